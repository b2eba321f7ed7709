"""Ingest under hostile input (issue 10, section 4): a corpus of files mutated at test time
from real pydicom / pydicom-data images, ingested in one folder. Every file must end up
stored with pixels equal to pydicom's decode, or refused / quarantined / flagged with a
reason; no good file is lost, nothing is mis-stored, and header refusals happen before
any decoding.

Also: same SOP Instance UID with other content in both arrival orders (header-only and
pixel differences), the quarantine commands, impossible values flagged in the series
image rows, UID padding, site limits, and the preamble-less pydicom-data file.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest

from server.database import database_of
from pydicom.uid import generate_uid

from codestream.encode import decode_full
from server import ingest as ingest_mod
from server import quarantine, quarantine_admin
from server import sample
from server.cli import main as cli_main
from server.ingest import (CONFLICT_REASON, NOT_DICOM, IngestLimits, ingest_paths,
                                uid_problem)
from server.store import Store
from server.fsck import fsck
from imaging.dicom import is_dicom_file


def _testfile(name: str) -> Path:
    p = sample.find_test_file(name)
    if p is None:
        pytest.skip(f"test file {name} not installed")
    return p


def _expected_frames(data: bytes) -> list[np.ndarray]:
    """Reference pixels straight from pydicom (palettes through their LUT to 8 bits,
    YCbCr to RGB by pydicom), as test_ingest documents."""
    from pydicom.pixels import apply_color_lut

    if data[128:132] == b"DICM":
        ds = pydicom.dcmread(io.BytesIO(data))
    else:
        ds = ingest_mod.parse_dataset(data)
    arr = ds.pixel_array
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    frames = list(arr) if nframes > 1 else [arr]
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        out = []
        for f in frames:
            rgb = apply_color_lut(f, ds)
            if rgb.dtype != np.uint8:
                rgb = (rgb >> 8).astype(np.uint8) if not (rgb & 0xFF).any() else \
                    (rgb // 257).astype(np.uint8)
            out.append(rgb)
        frames = out
    return frames


def _stored_frames(store: Store, sop: str) -> list[np.ndarray]:
    inst = store.catalogue.find_instance(sop)
    rows = [r for r in store.catalogue.series_images(inst["SeriesInstanceUID"])
            if r["SOPInstanceUID"] == sop]
    out = []
    for r in rows:
        cs = store.read_verified(r["codestream_relpath"], r["codestream_sha256"],
                                 r["codestream_size"])
        out.append(decode_full(cs, r["offset"], r["signed"]))
    return out


def _pixels_equal(store: Store, sop: str, data: bytes) -> bool:
    got, exp = _stored_frames(store, sop), _expected_frames(data)
    return len(got) == len(exp) and all(
        g.shape == e.shape and np.array_equal(g.astype(np.int64), e.astype(np.int64))
        for g, e in zip(got, exp))


def _save(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _with_raw_uid(data: bytes, old: str, raw: bytes) -> bytes:
    """Replace the SOP Instance UID element's value bytes (length kept even) directly,
    the way a hostile file would carry it (pydicom would refuse to write it)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    tag = b"\x08\x00\x18\x00UI"
    oldv = old.encode() + (b"\x00" if len(old) % 2 else b"")
    needle = tag + len(oldv).to_bytes(2, "little") + oldv
    assert ds.file_meta.TransferSyntaxUID.is_little_endian and not ds.is_implicit_VR
    assert data.count(needle) == 1, "test expects one explicit-VR SOP Instance UID"
    if len(raw) % 2:
        raw += b"\x00"
    return data.replace(needle, tag + len(raw).to_bytes(2, "little") + raw)


# --------------------------------------------------------------------------- the corpus

@dataclass
class Case:
    name: str
    data: bytes
    expect: str               # stored | flagged | refused | quarantined | not-dicom
    why: str = ""             # substring of the reason (refused) or flag keyword (flagged)
    good: bool = False        # a genuine file that must never be lost
    header_refusal: bool = False   # must be refused before any decoding
    sop: str | None = None


GOOD_FILES = [
    "CT_small.dcm", "693_J2KR.dcm", "MR_small.dcm", "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm", "emri_small.dcm", "emri_small_RLE.dcm",
    "emri_small_jpeg_ls_lossless.dcm", "RG3_J2KR.dcm", "JPEG-LL.dcm", "JPGExtended.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm", "image_dfl.dcm", "US1_UNCR.dcm", "US1_J2KR.dcm",
    "SC_rgb.dcm", "SC_rgb_16bit_2frame.dcm", "SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm",
    "SC_ybr_full_422_uncompressed.dcm", "OBXXXX1A.dcm", "liver.dcm", "OT-PAL-8-face.dcm",
]


def _odd_uid() -> str:
    """A fresh UID of odd length (its element then carries exactly one NUL of padding)."""
    uid = generate_uid()
    return uid if len(uid) % 2 else uid[:-1]


def _fresh(ds) -> str:
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    if "MediaStorageSOPInstanceUID" in ds.file_meta:
        ds.file_meta.MediaStorageSOPInstanceUID = uid
    return uid


def _mutant(src: bytes, fn, *, fresh: bool = True):
    ds = pydicom.dcmread(io.BytesIO(src))
    uid = _fresh(ds) if fresh else str(ds.SOPInstanceUID)
    fn(ds)
    return _save(ds), uid


def _ct256(src: bytes) -> bytes:
    """A real CT slice tiled to 256 x 256 (native, signed 16-bit)."""
    ds = pydicom.dcmread(io.BytesIO(src))
    arr = np.tile(ds.pixel_array, (2, 2))
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = arr.tobytes()
    _fresh(ds)
    return _save(ds)


def build_corpus() -> list[Case]:
    cases: list[Case] = []
    raw = {n: _testfile(n).read_bytes() for n in GOOD_FILES}
    seen: set[str] = set()
    for n, data in raw.items():
        # pydicom's test files reuse SOP Instance UIDs across encodings (MR_small and its
        # big endian / implicit twins, emri_small and its RLE / JPEG-LS twins): real
        # conflicts, so the later ones must be quarantined, never stored over or lost.
        sop = str(ingest_mod.parse_dataset(data).SOPInstanceUID)
        cases.append(Case(f"good_{n}", data, "quarantined" if sop in seen else "stored",
                          good=True))
        seen.add(sop)
    ct256 = _ct256(raw["CT_small.dcm"])
    cases.append(Case("good_ct256.dcm", ct256, "stored", good=True))

    def add(name, base, fn, expect, why="", *, header=False, fresh=True, good=False):
        data, uid = _mutant(base, fn, fresh=fresh)
        cases.append(Case(name, data, expect, why, good, header, uid))

    def setattrs(**kw):
        def fn(ds):
            for k, v in kw.items():
                setattr(ds, k, v)
        return fn

    mismatch = "geometry does not match the pixel data"
    # Geometry against the native pixel data length (never reinterpreted).
    add("geo_ct256_128x128", ct256, setattrs(Rows=128, Columns=128), "refused", mismatch,
        header=True)
    add("geo_ct256_255x256", ct256, setattrs(Rows=255), "refused", mismatch, header=True)
    add("geo_ct256_65535x1", ct256, setattrs(Rows=65535, Columns=1), "refused", mismatch,
        header=True)
    add("geo_ct256_frames0", ct256, setattrs(NumberOfFrames=0), "refused",
        "NumberOfFrames is 0", header=True)
    add("bomb_ct256_1x1", ct256, setattrs(Rows=1, Columns=1), "refused", mismatch,
        header=True)
    native = ["CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "US1_UNCR.dcm",
              "SC_rgb_16bit_2frame.dcm", "MR_small_bigendian.dcm"]
    for n in native:
        b = raw[n]
        ds0 = pydicom.dcmread(io.BytesIO(b))
        r, c = int(ds0.Rows), int(ds0.Columns)
        nf = int(ds0.get("NumberOfFrames", 1) or 1)
        add(f"geo_{n}_half", b, setattrs(Rows=r // 2, Columns=c // 2), "refused", mismatch,
            header=True)
        add(f"geo_{n}_rows-1", b, setattrs(Rows=r - 1), "refused", mismatch, header=True)
        add(f"geo_{n}_frames+1", b, setattrs(NumberOfFrames=nf + 1), "refused", mismatch,
            header=True)
        add(f"geo_{n}_frames0", b, setattrs(NumberOfFrames=0), "refused",
            "NumberOfFrames is 0", header=True)
        add(f"geo_{n}_bits12", b, setattrs(BitsAllocated=12), "refused", "BitsAllocated 12",
            header=True)
        add(f"bomb_{n}_1x1", b, setattrs(Rows=1, Columns=1), "refused", mismatch,
            header=True)
        add(f"bomb_{n}_65535sq", b, setattrs(Rows=65535, Columns=65535), "refused",
            "max_pixels_per_frame", header=True)
        add(f"bomb_{n}_2Mframes", b, setattrs(NumberOfFrames=2_000_000), "refused",
            "max_frames", header=True)
    # Encapsulated: frame / fragment counts.
    for n in ["emri_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm", "SC_rgb_rle.dcm",
              "JPEG-LL.dcm", "693_J2KR.dcm", "US1_J2KR.dcm"]:
        b = raw[n]
        nf = int(pydicom.dcmread(io.BytesIO(b)).get("NumberOfFrames", 1) or 1)
        add(f"enc_{n}_frames+3", b, setattrs(NumberOfFrames=nf + 3), "refused", mismatch,
            header=True)
        if nf > 1:
            add(f"enc_{n}_frames1", b, setattrs(NumberOfFrames=1), "refused", mismatch,
                header=True)
        add(f"enc_{n}_65535sq", b, setattrs(Rows=65535, Columns=65535), "refused",
            "max_pixels_per_frame", header=True)
        add(f"enc_{n}_frames0", b, setattrs(NumberOfFrames=0), "refused",
            "NumberOfFrames is 0", header=True)
        ds0 = pydicom.dcmread(io.BytesIO(b))
        add(f"enc_{n}_half", b, setattrs(Rows=int(ds0.Rows) // 2, Columns=int(ds0.Columns) // 2),
            "refused", "(refused before decoding)", header=True)
    # Impossible values: stored, original kept, flagged.
    flag_bases = ["CT_small.dcm", "MR_small.dcm", "emri_small_RLE.dcm"]
    for n in flag_bases:
        b = raw[n]
        add(f"flag_{n}_spacing_nan", b, setattrs(PixelSpacing=["nan", "nan"]), "flagged",
            "PixelSpacing")
        add(f"flag_{n}_spacing_inf", b, setattrs(PixelSpacing=["inf", "1"]), "flagged",
            "PixelSpacing")
        add(f"flag_{n}_spacing_0", b, setattrs(PixelSpacing=["0", "0"]), "flagged",
            "PixelSpacing")
        add(f"flag_{n}_spacing_neg", b, setattrs(PixelSpacing=["-0.5", "0.5"]), "flagged",
            "PixelSpacing")
        add(f"flag_{n}_thick_0", b, setattrs(SliceThickness="0"), "flagged", "SliceThickness")
        add(f"flag_{n}_thick_neg", b, setattrs(SliceThickness="-2"), "flagged",
            "SliceThickness")
        add(f"flag_{n}_ipp_nan", b, setattrs(ImagePositionPatient=["nan", "0", "0"]),
            "flagged", "ImagePositionPatient")
        add(f"flag_{n}_iop_skew", b,
            setattrs(ImageOrientationPatient=["1", "0", "0", "0.5", "0.5", "0"]), "flagged",
            "ImageOrientationPatient")
        add(f"flag_{n}_slope_0", b, setattrs(RescaleSlope="0", RescaleIntercept="0"),
            "flagged", "RescaleSlope")
        add(f"flag_{n}_slope_nan", b, setattrs(RescaleSlope="NaN", RescaleIntercept="0"),
            "flagged", "RescaleSlope")
        add(f"flag_{n}_width_0", b, setattrs(WindowCenter="40", WindowWidth="0"), "flagged",
            "WindowWidth")
        add(f"flag_{n}_width_neg", b, setattrs(WindowCenter="40", WindowWidth="-5"),
            "flagged", "WindowWidth")
    # UIDs.
    for n in ["CT_small.dcm", "MR_small.dcm", "US1_UNCR.dcm"]:
        b = raw[n]
        ds0 = pydicom.dcmread(io.BytesIO(b))
        if ds0.is_implicit_VR:
            continue
        sop = str(ds0.SOPInstanceUID)
        fresh = _odd_uid()
        for tag, rawuid, expect in (
                ("nul_inside", b"1.2.3\x00evil", "refused"),
                ("letters", b"1.2.abc.4", "refused"),
                ("long", ("1." * 40).encode().rstrip(b"."), "refused"),
                ("two_nuls", fresh.encode() + b"\x00\x00", "refused"),
                ("space_inside", b"1.2 3.4", "refused"),
                ("one_nul_pad", fresh.encode(), "stored")):      # odd: one NUL added
            data = _with_raw_uid(b, sop, rawuid)
            uid = fresh if expect == "stored" else None
            cases.append(Case(f"uid_{n}_{tag}", data, expect,
                              "invalid SOPInstanceUID" if expect == "refused" else "",
                              good=expect == "stored", header_refusal=expect == "refused",
                              sop=uid))
            if expect == "stored":
                fresh = _odd_uid()
    # Damage and non-DICOM.
    for n in ["CT_small.dcm", "emri_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm"]:
        b = raw[n]
        cases.append(Case(f"trunc_{n}", b[: len(b) * 2 // 3], "refused", "truncated"))
    rng = np.random.default_rng(7)
    cases.append(Case("junk_random.bin", rng.bytes(4096), "not-dicom"))
    cases.append(Case("junk_empty", b"", "not-dicom"))
    cases.append(Case("junk_text.txt", b"hello, not an image\n" * 20, "not-dicom"))
    cases.append(Case("junk_group8", b"\x08\x00\x05\x00" + rng.bytes(2000), "not-dicom"))
    # Same SOP Instance UID as a good file, other content: quarantined (names sort after
    # the good files, so the genuine file is stored first here).
    for n in ["CT_small.dcm", "MR_small.dcm", "emri_small_RLE.dcm"]:
        b = raw[n]
        add(f"twin_{n}_name", b, setattrs(PatientName="Other^Patient"), "quarantined",
            fresh=False)

        def bump(ds):
            arr = ds.pixel_array.copy()
            arr.flat[0] = arr.flat[0] + 1 if arr.flat[0] < 100 else arr.flat[0] - 1
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                ds.compress(ds.file_meta.TransferSyntaxUID, arr, generate_instance_uid=False)
            else:
                ds.PixelData = arr.tobytes()
        add(f"twin_{n}_pixel", b, bump, "quarantined", fresh=False)
    return cases


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    cases = build_corpus()
    folder = tmp_path_factory.mktemp("corpus")
    paths = {}
    for i, c in enumerate(cases):
        # good files first, then the rest in corpus order (twins last)
        prefix = "a" if c.good else ("z" if c.expect == "quarantined" else "m")
        p = folder / f"{prefix}{i:04d}_{c.name}"
        p.write_bytes(c.data)
        paths[p] = c
    store = Store(tmp_path_factory.mktemp("store"))
    decoded: list[str] = []
    real = ingest_mod._decode_frames

    def spy(ds, shape):
        decoded.append(str(ds.SOPInstanceUID))
        return real(ds, shape)

    ingest_mod._decode_frames = spy
    try:
        logs: list[str] = []
        report = ingest_paths([folder], store, log=logs.append)
    finally:
        ingest_mod._decode_frames = real
    yield paths, store, report, decoded, logs
    store.close()


def test_hostile_corpus_nothing_lost_nothing_mis_stored(corpus_run):
    paths, store, report, decoded, logs = corpus_run
    assert len(paths) >= 100
    outcome: dict[Path, tuple[str, object]] = {}
    for f in report.imported:
        outcome[f.path] = ("flagged" if f.flags else "stored", f)
    for f in report.duplicates:
        outcome[f.path] = ("duplicate", f)
    for f in report.quarantined:
        outcome[f.path] = ("quarantined", f)
    for f in report.skipped:
        outcome[f.path] = ("not-dicom" if f.kind == NOT_DICOM else "refused", f)
    # every file accounted for exactly once, and logged
    assert sum(map(len, (report.imported, report.duplicates, report.quarantined,
                         report.skipped))) == len(paths) == len(outcome)
    assert len(logs) == len(paths)

    lost, mis_stored, wrong = [], [], []
    for p, c in paths.items():
        kind, res = outcome[p]
        if c.good and kind not in ("stored", "flagged", "quarantined"):
            lost.append((p.name, kind, getattr(res, "reason", "")))
        if kind in ("stored", "flagged"):
            if c.expect not in ("stored", "flagged") or not _pixels_equal(
                    store, res.sop_instance_uid, c.data):
                mis_stored.append((p.name, c.expect))
            if c.sop is not None and res.sop_instance_uid != c.sop:
                mis_stored.append((p.name, f"stored as {res.sop_instance_uid}"))
        if kind != c.expect:
            wrong.append((p.name, c.expect, kind, getattr(res, "reason", "")))
            continue
        if kind == "refused":
            assert c.why in res.reason, (p.name, res.reason)
            assert res.reason
        elif kind == "flagged":
            assert any(fl.startswith(c.why) for fl in res.flags), (p.name, res.flags)
            inst = store.catalogue.find_instance(res.sop_instance_uid)
            assert inst["geometry_flags"] == res.flags
        elif kind == "quarantined":
            e = quarantine.get(store, res.quarantine_id)
            assert store.abspath(e.relpath).read_bytes() == c.data
            assert e.reason.startswith(CONFLICT_REASON) and e.stored_sha256
        if c.header_refusal and c.sop:
            assert c.sop not in decoded, f"{p.name} was decoded before its refusal"
    print(f"\nhostile ingest corpus: {len(paths)} files "
          f"({sum(c.good for c in paths.values())} good), {len(report.imported)} stored "
          f"({len(report.flagged)} flagged), {len(report.quarantined)} quarantined, "
          f"{len(report.skipped)} refused or not DICOM; lost {len(lost)}, "
          f"mis-stored {len(mis_stored)}")
    assert lost == []
    assert mis_stored == []
    assert wrong == [], "\n".join(map(str, wrong))
    assert fsck(store).clean


def test_header_refusals_are_not_decoded_at_all(corpus_run):
    """The bombs (1 x 1 over 128 kB, 65535 x 65535, two million frames) are refused from
    the header: pydicom's decoder was never called for them."""
    paths, store, report, decoded, logs = corpus_run
    bombs = [c for c in paths.values() if c.name.startswith("bomb_")]
    assert len(bombs) >= 10
    assert not {c.sop for c in bombs} & set(decoded)
    by_path = {s.path: s for s in report.skipped}
    for p, c in paths.items():
        if c.name.startswith("bomb_"):
            assert "(not decoded)" in by_path[p].reason or "not reinterpreted" in \
                by_path[p].reason


def test_flagged_geometry_reaches_the_series_rows(corpus_run):
    paths, store, report, decoded, logs = corpus_run
    for f in report.flagged:
        inst = store.catalogue.find_instance(f.sop_instance_uid)
        rows = [r for r in store.catalogue.series_images(inst["SeriesInstanceUID"])
                if r["SOPInstanceUID"] == f.sop_instance_uid]
        assert rows and all(r["geometry_flags"] == f.flags for r in rows)
        if any(fl.startswith("PixelSpacing") for fl in f.flags):
            assert all(r["PixelSpacing"] is None for r in rows)
        if any(fl.startswith("WindowWidth") for fl in f.flags):
            assert all(r["WindowWidth"] is None for r in rows)
    # the genuine instances carry no flags
    good_ct = pydicom.dcmread(_testfile("CT_small.dcm"))
    inst = store.catalogue.find_instance(str(good_ct.SOPInstanceUID))
    assert inst["geometry_flags"] == []


# --------------------------------------------------------------------------- conflicts

def _twins(kind: str) -> tuple[bytes, bytes]:
    genuine = _testfile("CT_small.dcm").read_bytes()
    ds = pydicom.dcmread(io.BytesIO(genuine))
    if kind == "header":
        ds.PatientName = "Someone^Else"
    else:
        arr = ds.pixel_array.copy()
        arr[10, 10] += 7
        ds.PixelData = arr.tobytes()
    return genuine, _save(ds)


@pytest.mark.parametrize("kind", ["header", "pixel"])
@pytest.mark.parametrize("order", ["genuine-first", "twin-first"])
def test_conflict_quarantined_in_either_order(tmp_path, kind, order, capsys):
    genuine, twin = _twins(kind)
    first, second = (genuine, twin) if order == "genuine-first" else (twin, genuine)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "1.dcm").write_bytes(first)
    (tmp_path / "in" / "2.dcm").write_bytes(second)
    sdir = tmp_path / "store"
    code = cli_main(["ingest", str(tmp_path / "in"), "--store", str(sdir)])
    out = capsys.readouterr().out
    assert code == 3, out
    assert "1 imported" in out and "1 quarantined" in out
    store = Store(sdir)
    sop = str(pydicom.dcmread(io.BytesIO(genuine)).SOPInstanceUID)
    inst = store.catalogue.find_instance(sop)
    assert inst["original_sha256"] == ingest_mod.sha256_hex(first)   # never replaced
    (e,) = quarantine.entries(store, "open")
    assert store.abspath(e.relpath).read_bytes() == second           # never discarded
    assert e.stored_sha256 == inst["original_sha256"]
    want = "PatientName" if kind == "header" else "pixel data differs"
    assert want in e.reason
    assert ("pixel data identical" in e.reason) == (kind == "header")
    rows = store.catalogue.series_images(inst["SeriesInstanceUID"])
    assert [r["conflict"] for r in rows] == [True]
    # the audit log names it
    from server.auth import Authority
    auth = Authority(database_of(sdir))
    (row,) = auth.audit_rows(action="ingest")
    auth.close()
    assert row["outcome"] == "quarantined" and row["resource"] == sop
    assert row["detail"]["quarantine_id"] == e.id
    # ingesting the same two files again changes nothing
    again = ingest_paths([tmp_path / "in"], store)
    assert len(again.duplicates) == 1 and len(again.quarantined) == 1
    assert len(quarantine.entries(store)) == 1
    assert fsck(store).clean
    store.close()


def _conflicted_store(tmp_path) -> tuple[Path, bytes, bytes, str]:
    genuine, twin = _twins("pixel")
    sdir = tmp_path / "store"
    (tmp_path / "a.dcm").write_bytes(genuine)
    (tmp_path / "b.dcm").write_bytes(twin)
    with Store(sdir) as store:
        ingest_paths([tmp_path / "a.dcm"], store)
        report = ingest_paths([tmp_path / "b.dcm"], store)
        assert len(report.quarantined) == 1
    return sdir, genuine, twin, str(pydicom.dcmread(io.BytesIO(genuine)).SOPInstanceUID)


def test_quarantine_list_show_keep(tmp_path, capsys):
    sdir, genuine, twin, sop = _conflicted_store(tmp_path)
    assert cli_main(["quarantine", "list", "--store", str(sdir)]) == 0
    out = capsys.readouterr().out
    assert "1 open entry" in out and sop in out
    assert cli_main(["quarantine", "show", "1", "--store", str(sdir), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "open" and shown["stored_sop_instance_uid"] == sop
    assert cli_main(["quarantine", "resolve", "1", "--store", str(sdir)]) == 2
    assert cli_main(["quarantine", "resolve", "1", "--keep", "--store", str(sdir)]) == 0
    assert cli_main(["quarantine", "resolve", "1", "--keep", "--store", str(sdir)]) == 1
    with Store(sdir) as store:
        inst = store.catalogue.find_instance(sop)
        assert inst["original_sha256"] == ingest_mod.sha256_hex(genuine)
        assert not store.catalogue.series_images(inst["SeriesInstanceUID"])[0]["conflict"]
        (e,) = quarantine.entries(store)
        assert e.state == "kept" and store.abspath(e.relpath).read_bytes() == twin
        assert fsck(store).clean


def test_quarantine_replace_keeps_the_former_original(tmp_path):
    sdir, genuine, twin, sop = _conflicted_store(tmp_path)
    assert cli_main(["quarantine", "resolve", "1", "--replace", "--store", str(sdir)]) == 0
    with Store(sdir) as store:
        inst = store.catalogue.find_instance(sop)
        assert inst["original_sha256"] == ingest_mod.sha256_hex(twin)
        assert _pixels_equal(store, sop, twin)
        states = {e.state: e for e in quarantine.entries(store)}
        assert set(states) == {"replaced"} or len(quarantine.entries(store)) == 2
        former = [e for e in quarantine.entries(store) if e.sha256 ==
                  ingest_mod.sha256_hex(genuine)]
        assert former and store.abspath(former[0].relpath).read_bytes() == genuine
        assert not store.catalogue.series_images(inst["SeriesInstanceUID"])[0]["conflict"]
        assert fsck(store).clean
        from server.auth import Authority
        auth = Authority(database_of(sdir))
        assert [r["outcome"] for r in auth.audit_rows(action="quarantine-resolve")] == \
            ["replace"]
        auth.close()


def test_quarantine_new_uid_records_the_original(tmp_path):
    sdir, genuine, twin, sop = _conflicted_store(tmp_path)
    assert cli_main(["quarantine", "resolve", "1", "--new-uid", "--store", str(sdir)]) == 0
    with Store(sdir) as store:
        (e,) = quarantine.entries(store)
        assert e.state == "imported" and e.new_sop_instance_uid
        new = store.catalogue.find_instance(e.new_sop_instance_uid)
        assert new is not None
        assert store.catalogue.find_instance(sop)["original_sha256"] == \
            ingest_mod.sha256_hex(genuine)
        copy = pydicom.dcmread(store.abspath(new["original_relpath"]))
        assert copy.SourceImageSequence[-1].ReferencedSOPInstanceUID == sop
        assert np.array_equal(_stored_frames(store, e.new_sop_instance_uid)[0],
                              pydicom.dcmread(io.BytesIO(twin)).pixel_array)
        assert store.abspath(e.relpath).read_bytes() == twin
        assert fsck(store).clean


# --------------------------------------------------------------------------- the rest

def test_uid_rules():
    assert uid_problem("1.2.840.10008.1\x00") is None          # one padding byte
    assert uid_problem("1.2.840 ") is None
    assert "digits and dots" in uid_problem("1.2.3\x00evil")
    assert "digits and dots" in uid_problem("1.2.3\x00\x00")
    assert "64" in uid_problem("1." * 40 + "1")
    assert uid_problem("1..2") is not None and uid_problem("") is not None
    assert uid_problem("1.2.abc", lax=True) is None
    assert uid_problem("1.2.3\x00evil", lax=True) is not None
    assert uid_problem("1/2", lax=True) is not None


def test_site_limits_from_policy_and_flag(tmp_path):
    sdir = tmp_path / "store"
    sdir.mkdir()
    (sdir / "policy.toml").write_text("[ingest]\nmax_frames = 5\n")
    assert IngestLimits.for_store(sdir).max_frames == 5
    with Store(sdir) as store:
        report = ingest_paths([_testfile("emri_small.dcm"), _testfile("CT_small.dcm")], store)
    assert len(report.imported) == 1
    (s,) = report.skipped
    assert "max_frames = 5" in s.reason and "not decoded" in s.reason
    (sdir / "policy.toml").write_text("[ingest]\nmax_frame = 5\n")
    with pytest.raises(ValueError, match="unknown"):
        IngestLimits.for_store(sdir)
    # real images pass the defaults: a 4096 x 5120 mammogram, a 1000-frame US cine, a
    # whole slide of 200 000 tiles of 256 x 256 RGB
    d = IngestLimits()
    assert 4096 * 5120 <= d.max_pixels_per_frame and 4096 * 5120 * 2 <= d.max_decoded_bytes
    assert 1000 * 600 * 800 * 3 <= d.max_decoded_bytes
    assert 200_000 <= d.max_frames and 200_000 * 256 * 256 * 3 <= d.max_decoded_bytes


def test_preambleless_file_is_ingested(tmp_path):
    """pydicom-data's OT-PAL-8-face.dcm has no preamble (issue 11)."""
    src = _testfile("OT-PAL-8-face.dcm")
    assert src.read_bytes()[128:132] != b"DICM"
    assert is_dicom_file(src)
    with Store(tmp_path / "s") as store:
        report = ingest_paths([src], store)
        (imp,) = report.imported
        assert _pixels_equal(store, imp.sop_instance_uid, src.read_bytes())
        inst = store.catalogue.find_instance(imp.sop_instance_uid)
        assert store.abspath(inst["original_relpath"]).read_bytes() == src.read_bytes()


def test_nonstandard_uid_accepted_with_the_site_flag(tmp_path):
    b = _testfile("CT_small.dcm").read_bytes()
    sop = str(pydicom.dcmread(io.BytesIO(b)).SOPInstanceUID)
    (tmp_path / "x.dcm").write_bytes(_with_raw_uid(b, sop, b"1.2.abc.4"))
    with Store(tmp_path / "s") as store:
        r = ingest_paths([tmp_path / "x.dcm"], store)
        assert "invalid SOPInstanceUID" in r.skipped[0].reason
    code = cli_main(["ingest", str(tmp_path / "x.dcm"), "--store", str(tmp_path / "s"),
                     "--accept-nonstandard-uids", "--quiet"])
    assert code == 0
    with Store(tmp_path / "s") as store:
        assert store.catalogue.find_instance("1.2.abc.4") is not None


def test_flags_and_conflict_reach_the_viewer_through_the_server(tmp_path):
    """A series with impossible spacing and a quarantined twin, served over HTTP: the
    rows carry geometry_flags and conflict, the overlay says so, measurements stay in
    pixels, MPR is refused."""
    from client.session import Session
    from server.embedded import EmbeddedServer
    from imaging.measure import GEOMETRY_REFUSAL, Measurement, MeasureKind, measurement_label
    from imaging.model import ImageMeta
    from imaging.overlay import corner_lines
    from client.volume_loader import geometry_refusal, usable_images

    b = _testfile("CT_small.dcm").read_bytes()
    flagged, _uid = _mutant(b, lambda ds: setattr(ds, "PixelSpacing", ["0", "0"]))
    twin, _ = _mutant(flagged, lambda ds: setattr(ds, "PatientName", "X^Y"), fresh=False)
    (tmp_path / "1.dcm").write_bytes(flagged)
    (tmp_path / "2.dcm").write_bytes(twin)
    sdir = tmp_path / "store"
    with Store(sdir) as store:
        report = ingest_paths([tmp_path], store)
        assert len(report.imported) == 1 and len(report.quarantined) == 1
        series_uid = report.imported[0].series_instance_uid
    srv = EmbeddedServer(str(sdir)).start()
    try:
        images = Session(srv.url).series_images(series_uid)["images"]
    finally:
        srv.stop()
    (row,) = images
    assert row["conflict"] is True
    assert row["geometry_flags"] and row["geometry_flags"][0].startswith("PixelSpacing")
    meta = ImageMeta.from_dict(row)
    assert meta.conflict and meta.geometry_flagged and meta.mm_spacing is None
    lines = corner_lines(None, meta, None).top_left
    assert any("UID CONFLICT" in ln for ln in lines)
    assert any("IMPOSSIBLE VALUES" in ln and "PixelSpacing" in ln for ln in lines)
    label = measurement_label(Measurement(MeasureKind.DISTANCE, (0, 0), (3, 4), 0), [], meta)
    assert label == ["5.0 px", GEOMETRY_REFUSAL]
    refusal = geometry_refusal(images)
    assert refusal and "MPR refused" in refusal and "PixelSpacing" in refusal
    assert usable_images(images)[0] == []
    # an unflagged image: mm, no refusal
    ok = dict(row, geometry_flags=[], conflict=False, PixelSpacing=[0.5, 0.5])
    assert measurement_label(Measurement(MeasureKind.DISTANCE, (0, 0), (3, 4), 0), [],
                             ImageMeta.from_dict(ok))[0].endswith("mm")
    assert geometry_refusal([ok]) is None


def test_fsck_checks_quarantined_files(tmp_path):
    sdir, genuine, twin, sop = _conflicted_store(tmp_path)
    with Store(sdir) as store:
        (e,) = quarantine.entries(store)
        assert fsck(store).clean
        p = store.abspath(e.relpath)
        data = bytearray(p.read_bytes())
        data[200] ^= 0xFF
        p.write_bytes(bytes(data))
        report = fsck(store)
        assert [d[0] for d in report.damaged] == [e.relpath]
        with pytest.raises(quarantine.QuarantineError, match="damaged"):
            quarantine_admin.resolve(store, e.id, "replace")   # a damaged copy is never imported
        # nothing changed: the stored instance is still the genuine one
        assert store.catalogue.find_instance(sop)["original_sha256"] == \
            ingest_mod.sha256_hex(genuine)


def test_enhanced_multiframe_flags_a_bad_frame_position(tmp_path):
    """An impossible per-frame position in an enhanced multi-frame (frame 3 of 10)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    b = _testfile("emri_small.dcm").read_bytes()

    def per_frame(ds):
        items = []
        for k in range(int(ds.NumberOfFrames)):
            pos = Dataset()
            pos.ImagePositionPatient = ["0", "0", "nan" if k == 2 else str(k)]
            item = Dataset()
            item.PlanePositionSequence = Sequence([pos])
            items.append(item)
        ds.PerFrameFunctionalGroupsSequence = Sequence(items)
    data, uid = _mutant(b, per_frame)
    (tmp_path / "e.dcm").write_bytes(data)
    with Store(tmp_path / "s") as store:
        (imp,) = ingest_paths([tmp_path / "e.dcm"], store).imported
        assert imp.flags == ["ImagePositionPatient: frame 3: not a finite number (0\\0\\nan)"]
        assert _pixels_equal(store, uid, data)


def test_deflate_bomb_refused_before_inflating_it_whole(tmp_path, monkeypatch):
    """A deflated dataset whose trailing element inflates to 64 MiB of zeros (a ~64 kB
    file): refused from its own header before pydicom inflates it; the genuine deflated
    file of pydicom-data is stored."""
    import zlib

    src = _testfile("image_dfl.dcm").read_bytes()
    end, ts = ingest_mod._meta_end(src)
    assert ts == ingest_mod._DEFLATED
    inflated = zlib.decompress(src[end:], -zlib.MAX_WBITS)
    pad = b"\xfc\xff\xfc\xffOB\x00\x00" + (64 << 20).to_bytes(4, "little") + bytes(64 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = src[:end] + c.compress(inflated + pad) + c.flush()
    assert len(bomb) < 200_000
    (tmp_path / "bomb.dcm").write_bytes(bomb)
    called = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: called.append(1) or real(*a, **k))
    with Store(tmp_path / "s") as store:
        report = ingest_paths([tmp_path / "bomb.dcm", _testfile("image_dfl.dcm")], store)
    assert len(report.imported) == 1
    (s,) = report.skipped
    assert "decompression bomb" in s.reason and "before decoding" in s.reason
    assert len(called) == 1           # pydicom read the genuine file only
