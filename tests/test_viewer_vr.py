"""Volume rendering in the app: progressive data reaches the picture, the desktop
(xcb/GLX) pane shows the volume, the fallback to offscreen rendering, the words a blank
pane shows, and maximising the VR pane."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PySide6.QtCore import QPoint, Qt  # noqa: E402

from viewer.mprlayout import MprLayout  # noqa: E402
from imaging.vr import VrScene, VrUnavailable, offscreen_window  # noqa: E402
from viewer.vrview import VrView, frame_is_blank  # noqa: E402
from imaging.volume import SliceGeometry, volume_for_slices  # noqa: E402

from vr_data import ingest_folder, make_ball_ct  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def empty_ct(n=24, size=48, spacing=1.0):
    half = (size - 1) / 2 * spacing
    sl = [SliceGeometry((-half, -half, -(n - 1) / 2 + k), (1, 0, 0, 0, 1, 0), (spacing, spacing),
                        size, size, 1.0) for k in range(n)]
    vol, _ = volume_for_slices(sl, [(1.0, -1024.0)] * n, (0, 4095), modality="CT")
    return vol


def fill_ball(vol, hu_inside=1000, hu_outside=40):
    nz, ny, nx = vol.shape
    z, y, x = np.mgrid[:nz, :ny, :nx]
    r = np.sqrt((x - nx / 2) ** 2 + (y - ny / 2) ** 2 + (z - nz / 2) ** 2)
    vol.data[...] = np.where(r < min(vol.shape) * 0.35, hu_inside, hu_outside)
    vol.own[:] = 1


def scene_or_skip(vol):
    try:
        return VrScene(vol, offscreen_window((160, 160)))
    except VrUnavailable as e:
        pytest.skip(f"no offscreen OpenGL: {e}")


def test_voxels_arriving_after_the_scene_was_built_are_rendered():
    """The scene is built while the volume is still empty (progressive loading); the
    voxels then arrive in place: refresh() must show them (VTK's cached value range of
    the empty array made every frame black)."""
    vol = empty_ct()
    scene = scene_or_skip(vol)
    try:
        assert frame_is_blank(scene.to_array())
        fill_ball(vol)
        scene.refresh()
        img = scene.to_array()
        assert not frame_is_blank(img)
        h, w, _ = img.shape
        assert img[h // 2, w // 2].max() > 100
    finally:
        scene.close()
        scene.render_window.Finalize()


def test_a_blank_pane_says_why_in_words(qtbot):
    vol = empty_ct()
    fill_ball(vol, hu_inside=100, hu_outside=-1000)         # nothing reaches the bone range
    view = VrView(vol, backend="image")
    qtbot.addWidget(view)
    view.resize(200, 200)
    view.show()
    if view.scene is None:
        assert "unavailable" in view.message
        return
    view.render_now()
    assert frame_is_blank(view.grab_array())
    assert "CT bone" in view.message and "150 HU" in view.message and "100 HU" in view.message
    view.set_preset("CT soft tissue")
    view.render_now()
    assert not frame_is_blank(view.grab_array()) and view.message == ""
    view.close_scene()


def test_fallback_to_offscreen_keeps_preset_and_camera(qtbot):
    vol = empty_ct()
    fill_ball(vol)
    view = VrView(vol, backend="image")
    qtbot.addWidget(view)
    view.resize(200, 200)
    view.show()
    if view.scene is None:
        pytest.skip(view.message)
    view.set_preset("MIP", (500.0, 1000.0))
    view.scene.rotate(30, 10)
    pos = view.scene.renderer.GetActiveCamera().GetPosition()
    view._fall_back_to_image("a test frame read back black")
    assert view.fallback_reason == "a test frame read back black"
    assert view.scene.preset.name == "MIP" and view.scene.window == (500.0, 1000.0)
    assert np.allclose(view.scene.renderer.GetActiveCamera().GetPosition(), pos)
    view.render_now()
    assert not frame_is_blank(view.grab_array())
    view.close_scene()


@pytest.mark.parametrize("pane", ["axial", "coronal", "sagittal", "vr"])
def test_a_maximised_pane_fills_the_grid(qtbot, pane):
    vol = empty_ct(n=12, size=32)
    fill_ball(vol)
    lay = MprLayout(vol, sync=True)
    qtbot.addWidget(lay)
    lay.resize(640, 520)
    lay.show()
    qtbot.waitExposed(lay)
    try:
        lay.set_layout(pane)
        w = lay.panes[pane]
        g = lay.grid.geometry
        qtbot.waitUntil(lambda: w.width() >= g().width() - 4 and w.height() >= g().height() - 4)
        lay.set_layout("2x2")
        qtbot.waitUntil(lambda: w.width() < g().width() * 0.6 and w.height() < g().height() * 0.6)
        if pane == "vr" and lay.vr._canvas is not None:
            qtbot.mouseDClick(lay.vr._canvas, Qt.MouseButton.LeftButton, pos=QPoint(10, 10))
            assert lay.layout_name() == "vr"
            qtbot.waitUntil(lambda: w.width() >= g().width() - 4)
    finally:
        lay.close_layout()


def _free_display() -> int:
    for n in range(90, 200):
        if not Path(f"/tmp/.X11-unix/X{n}").exists() and not Path(f"/tmp/.X{n}-lock").exists():
            return n
    raise RuntimeError("no free X display number")


@pytest.fixture()
def xvfb():
    """An Xvfb server with GLX on a free display number (stopped afterwards)."""
    subprocess.run(["bash", str(ROOT / "scripts" / "apt-ensure.sh"), "xvfb"], check=True,
                   stdout=subprocess.DEVNULL)
    if shutil.which("Xvfb") is None:
        pytest.fail("Xvfb is not installed")
    for _ in range(5):
        n = _free_display()
        r, w = os.pipe()
        proc = subprocess.Popen(["Xvfb", f":{n}", "-screen", "0", "1280x1024x24", "+extension", "GLX",
                                 "-nolisten", "tcp", "-displayfd", str(w)], pass_fds=(w,),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(w)
        with os.fdopen(r) as f:
            line = f.readline().strip()           # Xvfb writes the display once it is ready
        if line:
            break
        proc.wait()
    else:
        pytest.fail("Xvfb did not start")
    yield f":{line}"
    proc.terminate()
    proc.wait(timeout=30)


def test_vr_pane_shows_the_volume_under_xcb_in_the_main_windows_3d_layout(tmp_path, xvfb):
    """The app on a real X server (Xvfb, xcb platform, GLX): the VR pane of the 3D layout
    shows the volume (non-black pixels read back from the X server), and double-clicking
    it maximises it over the whole grid."""
    files = make_ball_ct(tmp_path / "dicom", slices=20, size=64)
    uid = ingest_folder(files, tmp_path / "store")
    out = Path(os.environ.get("MEDVIEW_TEST_ARTEFACTS", tmp_path / "artefacts"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, QT_QPA_PLATFORM="xcb", DISPLAY=xvfb,
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    env.pop("MEDVIEW_VR_BACKEND", None)
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "xcb_vr_app.py"), str(tmp_path / "store"),
                          uid, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["platform"] == "xcb"
    assert result["vr_lit"] > 0.01 and result["vr_max"] > 100, result
    assert result["max_size"][0] >= result["grid"][0] - 4, result
