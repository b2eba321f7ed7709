"""Slide quality check: blurred, colour-shifted, folded and bubbled variants of a slide
made of real tissue (scikit-image's IHC image) are flagged, the clean one is not; flags
reach the catalogue; thresholds are configurable."""
from __future__ import annotations

import json

import pytest

from imaging.qc import QCThresholds, check_slide
from imaging.slide_sample import make_ihc_slide, variants
from imaging.tilesource import ArraySource

from pathology_util import new_store


@pytest.fixture(scope="module")
def slide():
    img, _ = make_ihc_slide(1200, 900, seed=3)
    return img


@pytest.fixture(scope="module")
def results(slide):
    out = {"clean": check_slide(ArraySource(slide, mpp=0.5))}
    for name, v in variants(slide).items():
        out[name] = check_slide(ArraySource(v, mpp=0.5))
    return out


def test_clean_slide_passes(results):
    r = results["clean"]
    assert r["flags"] == []
    assert r["blur_median"] > 200 and r["cast_delta"] < 4 and r["fold_fraction"] < 0.03
    assert 0.3 < r["tissue_fraction"] < 0.7


def test_blurred_variant_is_flagged(results):
    r = results["blurred"]
    assert r["flags"] == ["blur"]
    assert r["blur_median"] < 0.1 * results["clean"]["blur_median"]


def test_colour_shifted_variant_is_flagged(results):
    r = results["colour-shifted"]
    assert "colour-cast" in r["flags"] and "blur" not in r["flags"]
    assert r["background_cast"] > 10 and r["cast_delta"] > 8
    # the tissue mask is not fooled by the cast (white balance against the glass)
    assert abs(r["tissue_fraction"] - results["clean"]["tissue_fraction"]) < 0.05


def test_fold_and_bubble_heuristics(results):
    assert results["folded"]["flags"] == ["fold"]
    assert results["bubble"]["flags"] == ["bubble"] and results["bubble"]["bubbles"] == 1


def test_flags_reach_the_catalogue_and_thresholds_are_configurable(tmp_path, slide):
    st = new_store(tmp_path)
    blurred = variants(slide)["blurred"]
    row = st.ingest(ArraySource(blurred, mpp=0.5), patient_id="P", accession="A",
                    tile_size=256)
    assert row["qc_status"] == "flagged" and row["qc"]["flags"] == ["blur"]
    assert [r["pk"] for r in st.catalogue.slides(flagged=True)] == [row["pk"]]
    # a site that tolerates softer focus: thresholds from qc.json
    (st.root / "qc.json").write_text(json.dumps({"blur_threshold": 3.0}))
    again = st.recheck(row["pk"])
    assert again["qc_status"] == "pass"
    (st.root / "qc.json").write_text(json.dumps({"blur_treshold": 3.0}))
    with pytest.raises(ValueError, match="unknown QC threshold"):
        QCThresholds.load(st.root / "qc.json")
    st.close()
