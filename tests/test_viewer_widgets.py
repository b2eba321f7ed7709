"""Viewer logic (windowing, orientation, measurements, cine) and widgets, headless."""

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PySide6.QtCore import QPoint, QPointF, Qt  # noqa: E402
from PySide6.QtGui import QImage, QWheelEvent  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from client import cine  # noqa: E402
from imaging import measure
from imaging import orientation
from imaging import windowing
from viewer.cinebar import CineBar  # noqa: E402
from imaging.model import DecodedImage, ImageMeta, SeriesInfo  # noqa: E402
from imaging.overlay import format_person_name  # noqa: E402
from viewer.progress import BytesBar, LevelBar, SeriesStrip, TransferLabel  # noqa: E402
from viewer.snapshot import render_view_to_image  # noqa: E402
from viewer.stackview import MouseMode, StackView  # noqa: E402
from client.transferstats import TransferRate, format_bytes  # noqa: E402
from imaging.viewstate import ViewState, nice_scale_bar  # noqa: E402
from waits import WAIT_MS  # noqa: E402

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


# ---------------------------------------------------------------------------- helpers
def make_meta(index=0, rows=64, columns=64, *, photometric="MONOCHROME2", spacing=(0.5, 0.5),
              iop=AXIAL, intercept=-1024.0, slope=1.0, modality="CT", window=(None, None)):
    return ImageMeta(
        index=index, sop_instance_uid=f"1.2.3.{index}", frame=0, rows=rows, columns=columns,
        samples_per_pixel=3 if photometric == "RGB" else 1, photometric=photometric,
        pixel_spacing=spacing, image_position=(0.0, 0.0, 2.5 * index), image_orientation=iop,
        slice_thickness=2.5, rescale_slope=slope, rescale_intercept=intercept,
        window_center=window[0], window_width=window[1], instance_number=index + 1, modality=modality,
    )


def make_series(n=3, **kw):
    return SeriesInfo(
        patient_name="DOE^Jane", patient_id="PID42", study_date="20240131", study_description="CT HEAD",
        series_description="Axial 2.5mm", modality="CT", series_uid="1.2.3", body_part="HEAD",
        images=[make_meta(i, **kw) for i in range(n)],
    )


def square_image(rows=64, columns=64, background=1024, value=1224):
    """Stored values: background 0 HU, a bright 16x16 square at rows 16-31, columns 32-47."""
    px = np.full((rows, columns), background, np.uint16)
    px[16:32, 32:48] = value
    return px


def red(image: QImage) -> np.ndarray:
    """Red channel of a QImage as an (H, W) uint8 array."""
    image = image.convertToFormat(QImage.Format.Format_RGB32)
    raw = np.frombuffer(image.constBits(), np.uint8).reshape(image.height(), image.bytesPerLine())
    return raw[:, : image.width() * 4].reshape(image.height(), image.width(), 4)[..., 2].copy()


@pytest.fixture
def view(qtbot):
    widget = StackView()
    qtbot.addWidget(widget)
    widget.resize(64, 64)
    widget.set_series(make_series())
    widget.set_overlays_visible(False)
    return widget


# ---------------------------------------------------------------------------- model
def test_image_meta_and_series_from_dicts():
    meta = ImageMeta.from_dict({
        "index": 4, "SOPInstanceUID": "1.2.840.9", "frame": 0, "Rows": 512, "Columns": 256,
        "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2",
        "PixelSpacing": [0.7, 0.35], "ImagePositionPatient": "-10\\20\\30.5",
        "ImageOrientationPatient": list(AXIAL), "SliceThickness": "1.25", "RescaleSlope": 1,
        "RescaleIntercept": -1024, "WindowCenter": [40, 400], "WindowWidth": [400, 2000],
        "InstanceNumber": "5",
    })
    assert meta.pixel_spacing == (0.7, 0.35) and meta.image_position == (-10.0, 20.0, 30.5)
    assert (meta.window_center, meta.window_width, meta.instance_number) == (40.0, 400.0, 5)
    assert meta.slice_location == pytest.approx(30.5) and meta.rescale_intercept == -1024.0
    bare = ImageMeta.from_dict({"index": 0, "SOPInstanceUID": "1", "Rows": 8, "Columns": 8})
    assert (bare.pixel_spacing, bare.image_orientation, bare.rescale_slope, bare.photometric) == (
        None, None, 1.0, "MONOCHROME2")
    series = SeriesInfo.from_dict({"PatientName": "DOE^Jane", "Modality": "CT", "SeriesInstanceUID": "9",
                                   "images": [{"index": 0, "SOPInstanceUID": "1", "Rows": 8, "Columns": 8}]})
    assert series.patient_name == "DOE^Jane" and series.images[0].modality == "CT"


# ---------------------------------------------------------------------------- windowing
def test_apply_window_matches_dicom_linear_function():
    # c=40, w=400: x <= -160 -> 0, x > 239 -> 255, else ((x - 39.5) / 399 + 0.5) * 255
    x = np.array([-1000, -160, -159, -60, 39.5, 140, 239, 240, 3000], np.float32)
    out = windowing.apply_window(x, 40, 400)
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 0, 1, 64, 128, 192, 255, 255, 255]
    assert windowing.apply_window(x, 40, 400, invert=True).tolist() == [255 - v for v in out.tolist()]
    # width 1 is a threshold at c - 0.5
    assert windowing.apply_window(np.array([-1, 0]), 0, 1).tolist() == [0, 255]


def test_modality_values_and_lut_path_agree():
    assert windowing.modality_values(np.array([1064], np.uint16), 1.0, -1024.0)[0] == 40.0
    rng = np.random.default_rng(0)
    stored = rng.integers(-2000, 3000, size=(40, 50)).astype(np.int16)
    direct = windowing.apply_window(windowing.modality_values(stored, 2.0, -10.0), 40, 400)
    assert np.array_equal(windowing.window_stored(stored, 40, 400, slope=2.0, intercept=-10.0), direct)


def test_presets_and_default_window():
    ct = {p.name: (p.center, p.width) for p in windowing.presets_for("CT")}
    assert ct["Brain"] == (40, 80) and ct["Soft tissue"] == (40, 400)
    assert ct["Lung"] == (-600, 1500) and ct["Bone"] == (400, 1800)
    assert "Abdomen" in ct and "Liver" in ct
    assert windowing.presets_for("MR") == ()
    assert windowing.find_preset("lung").center == -600
    with pytest.raises(KeyError, match="Brain"):
        windowing.find_preset("nope")
    # DICOM values first, then CT soft tissue, then the 1-99 % histogram window
    assert windowing.default_window(make_meta(window=(50.0, 350.0)), None) == (50.0, 350.0)
    assert windowing.default_window(make_meta(), None) == (40, 400)
    mr = make_meta(modality="MR", intercept=0.0)
    data = np.arange(1000, dtype=np.uint16).reshape(10, 100)
    center, width = windowing.default_window(mr, data, "MR")
    assert center == pytest.approx(499.5)
    assert width == pytest.approx(np.percentile(np.arange(1000), 99) - np.percentile(np.arange(1000), 1))


def test_monochrome1_inverts_and_rgb_passes_through():
    stored = np.array([[0, 1000]], np.uint16)
    m2 = make_meta(intercept=0.0, modality="CR")
    m1 = make_meta(intercept=0.0, modality="CR", photometric="MONOCHROME1")
    assert windowing.render_display(stored, m2, 500, 1000).tolist() == [[0, 255]]
    assert windowing.render_display(stored, m1, 500, 1000).tolist() == [[255, 0]]
    assert windowing.render_display(stored, m1, 500, 1000, invert=True).tolist() == [[0, 255]]
    rgb = np.arange(12, dtype=np.uint8).reshape(1, 4, 3)
    assert np.array_equal(windowing.render_display(rgb, make_meta(photometric="RGB"), 40, 1), rgb)


def test_drag_window_direction():
    c, w = windowing.drag_window(40, 400, dx=10, dy=-5, value_range=1024)
    assert (c, w) == (35, 410)
    assert windowing.drag_window(40, 2, dx=-100, dy=0, value_range=1024)[1] == windowing.MIN_WIDTH


# ---------------------------------------------------------------------------- orientation
def labels(iop, matrix=orientation.IDENTITY):
    e = orientation.edge_labels(iop, matrix)
    return (e.left, e.right, e.top, e.bottom)


def test_orientation_labels_standard_planes():
    assert labels(AXIAL) == ("R", "L", "A", "P")
    assert labels(CORONAL) == ("R", "L", "H", "F")
    assert labels(SAGITTAL) == ("A", "P", "H", "F")
    assert orientation.edge_labels(None) is None


def test_orientation_labels_oblique():
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    assert labels((c, s, 0, 0, 0, -1)) == ("RA", "LP", "H", "F")
    # a 5 degree tilt stays a plain label with the default threshold
    c5, s5 = math.cos(math.radians(5)), math.sin(math.radians(5))
    assert labels((c5, s5, 0, 0, 0, -1)) == ("R", "L", "H", "F")
    assert orientation.direction_label((0.6, 0.0, -0.8)) == "FL"


def test_orientation_labels_follow_rotation_and_flips():
    vm = orientation.view_matrix
    assert labels(AXIAL, vm(1)) == ("P", "A", "R", "L")  # 90 deg clockwise: anterior to the right
    assert labels(AXIAL, vm(-1)) == ("A", "P", "L", "R")
    assert labels(AXIAL, vm(4)) == labels(AXIAL)
    assert labels(AXIAL, vm(flip_h=True)) == ("L", "R", "A", "P")
    assert labels(AXIAL, vm(flip_v=True)) == ("R", "L", "P", "A")
    assert labels(AXIAL, vm(1, flip_h=True)) == ("A", "P", "R", "L")  # flip acts on the screen
    assert labels(SAGITTAL, vm(2)) == ("P", "A", "F", "H")
    # the view state composes the same way
    state = ViewState()
    state.rotate(1)
    state.flip_horizontal()
    assert state.matrix == vm(1, flip_h=True)


# ---------------------------------------------------------------------------- view geometry
def test_viewstate_mapping_fit_and_anisotropy():
    state = ViewState()
    state.set_viewport(200, 80)
    state.set_image(100, 100, aspect=0.5)  # rows half as tall as columns are wide: 100 x 50
    assert state.zoom == pytest.approx(1.6)
    assert state.to_screen(0, 0) == pytest.approx((20, 0))
    assert state.to_screen(100, 100) == pytest.approx((180, 80))
    assert state.to_image(*state.to_screen(12.5, 7.0)) == pytest.approx((12.5, 7.0))
    state.zoom_by(2, anchor=(10, 30))
    assert state.to_screen(*state.to_image(10, 30)) == pytest.approx((10, 30))
    assert not state.fit_mode
    full = ViewState(image_width=4096, image_height=4096)
    full.set_viewport(1024, 1024)
    assert full.useful_reduce() == 2


def test_scale_bar():
    length_mm, length_px, label = nice_scale_bar(pixels_per_mm=2.0, max_pixels=130)
    assert (length_mm, length_px, label) == (50, 100, "5 cm")
    assert nice_scale_bar(10.0, 55)[2] == "5 mm"


# ---------------------------------------------------------------------------- measurements
def test_distance_uses_row_then_column_spacing():
    spacing = (2.0, 0.5)  # row spacing 2 mm (vertical), column spacing 0.5 mm (horizontal)
    assert measure.distance((0, 0), (10, 0), spacing).length == pytest.approx(5.0)
    assert measure.distance((0, 0), (0, 10), spacing).length == pytest.approx(20.0)
    assert measure.distance((0, 0), (6, 4), spacing).length == pytest.approx(math.hypot(3, 8))
    assert str(measure.distance((0, 0), (3, 4), None)) == "5.0 px"


def roi_image():
    """Columns 10-19 of rows 10-29 at 40 HU, columns 20-29 at 60 HU, elsewhere 0 HU."""
    px = np.full((64, 64), 1024, np.uint16)
    px[10:30, 10:20] = 1064
    px[10:30, 20:30] = 1084
    return px


def test_rect_and_ellipse_roi_stats_with_anisotropic_spacing():
    meta = make_meta(spacing=(2.0, 0.5))
    full = DecodedImage(0, roi_image(), 4, 4, 0)
    stats = measure.roi_stats(full, meta, measure.MeasureKind.RECT, (10, 10), (30, 30))
    assert stats.mean == pytest.approx(50.0) and stats.sd == pytest.approx(10.0)
    assert (stats.minimum, stats.maximum, stats.n_pixels) == (40.0, 60.0, 400)
    assert stats.area == pytest.approx(20 * 20 * 1.0) and stats.area_unit == "mm²" and stats.unit == "HU"
    ellipse = measure.roi_stats(full, meta, measure.MeasureKind.ELLIPSE, (10, 10), (20, 30))
    assert ellipse.mean == pytest.approx(40.0) and ellipse.sd == 0.0
    assert ellipse.area == pytest.approx(math.pi * 5 * 10 * 1.0)
    # the same ROI on a half-resolution decode reads the covering pixels
    half = DecodedImage(0, roi_image()[::2, ::2], 2, 4, 1)
    low = measure.roi_stats(half, meta, measure.MeasureKind.RECT, (10, 10), (30, 30))
    assert low.mean == pytest.approx(50.0) and low.sd == pytest.approx(10.0) and low.n_pixels == 100
    assert low.area == stats.area


def test_value_under_cursor_in_hu_at_any_resolution():
    meta = make_meta(rows=8, columns=8)
    px = np.full((8, 8), 1024, np.uint16)
    px[0:4, 4:8] = 1064
    full = DecodedImage(0, px, 4, 4, 0)
    assert measure.value_at(full, meta, 5.5, 1.5) == (1064.0, 40.0, "HU")
    reduced = DecodedImage(0, px[::4, ::4].copy(), 1, 4, 2)  # 2x2 pixels of 4x4 full-res each
    assert reduced.grid(meta).sx == 4
    assert measure.value_at(reduced, meta, 7.9, 3.9) == (1064.0, 40.0, "HU")
    assert measure.value_at(reduced, meta, 3.9, 3.9).modality_value == 0.0
    assert measure.value_at(reduced, meta, 8.0, 0.0) is None
    # odd sizes: 7 rows at reduce 1 give ceil(7/2) = 4
    odd = DecodedImage(0, np.zeros((4, 4), np.uint16), 1, 4, 1)
    assert odd.grid(make_meta(rows=7, columns=7)).sy == 2
    # a region patch answers only inside its rectangle
    patch = DecodedImage(0, np.full((2, 2), 1074, np.uint16), 4, 4, 0, region=(2, 2, 2, 2))
    assert measure.value_at(patch, meta, 3, 3).modality_value == 50.0
    assert measure.value_at(patch, meta, 1, 1) is None
    # non-CT without rescale type: no unit
    mr = make_meta(rows=8, columns=8, modality="MR", intercept=0.0)
    assert measure.value_at(full, mr, 0, 0) == (1024.0, 1024.0, "")


# ---------------------------------------------------------------------------- cine
def test_next_frame_loop_and_bounce():
    idx, d, seq = 0, 1, []
    for _ in range(7):
        idx, d = cine.next_frame(idx, 4, cine.CineMode.BOUNCE, d)
        seq.append(idx)
    assert seq == [1, 2, 3, 2, 1, 0, 1]
    assert cine.next_frame(3, 4, cine.CineMode.LOOP) == (0, 1)
    assert cine.next_frame(0, 1, cine.CineMode.BOUNCE) == (0, 1)


def test_consistent_level_is_the_minimum():
    assert cine.common_level([3, 2, 4]) == 2
    assert cine.common_level([(2, 3), (3, 1), (1, 4)]) == (1, 1)
    assert cine.common_level([3, None]) is None and cine.common_level([]) is None
    levels = [3, 2, 4]
    calls = []

    def image_at(index, level):
        calls.append((index, level))
        return f"img{index}@{level}"

    ctl = cine.CineController(count=3, fps=25, consistent=True, image_at=image_at, levels=lambda: levels)
    assert ctl.interval_ms == 40
    frame = ctl.step()
    assert (frame.index, frame.level, frame.image) == (1, 2, "img1@2")
    levels[1] = None  # a slice lost its data: playback waits
    assert ctl.step() is None and ctl.current == 1
    levels[1] = 3
    assert ctl.step().index == 2 and calls[-1] == (2, 3)


# ---------------------------------------------------------------------------- StackView
def test_stackview_draws_windowed_pixels_and_invert(view):
    meta = view.series().images[0]
    px = square_image()
    assert view.set_image(DecodedImage(0, px, 4, 4, 0), meta)
    view.set_window(40, 400)
    expected = windowing.render_display(px, meta, 40, 400)
    shot = red(view.grab().toImage())
    assert np.array_equal(shot, expected)
    assert shot[24, 40] > 200 and shot[5, 5] == 102  # bright square where it belongs, 0 HU grey
    view.set_invert(True)
    assert np.array_equal(red(view.grab().toImage()), 255 - expected)


def test_stackview_rotate_and_flip_move_the_picture(view):
    meta = view.series().images[0]
    view.set_image(DecodedImage(0, square_image(), 4, 4, 0), meta)
    view.set_window(40, 400)
    bright = windowing.apply_window(np.array([200.0]), 40, 400)[0]
    assert red(view.grab().toImage())[24, 40] == bright  # square centre: image (x 40, y 24)
    view.rotate(1)  # clockwise: image (x, y) -> screen (64 - y, x)
    shot = red(view.grab().toImage())
    assert shot[40, 40] == bright and shot[24, 40] == 102
    view.rotate(-1)
    view.flip_horizontal()  # screen (64 - x, y)
    shot = red(view.grab().toImage())
    assert shot[24, 24] == bright and shot[24, 40] == 102
    view.reset_view()                  # back to the image's initial window (windowing.initial_window)
    c, w = windowing.default_window(meta, square_image(), "CT")
    assert red(view.grab().toImage())[24, 40] == windowing.apply_window(np.array([200.0]), c, w)[0]


def test_stackview_geometry_same_for_low_and_full_resolution(view):
    view.resize(200, 120)
    meta = view.series().images[0]
    px = square_image()
    view.set_image(DecodedImage(0, px, 4, 4, 0), meta)
    view.set_window(40, 400)
    full = red(view.grab().toImage())
    view.set_image(DecodedImage(0, px[::4, ::4].copy(), 1, 4, 2), meta)
    low = red(view.grab().toImage())

    def bbox(a):
        ys, xs = np.nonzero(a)
        return ys.min(), ys.max(), xs.min(), xs.max()

    assert bbox(full) == bbox(low) == (0, 119, 40, 159)  # 64x64 fitted into 120x120, centred
    sx, sy = view.image_to_widget(40, 24).toTuple()  # centre of the square
    bright = windowing.apply_window(np.array([200.0]), 40, 400)[0]  # the square: 200 HU
    assert full[int(sy), int(sx)] == low[int(sy), int(sx)] == bright
    assert view.display_zoom() == pytest.approx(120 / 64)


def test_stackview_region_patch_drawn_over_base(view):
    meta = view.series().images[0]
    base = np.full((64, 64), 1024, np.uint16)
    view.set_image(DecodedImage(0, base[::4, ::4].copy(), 1, 4, 2), meta)
    view.set_window(40, 400)
    patch = DecodedImage(0, np.full((8, 8), 1424, np.uint16), 4, 4, 0, region=(8, 8, 8, 8))
    view.set_image(patch, meta)
    shot = red(view.grab().toImage())
    assert (shot[8:16, 8:16] == 255).all() and shot[20, 20] == 102
    assert len(view.patches()) == 1


def test_stackview_refuses_images_of_another_series(view):
    stranger = make_meta(0)
    stranger.sop_instance_uid = "9.9.9"
    assert not view.set_image(DecodedImage(0, square_image(), 4, 4, 0), stranger)
    assert view.decoded() is None


def test_wheel_and_keys_request_slices(view, qtbot):
    view.set_image(DecodedImage(0, square_image(), 4, 4, 0), view.series().images[0])

    def wheel(dy):
        event = QWheelEvent(QPointF(30, 30), QPointF(30, 30), QPoint(0, 0), QPoint(0, dy),
                            Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier,
                            Qt.ScrollPhase.NoScrollPhase, False)
        QApplication.sendEvent(view, event)

    with qtbot.waitSignal(view.sliceRequested, timeout=WAIT_MS) as blocker:
        wheel(-120)
    assert blocker.args == [1]
    with qtbot.waitSignal(view.sliceRequested, timeout=WAIT_MS) as blocker:
        wheel(-120)  # continues from the requested slice, not the displayed one
    assert blocker.args == [2]
    with qtbot.assertNotEmitted(view.sliceRequested):
        wheel(-120)  # already at the last slice
    with qtbot.waitSignal(view.sliceRequested, timeout=WAIT_MS) as blocker:
        qtbot.keyClick(view, Qt.Key.Key_Home)
    assert blocker.args == [0]
    with qtbot.waitSignal(view.sliceRequested, timeout=WAIT_MS) as blocker:
        qtbot.keyClick(view, Qt.Key.Key_End)
    assert blocker.args == [2]


def test_region_mode_emits_full_resolution_rectangle(view, qtbot):
    view.resize(128, 128)  # 64x64 image at zoom 2
    meta = view.series().images[0]
    view.set_image(DecodedImage(0, square_image()[::4, ::4].copy(), 1, 4, 2), meta)
    view.set_mouse_mode(MouseMode.REGION)
    with qtbot.waitSignal(view.regionRequested, timeout=WAIT_MS) as blocker:
        qtbot.mousePress(view, Qt.MouseButton.LeftButton, pos=QPoint(20, 20))
        qtbot.mouseMove(view, QPoint(40, 30))
        qtbot.mouseRelease(view, Qt.MouseButton.LeftButton, pos=QPoint(60, 40))
    assert blocker.args == [10, 10, 20, 10]


def test_distance_and_roi_tools(view, qtbot):
    meta = view.series().images[0]
    view.set_image(DecodedImage(0, roi_image(), 4, 4, 0), meta)
    view.set_mouse_mode(MouseMode.DISTANCE)
    qtbot.mousePress(view, Qt.MouseButton.LeftButton, pos=QPoint(10, 10))
    qtbot.mouseRelease(view, Qt.MouseButton.LeftButton, pos=QPoint(50, 10))
    view.set_mouse_mode(MouseMode.RECT_ROI)
    qtbot.mousePress(view, Qt.MouseButton.LeftButton, pos=QPoint(10, 10))
    qtbot.mouseRelease(view, Qt.MouseButton.LeftButton, pos=QPoint(30, 30))
    line, rect = view.measurements()
    assert view.measurement_text(line) == ["20.0 mm"]  # 40 px x 0.5 mm
    assert view.measurement_text(rect)[0].startswith("Mean 50.0 HU  SD 10.0")
    assert view.measurement_text(rect)[2] == "Area 100.0 mm²"
    view.grab()  # draws measurements without error


def test_window_level_drag_and_zoom_drag(view, qtbot):
    view.set_image(DecodedImage(0, square_image(), 4, 4, 0), view.series().images[0])
    c, w = view.window()
    with qtbot.waitSignal(view.viewStateChanged, timeout=WAIT_MS):
        qtbot.mousePress(view, Qt.MouseButton.LeftButton, pos=QPoint(10, 10))
        qtbot.mouseMove(view, QPoint(30, 10))
        qtbot.mouseRelease(view, Qt.MouseButton.LeftButton, pos=QPoint(30, 10))
    assert view.window()[1] > w and view.window()[0] == c
    zoom = view.display_zoom()
    view.zoom_by(2.0)
    assert view.display_zoom() == pytest.approx(2 * zoom)
    view.fit()
    assert view.display_zoom() == pytest.approx(zoom)


def test_overlay_text(view):
    meta = view.series().images[1]
    view.set_image(DecodedImage(1, square_image()[::2, ::2].copy(), 2, 4, 1), meta)
    view.set_window(40, 400)
    text = view.overlay_text()
    assert format_person_name("DOE^Jane") == "DOE, Jane"
    for expected in ("DOE, Jane", "PID42", "2024-01-31", "Axial 2.5mm", "Im: 2 / 3", "Pos: 2.5 mm",
                     "W 400 L 40", "L 2/4", "32×32 (1/2)"):
        assert expected in text
    assert view.orientation_labels().right == "L"
    view.rotate(1)
    assert view.orientation_labels().right == "A"
    view.set_overlays_visible(True)
    view.resize(256, 256)
    view.grab()  # paints overlays (text, labels, scale bar) without error


def test_cursor_value_in_hu(view, qtbot):
    meta = view.series().images[0]
    view.set_image(DecodedImage(0, square_image()[::4, ::4].copy(), 1, 4, 2), meta)
    view.show()
    qtbot.waitExposed(view)
    qtbot.mouseMove(view, QPoint(40, 20))
    x, y, value = view.cursor_value()
    assert (int(x), int(y)) == (40, 20)
    assert value == (1224.0, 200.0, "HU")
    assert "200 HU (1224)" in view.overlay_text()


def test_displayed_size_changed_on_resize(view, qtbot):
    with qtbot.waitSignal(view.displayedSizeChanged, timeout=WAIT_MS) as blocker:
        view.resize(300, 200)
        view.show()
    assert blocker.args == [300, 200]


# ---------------------------------------------------------------------------- progress widgets
def test_level_and_bytes_bars(qtbot):
    bar = LevelBar()
    qtbot.addWidget(bar)
    bar.resize(100, 16)
    bar.set_levels(1, 3, 4)
    assert bar.levels() == (1, 3, 4) and bar.fractions() == (0.25, 0.75)
    assert bar.text() == "Quality 1 / 3 (max 4)"
    shot = bar.grab().toImage()
    reached, requested, empty = (shot.pixelColor(x, 2) for x in (10, 50, 95))
    assert len({reached.rgb(), requested.rgb(), empty.rgb()}) == 3
    bytes_bar = BytesBar()
    qtbot.addWidget(bytes_bar)
    bytes_bar.set_bytes(1500, 3_000_000, 10_000_000)
    assert bytes_bar.byte_counts() == (1500, 3_000_000, 10_000_000)
    assert bytes_bar.text() == "1.5 kB / 3.0 MB (of 10.0 MB)"
    assert format_bytes(999) == "999 B" and format_bytes(250_000_000) == "250 MB"


def test_series_strip_levels_current_and_click(qtbot):
    strip = SeriesStrip()
    qtbot.addWidget(strip)
    strip.resize(100, 12)
    strip.set_count(10)
    strip.set_levels([4, 4, 2, None, 0, 1, 1, 1, 1, 3], maximum=4)
    strip.set_current(2)
    shot = strip.grab().toImage()
    assert shot.pixelColor(5, 6) != shot.pixelColor(35, 6)  # level 4 vs nothing
    with qtbot.waitSignal(strip.sliceClicked, timeout=WAIT_MS) as blocker:
        qtbot.mouseClick(strip, Qt.MouseButton.LeftButton, pos=QPoint(73, 6))
    assert blocker.args == [7]
    strip.set_level(3, 2)
    assert strip.levels()[3] == 2 and strip.current() == 2


def test_transfer_label_speed_and_time_left(qtbot):
    label = TransferLabel()
    qtbot.addWidget(label)
    label.update_transfer(0, 1_000_000, 2_000_000, 0.0)
    label.update_transfer(500_000, 1_000_000, 2_000_000, 1.0)
    snap = label.snapshot()
    assert snap.speed == pytest.approx(500_000) and snap.time_left_s == pytest.approx(1.0)
    assert label.text() == "500 kB / 1.0 MB (of 2.0 MB) · 500 kB/s · 1 s left"
    rate = TransferRate(window_s=2.0)
    for t in range(6):  # speed follows the recent window: 100 kB/s then 300 kB/s
        rate.update(t * 100_000 if t <= 3 else 300_000 + (t - 3) * 300_000, 10**7, 10**7, float(t))
    assert rate.update(1_200_000, 10**7, 10**7, 6.0).speed == pytest.approx(300_000)


# ---------------------------------------------------------------------------- cine bar
def test_cine_bar_plays_and_honours_consistent_mode(qtbot):
    bar = CineBar()
    qtbot.addWidget(bar)
    bar.set_count(3)
    bar.set_fps(100)
    assert bar.controller.interval_ms == 10
    frames = []
    bar.frameChanged.connect(lambda i, level, image: frames.append((i, level, image)))
    bar.set_sources(lambda i, level: (i, level), lambda: [2, 1, 3])
    bar.set_consistent(True)
    bar.set_mode("bounce")
    with qtbot.waitSignal(bar.playingChanged, timeout=WAIT_MS):
        bar.play()
    qtbot.waitUntil(lambda: len(frames) >= 4, timeout=WAIT_MS)
    bar.pause()
    assert not bar.is_playing()
    assert [f[0] for f in frames[:4]] == [1, 2, 1, 0]
    assert all(level == 1 and image == (i, 1) for i, level, image in frames)


# ---------------------------------------------------------------------------- snapshot
def test_snapshot_pixels_match_windowed_data(qtbot):
    series = make_series()
    meta = series.images[0]
    px = square_image()
    decoded = DecodedImage(0, px, 4, 4, 0)
    image = render_view_to_image(series, meta, decoded, window=(40, 400), size=(64, 64), overlays=False)
    assert (image.width(), image.height()) == (64, 64)
    assert np.array_equal(red(image), windowing.render_display(px, meta, 40, 400))
    # with overlays and a larger canvas the image part still shows the data, upscaled
    big = red(render_view_to_image(series, meta, decoded, window=(1000, 400), size=(256, 256)))
    assert big[4 * 24, 4 * 40] == 0 and big[4 * 40, 4 * 20] == 0  # below the window: black
    light = red(render_view_to_image(series, meta, decoded, window=(40, 400), size=(256, 256)))
    assert light[4 * 24, 4 * 40] == windowing.apply_window(np.array([200.0]), 40, 400)[0]
    assert light[4 * 40, 4 * 20] == 102
