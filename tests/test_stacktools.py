"""The stack view's tools (viewer/stacktools.py) driven by real Qt events, and the Qt-free
view maths they use (imaging: region_between, rect_covers, label_origin, value_under,
SeriesInfo.lists)."""

import math
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PySide6.QtCore import QPoint, QPointF, Qt  # noqa: E402
from PySide6.QtGui import QWheelEvent  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from imaging.measure import value_under  # noqa: E402
from imaging.model import DecodedImage, ImageMeta, SeriesInfo  # noqa: E402
from imaging.overlay import label_origin  # noqa: E402
from imaging.viewstate import rect_covers, region_between  # noqa: E402
from viewer.stackview import MouseMode, StackView  # noqa: E402

L, M, R = Qt.MouseButton.LeftButton, Qt.MouseButton.MiddleButton, Qt.MouseButton.RightButton


def meta(index=0, rows=64, columns=64, uid=None):
    return ImageMeta(index=index, sop_instance_uid=uid or f"1.2.{index}", frame=0, rows=rows, columns=columns,
                     samples_per_pixel=1, photometric="MONOCHROME2", pixel_spacing=(0.5, 0.5),
                     image_position=(0.0, 0.0, 2.5 * index), image_orientation=(1, 0, 0, 0, 1, 0), slice_thickness=2.5,
                     rescale_slope=1.0, rescale_intercept=-1024.0, modality="CT")


def series(n=3):
    return SeriesInfo(modality="CT", series_uid="1.2", images=[meta(i) for i in range(n)])


@pytest.fixture
def view(qtbot):
    widget = StackView()
    qtbot.addWidget(widget)
    widget.resize(128, 128)                   # a 64 x 64 image fitted at zoom 2
    widget.set_series(series())
    px = np.full((64, 64), 1024, np.uint16)
    px[:, 32:] = 2048                         # value range 1024 (0 .. 1024 HU)
    widget.set_image(DecodedImage(0, px, 4, 4, 0), widget.series().images[0])
    widget.set_overlays_visible(False)
    return widget


def drag(qtbot, view, button, a, b):
    qtbot.mousePress(view, button, pos=QPoint(*a))
    qtbot.mouseMove(view, QPoint(*b))
    qtbot.mouseRelease(view, button, pos=QPoint(*b))


# ---------------------------------------------------------------------------- Qt-free maths
def test_region_between_clips_to_the_image_and_rect_covers():
    assert region_between((10.4, 20.6), (3.2, 5.0), 64, 64) == (3, 5, 8, 16)   # any corner order
    assert region_between((-5, -5), (10.5, 70), 64, 64) == (0, 0, 11, 64)
    assert region_between((70, 10), (80, 20), 64, 64) is None                   # wholly outside
    assert rect_covers((0, 0, 10, 10), (2, 2, 8, 8)) and not rect_covers((0, 0, 10, 10), (2, 2, 9, 8))
    assert not rect_covers(None, (0, 0, 1, 1)) and not rect_covers((0, 0, 1, 1), None)


def test_label_origin_right_of_the_shape_else_left_and_inside_the_view():
    assert label_origin((10, 30), (40, 20), (50, 12), (200, 100)) == (46, 20)   # right, top of shape
    assert label_origin((150, 30), (180, 20), (50, 12), (200, 100)) == (94, 20)  # no room: left side
    x, y = label_origin((5, 95), (20, 99), (50, 12), (60, 100))                # no room either side
    assert (x, y) == (2, 86)                                                     # kept inside


def test_series_lists_only_its_own_images():
    s = series(2)
    assert s.lists(meta(1)) and not s.lists(meta(1, uid="9.9")) and not s.lists(meta(2))
    assert SeriesInfo().lists(meta(5))                                           # lists none: any


def test_value_under_reads_the_finest_source_holding_the_point():
    m = meta()
    base = DecodedImage(0, np.full((16, 16), 1024, np.uint16), 1, 4, 2)          # quarter resolution
    patch = DecodedImage(0, np.full((8, 8), 1124, np.uint16), 4, 4, 0, region=(8, 8, 8, 8))
    assert value_under([base, patch], m, 10.5, 10.5, "CT").modality_value == 100.0        # in the patch
    assert value_under([base, patch], m, 40.5, 40.5, "CT").modality_value == 0.0          # base only
    assert value_under([base, patch], m, 70.0, 1.0, "CT") is None


# ---------------------------------------------------------------------------- tools via events
def test_middle_drag_pans_with_the_mouse(view, qtbot):
    before = view.widget_to_image(QPointF(40, 40))
    drag(qtbot, view, M, (40, 40), (70, 50))
    assert view.widget_to_image(QPointF(70, 50)) == pytest.approx(before)     # the point followed
    assert view.snapshot().pan == (30.0, 10.0) and not view.snapshot().fit


def test_right_drag_zooms_around_the_pressed_point(view, qtbot):
    anchor = view.widget_to_image(QPointF(30, 90))
    drag(qtbot, view, R, (30, 90), (30, 40))                                    # 50 px up: zoom in
    assert view.snapshot().zoom == pytest.approx(2.0 * math.exp(0.5))
    assert view.widget_to_image(QPointF(30, 90)) == pytest.approx(anchor)
    qtbot.mouseDClick(view, L, pos=QPoint(64, 64))                            # double click fits
    assert view.snapshot().fit and view.snapshot().zoom == pytest.approx(2.0)


def test_left_drag_windows_by_the_value_range(view, qtbot):
    view.set_window(100, 400)
    step = view.value_range() / 1024.0
    assert step == pytest.approx(1.0)
    drag(qtbot, view, L, (20, 20), (60, 30))                                    # right: wider, down: higher
    assert view.window() == pytest.approx((110.0, 440.0))


def test_ctrl_wheel_zooms_and_wheel_scrolls_by_whole_notches(view, qtbot):
    def wheel(dy, mods=Qt.KeyboardModifier.NoModifier):
        QApplication.sendEvent(view, QWheelEvent(QPointF(32, 32), QPointF(32, 32), QPoint(0, 0), QPoint(0, dy),
                                                 Qt.MouseButton.NoButton, mods, Qt.ScrollPhase.NoScrollPhase, False))

    anchor = view.widget_to_image(QPointF(32, 32))
    wheel(120, Qt.KeyboardModifier.ControlModifier)
    assert view.snapshot().zoom == pytest.approx(2.0 * 1.15)
    assert view.widget_to_image(QPointF(32, 32)) == pytest.approx(anchor)
    asked = []
    view.sliceRequested.connect(asked.append)
    wheel(-60)                                                                  # half a notch: nothing yet
    assert asked == []
    wheel(-60)
    assert asked == [1]


def test_shapes_need_a_real_drag_and_escape_abandons_one(view, qtbot):
    view.set_mouse_mode(MouseMode.RECT_ROI)
    drag(qtbot, view, L, (20, 20), (21, 21))                                    # under 3 px: no shape
    assert view.measurements() == []
    qtbot.mousePress(view, L, pos=QPoint(20, 20))
    qtbot.mouseMove(view, QPoint(80, 80))
    qtbot.keyClick(view, Qt.Key.Key_Escape)
    qtbot.mouseRelease(view, L, pos=QPoint(80, 80))
    assert view.measurements() == []
    view.zoom_by(2.0)
    qtbot.mouseDClick(view, L, pos=QPoint(64, 64))                            # drawing tools do not fit
    qtbot.mouseRelease(view, L, pos=QPoint(64, 64))                           # (Qt ends a double click so)
    assert not view.snapshot().fit and view.measurements() == []
    drag(qtbot, view, L, (20, 20), (80, 60))
    (m,) = view.measurements()
    assert m.p0 == pytest.approx(view.widget_to_image(QPointF(20, 20)))
    qtbot.keyClick(view, Qt.Key.Key_Delete)
    assert view.measurements() == []


def test_view_keys(view, qtbot):
    for key in (Qt.Key.Key_I, Qt.Key.Key_R, Qt.Key.Key_H):
        qtbot.keyClick(view, key)
    snap = view.snapshot()
    assert snap.invert and snap.matrix == (0, 1, 1, 0)                          # rotated, then mirrored
    qtbot.keyClick(view, Qt.Key.Key_1)
    assert view.display_zoom() == pytest.approx(1.0)
    qtbot.keyClick(view, Qt.Key.Key_0)
    snap = view.snapshot()
    assert not snap.invert and snap.matrix == (1, 0, 0, 1) and snap.fit


def test_restore_takes_over_a_snapshot(view, qtbot):
    view.set_window(300, 900)
    view.set_invert(True)
    view.rotate(1)
    view.zoom_by(1.5, QPointF(20, 30))
    snap = view.snapshot()
    other = StackView()
    qtbot.addWidget(other)
    other.resize(128, 128)
    other.set_series(view.series())
    other.set_image(view.decoded(), view.meta())
    other.set_overlays_visible(False)
    other.restore(snap)
    assert other.snapshot() == snap
    assert other.grab().toImage() == view.grab().toImage()
