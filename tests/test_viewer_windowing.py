"""One rule for the initial window (imaging.windowing.initial_window) and its use in the
2D viewer, the MPR from a folder, the VR MIP preset and ``medview render --view mip``."""
from __future__ import annotations

import json
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from imaging import windowing  # noqa: E402
from imaging.windowing import header_window, initial_window  # noqa: E402


def test_header_window_when_usable():
    assert header_window(40, 400) == (40.0, 400.0)
    assert header_window(["40", "50"], ["400", "350"]) == (40.0, 400.0)     # first of several
    assert header_window(0, 0) is None and header_window(0, 1) is None
    assert header_window(None, 400) is None and header_window("x", 400) is None


def test_initial_window_rule():
    data = np.linspace(0, 1000, 10_000)
    assert initial_window(300, 200, data) == (300.0, 200.0)                   # the header's
    c, w = initial_window(0, 0, data)                                         # 0/0: percentiles
    lo, hi = np.percentile(data, [1, 99])
    assert c == pytest.approx((lo + hi) / 2) and w == pytest.approx(hi - lo)
    c, w = initial_window(5000, 100, data)                                    # beside the data
    assert 0 < c < 1000 and w > 500
    assert initial_window(None, None, np.zeros(100)) is None                  # nothing to decide yet
    assert initial_window(None, None, None) is None
    assert initial_window(300, 200, None) == (300.0, 200.0)
    # a projection ignores the header: its own window from the projected values
    proj = np.concatenate([np.full(5000, -1000.0), np.linspace(100, 1500, 5000)])
    c, w = initial_window(40, 400, proj, projection=True)
    assert c - w / 2 > 0 and c + w / 2 > 1000


def test_2d_default_window_uses_the_rule():
    from imaging.model import ImageMeta

    meta = ImageMeta(index=0, sop_instance_uid="1.2", frame=0, rows=10, columns=100, samples_per_pixel=1,
                     photometric="MONOCHROME2", pixel_spacing=None, image_position=None,
                     image_orientation=None, slice_thickness=None, window_center=0.0, window_width=0.0,
                     modality="MR")
    data = np.arange(1000, dtype=np.uint16).reshape(10, 100)
    c, w = windowing.default_window(meta, data, "MR")
    assert w > 900 and c == pytest.approx(499.5)


def _mr_folder(folder, slices=12, size=48):
    """An MR-like series whose WindowCenter/WindowWidth are 0 (as some scanners write)."""
    import pydicom

    from server.sample import make_sample_ct

    files = make_sample_ct(folder, slices=slices, size=size, seed=17)
    rng = np.random.default_rng(3)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.WindowCenter, ds.WindowWidth = "0", "0"
        yy, xx = np.mgrid[:size, :size] - size / 2
        img = np.where(xx ** 2 + yy ** 2 < (size * 0.4) ** 2, 600, 20) + rng.integers(0, 80, (size, size))
        ds.PixelData = img.astype(np.uint16).tobytes()
        ds.save_as(f)
    return files


def test_open_folder_in_mpr_on_an_mr_with_window_0_0_is_not_white(tmp_path, qtbot):
    from viewer.mprlayout import open_folder

    _mr_folder(tmp_path)
    win = open_folder(tmp_path, show=False, sync=True, vr=False, show_errors=False)
    qtbot.addWidget(win)
    qtbot.waitUntil(lambda: "complete" in win.mpr.status.text(), timeout=60_000)
    c, w = win.mpr.state.window
    assert w > 100 and 20 < c < 700, (c, w)
    for name, view in win.mpr.views.items():
        img = view._qimage()
        assert img is not None, name
        shown = np.asarray(view._buffer, float)
        assert 30 < shown.mean() < 225, (name, shown.mean())                  # neither white nor black
    win.close()


def test_mpr_vr_mip_preset_has_its_own_window(qtbot):
    from viewer.mprlayout import MprLayout

    from test_viewer_vr import empty_ct, fill_ball

    vol = empty_ct(n=16, size=32)
    fill_ball(vol, hu_inside=1500, hu_outside=40)
    lay = MprLayout(vol, sync=True, window=(40, 400))
    qtbot.addWidget(lay)
    try:
        assert lay.state.window == (40.0, 400.0)
        if lay.vr is None or lay.vr.scene is None:
            pytest.skip("no offscreen OpenGL")
        lay.vr_box.setCurrentText("MIP")
        c, w = lay.vr.scene.window
        assert c + w / 2 > 1000 and c - w / 2 > 0                           # not the slice window
        lay.state.set_window(500, 2000)                                     # the user's drag wins
        assert lay.vr.scene.window == (500.0, 2000.0)
    finally:
        lay.close_layout()


def test_render_mip_gets_a_window_of_the_projection(tmp_path, capsys):
    from server.sample import make_sample_ct
    from viewer.cli import main

    make_sample_ct(tmp_path / "ct", slices=16, size=256, seed=9)             # header: 40/400
    code = main(["render", "--folder", str(tmp_path / "ct"), "--view", "mip", "--out",
                 str(tmp_path / "mip.png"), "--out-npy", str(tmp_path / "mip.npy")])
    err = capsys.readouterr().err
    assert code == 0, err
    meta = json.loads((tmp_path / "mip.json").read_text())
    c, w = meta["window"]
    assert (c, w) != (40, 400)
    mip = np.load(tmp_path / "mip.npy")
    body = np.nan_to_num(mip, nan=-1000) > -200
    shown = windowing.apply_window(mip[body], c, w)
    assert (shown == 255).mean() < 0.2, (c, w)                               # no white blob
    assert shown.std() > 30                                                  # contrast inside the body
