"""``medview render``: planes, MIP and VR from a folder or the server; pixels checked."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from PySide6.QtGui import QImage

from server.sample import SAMPLE_SPHERES, make_sample_ct
from viewer.cli import main

CALC = next(s for s in SAMPLE_SPHERES if s.name == "calcification")       # 1000 HU, r 6 mm


def png(path) -> np.ndarray:
    img = QImage(str(path))
    assert not img.isNull(), path
    img = img.convertToFormat(QImage.Format.Format_RGB888)
    a = np.frombuffer(img.constBits(), np.uint8).reshape(img.height(), img.bytesPerLine())
    return a[:, : img.width() * 3].reshape(img.height(), img.width(), 3).copy()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """32 slices of 256² (0.7 mm, 2.5 mm) around the calcification, plus a PNG and a file
    of another patient."""
    root = tmp_path_factory.mktemp("render")
    files = make_sample_ct(root / "gen", slices=32, size=256, seed=9)
    d = root / "series"
    d.mkdir()
    for p in files:
        shutil.copy(p, d / p.name)
    (d / "thumb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    return d


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["render", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_axial_through_a_known_sphere(folder, tmp_path, capsys):
    pos = ",".join(str(v) for v in CALC.center)
    code, out, err = _run(capsys, "--folder", folder, "--view", "axial", "--position", pos,
                          "--window", "40,400", "--out", tmp_path / "ax.png", "--out-npy", tmp_path / "ax.npy")
    assert code == 0, err
    assert "kept 32 image(s)" in out and "skipped 1" in out and "thumb.png" in out
    assert "missing: none" in out
    plane = np.load(tmp_path / "ax.npy")
    meta = json.loads((tmp_path / "ax.json").read_text())
    assert meta["spacing"] == [pytest.approx(0.7), pytest.approx(0.7)]
    assert meta["labels"] == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert plane.dtype == np.float32 and list(plane.shape) == meta["shape"]
    row, col = _pixel_of(meta, CALC.center)
    assert plane[row, col] == pytest.approx(1000, abs=45)           # HU of the calcification
    # the disc has the sphere's radius (mm): look only near it (ribs are bright too)
    mask = _near(plane, row, col, CALC.radius + 3) > 700
    r = math.sqrt(mask.sum() * 0.49 / math.pi)
    assert r == pytest.approx(CALC.radius, abs=0.8)
    img = png(tmp_path / "ax.png")
    assert img.shape[:2] == plane.shape
    assert (img[row, col] == 255).all()                              # windowed: white


def _near(plane, row, col, mm):
    k = int(math.ceil(mm / 0.7))
    out = np.full(plane.shape, np.nan, np.float32)
    out[max(row - k, 0):row + k + 1, max(col - k, 0):col + k + 1] = \
        plane[max(row - k, 0):row + k + 1, max(col - k, 0):col + k + 1]
    return np.nan_to_num(out, nan=-1000)


def _pixel_of(meta, point) -> tuple[int, int]:
    d = np.asarray(point) - np.asarray(meta["origin"])
    s = meta["spacing"][0]
    return int(round(d @ np.asarray(meta["v"]) / s)), int(round(d @ np.asarray(meta["u"]) / s))


def test_coronal_and_sagittal_keep_the_sphere_round(folder, tmp_path, capsys):
    pos = ",".join(str(v) for v in CALC.center)
    for view, labels in (("coronal", ("R", "L", "H", "F")), ("sagittal", ("A", "P", "H", "F"))):
        code, _, err = _run(capsys, "--folder", folder, "--view", view, "--position", pos,
                            "--out", tmp_path / f"{view}.png", "--out-npy", tmp_path / f"{view}.npy")
        assert code == 0, err
        plane = np.load(tmp_path / f"{view}.npy")
        meta = json.loads((tmp_path / f"{view}.json").read_text())
        assert tuple(meta["labels"].values()) == labels
        row, col = _pixel_of(meta, CALC.center)
        ys, xs = np.nonzero(_near(plane, row, col, CALC.radius + 3) > 500)
        width = (xs.max() - xs.min() + 1) * 0.7
        height = (ys.max() - ys.min() + 1) * 0.7
        # 2.5 mm slices: the vertical extent is within one slice of the horizontal one
        assert abs(width - height) <= 2.6, (view, width, height)
        assert width == pytest.approx(2 * CALC.radius, abs=1.5)


def test_oblique_slab_mip_and_vr(folder, tmp_path, capsys):
    pos = ",".join(str(v) for v in CALC.center)
    code, out, err = _run(capsys, "--folder", folder, "--view", "oblique", "--angles", "25,15",
                          "--position", pos, "--slab", "8", "--mode", "mip",
                          "--out", tmp_path / "ob.png", "--out-npy", tmp_path / "ob.npy")
    assert code == 0, err
    meta = json.loads((tmp_path / "ob.json").read_text())
    assert meta["slab"] == 8 and meta["mode"] == "mip"
    assert len(meta["labels"]["top"]) == 2 and len(meta["labels"]["left"]) >= 2   # double oblique
    plane = np.load(tmp_path / "ob.npy")
    row, col = _pixel_of(meta, CALC.center)
    assert plane[row, col] > 900
    # the plane normal is the axial normal turned by the angles
    from imaging.mpr import angles_rotation
    np.testing.assert_allclose(meta["normal"], angles_rotation(25, 15) @ [0, 0, 1.0], atol=1e-9)

    code, _, err = _run(capsys, "--folder", folder, "--view", "mip", "--out", tmp_path / "mip.png",
                        "--out-npy", tmp_path / "mip.npy")
    assert code == 0, err
    mip = np.load(tmp_path / "mip.npy")
    meta = json.loads((tmp_path / "mip.json").read_text())
    row, col = _pixel_of(meta, CALC.center)
    assert mip[row, col] > 900                               # projected through the body
    assert np.nanmax(mip) >= 1000

    code, out, err = _run(capsys, "--folder", folder, "--view", "vr", "--size", "160,120",
                          "--out", tmp_path / "vr.png")
    if code != 0 and "OpenGL" in err:
        pytest.skip(err)
    assert code == 0, err
    img = png(tmp_path / "vr.png")
    assert img.shape == (120, 160, 3)
    assert img.max() > 100 and (img.sum(axis=2) > 30).mean() > 0.02     # bone shows up


def test_oblique_needs_angles_and_refusal_below_threshold(folder, tmp_path, capsys):
    code, _, err = _run(capsys, "--folder", folder, "--view", "oblique", "--out", tmp_path / "x.png")
    assert code == 1 and "--angles" in err
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(folder.glob("CT000[1-5].dcm")):
        shutil.copy(p, few / p.name)
    code, out, err = _run(capsys, "--folder", few, "--view", "axial", "--out", tmp_path / "x.png")
    assert code == 1 and "at least 10 images" in err and "kept 5" in out
    # the refusal is said once, and nothing before it claims "missing: none"
    assert "missing" not in out and "refused" not in out
    assert err.count("at least 10 images") == 1
    assert not (tmp_path / "x.png").exists()


def test_series_from_the_server_matches_the_folder(server, ct_series_uid, tmp_path, capsys):
    files = make_sample_ct(tmp_path / "same", slices=12, size=256, seed=3)     # = the served series
    code, _, err = _run(capsys, "--series", ct_series_uid, "--server", server.url, "--no-cache",
                        "--view", "sagittal", "--out", tmp_path / "s.png", "--out-npy", tmp_path / "s.npy")
    assert code == 0, err
    code, _, err = _run(capsys, "--folder", files[0].parent, "--view", "sagittal",
                        "--out", tmp_path / "f.png", "--out-npy", tmp_path / "f.npy")
    assert code == 0, err
    a, b = np.load(tmp_path / "s.npy"), np.load(tmp_path / "f.npy")
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_array_equal(a[~np.isnan(a)], b[~np.isnan(b)])
    assert (png(tmp_path / "s.png") == png(tmp_path / "f.png")).all()


def test_thick_to_thin_through_the_bundled_server(ct_store, ct_series_uid, tmp_path, capsys):
    code = main(["--store", str(ct_store), "render", "--series", ct_series_uid, "--no-cache",
                 "--thick-to-thin", "--view", "coronal", "--out", str(tmp_path / "t.png"),
                 "--out-npy", str(tmp_path / "t.npy")])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "slabs of" in cap.err and "thin slices" in cap.err
    files = make_sample_ct(tmp_path / "same", slices=12, size=256, seed=3)
    assert main(["render", "--folder", str(files[0].parent), "--view", "coronal",
                 "--out", str(tmp_path / "f.png"), "--out-npy", str(tmp_path / "f.npy")]) == 0
    a, b = np.load(tmp_path / "t.npy"), np.load(tmp_path / "f.npy")
    np.testing.assert_array_equal(a[~np.isnan(a)], b[~np.isnan(b)])        # bit-exact at the end
