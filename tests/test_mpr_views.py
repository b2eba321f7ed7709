"""MPR and VR panes headless: layout 2x2/1x1, crosshair rotation, scrolling, shared window,
measurements in mm, slabs, the VR pane offscreen, progressive redraws from the server."""
from __future__ import annotations

import math
import os
import re

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PySide6.QtCore import QPoint, QPointF, Qt  # noqa: E402

from viewer.mprlayout import MprLayout, describe_series, open_folder, open_series  # noqa: E402
from viewer.mprview import MprView, ResliceScheduler, Tool  # noqa: E402
from imaging.volume import SliceGeometry, Volume, volume_for_slices  # noqa: E402
from waits import WAIT_MS, WAIT_S  # noqa: E402

CENTER = np.array([2.0, -3.0, 1.0])
RADIUS = 12.0


def sphere_volume(n=40, size=64, spacing=0.8, step=1.6) -> Volume:
    half = (size - 1) / 2 * spacing
    sl = [SliceGeometry((-half, -half, -(n - 1) / 2 * step + k * step), (1, 0, 0, 0, 1, 0),
                        (spacing, spacing), size, size, step) for k in range(n)]
    vol, _ = volume_for_slices(sl, [(1.0, -1024.0)] * n, (0, 4095), modality="CT")
    nz, ny, nx = vol.shape
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    p = vol.geometry.index_to_patient(np.stack([x, y, z], -1).astype(float))
    r = np.linalg.norm(p - CENTER, axis=-1)
    # a ball with a 2 mm edge ramp: 0 HU exactly at the radius
    vol.data[...] = np.rint(np.clip((RADIUS - r) / 2.0 + 0.5, 0, 1) * 2000 - 1000).astype(np.int16)
    vol.own[:] = 1
    return vol


@pytest.fixture
def layout(qtbot):
    lay = MprLayout(sphere_volume(), sync=True)
    qtbot.addWidget(lay)
    lay.resize(640, 520)
    lay.show()
    qtbot.waitExposed(lay)
    yield lay
    lay.close_layout()


def _disc(view: MprView) -> tuple[float, float, float]:
    """(area-equivalent radius in mm, x, y centre in widget pixels) of the bright disc."""
    vals = view.values()
    mask = np.nan_to_num(vals) > 0
    ys, xs = np.nonzero(mask)
    plane = view.plane()
    r = math.sqrt(mask.sum() * plane.spacing ** 2 / math.pi)
    sx = view.width() / plane.shape[1]
    sy = view.height() / plane.shape[0]
    return r, (xs.mean() + 0.5) * sx, (ys.mean() + 0.5) * sy


def test_three_planes_and_vr_in_2x2_and_maximise_by_double_click(layout, qtbot):
    assert layout.layout_name() == "2x2"
    assert all(w.isVisible() for w in layout.panes.values())
    for name, v in layout.views.items():
        assert v.values() is not None, name
    qtbot.mouseDClick(layout.views["coronal"], Qt.MouseButton.LeftButton, pos=QPoint(20, 20))
    assert layout.layout_name() == "coronal"
    assert [n for n, w in layout.panes.items() if w.isVisible()] == ["coronal"]
    qtbot.mouseDClick(layout.views["coronal"], Qt.MouseButton.LeftButton, pos=QPoint(20, 20))
    assert layout.layout_name() == "2x2"
    if layout.vr is not None and layout.vr._canvas is not None:
        qtbot.mouseDClick(layout.vr._canvas, Qt.MouseButton.LeftButton, pos=QPoint(10, 10))
        assert layout.layout_name() == "vr"
        layout.toggle_maximise("vr")
        assert layout.layout_name() == "2x2"


def test_crosshair_centre_sphere_round_and_labels(layout, qtbot):
    layout.state.set_center(CENTER)
    for name, v in layout.views.items():
        r, x, y = _disc(v)
        assert r == pytest.approx(RADIUS, rel=0.05), name
        c = v.center_on_screen()
        assert (x, y) == pytest.approx((c.x(), c.y()), abs=2.0), name
        lab = v.overlay_lines()["labels"]
        assert lab == {"axial": ["R", "L", "A", "P"], "coronal": ["R", "L", "H", "F"],
                       "sagittal": ["A", "P", "H", "F"]}[name]


def test_dragging_a_crosshair_line_rotates_the_other_planes(layout, qtbot):
    ax = layout.views["axial"]
    layout.state.set_center(CENTER)
    c = ax.center_on_screen()
    # grab the coronal line (horizontal) 60 px right of the centre, drag it down: clockwise
    start = QPoint(int(c.x() + 60), int(c.y()))
    qtbot.mousePress(ax, Qt.MouseButton.LeftButton, pos=start)
    end = QPointF(c.x() + 60 * math.cos(math.radians(30)), c.y() + 60 * math.sin(math.radians(30)))
    from PySide6.QtGui import QMouseEvent
    from PySide6.QtCore import QEvent
    move = QMouseEvent(QEvent.Type.MouseMove, end, end, Qt.MouseButton.NoButton,
                       Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier)
    QApplication_send(ax, move)
    qtbot.mouseRelease(ax, Qt.MouseButton.LeftButton, pos=end.toPoint())
    # the coronal plane turned ~30 degrees about the head axis; the axial one did not
    n = layout.state.normal("coronal")
    assert math.degrees(math.acos(abs(n @ np.array([0, 1.0, 0])))) == pytest.approx(30, abs=2)
    np.testing.assert_allclose(layout.state.normal("axial"), [0, 0, 1], atol=1e-9)
    assert layout.state.is_oblique("coronal") and layout.state.is_oblique("sagittal")
    cor = layout.views["coronal"].overlay_lines()
    assert "oblique" in cor["top_left"][0].lower()
    assert len(cor["labels"][0]) == 2                      # e.g. "RA": an oblique edge
    # the sphere stays round in the oblique planes
    for name in ("coronal", "sagittal"):
        r, _, _ = _disc(layout.views[name])
        assert r == pytest.approx(RADIUS, rel=0.05)


def QApplication_send(widget, event):
    from PySide6.QtWidgets import QApplication
    QApplication.sendEvent(widget, event)


def test_wheel_scrolls_one_voxel_along_the_normal(layout, qtbot):
    from PySide6.QtGui import QWheelEvent

    sag = layout.views["sagittal"]
    before = layout.state.center.copy()
    pos = QPointF(50, 50)
    ev = QWheelEvent(pos, sag.mapToGlobal(pos), QPoint(0, 0), QPoint(0, 120), Qt.MouseButton.NoButton,
                     Qt.KeyboardModifier.NoModifier, Qt.ScrollPhase.NoScrollPhase, False)
    QApplication_send(sag, ev)
    step = layout.state.center - before
    np.testing.assert_allclose(step, 0.8 * layout.state.normal("sagittal"), atol=1e-9)
    qtbot.keyClick(layout.views["axial"], Qt.Key.Key_Up)
    assert (layout.state.center - before)[2] == pytest.approx(1.6)


def test_shared_window_and_slab(layout, qtbot):
    layout.set_tool(Tool.WINDOW)
    cor = layout.views["coronal"]
    w0 = layout.state.window
    qtbot.mousePress(cor, Qt.MouseButton.LeftButton, pos=QPoint(100, 100))
    from PySide6.QtGui import QMouseEvent
    from PySide6.QtCore import QEvent
    p = QPointF(160, 130)
    QApplication_send(cor, QMouseEvent(QEvent.Type.MouseMove, p, p, Qt.MouseButton.NoButton,
                                       Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier))
    qtbot.mouseRelease(cor, Qt.MouseButton.LeftButton, pos=p.toPoint())
    assert layout.state.window != w0
    assert all(v.overlay_lines()["bottom_left"] == cor.overlay_lines()["bottom_left"]
               for v in layout.views.values())
    # a slab above the sphere shows nothing thin but the MIP reaches it
    layout.state.set_center(CENTER + np.array([0, 0, RADIUS + 3.0]))
    assert np.nanmax(layout.views["axial"].values()) < 0
    layout.set_slab(12.0, "mip")
    assert "MIP 12.0 mm" in layout.views["axial"].overlay_lines()["top_left"]
    assert np.nanmax(layout.views["axial"].values()) > 500
    layout.set_slab(12.0, None)
    assert layout.state.slab == 0


def test_distance_measurement_in_mm(layout, qtbot):
    layout.set_tool(Tool.DISTANCE)
    ax = layout.views["axial"]
    a, b = QPoint(40, 60), QPoint(160, 60)
    qtbot.mousePress(ax, Qt.MouseButton.LeftButton, pos=a)
    qtbot.mouseRelease(ax, Qt.MouseButton.LeftButton, pos=b)
    assert len(ax.measurements) == 1
    m = ax.measurements[0]
    plane = ax.plane()
    mm_per_px = plane.spacing * plane.shape[1] / ax.width()
    assert m.length == pytest.approx(120 * mm_per_px, rel=1e-3)
    # measured in patient space: the points lie in the axial plane through the centre
    assert m.p0[2] == pytest.approx(layout.state.center[2]) and m.p1[2] == pytest.approx(m.p0[2])


def test_vr_pane_offscreen_presets_and_interaction(layout, qtbot):
    vr = layout.vr
    if vr is None or vr.scene is None:
        pytest.skip(f"no offscreen OpenGL: {vr.message if vr else ''}")
    if vr.backend != "image":
        pytest.skip("the image-mode pane is used on the offscreen platform only")
    vr.render_now()
    img = vr.grab_array()
    h, w, _ = img.shape
    assert img[h // 2, w // 2].max() > 100 and img[2, 2].max() < 10        # the ball, black around
    count = vr.render_count
    canvas = vr._canvas
    qtbot.mousePress(canvas, Qt.MouseButton.LeftButton, pos=QPoint(w // 2, h // 2))
    assert vr.scene.interactive                            # coarse sampling while dragging
    from PySide6.QtGui import QMouseEvent
    from PySide6.QtCore import QEvent
    p = QPointF(w // 2 + 40, h // 2)
    QApplication_send(canvas, QMouseEvent(QEvent.Type.MouseMove, p, p, Qt.MouseButton.NoButton,
                                          Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier))
    vr.render_now()
    assert vr.render_count > count
    qtbot.mouseRelease(canvas, Qt.MouseButton.LeftButton, pos=p.toPoint())
    assert not vr.scene.interactive
    layout.vr_box.setCurrentText("MIP")
    vr.render_now()
    assert vr.scene.preset.name == "MIP" and vr.scene.preset.blend == "mip"
    mip = vr.grab_array()
    assert mip.max() > 200
    layout.clip_box.setChecked(True)                     # cut at the crosshair
    assert vr.scene.clip is not None
    vr.set_crop(((0.0, 0.5), (0.0, 1.0), (0.0, 1.0)))
    vr.render_now()
    half = vr.grab_array()
    assert half.sum() < mip.sum()


def test_scheduler_latest_request_wins(qtbot):
    sched = ResliceScheduler()
    got = []
    import threading
    gate = threading.Event()
    sched.submit("a", lambda: gate.wait(WAIT_S) or "first", got.append)      # running
    sched.submit("a", lambda: "second", got.append)                        # superseded
    sched.submit("a", lambda: "third", got.append)
    gate.set()
    qtbot.waitUntil(lambda: "third" in got, timeout=WAIT_MS)
    assert "second" not in got
    sched.shutdown()


def test_progressive_volume_redraws_at_each_level(qtbot, server, ct_series_uid):
    from client.session import Session

    session = Session(server.url)
    try:
        win = open_series(session, ct_series_uid, series=describe_series(session, ct_series_uid),
                          show=False, sync=True, vr=False, show_errors=False)
        qtbot.addWidget(win)
        win.resize(600, 500)
        win.show()
        lay = win.mpr
        renders = []
        lay.views["coronal"].rendered.connect(renders.append)
        events = win.load_events
        qtbot.waitUntil(lambda: bool(events) and events[-1].final, timeout=WAIT_MS)
        # the full stage's route and why: in the status (the copies) and its tooltip
        last = events[-1]
        # a preview, then full quality; through the J2K layers the second preview stage
        # comes between them, through the HTJ2K copies it is left out (and said so)
        if last.route == "htj2k" and re.search(r"J2K preview stages? left out", last.why):
            assert len(events) >= 2
        else:
            assert len(events) >= 3
        assert len(renders) >= 2
        assert "complete" in lay.status.text()
        assert last.route in ("htj2k", "j2k") and last.why in lay.status.toolTip()
        assert ("HTJ2K copies" in lay.status.text()) == (last.route == "htj2k")
        assert len(lay.volume.filled_slots()) == 0
        win.close()
    finally:
        session.logout()


def test_open_folder_refuses_below_the_threshold(tmp_path, qtbot):
    from server.sample import make_sample_ct

    make_sample_ct(tmp_path, slices=4, size=32, seed=2)
    with pytest.raises(RuntimeError, match="at least 10"):
        open_folder(tmp_path, show=False, show_errors=False)
    win = open_folder(tmp_path, threshold=3, show=False, sync=True, vr=False, show_errors=False)
    qtbot.addWidget(win)
    assert win.runner.wait(WAIT_S)
    qtbot.waitUntil(lambda: "complete" in win.mpr.status.text(), timeout=WAIT_MS)
    assert len(win.mpr.volume.own_slots()) == 4
    win.close()
