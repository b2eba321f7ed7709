"""Slide ingest: readers (plain, pyramidal TIFF, DICOM WSI), the J2K tile pyramid, the
catalogue's referential integrity."""
from __future__ import annotations

import numpy as np
import pytest

from imaging.pyramid import StoredSlide, plan_levels
from imaging.slide_sample import make_ihc_slide
from imaging.tilesource import (ArraySource, DicomWsiSource, SlideFormatError, TiffSource,
                                  block_mean, open_slide)

from pathology_util import new_store, write_dicom_wsi


@pytest.fixture(scope="module")
def slide_img():
    img, assoc = make_ihc_slide(1000, 700, seed=1)
    return img, assoc


@pytest.fixture(scope="module")
def stored(tmp_path_factory, slide_img):
    img, assoc = slide_img
    st = new_store(tmp_path_factory.mktemp("pyr"))
    row = st.ingest(ArraySource(img, mpp=0.5, associated=assoc), patient_id="P1",
                    accession="A1", tile_size=256, label="ihc")
    yield st, row
    st.close()


def test_geometry_plan():
    lv = plan_levels(1000, 700, 256)
    assert [(g.width, g.height, g.downsample) for g in lv] == [
        (1000, 700, 1), (500, 350, 2), (250, 175, 4)]
    assert lv[0].cols == 4 and lv[0].rows == 3
    assert lv[0].tile_rect(11) == (768, 512, 232, 188)
    assert lv[0].tiles_in(250, 250, 20, 20) == [0, 1, 4, 5]


def test_pyramid_levels_match_the_source(stored, slide_img):
    img, assoc = slide_img
    st, row = stored
    _row, s = st.open(row["slide_uid"])
    assert (s.width, s.height, len(s.levels)) == (1000, 700, 3)
    # level 0 is lossless, bit for bit
    assert np.array_equal(s.read_region(0, 0, 0, 1000, 700), img)
    # every further level is the source reduced by 2**k (block mean)
    ref = img
    for k in range(1, len(s.levels)):
        ref = block_mean(ref, 2)
        g = s.levels[k]
        got = s.read_region(k, 0, 0, g.width, g.height)
        assert got.shape == ref.shape
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    # a lossy quality layer is close but not exact; edge tiles keep their true size
    ix = s.tile_index(0, 11)
    assert (ix.width, ix.height, ix.ncomp, ix.nlayers) == (232, 188, 3, 4)
    coarse = s.decode_tile(0, 5, layers=1)
    assert coarse.shape == (256, 256, 3) and not np.array_equal(coarse, img[256:512, 256:512])
    # label and macro kept; every file verifies
    assert np.array_equal(s.associated("label"), assoc["label"])
    assert s.verify() == []
    assert row["qc_status"] == "pass" and row["mpp"] == 0.5 and row["state"] == "high"


def test_damaged_tile_is_detected(stored, tmp_path):
    import shutil

    st, row = stored
    _r, s = st.open(row["slide_uid"])
    copy = tmp_path / "copy"
    shutil.copytree(s.path, copy)
    lv = s.manifest["levels"][0]
    off = lv["tiles"][3][0] + 50
    with open(copy / lv["file"], "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))
    bad = StoredSlide.open(copy)
    with pytest.raises(Exception, match="damaged"):
        bad.tile_bytes(0, 3)
    assert any("SHA-256" in p for p in bad.verify())


@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_pyramidal_tiff_reader(tmp_path, slide_img, planar):
    import tifffile

    img, _ = slide_img
    p = tmp_path / "slide.tif"
    lay = (lambda a: a) if planar == "contig" else (lambda a: np.moveaxis(a, 2, 0))
    with tifffile.TiffWriter(p) as tw:
        tw.write(lay(img), tile=(256, 256), subifds=1, photometric="rgb", planarconfig=planar,
                 resolution=(20000, 20000), resolutionunit="CENTIMETER")
        tw.write(lay(block_mean(img, 4)), tile=(256, 256), subfiletype=1, photometric="rgb",
                 planarconfig=planar)
    src = open_slide(p)
    assert isinstance(src, TiffSource)
    assert [(lv.width, lv.height) for lv in src.levels] == [(1000, 700), (250, 175)]
    assert src.mpp == pytest.approx((0.5, 0.5))
    assert np.array_equal(src.read_region(0, 300, 200, 400, 300), img[200:500, 300:700])
    # a level between native ones is read from the nearest finer level
    assert np.abs(src.read_scaled(2, 0, 0, 500, 350).astype(int)
                  - block_mean(img, 2).astype(int)).max() <= 1
    if planar == "separate":
        return
    st = new_store(tmp_path / "store")
    row = st.ingest(p, patient_id="P2", accession="A2", tile_size=256, run_qc=False)
    _r, s = st.open(row["pk"])
    assert np.array_equal(s.read_region(0, 0, 0, 1000, 700), img)
    st.close()


def test_dicom_wsi_reader(tmp_path, slide_img):
    img, assoc = slide_img
    write_dicom_wsi(tmp_path / "wsi", img, tile=256, levels=2, label=assoc["label"])
    src = open_slide(tmp_path / "wsi")
    assert isinstance(src, DicomWsiSource)
    assert [(lv.width, lv.height) for lv in src.levels] == [(1000, 700), (500, 350)]
    assert src.mpp == pytest.approx((0.5, 0.5))
    assert src.acquired_at == "2026-01-02T03:04:05"
    assert np.array_equal(src.associated["label"], assoc["label"])
    assert np.array_equal(src.read_region(0, 100, 600, 300, 100), img[600:700, 100:400])
    assert np.array_equal(src.read_region(1, 0, 0, 500, 350), block_mean(img, 2))


def test_unknown_input_names_every_reader(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("not a slide")
    with pytest.raises(SlideFormatError) as e:
        open_slide(p)
    for name in ("dicom-wsi", "tiff", "image"):
        assert name in str(e.value)


def test_catalogue_referential_integrity(stored):
    from server.dbutil import IntegrityError
    from server.slide_catalogue import CatalogueError

    st, row = stored
    cat = st.catalogue
    with pytest.raises(CatalogueError, match="still has exams"):
        cat.delete_patient("P1")
    with pytest.raises(IntegrityError):
        with cat.db.transaction():
            cat.db.execute("INSERT INTO slide(slide_uid, exam_pk, state, tier, path, ingested_at,"
                           " width, height, levels, tile_size, bytes, manifest_sha256)"
                           " VALUES ('x', 9999, 'low', 'recent', 'x', 'now', 1, 1, 1, 256, 1, 'x')")
    with pytest.raises(IntegrityError):
        with cat.db.transaction():
            cat.db.execute("UPDATE slide SET state = 'medium' WHERE pk = ?", [row["pk"]])
    got = cat.slide(row["slide_uid"])
    assert (got["patient_id"], got["accession"], got["state"], got["tier"]) == ("P1", "A1", "high", "recent")
    assert got["acquired_at"] and got["path"] == row["slide_uid"]
