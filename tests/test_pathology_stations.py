"""W7: gather takes everything of a patient (slides and radiology originals, bit for bit);
a reading station lists the exams assigned to it and opens them from its pre-distributed
cache first, falling back to the server."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from imaging.slide_sample import make_ihc_slide
from imaging.tilesource import ArraySource
from server_stub.sample import PATIENT_ID, make_sample_ct

from pathology_util import new_store


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def slide_img():
    return make_ihc_slide(256, 192, seed=8)[0]


def _store_with_ct_and_slides(root: Path, tmp: Path, slide_img):
    """A store with one CT study and two slide exams of the sample patient, and a slide of
    another patient. Returns (slide store, image store, CT files, slide rows)."""
    from server_stub.ingest import ingest_paths
    from server_stub.store import Store

    images = Store(root)
    ct = make_sample_ct(tmp / "ct", slices=4, size=32, seed=2)
    rep = ingest_paths(ct, images)
    assert len(rep.imported) == 4
    st = new_store(root)
    rows = [st.ingest(ArraySource(slide_img, mpp=0.5), patient_id=PATIENT_ID, accession=acc,
                      tile_size=128, run_qc=False) for acc in ("PA-1", "PA-2")]
    rows.append(st.ingest(ArraySource(slide_img, mpp=0.5), patient_id="OTHER",
                          accession="PB-1", tile_size=128, run_qc=False))
    return st, images, ct, rows


def test_gather_includes_the_radiology_originals_bit_for_bit(tmp_path, slide_img):
    from client.slides import LocalSlide
    from server_stub.slide_organise import gather_patient

    st, images, ct, rows = _store_with_ct_and_slides(tmp_path / "store", tmp_path, slide_img)
    try:
        out = tmp_path / "out"
        idx = gather_patient(st, PATIENT_ID, out, image_store=images)
        base = out / PATIENT_ID
        assert sorted(s["slide_uid"] for s in idx["slides"]) == sorted(
            r["slide_uid"] for r in rows[:2])
        for s in idx["slides"]:
            assert LocalSlide.from_folder(base / s["folder"]).stored.verify() == []
        (study,) = idx["studies"]
        assert study["files"] == 4 and study["copy"] == "copied" and "CT" in study["modalities"]
        got = {_sha(p) for p in (base / study["folder"]).rglob("*.dcm")}
        assert got == {_sha(p) for p in ct}                     # the originals, bit for bit
        assert not list(base.glob("radiology/.incoming-*"))
        # again: what is in place and intact is left alone; a damaged file is replaced
        assert gather_patient(st, PATIENT_ID, out, image_store=images)["studies"][0]["copy"] \
            == "present"
        victim = next((base / study["folder"]).rglob("*.dcm"))
        victim.write_bytes(victim.read_bytes()[:-8] + bytes(8))
        assert gather_patient(st, PATIENT_ID, out)["studies"][0]["copy"] == "copied"
        assert {_sha(p) for p in (base / study["folder"]).rglob("*.dcm")} == {_sha(p) for p in ct}
        # a patient without radiology: slides only, and the other patient's CT not there
        other = gather_patient(st, "OTHER", out, image_store=images)
        assert other["studies"] == [] and len(other["slides"]) == 1
    finally:
        st.close()
        images.close()
