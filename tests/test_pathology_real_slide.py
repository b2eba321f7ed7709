"""The slide readers on real slide data from outside the project.

``resources/pathology/samples/CMU-1-Small-Region.svs`` is a real Aperio scan (OpenSlide's
test data, CC0; see the README beside it). It is read by our tifffile reader and by
OpenSlide and the two are compared pixel for pixel; an SVS with reduced levels and DICOM
WSI series (TILED_FULL and TILED_SPARSE, three transfer syntaxes) are built from its
tissue; it is ingested into the JPEG 2000 pyramid the way ``medview-slide ingest`` does;
the quality check runs on it and on degraded copies of it.

OpenSlide is in the ``test`` extra: its tests are skipped only when it cannot be imported.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from imaging.qc import (QCThresholds, check_slide, choose_reference, colour_measures,
                          load_reference, tissue_mask)
from imaging.slide_sample import variants
from imaging.tilesource import (ArraySource, DicomWsiSource, OpenSlideSource, SlideFormatError,
                                  TiffSource, block_mean, open_slide)

from pathology_util import new_store, write_dicom_wsi

ROOT = Path(__file__).resolve().parent.parent
SVS = ROOT / "resources" / "pathology" / "samples" / "CMU-1-Small-Region.svs"
SVS_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"

try:
    import openslide  # noqa: F401

    OPENSLIDE_MISSING = ""
except (ImportError, OSError) as e:       # the Python package, or its library
    OPENSLIDE_MISSING = f"{type(e).__name__}: {e}"

needs_openslide = pytest.mark.skipif(
    bool(OPENSLIDE_MISSING),
    reason=f"openslide cannot be imported ({OPENSLIDE_MISSING}); it is in the test extra: "
           "pip install -e '.[test]'")

# Max |difference| between our reader and OpenSlide, measured on this file and on the SVS
# and DICOM series built from it: 0 (tifffile/imagecodecs and OpenSlide both decode these
# JPEG tiles with libjpeg-turbo; lossless and uncompressed DICOM frames leave no room).
READER_TOLERANCE = 0
# DICOM JPEG baseline frames (4:2:0): pydicom decodes them with pylibjpeg-libjpeg, OpenSlide
# with libjpeg-turbo; the two libraries' IDCT / chroma upsampling differ: measured max
# |difference| 6, mean 0.17 grey levels.
DICOM_JPEG_DECODER_TOLERANCE = 6


@pytest.fixture(scope="module")
def svs():
    src = open_slide(SVS)
    yield src
    src.close()


@pytest.fixture(scope="module")
def level0(svs):
    return svs.read_region(0, 0, 0, svs.width, svs.height)


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / mse))


# --------------------------------------------------------------------------- the SVS
def test_sample_is_the_published_file():
    assert hashlib.sha256(SVS.read_bytes()).hexdigest() == SVS_SHA256


def test_tiff_reader_on_the_real_svs(svs, level0):
    # our reader opens it even though OpenSlide (when installed) recognises it too
    assert isinstance(svs, TiffSource)
    assert (svs.width, svs.height) == (2220, 2967)
    assert svs.level_count == 1 and [lv.downsample for lv in svs.levels] == [1.0]
    assert (svs.levels[0].tile_width, svs.levels[0].tile_height) == (240, 240)
    assert svs.mpp == pytest.approx((0.499, 0.499))
    assert svs.objective_power == 20.0
    assert svs.acquired_at == "2009-12-29T09:59:15"
    assert svs.properties["aperio.MPP"] == "0.4990" and svs.properties["aperio.AppMag"] == "20"
    # label (LZW strip image), macro (JPEG), and the thumbnail: Aperio's second TIFF
    # directory is a strip image, an associated image, not a pyramid level (as OpenSlide)
    shapes = {k: v.shape for k, v in svs.associated.items()}
    assert shapes == {"label": (463, 387, 3), "macro": (431, 1280, 3), "thumbnail": (768, 574, 3)}
    assert all(v.std() > 10 for v in svs.associated.values())       # real pictures
    assert (574, 768) not in [(lv.width, lv.height) for lv in svs.levels]
    # the thumbnail is this slide reduced (1/3.87): compare it with level 0 reduced 4×
    from PIL import Image

    thumb = np.asarray(Image.fromarray(svs.associated["thumbnail"]).resize((555, 742),
                                                                           Image.BILINEAR))
    assert np.abs(thumb.astype(np.int16) - block_mean(level0, 4)).mean() < 6
    # real tissue, and a region read is the same pixels as the level read whole
    assert 0.2 < (level0.mean(axis=2) < 200).mean() < 0.6
    assert np.array_equal(svs.read_region(0, 1000, 1500, 517, 333), level0[1500:1833, 1000:1517])
    # past the edges: white, the rest unchanged
    edge = svs.read_region(0, 2100, 2900, 300, 200)
    assert (edge[67:, :] == 255).all() and (edge[:, 120:] == 255).all()
    assert np.array_equal(edge[:67, :120], level0[2900:, 2100:])


@needs_openslide
def test_openslide_reads_the_same_slide(svs, level0):
    assert OpenSlideSource.score(SVS)[0] > 0           # OpenSlide recognises it (aperio)
    with OpenSlideSource(SVS) as osr:
        assert osr.properties["openslide.vendor"] == "aperio"
        assert (osr.width, osr.height, osr.level_count) == (svs.width, svs.height, 1)
        assert [lv.downsample for lv in osr.levels] == [lv.downsample for lv in svs.levels]
        assert (osr.levels[0].tile_width, osr.levels[0].tile_height) == (240, 240)
        assert osr.mpp == pytest.approx(svs.mpp, abs=1e-6)
        assert osr.objective_power == svs.objective_power
        assert osr.acquired_at == svs.acquired_at
        assert sorted(osr.associated) == sorted(svs.associated)
        for name, img in svs.associated.items():
            assert _max_diff(osr.associated[name], img) <= READER_TOLERANCE, name
        # the whole level, then regions across tile boundaries and past the edges
        assert _max_diff(osr.read_region(0, 0, 0, svs.width, svs.height), level0) <= READER_TOLERANCE
        for x, y, w, h in [(239, 239, 3, 3), (100, 200, 300, 300), (1000, 1500, 517, 333),
                           (2100, 2900, 300, 200), (-50, -70, 200, 200)]:
            assert _max_diff(osr.read_region(0, x, y, w, h),
                             svs.read_region(0, x, y, w, h)) <= READER_TOLERANCE, (x, y, w, h)


def _write_svs(path: Path, svs: TiffSource, level0: np.ndarray) -> list[np.ndarray]:
    """An Aperio SVS of the real tissue with reduced levels, laid out as Aperio does:
    level 0, the thumbnail strip image, the reduced levels (tiled), label, macro."""
    import tifffile

    head = "Aperio Image Library v11.2.1 \r\n"
    meta = "|AppMag = 20|MPP = 0.4990|Date = 12/29/09|Time = 09:59:15"
    levels = [level0, block_mean(level0, 4), block_mean(level0, 16)]
    tiled = dict(metadata=None, photometric="rgb", compression="jpeg",
                 compressionargs={"level": 80}, tile=(240, 240))
    strip = dict(metadata=None, photometric="rgb", rowsperstrip=16)
    w0, h0 = level0.shape[1], level0.shape[0]
    with tifffile.TiffWriter(path) as tw:
        tw.write(levels[0], description=f"{head}{w0}x{h0} [0,0 {w0}x{h0}] (240x240) JPEG/RGB Q=80{meta}",
                 **tiled)
        th = svs.associated["thumbnail"]
        tw.write(th, compression="jpeg", description=f"{head}{w0}x{h0} -> {th.shape[1]}x{th.shape[0]} - {meta}",
                 **strip)
        for lv in levels[1:]:
            tw.write(lv, description=f"{head}{w0}x{h0} -> {lv.shape[1]}x{lv.shape[0]} - {meta}", **tiled)
        lab, mac = svs.associated["label"], svs.associated["macro"]
        tw.write(lab, compression="lzw", subfiletype=1,
                 description=f"{head}label {lab.shape[1]}x{lab.shape[0]}", **strip)
        tw.write(mac, compression="jpeg", subfiletype=9,
                 description=f"{head}macro {mac.shape[1]}x{mac.shape[0]}", **strip)
    return levels


def test_svs_with_reduced_levels(tmp_path, svs, level0):
    """Aperio's thumbnail sits between level 0 and the reduced levels: it must not be
    taken for a level, and both readers must agree on the level geometry and pixels."""
    p = tmp_path / "levels.svs"
    base = level0[:1599, :1203]                # real tissue; odd sizes: ragged levels
    _write_svs(p, svs, base)
    src = open_slide(p)
    assert isinstance(src, TiffSource)
    dims = [(lv.width, lv.height) for lv in src.levels]
    assert dims == [(1203, 1599), (301, 400), (76, 100)]
    # OpenSlide's downsample: the mean of the width and height ratios
    assert [lv.downsample for lv in src.levels] == pytest.approx(
        [1.0, (1203 / 301 + 1599 / 400) / 2, (1203 / 76 + 1599 / 100) / 2], abs=1e-12)
    assert sorted(src.associated) == ["label", "macro", "thumbnail"]
    assert src.best_level_for_downsample(3.99) == 0       # level 1 is 3.9971, not 4 exactly
    assert src.best_level_for_downsample(4) == 1
    reads = [src.read_region(k, 0, 0, *dims[k]) for k in range(3)]
    assert _psnr(reads[0], base) > 30        # JPEG q80 4:2:0 of the real tissue: 32 dB
    assert _psnr(reads[1], block_mean(base, 4)) > 30
    if OPENSLIDE_MISSING:
        pytest.skip(f"OpenSlide comparison skipped: openslide cannot be imported ({OPENSLIDE_MISSING})")
    with OpenSlideSource(p) as osr:
        assert osr.properties["openslide.vendor"] == "aperio"
        assert [(lv.width, lv.height) for lv in osr.levels] == dims
        assert [lv.downsample for lv in osr.levels] == pytest.approx(
            [lv.downsample for lv in src.levels], abs=1e-9)
        assert sorted(osr.associated) == sorted(src.associated)
        for k in range(3):
            assert _max_diff(osr.read_region(k, 0, 0, *dims[k]), reads[k]) <= READER_TOLERANCE, k
        # a region of a reduced level away from the origin: ours is exactly those level
        # pixels. OpenSlide places a region by its level-0 corner, so on a level whose
        # downsample is not an integer (3.9971 here) it samples off the pixel grid:
        # (51, 103) → level 0 (204, 412) → (51.037, 103.075), interpolated; measured
        # max 19, mean 0.62 grey levels. Where the shift is 0.0007 px they agree exactly.
        ours = src.read_region(1, 51, 103, 200, 180)
        assert np.array_equal(ours, reads[1][103:283, 51:251])
        theirs = osr.read_region(1, 51, 103, 200, 180)
        assert _max_diff(theirs, ours) <= 19
        assert np.abs(theirs.astype(float) - ours).mean() < 1
        assert _max_diff(osr.read_region(1, 1, 2, 150, 150),
                         src.read_region(1, 1, 2, 150, 150)) <= READER_TOLERANCE


def test_a_strip_image_of_the_same_shape_is_not_a_level(tmp_path, level0):
    """A generic (non-Aperio) TIFF: a tiled image, a strip overview of the same aspect
    ratio, a tiled reduced level. As OpenSlide's generic reader: only tiled images are
    levels."""
    import tifffile

    p = tmp_path / "generic.tif"
    img = level0[:1024, :768]
    with tifffile.TiffWriter(p) as tw:
        tw.write(img, photometric="rgb", tile=(256, 256), metadata=None)
        tw.write(block_mean(img, 3), photometric="rgb", rowsperstrip=64, metadata=None)
        tw.write(block_mean(img, 4), photometric="rgb", tile=(256, 256), metadata=None)
    src = open_slide(p)
    assert [(lv.width, lv.height) for lv in src.levels] == [(768, 1024), (192, 256)]
    assert np.array_equal(src.read_region(1, 0, 0, 192, 256), block_mean(img, 4))


# --------------------------------------------------------------------------- ingest
@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    st = new_store(tmp_path_factory.mktemp("real-store"))
    # as `medview-slide ingest CMU-1-Small-Region.svs --patient ... --accession ...`
    row = st.ingest(SVS, patient_id="CMU-1", accession="CMU-1-SR", tile_size=512)
    yield st, row
    st.close()


def test_ingest_of_the_real_svs(ingested, level0, svs):
    st, row = ingested
    _row, s = st.open(row["pk"])
    assert row["width"] == 2220 and row["height"] == 2967 and row["mpp"] == pytest.approx(0.499)
    assert row["acquired_at"] == "2009-12-29T09:59:15" and row["state"] == "high"
    assert s.manifest["source"]["reader"] == "tiff" and s.manifest["objective_power"] == 20.0
    geo = [(g.width, g.height, g.downsample) for g in s.levels]
    assert geo == [(2220, 2967, 1), (1110, 1484, 2), (555, 742, 4), (278, 371, 8)]
    # level 0 is lossless: bit for bit the source's level 0
    assert np.array_equal(s.read_region(0, 0, 0, 2220, 2967), level0)
    # level k is level 0 halved k times (2×2 block mean, rounded; the odd last row and
    # column average what they cover): bit for bit, whether the ingest read it from the
    # source (levels 1, 2) or reduced the previous output level (level 3)
    ref = level0
    for k in range(1, len(s.levels)):
        ref = block_mean(ref, 2)
        g = s.levels[k]
        assert np.array_equal(s.read_region(k, 0, 0, g.width, g.height), ref), k
    # the last row of an odd level is the mean of the one source row it covers, not
    # blended with the white beyond the slide
    assert np.array_equal(s.read_region(1, 0, 1483, 1110, 1), block_mean(level0[2966:], 2))
    # label, macro and thumbnail kept, every file verifies
    for name in ("label", "macro", "thumbnail"):
        assert np.array_equal(s.associated(name), svs.associated[name])
    assert s.verify() == []


def test_qc_passes_the_real_slide_and_its_stored_pyramid(ingested, svs):
    st, row = ingested
    assert row["qc_status"] == "pass" and row["qc"]["flags"] == []
    # the source, read directly (one level: its overview is level 0 reduced 4×, as the
    # stored pyramid's level 2), gets the same measures
    direct = check_slide(svs)
    assert direct["flags"] == [] and direct["overview_downsample"] == 4
    for k in ("tissue_fraction", "cast_delta", "background_cast", "fold_fraction", "blur_median"):
        assert direct[k] == pytest.approx(row["qc"][k], rel=1e-3, abs=1e-3), k
    # an H&E slide of unknown stain is judged against the H&E reference, not the IHC one
    assert "H&E" in direct["reference"] and "nearest" in direct["reference_choice"]
    assert direct["blur_median"] > 1000 and direct["fold_fraction"] < 0.03
    # dense epidermis on loose dermis is not a fold: OD is compared within a colour
    # (the tissue-wide median alone put 13 % of this slide above 1.7×)
    # and the reference matters: against the IHC colours (stain named "IHC") this H&E
    # slide would be flagged
    overview = svs.read_scaled(4, 0, 0, 555, 742)
    mask = tissue_mask(overview)
    ref, why = choose_reference(overview, mask, "IHC")
    assert ref["name"] == load_reference(stain="ihc")["name"] and "IHC" in why
    ihc = colour_measures(overview, mask, ref)
    th = QCThresholds()
    assert ihc["cast_delta"] > th.cast_max and ihc["hist_distance"] > th.hist_max


def test_qc_flags_degraded_copies_of_the_real_slide(level0, ingested):
    clean = ingested[1]["qc"]
    v = variants(level0, names=("blurred", "colour-shifted"))
    blurred = check_slide(ArraySource(v["blurred"], mpp=0.499))
    assert blurred["flags"] == ["blur"]
    assert blurred["blur_median"] < 0.05 * clean["blur_median"]
    shifted = check_slide(ArraySource(v["colour-shifted"], mpp=0.499), stain="H&E")
    assert shifted["flags"] == ["colour-cast"]
    # the glass turns yellow (a reference-free measure) and the tissue moves off H&E
    assert shifted["background_cast"] > 10 and shifted["cast_delta"] > 8
    assert abs(shifted["tissue_fraction"] - clean["tissue_fraction"]) < 0.02


# --------------------------------------------------------------------------- DICOM WSI
# a 1000×740 piece of real tissue: 4×3 tiles of 256, the last column and row ragged
PIECE = (600, 900, 1000, 740)
MISSING = {(0, 0), (3, 1), (2, 2)}          # (tile column, tile row) a sparse scan skipped


@pytest.fixture(scope="module")
def piece(level0):
    x, y, w, h = PIECE
    return np.ascontiguousarray(level0[y:y + h, x:x + w])


def _present(shape, missing, tile: int = 256) -> np.ndarray:
    """(h, w) mask of the pixels in tiles a sparse scan holds."""
    m = np.ones(shape[:2], bool)
    for c, r in missing:
        m[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = False
    return m


def _without(img: np.ndarray, missing, tile: int = 256) -> np.ndarray:
    out = img.copy()
    out[~_present(img.shape, missing, tile)] = 255
    return out


def test_dicom_tiled_sparse_and_full(tmp_path, piece):
    """The same real tissue as TILED_FULL (uncompressed) and as TILED_SPARSE with tiles
    missing and frames shuffled (uncompressed, and JPEG 2000 lossless)."""
    full, sparse, sparse_j2k = tmp_path / "full", tmp_path / "sparse", tmp_path / "sparse-j2k"
    write_dicom_wsi(full, piece, tile=256, levels=2, mpp=0.499)
    write_dicom_wsi(sparse, piece, tile=256, levels=2, mpp=0.499,
                    organisation="TILED_SPARSE", missing=MISSING, shuffle_seed=7)
    write_dicom_wsi(sparse_j2k, piece, tile=256, levels=1, mpp=0.499, codec="j2k",
                    organisation="TILED_SPARSE", missing=MISSING, shuffle_seed=11)
    f, s, j = (open_slide(p) for p in (full, sparse, sparse_j2k))
    assert all(isinstance(x, DicomWsiSource) for x in (f, s, j))
    assert s.properties["DimensionOrganizationType"] == "TILED_SPARSE"
    assert j.properties["TransferSyntaxUID"] == "1.2.840.10008.1.2.4.90"
    for src in (f, s):
        assert [(lv.width, lv.height) for lv in src.levels] == [(1000, 740), (500, 370)]
        assert src.mpp == pytest.approx((0.499, 0.499))
    # TILED_FULL: exactly the source. TILED_SPARSE (frames in a shuffled order): exactly
    # the source where a tile exists, background (white) where the scan has none
    full0 = f.read_region(0, 0, 0, 1000, 740)
    assert np.array_equal(full0, piece)
    want = _without(piece, MISSING)
    for src in (s, j):
        assert np.array_equal(src.read_region(0, 0, 0, 1000, 740), want)
    # the same data both ways: the same pixels wherever both hold a tile
    present = _present(piece.shape, MISSING)
    assert np.array_equal(s.read_region(0, 0, 0, 1000, 740)[present], full0[present])
    assert np.array_equal(s.read_region(1, 0, 0, 500, 370), f.read_region(1, 0, 0, 500, 370))
    assert np.array_equal(f.read_region(1, 0, 0, 500, 370), block_mean(piece, 2))
    # regions across present and missing tiles, partly outside the matrix
    for x, y, w, h in [(200, 200, 120, 90), (700, 200, 120, 120), (900, 600, 200, 200)]:
        ref = np.full((h, w, 3), 255, np.uint8)
        x1, y1 = min(1000, x + w), min(740, y + h)
        ref[:y1 - y, :x1 - x] = want[y:y1, x:x1]
        for src in (s, j):
            assert np.array_equal(src.read_region(0, x, y, w, h), ref), (x, y, w, h)
    if OPENSLIDE_MISSING:
        return
    # OpenSlide 4 reads DICOM WSI too (sparse holes are transparent there, white here)
    for folder, ours in ((full, f), (sparse, s), (sparse_j2k, j)):
        with OpenSlideSource(folder / "level0.dcm") as osr:
            assert osr.properties["openslide.vendor"] == "dicom"
            assert [(lv.width, lv.height) for lv in osr.levels] == \
                [(lv.width, lv.height) for lv in ours.levels]
            for k, lv in enumerate(ours.levels):
                assert _max_diff(osr.read_region(k, 0, 0, lv.width, lv.height),
                                 ours.read_region(k, 0, 0, lv.width, lv.height)) \
                    <= READER_TOLERANCE, (folder.name, k)


def test_dicom_tiled_sparse_jpeg_baseline(tmp_path, piece):
    """JPEG baseline (YBR_FULL_422), the transfer syntax most scanners write: sparse and
    full decode to the same pixels (the same frames), close to the source."""
    write_dicom_wsi(tmp_path / "full", piece, tile=256, levels=1, codec="jpeg")
    write_dicom_wsi(tmp_path / "sparse", piece, tile=256, levels=1, codec="jpeg",
                    organisation="TILED_SPARSE", missing=MISSING, shuffle_seed=3)
    f, s = open_slide(tmp_path / "full"), open_slide(tmp_path / "sparse")
    a, b = f.read_region(0, 0, 0, 1000, 740), s.read_region(0, 0, 0, 1000, 740)
    present = _present(piece.shape, MISSING)
    assert np.array_equal(a[present], b[present]) and (b[~present] == 255).all()
    assert _psnr(a, piece) > 29               # JPEG q90, 4:2:0 of the real tissue: 30.5 dB
    if OPENSLIDE_MISSING:
        return
    with OpenSlideSource(tmp_path / "sparse" / "level0.dcm") as osr:
        theirs = osr.read_region(0, 0, 0, 1000, 740)
        assert _max_diff(theirs, b) <= DICOM_JPEG_DECODER_TOLERANCE
        assert np.abs(theirs.astype(float) - b).mean() < 0.5
        assert (theirs[~present] == 255).all()


def test_dicom_positions_without_an_organisation_type(tmp_path, piece):
    """No Dimension Organization Type but per-frame positions: read as TILED_SPARSE
    (wsidicom's rule), not as row-major frames."""
    import pydicom

    write_dicom_wsi(tmp_path / "w", piece, tile=256, levels=1,
                    organisation="TILED_SPARSE", missing=MISSING, shuffle_seed=5)
    p = tmp_path / "w" / "level0.dcm"
    ds = pydicom.dcmread(p)
    del ds.DimensionOrganizationType
    ds.save_as(p)
    assert np.array_equal(open_slide(tmp_path / "w").read_region(0, 0, 0, 1000, 740),
                          _without(piece, MISSING))


# --------------------------------------------------------------------------- damaged DICOM
@pytest.fixture(scope="module")
def dicom_files(tmp_path_factory, piece):
    out = {}
    for codec in ("native", "j2k"):
        d = tmp_path_factory.mktemp(f"good-{codec}")
        write_dicom_wsi(d, piece[:512, :512], tile=256, levels=1, codec=codec,
                        organisation="TILED_SPARSE")
        out[codec] = (d / "level0.dcm").read_bytes()
    return out


def _damaged(tmp_path: Path, name: str, data: bytes) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "level0.dcm").write_bytes(data)
    return d


@pytest.mark.parametrize("codec,where,match", [
    ("native", 0.5, "truncated pixel data"),
    ("native", -100, "truncated pixel data"),
    ("j2k", 0.5, "truncated pixel data"),
    ("j2k", -100, "truncated pixel data"),
    ("native", 2500, "no pixel data where the header ends"),  # in the per-frame groups
    ("native", 200, "without SOP Class UID"),                 # in the file meta header
])
def test_truncated_dicom_wsi_is_refused_clearly(tmp_path, dicom_files, codec, where, match):
    data = dicom_files[codec]
    cut = int(len(data) * where) if isinstance(where, float) else (
        len(data) + where if where < 0 else where)
    d = _damaged(tmp_path, "cut", data[:cut])
    with pytest.raises(SlideFormatError, match=match) as e:
        DicomWsiSource(d)
    assert "level0.dcm" in str(e.value)
    # open_slide names the reader and its reason
    with pytest.raises(SlideFormatError, match="dicom-wsi: .*level0.dcm"):
        open_slide(d)


def test_damaged_frame_is_a_clear_error_at_the_read(tmp_path, dicom_files):
    data = bytearray(dicom_files["j2k"])
    soc = [i for i in range(len(data) - 4) if data[i:i + 4] == b"\xff\x4f\xff\x51"]
    assert len(soc) == 4                               # one codestream per frame
    data[soc[2]:soc[2] + 64] = bytes(64)               # the third frame's main header wiped
    src = DicomWsiSource(_damaged(tmp_path, "bad", bytes(data)))
    assert src.read_region(0, 0, 0, 256, 256).shape == (256, 256, 3)     # frame 0 is fine
    with pytest.raises(SlideFormatError, match="frame 2 cannot be decoded"):
        src.read_region(0, 0, 0, 512, 512)


def test_inconsistent_dicom_wsi_is_refused(tmp_path, dicom_files, piece):
    import pydicom

    # TILED_FULL with fewer frames than the matrix needs
    write_dicom_wsi(tmp_path / "short", piece[:512, :512], tile=256, levels=1)
    p = tmp_path / "short" / "level0.dcm"
    ds = pydicom.dcmread(p)
    ds.TotalPixelMatrixColumns = 1000
    ds.save_as(p)
    with pytest.raises(SlideFormatError, match="TILED_FULL needs 4×2 = 8 frames"):
        DicomWsiSource(tmp_path / "short")
    # a sparse frame off the tile grid
    d = _damaged(tmp_path, "offgrid", dicom_files["native"])
    ds = pydicom.dcmread(d / "level0.dcm")
    ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSlideSequence[0] \
        .ColumnPositionInTotalImagePixelMatrix = 100
    ds.save_as(d / "level0.dcm")
    with pytest.raises(SlideFormatError, match="not on the 256×256 tile grid"):
        DicomWsiSource(d)
