"""Ingest, store and sample-data tests.

Lossless round trips run on real images shipped with pydicom and pydicom-data (located
locally, never downloaded); crash safety is checked both by an exception injected between
the file writes and the catalogue transaction, and by SIGKILL-ing a command-line ingest of
the 64-slice phantom.
"""
from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import os
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from client.session import Session
from codestream.encode import decode_full
from server import ingest as ingest_module
from server import sample
from server.catalogue import Catalogue
from server.cli import main as cli_main
from server.ingest import CONFLICT_REASON, NOT_DICOM, NOT_IMAGE, ingest_paths
from server.store import Store, StoreIntegrityError
from server.fsck import fsck
from waits import WAIT_S

REPO = Path(__file__).resolve().parents[1]


def _testfile(name: str) -> Path:
    p = sample.find_test_file(name)
    if p is None:
        pytest.skip(f"test file {name} not installed")
    return p


@pytest.fixture(scope="module")
def ingest_phantom_dir(tmp_path_factory) -> Path:
    """The default 64-slice 512x512 phantom, written once for this module."""
    out = tmp_path_factory.mktemp("phantom")
    sample.make_sample_ct(out, slices=64, size=512, seed=0)
    return out


def _expected_frames(path: Path) -> list[np.ndarray]:
    """Reference pixels straight from pydicom (YCbCr -> RGB by pydicom, palettes through
    their LUT reduced to 8 bits as the ingest documents)."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    frames = list(arr) if nframes > 1 else [arr]
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        out = []
        for f in frames:
            rgb = apply_color_lut(f, ds)
            if rgb.dtype != np.uint8:
                assert not (rgb & 0xFF).any(), "test expects 8-bit LUT entries in the high byte"
                rgb = (rgb >> 8).astype(np.uint8)
            out.append(rgb)
        frames = out
    return frames


ROUND_TRIP_FILES = [
    ("CT_small.dcm", "MONOCHROME2"),              # CT, signed 16-bit
    ("693_J2KR.dcm", "MONOCHROME2"),              # CT signed, JPEG 2000 lossless original
    ("MR_small.dcm", "MONOCHROME2"),              # MR signed 16-bit
    ("MR_small_bigendian.dcm", "MONOCHROME2"),    # explicit big endian
    ("MR_small_implicit.dcm", "MONOCHROME2"),     # implicit little endian
    ("emri_small.dcm", "MONOCHROME2"),            # multi-frame (10), 12-bit unsigned
    ("emri_small_RLE.dcm", "MONOCHROME2"),        # RLE, multi-frame
    ("emri_small_jpeg_ls_lossless.dcm", "MONOCHROME2"),   # JPEG-LS
    ("RG3_J2KR.dcm", "MONOCHROME1"),              # CR, MONOCHROME1, JPEG 2000 original
    ("JPEG-LL.dcm", "MONOCHROME2"),               # NM, JPEG lossless, signed 16-bit
    ("JPGExtended.dcm", "MONOCHROME2"),           # JPEG extended 12-bit
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", "MONOCHROME2"),    # US 8-bit JPEG lossless
    ("image_dfl.dcm", "MONOCHROME2"),             # deflated explicit VR LE, 8-bit
    ("US1_UNCR.dcm", "RGB"),                      # US RGB
    ("US1_J2KR.dcm", "RGB"),                      # US YBR_RCT JPEG 2000
    ("SC_rgb.dcm", "RGB"),                        # RGB 8-bit
    ("SC_rgb_16bit_2frame.dcm", "RGB"),           # RGB 16-bit, 2 frames
    ("SC_rgb_rle.dcm", "RGB"),                    # RLE colour
    ("SC_rgb_jpeg_dcmtk.dcm", "RGB"),             # YBR_FULL JPEG baseline
    ("SC_ybr_full_422_uncompressed.dcm", "RGB"),  # native YBR_FULL_422
    ("OBXXXX1A.dcm", "RGB"),                      # PALETTE COLOR
    ("liver.dcm", "MONOCHROME2"),                 # 1-bit segmentation, 3 frames
]


@pytest.mark.parametrize("name,photometric", ROUND_TRIP_FILES,
                         ids=[n for n, _ in ROUND_TRIP_FILES])
def test_lossless_round_trip_real_images(tmp_path, name, photometric):
    src = _testfile(name)
    store = Store(tmp_path / "store")
    report = ingest_paths([src], store)
    assert [s.reason for s in report.skipped] == []
    assert len(report.imported) == 1
    imp = report.imported[0]
    expected = _expected_frames(src)
    assert imp.frames == len(expected)

    cat = store.catalogue
    images = cat.series_images(imp.series_instance_uid)
    assert [im["frame"] for im in images] == list(range(1, len(expected) + 1))
    for im, exp in zip(images, expected):
        assert im["PhotometricInterpretation"] == photometric
        assert im["SamplesPerPixel"] == (3 if photometric == "RGB" else 1)
        assert (im["Rows"], im["Columns"]) == exp.shape[:2]
        cs = store.read_verified(im["codestream_relpath"], im["codestream_sha256"],
                                 im["codestream_size"])
        got = decode_full(cs, im["offset"], im["signed"])
        assert got.shape == exp.shape
        assert np.array_equal(got.astype(np.int64), exp.astype(np.int64)), name
        idx = store.read_verified(im["index_relpath"], im["index_sha256"])
        assert idx.startswith(b"{")

    # The original is kept bit for bit.
    inst = cat.find_instance(imp.sop_instance_uid)
    assert store.read_verified(inst["original_relpath"], inst["original_sha256"]) \
        == src.read_bytes()
    assert inst["TransferSyntaxUID"] == str(pydicom.dcmread(src, stop_before_pixels=True)
                                            .file_meta.TransferSyntaxUID)
    header = cat.instance_header(imp.sop_instance_uid)
    assert "7FE00010" not in header
    assert header["00080018"]["Value"] == [imp.sop_instance_uid]
    store.close()


def test_unsupported_32bit_is_skipped_with_reason(tmp_path):
    store = Store(tmp_path / "store")
    report = ingest_paths([_testfile("rtdose_1frame.dcm"), _testfile("SC_rgb_32bit.dcm")],
                          store)
    assert not report.imported
    assert len(report.skipped) == 2
    for s in report.skipped:
        assert s.reason.startswith("BitsAllocated 32 not supported"), s.reason
    store.close()


def _write_dicom(path: Path, arr: np.ndarray, *, bits_stored: int,
                 photometric: str = "MONOCHROME2") -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OB" if arr.dtype.itemsize == 1 else "OW"
    ds.save_as(path, enforce_file_format=True)


def test_32bit_values_that_fit_16_bits_are_imported(tmp_path):
    rng = np.random.default_rng(1)
    small = rng.integers(0, 60000, (40, 50)).astype(np.uint32)
    signed = rng.integers(-30000, 30000, (40, 50)).astype(np.int32)
    big = small.copy()
    big[0, 0] = 1 << 20
    _write_dicom(tmp_path / "small.dcm", small, bits_stored=32)
    _write_dicom(tmp_path / "signed.dcm", signed, bits_stored=32)
    _write_dicom(tmp_path / "big.dcm", big, bits_stored=32)
    store = Store(tmp_path / "store")
    report = ingest_paths([tmp_path / n for n in ("small.dcm", "signed.dcm", "big.dcm")],
                          store)
    assert sorted(i.path.name for i in report.imported) == ["signed.dcm", "small.dcm"]
    assert report.skipped_reason(tmp_path / "big.dcm").startswith(
        "BitsAllocated 32 not supported")
    for imp, ref in zip(sorted(report.imported, key=lambda i: i.path.name), (signed, small)):
        im = store.catalogue.series_images(imp.series_instance_uid)[0]
        assert im["BitsAllocated"] == 16 and im["bits_stored"] <= 16
        cs = store.read_verified(im["codestream_relpath"], im["codestream_sha256"])
        assert np.array_equal(decode_full(cs, im["offset"], im["signed"]).astype(np.int64),
                              ref.astype(np.int64))
    store.close()


def test_mixed_folder(tmp_path):
    src = tmp_path / "in"
    (src / "nested" / "deeper").mkdir(parents=True)
    ct = _testfile("CT_small.dcm")
    shutil.copy(ct, src / "ct.dcm")
    shutil.copy(_testfile("MR_small.dcm"), src / "nested" / "MRIMAGE")        # no suffix
    shutil.copy(_testfile("emri_small.dcm"), src / "nested" / "deeper" / "e.bin")
    shutil.copy(_testfile("test-SR.dcm"), src / "report.dcm")               # not an image
    (src / "notes.txt").write_text("not an image\n")
    (src / "fake.dcm").write_bytes(b"hello, I am not DICOM at all" * 20)
    (src / "tiny.dcm").write_bytes(b"x")
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(src / "picture.png")
    (src / "truncated.dcm").write_bytes(ct.read_bytes()[:1000])
    mr_trunc = _testfile("MR_truncated.dcm")   # pixel data cut short
    shutil.copy(mr_trunc, src / "nested" / "mr_truncated.dcm")

    store = Store(tmp_path / "store")
    logs: list[str] = []
    progress: list[tuple[int, int]] = []
    report = ingest_paths([src], store, log=logs.append,
                          progress=lambda d, t: progress.append((d, t)))
    imported = sorted(p.path.name for p in report.imported)
    assert imported == ["MRIMAGE", "ct.dcm", "e.bin"]
    reasons = {s.path.name: s for s in report.skipped}
    assert set(reasons) == {"report.dcm", "notes.txt", "fake.dcm", "tiny.dcm", "picture.png",
                            "truncated.dcm", "mr_truncated.dcm"}
    for name in ("notes.txt", "fake.dcm", "tiny.dcm", "picture.png"):
        assert reasons[name].kind == NOT_DICOM
        assert reasons[name].reason.startswith("not DICOM")
    assert reasons["report.dcm"].kind == NOT_IMAGE
    assert "not an image" in reasons["report.dcm"].reason
    assert "truncated" in reasons["truncated.dcm"].reason
    assert reasons["truncated.dcm"].is_error
    assert reasons["mr_truncated.dcm"].is_error
    assert not report.ok
    assert len(logs) == 10
    assert progress[-1] == (10, 10)
    counts = store.catalogue.counts()
    assert counts["instances"] == 3 and counts["frames"] == 12
    assert fsck(store).clean
    store.close()


def test_cli_ingest_exit_codes(tmp_path, capsys):
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(_testfile("CT_small.dcm"), good / "a")
    (good / "readme.txt").write_text("hi")
    assert cli_main(["ingest", str(good), "--store", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "1 imported" in out and "not DICOM" in out
    # Again: a duplicate, still fine.
    assert cli_main(["ingest", str(good), "--store", str(tmp_path / "s")]) == 0
    assert "1 duplicates" in capsys.readouterr().out
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "t.dcm").write_bytes(_testfile("CT_small.dcm").read_bytes()[:1000])
    assert cli_main(["ingest", str(bad), "--store", str(tmp_path / "s")]) == 1
    assert cli_main(["ingest", str(tmp_path / "nope"), "--store", str(tmp_path / "s")]) == 2
    with pytest.raises(SystemExit) as e:
        cli_main(["ingest"])
    assert e.value.code == 2
    assert cli_main(["fsck", "--store", str(tmp_path / "s")]) == 0


def test_reingest_is_noop(tmp_path):
    files = [_testfile(n) for n in ("CT_small.dcm", "MR_small.dcm", "emri_small.dcm")]
    store = Store(tmp_path / "store")
    first = ingest_paths(files, store)
    assert len(first.imported) == 3
    counts = store.catalogue.counts()
    listing = sorted(store.iter_files())
    mtimes = {p: store.abspath(p).stat().st_mtime_ns for p in listing}
    second = ingest_paths(files, store)
    assert not second.imported and not second.skipped
    assert len(second.duplicates) == 3
    assert store.catalogue.counts() == counts
    assert sorted(store.iter_files()) == listing
    assert {p: store.abspath(p).stat().st_mtime_ns for p in listing} == mtimes
    store.close()


def test_same_sop_uid_different_bytes_is_quarantined(tmp_path):
    store = Store(tmp_path / "store")
    assert len(ingest_paths([_testfile("MR_small.dcm")], store).imported) == 1
    report = ingest_paths([_testfile("MR_small_RLE.dcm")], store)
    assert not report.skipped and not report.imported
    assert [q.reason.split(":")[0] for q in report.quarantined] == [CONFLICT_REASON]
    # Two conflicting files in the same batch: the first is stored, the second kept aside.
    store2 = Store(tmp_path / "store2")
    report = ingest_paths([_testfile("emri_small.dcm"), _testfile("emri_small_RLE.dcm"),
                           _testfile("emri_small.dcm")], store2)
    assert len(report.imported) == 1 and len(report.duplicates) == 1
    assert len(report.quarantined) == 1 and not report.skipped
    assert "transfer syntax differs" in report.quarantined[0].reason
    assert fsck(store2).clean
    store.close()
    store2.close()


class _Crash(BaseException):
    """Stands for the process dying (not an ordinary, handled error)."""


def test_crash_between_files_and_catalogue(tmp_path, monkeypatch):
    files = [_testfile(n) for n in ("CT_small.dcm", "MR_small.dcm", "emri_small.dcm",
                                    "US1_UNCR.dcm")]
    store = Store(tmp_path / "store")
    real_add = Catalogue.add_instance
    calls = {"n": 0}

    def crashing_add(self, instance, frames):
        calls["n"] += 1
        if calls["n"] == 3:        # files of the third instance are on disk by now
            raise _Crash()
        return real_add(self, instance, frames)

    monkeypatch.setattr(Catalogue, "add_instance", crashing_add)
    # commits go in batches (one transaction each): two files a batch here, so the crash
    # in the second batch loses that batch and keeps the first
    monkeypatch.setattr(ingest_module, "COMMIT_BATCH_FILES", 2)
    with pytest.raises(_Crash):
        ingest_paths(files, store)
    monkeypatch.setattr(Catalogue, "add_instance", real_add)

    report = fsck(store)
    assert report.consistent                 # every row has its files, checksums match
    assert report.orphans                    # the crashed instance left orphans only
    assert store.catalogue.counts()["instances"] == 2

    again = ingest_paths(files, store)
    assert len(again.imported) == 2 and len(again.duplicates) == 2
    assert store.catalogue.counts()["instances"] == 4
    assert fsck(store).clean                # the orphans were rewritten and adopted
    store.close()


def test_sigkill_during_cli_ingest(tmp_path, ingest_phantom_dir):
    store_dir = tmp_path / "store"
    cmd = [sys.executable, "-m", "server.cli", "ingest", str(ingest_phantom_dir),
           "--store", str(store_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    imported = 0
    deadline = time.monotonic() + WAIT_S
    try:
        while imported < 6 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            imported += line.startswith("imported")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=WAIT_S)
        proc.stdout.close()
    assert imported >= 6, "the ingest finished or failed before it could be killed"

    store = Store(store_dir)
    n = store.catalogue.counts()["instances"]
    assert 6 <= n < 64
    report = fsck(store)
    assert report.consistent, report.format()
    for im in store.catalogue.series_images(store.catalogue.query_series()[0]
                                            ["SeriesInstanceUID"]):
        store.read_verified(im["codestream_relpath"], im["codestream_sha256"])

    again = ingest_paths([ingest_phantom_dir], store)
    assert not again.skipped
    assert len(again.imported) + len(again.duplicates) == 64
    assert len(again.duplicates) == n
    assert store.catalogue.counts()["instances"] == 64
    final = fsck(store, repair=True)          # at most temp-file orphans remain
    assert final.consistent and final.clean
    assert all(".tmp-" in o for o in final.orphans), final.orphans
    assert fsck(store).orphans == []
    store.close()


def test_truncated_codestream_detected(tmp_path):
    store = Store(tmp_path / "store")
    report = ingest_paths([_testfile("CT_small.dcm")], store)
    im = store.catalogue.series_images(report.imported[0].series_instance_uid)[0]
    path = store.abspath(im["codestream_relpath"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreIntegrityError) as e:
        store.read_verified(im["codestream_relpath"], im["codestream_sha256"])
    msg = str(e.value)
    assert im["codestream_relpath"] in msg and "SHA-256 mismatch" in msg
    with pytest.raises(StoreIntegrityError, match="size is"):
        store.read_verified(im["codestream_relpath"], im["codestream_sha256"],
                            im["codestream_size"])
    fsck_report = fsck(store)
    assert [d[0] for d in fsck_report.damaged] == [im["codestream_relpath"]]
    path.unlink()
    with pytest.raises(StoreIntegrityError, match="missing"):
        store.read_verified(im["codestream_relpath"], im["codestream_sha256"])
    assert [m[0] for m in fsck(store).missing] == [im["codestream_relpath"]]
    assert cli_main(["fsck", "--store", str(tmp_path / "store")]) == 1
    store.close()


def test_store_basics(tmp_path):
    store = Store(tmp_path / "s")
    rel, sha = store.put_original(b"abc")
    assert rel == f"originals/{sha[:2]}/{sha}.dcm"
    assert store.put_original(b"abc") == (rel, sha)
    store.abspath(rel).write_bytes(b"abX")           # damaged copy is rewritten
    store.put_original(b"abc")
    assert store.abspath(rel).read_bytes() == b"abc"
    assert store.codestream_paths("1.2.3", "1.2.3.4", 2) == (
        "j2k/1.2.3/1.2.3.4.2.j2k", "j2k/1.2.3/1.2.3.4.2.idx.json")
    j2k, _ = store.codestream_paths("../../etc", "1.2", 1)
    assert ".." not in j2k and j2k.startswith("j2k/x-")
    with pytest.raises(Exception):
        store.abspath("../outside")
    digest = store.atomic_write("j2k/a/b.bin", b"123")
    assert digest == hashlib.sha256(b"123").hexdigest()
    assert store.read_verified("j2k/a/b.bin", digest) == b"123"
    assert not [p for p in store.iter_files() if ".tmp-" in p]
    fsck_report = fsck(store, repair=True)
    assert sorted(fsck_report.removed) == sorted([rel, "j2k/a/b.bin"])
    store.close()


# ----------------------------------------------------------------------------- sample data

def test_sample_ct_phantom(ingest_phantom_dir):
    paths = sorted(ingest_phantom_dir.glob("*.dcm"))
    assert len(paths) == 64
    dss = [pydicom.dcmread(p) for p in paths]
    first = dss[0]
    assert (first.Rows, first.Columns) == (512, 512)
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert first.SOPClassUID == sample.CT_IMAGE_STORAGE
    assert first.Modality == "CT" and first.BodyPartExamined == "CHEST"
    assert str(first.PatientName) == "PHANTOM^CT" and first.PatientID == "MV-0001"
    assert (first.PixelRepresentation, first.RescaleIntercept, first.RescaleSlope) == (0, -1024, 1)
    assert (first.WindowCenter, first.WindowWidth) == (40, 400)
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in first.PixelSpacing] == [0.7, 0.7]
    assert [int(d.InstanceNumber) for d in dss] == list(range(1, 65))
    z = np.array([float(d.ImagePositionPatient[2]) for d in dss])
    assert np.allclose(np.diff(z), -2.5)
    assert float(first.SliceThickness) == 2.5 == float(first.SpacingBetweenSlices)
    assert len({d.SeriesInstanceUID for d in dss}) == 1
    assert len({d.SOPInstanceUID for d in dss}) == 64

    def hu(ds):
        return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(
            ds.RescaleIntercept)

    top, bottom = hu(dss[10]), hu(dss[56])
    assert abs(top[5:40, 5:40].mean() - sample.AIR_HU) < 5            # air corner
    assert 5 < top[5:40, 5:40].std() < 15                              # noise ~10 HU
    c = 256                                                            # image centre
    lung = top[c + 20:c + 60, c - 120:c - 90]                          # right lung
    assert abs(lung.mean() - sample.LUNG_HU) < 10
    fat = bottom[c - 5:c + 5, c - 232:c - 228]                         # fat ring, lateral
    assert abs(fat.mean() - sample.FAT_HU) < 15
    liver = bottom[c - 10:c + 10, c - 100:c - 80]
    assert abs(liver.mean() - sample.LIVER_HU) < 6
    muscle = bottom[c - 40:c - 20, c + 60:c + 80]                      # soft tissue
    assert abs(muscle.mean() - sample.SOFT_TISSUE_HU) < 8
    bone = top[c + 105:c + 118, c - 4:c + 4]                           # vertebral body
    assert 650 < bone.mean() < 1250 and bone.min() > 500

    x0, y0, _ = (float(v) for v in first.ImagePositionPatient)
    for s in sample.SAMPLE_SPHERES:
        k = int(round(-s.center[2] / 2.5))
        img = hu(dss[k])
        col = int(round((s.center[0] - x0) / 0.7))
        row = int(round((s.center[1] - y0) / 0.7))
        patch = img[row - 3:row + 4, col - 3:col + 4]
        assert abs(patch.mean() - s.hu) < 6, s


def test_sample_ct_deterministic_uids(tmp_path):
    a = sample.make_sample_ct(tmp_path / "a", slices=3, size=64, seed=7)
    b = sample.make_sample_ct(tmp_path / "b", slices=3, size=64, seed=7)
    c = sample.make_sample_ct(tmp_path / "c", slices=3, size=64, seed=8)

    def uids(paths):
        return [(d.StudyInstanceUID, d.SeriesInstanceUID, d.SOPInstanceUID,
                 d.FrameOfReferenceUID) for d in map(pydicom.dcmread, paths)]

    assert uids(a) == uids(b)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert not set(sum(uids(a), ())) & set(sum(uids(c), ()))


def test_sample_real_files_available():
    files = sample.sample_real_files()
    assert len(files) == len(sample.REAL_SAMPLE_FILES)
    mods = {pydicom.dcmread(f, stop_before_pixels=True).Modality for f in files}
    assert {"CT", "MR", "CR", "US"} <= mods


def test_ensure_sample_store_is_idempotent(tmp_path, monkeypatch):
    # Keep it quick: a small phantom and two real files.
    monkeypatch.setattr(sample, "REAL_SAMPLE_FILES",
                        (("CT_small.dcm", "CT"), ("US1_UNCR.dcm", "US RGB")))
    store = sample.ensure_sample_store(tmp_path / "s", slices=4, size=64, slide=False)
    cat = store.catalogue
    assert cat.get_setting(sample.SAMPLE_SETTING)
    assert cat.counts()["instances"] == 6
    phantom = cat.query_studies(PatientID="MV-0001")
    assert len(phantom) == 1 and phantom[0]["NumberOfStudyRelatedInstances"] == 4
    store.close()
    again = sample.ensure_sample_store(tmp_path / "s", slices=4, size=64, slide=False)
    assert again.catalogue.counts()["instances"] == 6
    for st in again.catalogue.query_studies():
        again.delete_study(st["StudyInstanceUID"])
    assert again.catalogue.counts()["studies"] == 0
    again.close()
    third = sample.ensure_sample_store(tmp_path / "s", slices=4, size=64, slide=False)
    assert third.catalogue.counts()["studies"] == 0      # not re-added after deletion
    assert fsck(third).clean
    third.close()


def test_sample_slide_is_added_once_and_served(tmp_path):
    """First run also brings the real sample slide (H&E, Aperio SVS), once; it is served
    through the bundled server's slide routes like any slide."""
    from client.slides import RemoteSlide
    from server.slide_store import SlideStore
    from server.embedded import EmbeddedServer

    store = Store(tmp_path / "s")
    row = sample.ensure_sample_slide(store)
    assert row is not None and row["patient_id"] == sample.SAMPLE_SLIDE_PATIENT[0]
    assert (row["width"], row["height"]) == (2220, 2967) and row["qc_status"] == "pass"
    assert store.catalogue.get_setting(sample.SAMPLE_SLIDE_SETTING) == row["slide_uid"]
    assert sample.ensure_sample_slide(store) is None                # not twice
    with SlideStore.for_image_store(store.root) as slides:
        assert len(slides.catalogue.slides()) == 1
    store.close()
    other = Store(tmp_path / "t")
    said: list[str] = []
    assert sample.ensure_sample_slide(other, path=tmp_path / "gone.svs", log=said.append) is None
    broken = tmp_path / "broken.svs"                     # a damaged copy: the first 64 kB
    broken.write_bytes(sample.SAMPLE_SLIDE.read_bytes()[:65536])
    assert sample.ensure_sample_slide(other, path=broken, log=said.append) is None
    assert "not found" in said[0] and said[-1].startswith("could not add the sample slide")
    assert other.catalogue.get_setting(sample.SAMPLE_SLIDE_SETTING) is None
    other.close()
    with EmbeddedServer(str(tmp_path / "s")) as srv:
        s = Session(srv.url)
        listed = s.get_json("/api/slides")
        assert [r["slide_uid"] for r in listed] == [row["slide_uid"]]
        rs = RemoteSlide(s, row["slide_uid"])
        top = len(rs.levels) - 1
        tile = rs.tile(top, 0)
        assert tile.shape[2] == 3 and tile.mean() < 235                # tissue, not glass


def test_a_whole_batch_is_lost_by_a_crash_and_nothing_else(tmp_path, monkeypatch):
    """One transaction per batch: a crash during it leaves none of its rows, only its
    files (orphans); the next ingest stores them all."""
    files = sample.make_sample_ct(tmp_path / "dicom", slices=5, size=32, seed=21)
    store = Store(tmp_path / "store")
    real_add = Catalogue.add_instance
    calls = {"n": 0}

    def crashing_add(self, instance, frames):
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Crash()
        return real_add(self, instance, frames)

    monkeypatch.setattr(Catalogue, "add_instance", crashing_add)
    with pytest.raises(_Crash):
        ingest_paths(files, store)
    monkeypatch.setattr(Catalogue, "add_instance", real_add)
    assert calls["n"] == 4 and store.catalogue.counts()["instances"] == 0
    report = fsck(store)
    assert report.consistent and report.orphans
    again = ingest_paths(files, store)
    assert len(again.imported) == 5 and store.catalogue.counts()["instances"] == 5
    assert fsck(store).clean
    store.close()


def test_batch_finds_duplicates_and_conflicts_inside_itself(tmp_path):
    """The same file twice, and another file with the same SOP Instance UID, in one
    batch: one stored, one duplicate, one quarantined."""
    import pydicom

    files = sample.make_sample_ct(tmp_path / "dicom", slices=3, size=32, seed=22)
    other = tmp_path / "other.dcm"
    ds = pydicom.dcmread(files[0])
    ds.SeriesDescription = "changed"
    ds.save_as(other)
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "copy.dcm").write_bytes(files[0].read_bytes())
    store = Store(tmp_path / "store")
    report = ingest_paths([*files, twin / "copy.dcm", other], store, workers=1)
    assert len(report.imported) == 3 and len(report.duplicates) == 1
    assert len(report.quarantined) == 1 and not report.skipped
    assert store.catalogue.counts()["instances"] == 3
    assert fsck(store).clean
    store.close()


def test_batch_durability_without_syncfs(tmp_path, monkeypatch):
    """Where syncfs is not available, a batch fsyncs each file and folder itself."""
    from imaging import files as files_mod

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(files_mod, "_syncfs", lambda root: False)
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    dicom = sample.make_sample_ct(tmp_path / "dicom", slices=3, size=32, seed=23)
    store = Store(tmp_path / "store")
    report = ingest_paths(dicom, store, verify=False)
    assert len(report.imported) == 3
    assert len(synced) >= 9                 # 3 files per instance, then their folders
    assert fsck(store).clean
    store.close()


def test_syncfs_is_used_on_linux(tmp_path):
    from imaging import files as files_mod

    if not sys.platform.startswith("linux"):
        pytest.skip("syncfs is Linux's")
    assert files_mod._syncfs(tmp_path) is True
