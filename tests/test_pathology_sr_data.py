"""Super-resolution data and training (W1): the degradations, the held-out slides, the
stain jitter, the ×8 offer gate, one tiny training run with checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from imaging import sr, srdata


def _tissue() -> np.ndarray:
    return srdata.heldout_sources()["nuclei-purple"][0][:96, :96]


def test_pyramid_degradation_is_the_rounded_block_mean():
    hr = _tissue()
    lr = srdata.degrade(hr, 4, "pyramid")
    assert lr.dtype == np.uint8 and lr.shape == (24, 24, 3)
    ref = hr.astype(np.float64).reshape(24, 4, 24, 4, 3).mean(axis=(1, 3))
    assert np.abs(lr - ref).max() <= 0.5 + 1e-4
    with pytest.raises(ValueError):
        srdata.degrade(hr, 4, "fax")


def test_scan_degradation_blurs_and_compresses():
    hr = _tissue()
    pyr = srdata.degrade(hr, 4, "pyramid").astype(np.float64)
    blur_only = srdata.degrade(hr, 4, "scan", quality=0).astype(np.float64)
    scan = srdata.degrade(hr, 4, "scan").astype(np.float64)
    assert scan.shape == blur_only.shape == pyr.shape
    # optical blur: less high-frequency energy than the plain block mean, same mean
    def lap(a):
        return np.abs(np.diff(a, 2, axis=0)).mean()
    assert lap(blur_only) < 0.9 * lap(pyr)
    assert abs(blur_only.mean() - pyr.mean()) < 1.0
    # JPEG at the scanner's quality changes pixels, but only a little
    d = np.abs(scan - blur_only)
    assert d.max() > 0 and d.mean() < 6
    assert np.array_equal(srdata.degrade(hr, 4, "scan", blur=0, quality=0), pyr)


def test_held_out_sources_are_real_and_separate_from_training():
    src = srdata.heldout_sources()
    assert set(srdata.UNSEEN) <= set(src) and {"cmu-he", "skimage-ihc"} <= set(src)
    for name in srdata.UNSEEN:
        assert src[name], name
        for t in src[name]:
            assert t.dtype == np.uint8 and t.shape[2] == 3 and min(t.shape[:2]) >= 128
        # tissue, not glass (fat, mostly clear cell interiors, counts little)
        assert np.mean([srdata.tissue_fraction(t) for t in src[name]]) > 0.3, name
    # the qc_real crops are documented with their licence next to them
    readme = (srdata.QC_REAL / "README.md").read_text()
    for files in srdata.HELDOUT_SOURCES.values():
        for f in files:
            assert f"`{f}`" in readme
    # the shipped generators never trained on any of them
    for scale in (2, 4):
        meta = sr.load_generator(scale).meta
        assert "qc_real" not in meta.get("trained_on", "") and "tiles" not in meta.get(
            "trained_on", "")


def test_score_reports_per_source_mean_and_worst():
    src = {k: v[:1] for k, v in srdata.heldout_sources().items()}
    def bic(lr):
        return (np.clip(sr.bicubic_upscale(lr.astype(np.float32) / 255, 4), 0, 1) * 255
                + 0.5).astype(np.uint8)

    r = srdata.score(bic, 4, "pyramid", src)                  # bicubic against itself: 0
    assert all(v["psnr_gain_db"] == 0 for v in r["sources"].values())
    g = sr.load_generator(4)
    r = srdata.score(g.upscale, 4, "pyramid", src)
    gains = {k: r["sources"][k]["psnr_gain_db"] for k in srdata.UNSEEN}
    assert r["unseen_worst_gain_db"] == min(gains.values())
    assert r["unseen_worst_source"] == min(gains, key=gains.get)
    assert abs(r["unseen_mean_gain_db"] - np.mean(list(gains.values()))) < 1e-3
    assert all(v > 0 for v in gains.values())      # the shipped ×4 beats bicubic on each


def test_stain_jitter_changes_colour_not_structure():
    from imaging.train_sr import stain_jitter

    hr = _tissue().astype(np.float32) / 255
    rng = np.random.default_rng(3)
    out = stain_jitter(rng, hr)
    assert out.shape == hr.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    assert np.abs(out - hr).mean() > 0.003                  # the colour moved
    g0, g1 = hr.mean(axis=2).ravel(), out.mean(axis=2).ravel()
    assert np.corrcoef(g0, g1)[0, 1] > 0.95                 # the tissue did not


def _weights_with_gain(folder, scale, gain):
    """Real ×``scale`` weights (the shipped ×4 generator's, the tail widened for ×8 as
    train_sr --init does) whose meta records ``gain`` on the never-trained slides."""
    from imaging.train_sr import init_params

    params = init_params(sr.weights_path(4), scale)
    meta = {"generated": True,
            "heldout": {"pyramid": {"unseen_mean_gain_db": gain}}} if gain is not None else {}
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(sr.weights_path(scale, folder),
                        meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **params)


def test_x8_is_offered_only_above_one_db(tmp_path):
    low, high, none = tmp_path / "low", tmp_path / "high", tmp_path / "none"
    _weights_with_gain(low, 8, 0.62)
    _weights_with_gain(high, 8, 1.07)
    _weights_with_gain(none, 8, None)
    why = sr.offer_check(8, low)
    assert why and "+0.62 dB" in why and "not offered" in why
    assert 8 not in sr.offered_scales(low)
    with pytest.raises(sr.GeneratorError, match="not offered"):
        sr.load_generator(8, low)
    assert sr.load_generator(8, low, unoffered=True, backend="numpy").scale == 8  # benches
    assert "no held-out score" in sr.offer_check(8, none)
    assert sr.offer_check(8, high) is None and 8 in sr.offered_scales(high)
    g = sr.load_generator(8, high, backend="numpy")
    assert g.upscale(np.zeros((5, 7, 3), np.uint8)).shape == (40, 56, 3)
    assert sr.offer_check(4, tmp_path / "empty") is not None        # no weights, no offer
    assert "not ×3" in sr.offer_check(3)


def test_render_refuses_x8_when_not_offered(tmp_path, monkeypatch, capsys):
    from commands.slide_cli import main

    _weights_with_gain(tmp_path / "res", 8, 0.4)
    monkeypatch.setattr(sr, "RESOURCES", tmp_path / "res")
    rc = main(["render", "--store", str(tmp_path / "store"), "--slide", "1", "--sr", "8",
               "--out", str(tmp_path / "x.png")])
    assert rc == 2
    assert "×8 is not offered" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "store").exists()


def test_a_tiny_training_run_leaves_checkpoints_and_loadable_weights(tmp_path):
    pytest.importorskip("torch")
    from imaging.train_sr import train

    ck = tmp_path / "ck.npz"
    meta = train(2, 4, tmp_path / "out", threads=1, channels=(4, 8), blocks=1, patch=8,
                 aug="stain", degrade="mixed", sets=("ihc",), checkpoint=ck,
                 checkpoint_every=2, batch=2, evaluate_sources=False, log=lambda m: None)
    assert meta["iterations"] == 4 and meta["generated"] is True
    saved = json.loads(bytes(np.load(ck)["meta"]).decode())
    assert saved["checkpoint"] == 4
    g = sr.load_generator(2, tmp_path / "out", backend="numpy")
    assert g.upscale(np.zeros((6, 6, 3), np.uint8)).shape == (12, 12, 3)
    with pytest.raises(SystemExit, match="--histolab"):
        train(2, 1, tmp_path / "x", sets=("tcga",), evaluate_sources=False)


def test_training_keeps_every_checkpoint_and_samples_each_zoom(tmp_path):
    pytest.importorskip("torch")
    from imaging.train_sr import train

    # zoom 0.25 of the IHC training columns is 128 x 96: too small for a 128-pixel patch,
    # so those draws fall back to the next larger zoom instead of failing
    meta = train(4, 4, tmp_path / "out", threads=1, channels=(4, 8), blocks=1, patch=32,
                 sets=("ihc",), checkpoint=tmp_path / "ck_{it}.npz", checkpoint_every=2,
                 batch=2, evaluate_sources=False, log=lambda m: None,
                 zooms=(1.0, 0.5, 0.25), mix=(0.2, 0.2, 0.6))
    assert "scales 1/0.5/0.25" in meta["trained_on"]
    for it in (2, 4):
        saved = json.loads(bytes(np.load(tmp_path / f"ck_{it}.npz")["meta"]).decode())
        assert saved["checkpoint"] == it
    with pytest.raises(SystemExit, match="one weight per zoom"):
        train(4, 1, tmp_path / "x", sets=("ihc",), zooms=(1.0, 0.5), evaluate_sources=False)


def test_a_generator_grown_deeper_starts_as_the_one_it_grew_from(tmp_path):
    """--blocks above the --init generator's: the new residual blocks start as the identity,
    so fine-tuning starts from exactly what the shipped generator computes."""
    pytest.importorskip("torch")
    from imaging.train_sr import train

    shipped = sr.load_generator(2, backend="numpy")
    meta = train(2, 0, tmp_path / "out", threads=1, channels=(32, 64), blocks=shipped.n_res + 2,
                 sets=("ihc",), init=sr.weights_path(2), evaluate_sources=False,
                 log=lambda m: None)
    grown = sr.load_generator(2, tmp_path / "out", backend="numpy")
    assert meta["residual_blocks"] == grown.n_res == shipped.n_res + 2
    assert not np.any(grown.params[f"res{shipped.n_res}.b.w"])
    assert np.any(grown.params[f"res{shipped.n_res}.a.w"])
    hr = _tissue()
    lr = srdata.degrade(hr, 2, "pyramid")
    assert np.array_equal(grown.upscale(lr), shipped.upscale(lr))


def test_shipped_x8_is_offered_exactly_when_its_recorded_gain_allows():
    path = sr.weights_path(8)
    if not path.is_file():
        assert 8 not in sr.offered_scales()
        return
    meta = sr.load_generator(8, unoffered=True, backend="numpy").meta
    gain = meta["heldout"]["pyramid"]["unseen_mean_gain_db"]
    assert (8 in sr.offered_scales()) == (gain >= sr.X8_MIN_GAIN_DB)
    assert {2, 4} <= set(sr.offered_scales())


def test_bench_curve_scores_checkpoints_as_the_weights_record(tmp_path):
    """bench/sr.py --curve: each checkpoint scored on the held-out sources by iteration,
    on ONNX Runtime — the shipped ×4 weights, copied as a checkpoint, score what their
    meta recorded (numpy inference at training time) within float rounding."""
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location(
        "bench_sr", Path(__file__).resolve().parents[1] / "bench" / "sr.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(sr.weights_path(4), run / "ck_b.npz")
    recorded = sr.load_generator(4, backend="numpy").meta["heldout"]
    rows = bench.curve(str(run / "ck_*.npz"))
    assert len(rows) == 1 and rows[0]["scale"] == 4
    assert rows[0]["iteration"] == sr.load_generator(4, backend="numpy").meta["iterations"]
    for kind in srdata.DEGRADATIONS:
        assert abs(rows[0][kind]["unseen_mean"] - recorded[kind]["unseen_mean_gain_db"]) < 0.01
        assert rows[0][kind]["unseen_worst"] == min(rows[0][kind][n] for n in srdata.UNSEEN)
