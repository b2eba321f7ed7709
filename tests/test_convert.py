"""The codec policy ([codec] in resources/policy.toml) and the batch converter
(server/convert.py, ``medview-server convert``): the policy chooses as its table says;
outputs keep every attribute, are bit-exact (lossless) or carry the lossy record, open in
pydicom and dcmtk; damaged input is refused and reported while the rest goes on; a rerun
skips what is done; inputs are never written."""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import shutil
import subprocess
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from codestream import codecs
from server import sample
from server.cli import main as cli_main
from server.convert import Options, convert_file, convert_paths
from server.policy import PolicyError, load_policy

REPO = Path(__file__).resolve().parents[1]
PIXEL_KEYS = {"PixelData"}


def _testfile(name: str) -> Path:
    p = sample.find_test_file(name)
    if p is None:
        pytest.skip(f"test file {name} not installed")
    return p


def _sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _synthetic(path: Path, *, rows=40, cols=48, frames=2, signed=True, bits=12) -> Path:
    """A multi-frame MR with private tags, a private sequence inside a standard one and a
    nested sequence: everything a converter might drop."""
    rng = np.random.default_rng(7)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1))) if signed else (0, 1 << bits)
    px = rng.integers(lo, hi, (frames, rows, cols)).astype(np.int16 if signed else np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "CONVERT^TEST", "CV-1", "MR"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M"]
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    block = ds.private_block(0x0029, "MEDVIEW TEST", create=True)
    block.add_new(0x01, "LO", "private text")
    block.add_new(0x02, "OB", b"\x01\x02\x03\x04")
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-1", "99X", "thing"
    ib = inner.private_block(0x0031, "MEDVIEW INNER", create=True)
    ib.add_new(0x10, "DS", "1.5")
    deep = Dataset()
    deep.TextValue = "nested two levels"
    inner.ContentSequence = [deep]
    ds.AnatomicRegionSequence = [inner]
    block.add_new(0x03, "SQ", [Dataset()])
    ds.PixelData = px.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _elements(ds, skip=frozenset()) -> dict:
    """Every element, sequences flattened with their path, as comparable values."""
    out = {}

    def walk(d, prefix):
        for e in d:
            if e.keyword in skip or e.tag.group == 0 or e.tag.element == 0:
                continue            # group lengths (retired) are recomputed, not kept
            key = f"{prefix}{e.tag}"
            if e.VR == "SQ":
                out[key] = len(e.value)
                for i, item in enumerate(e.value):
                    walk(item, f"{key}[{i}].")
            else:
                v = e.value
                out[key] = bytes(v) if isinstance(v, (bytes, bytearray)) else str(v)
    walk(ds, "")
    return out


def _same_attributes(src: Path, dst: Path, allowed_changes=()) -> None:
    a = pydicom.dcmread(src)
    b = pydicom.dcmread(dst)
    skip = PIXEL_KEYS | set(allowed_changes)
    ea, eb = _elements(a, skip), _elements(b, skip)
    assert ea.keys() == eb.keys(), (set(ea) ^ set(eb))
    diff = [k for k in ea if ea[k] != eb[k]]
    assert not diff, [(k, ea[k], eb[k]) for k in diff]
    # the file meta: only the transfer syntax (and lengths/versions pydicom writes) differ
    assert b.file_meta.MediaStorageSOPInstanceUID == a.file_meta.MediaStorageSOPInstanceUID


def _pixels_from_pydicom(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array


# --------------------------------------------------------------------------- policy
def test_policy_default_table():
    pol = load_policy().codec
    ch = lambda **kw: pol.choose(**{"samples": 1, **kw}).codec  # noqa: E731
    assert ch(rows=512, cols=512) == "jpegls"
    assert ch(rows=999, cols=999) == "jpegls"
    assert ch(rows=1000, cols=512) == "htj2k"            # either side >= 1000
    assert ch(rows=512, cols=2048) == "htj2k"
    assert ch(rows=3000, cols=3000, modality="CR") == "htj2k"
    assert ch(rows=64, cols=64, samples=3) == "jxl"
    assert ch(rows=4000, cols=4000, samples=3) == "jxl"
    jpeg = "1.2.840.10008.1.2.4.50"
    assert ch(rows=480, cols=640, samples=3, transfer_syntax=jpeg) == "keep"
    assert ch(rows=480, cols=640, samples=3, transfer_syntax="1.2.840.10008.1.2.1") == "jxl"
    assert "JPEG baseline" in pol.choose(rows=4, cols=4, samples=3, transfer_syntax=jpeg).reason
    for c in ("jpegls", "htj2k", "jxl"):
        assert codecs.by_name(c).available


def test_policy_overrides_by_modality_and_body_part(tmp_path):
    (tmp_path / "policy.toml").write_text("""
[codec]
colour = "htj2k"

[[codec.overrides]]
modality = "MG"
small_grayscale = "htj2k"

[[codec.overrides]]
modality = "CT"
body_part = "HEAD"
size_threshold = 300

[[codec.overrides]]
modality = "CT"
size_threshold = 2000
keep_jpeg_baseline = false
""")
    pol = load_policy(tmp_path).codec
    ch = lambda **kw: pol.choose(**{"samples": 1, **kw}).codec  # noqa: E731
    assert ch(rows=64, cols=64, samples=3) == "htj2k"          # the site's colour
    assert ch(rows=512, cols=512, modality="MG") == "htj2k"
    assert ch(rows=512, cols=512, modality="mr") == "jpegls"
    # CT: threshold 2000; CT HEAD (more specific) 300, whichever row comes first
    assert ch(rows=1500, cols=1500, modality="CT") == "jpegls"
    assert ch(rows=512, cols=512, modality="CT", body_part="HEAD") == "htj2k"
    assert ch(rows=256, cols=256, modality="CT", body_part="head") == "jpegls"
    jpeg = "1.2.840.10008.1.2.4.50"
    assert ch(rows=4, cols=4, samples=3, modality="CT", transfer_syntax=jpeg) == "htj2k"
    assert ch(rows=4, cols=4, samples=3, modality="US", transfer_syntax=jpeg) == "keep"


@pytest.mark.parametrize("text, msg", [
    ('[codec]\nsmall_grayscale = "png"', "codecs are"),
    ('[codec]\nsize_threshold = 0', "positive integer"),
    ('[codec]\nfoo = 1', "unknown key"),
    ('[[codec.overrides]]\nmodality = "CT"', "changes nothing"),
    ('[codec]\nkeep_jpeg_baseline = "yes"', "true or false"),
])
def test_policy_bad_codec_table(tmp_path, text, msg):
    f = tmp_path / "p.toml"
    f.write_text(text)
    with pytest.raises(PolicyError, match=msg):
        load_policy(None, f)


# --------------------------------------------------------------------------- converter
REAL_LOSSLESS = [
    # (file, expected policy codec)
    ("CT_small.dcm", "jpegls"),         # signed 16-bit CT, Implicit-VR-free explicit LE
    ("693_UNCR.dcm", "jpegls"),         # signed, BitsStored 14
    ("emri_small.dcm", "jpegls"),       # 10 frames
    ("MR2_UNCR.dcm", "htj2k"),          # 1024 x 1024: the large-grayscale rule
    ("OBXXXX1A.dcm", "jpegls"),         # palette colour: indices, LUT kept
    ("US1_UNCR.dcm", "jxl"),            # RGB
    ("MR_small_bigendian.dcm", "jpegls"),   # big endian in, little endian out
    ("MR_small_implicit.dcm", "jpegls"),
    ("JPEG-LL.dcm", "htj2k"),           # compressed input (JPEG lossless), 1024 rows
]


def test_convert_real_files_keeps_attributes_and_pixels(tmp_path):
    srcs = [_testfile(n) for n, _ in REAL_LOSSLESS]
    syn = _synthetic(tmp_path / "syn.dcm")
    before = {p: _sha(p) for p in [*srcs, syn]}
    rep = convert_paths([*srcs, syn], tmp_path / "out", Options())
    assert rep.ok, [r.error for r in rep.results if not r.ok]
    by = {Path(r.file).name: r for r in rep.results}
    for name, want in [*REAL_LOSSLESS, ("syn.dcm", "jpegls")]:
        r = by[name]
        assert r.status == "converted" and r.codec == want, (name, r)
        assert r.verification == "bit-exact" and r.max_error == 0
        assert r.bytes_after == Path(r.output).stat().st_size and r.sha256 == _sha(Path(r.output))
        src = next(p for p in [*srcs, syn] if p.name == name)
        _same_attributes(src, Path(r.output))
        out = pydicom.dcmread(r.output)
        assert out.SOPInstanceUID == pydicom.dcmread(src).SOPInstanceUID   # lossless: kept
        assert out.file_meta.TransferSyntaxUID == codecs.by_name(want).transfer_syntax
        # pydicom's own decoders read our JPEG-LS and HTJ2K (not JPEG XL: no plugin)
        if want != "jxl":
            ref = pydicom.dcmread(src).pixel_array
            ref = ref.astype(ref.dtype.newbyteorder("="))
            assert np.array_equal(_pixels_from_pydicom(Path(r.output)), ref), name
    # private tags and nested sequences survived, inputs untouched
    out = pydicom.dcmread(by["syn.dcm"].output)
    assert out[0x0029, 0x1001].value == "private text"
    assert out.AnatomicRegionSequence[0][0x0031, 0x1010].value == "1.5"
    assert out.AnatomicRegionSequence[0].ContentSequence[0].TextValue == "nested two levels"
    assert {p: _sha(p) for p in before} == before


@pytest.mark.parametrize("to", ["jpegls", "htj2k", "jxl", "j2k"])
def test_convert_each_target(tmp_path, to):
    syn = _synthetic(tmp_path / "s.dcm", signed=False, bits=12)
    rgb = _testfile("US1_UNCR.dcm")
    neg = _synthetic(tmp_path / "neg.dcm", signed=True, bits=16)
    rep = convert_paths([syn, rgb, neg], tmp_path / "out", Options(to=to))
    by = {Path(r.file).name: r for r in rep.results}
    for n in ("s.dcm", "US1_UNCR.dcm"):
        assert by[n].status == "converted" and by[n].verification == "bit-exact", by[n]
        assert pydicom.dcmread(by[n].output).file_meta.TransferSyntaxUID == \
            codecs.by_name(to).transfer_syntax
        _same_attributes(syn if n == "s.dcm" else rgb, Path(by[n].output))
    if to == "jxl":     # JPEG XL takes no signed samples: refused, with the reason
        assert by["neg.dcm"].status == "failed" and "signed" in by["neg.dcm"].error
        assert not (tmp_path / "out" / "neg.dcm").exists()
    else:
        assert by["neg.dcm"].verification == "bit-exact"


def test_jpeg_baseline_stays_jpeg(tmp_path):
    src = _testfile("SC_rgb_jpeg_dcmtk.dcm")
    r = convert_file(src, tmp_path / "o.dcm", Options(codec_policy=load_policy().codec))
    assert r.status == "kept" and r.verification == "byte copy"
    assert _sha(tmp_path / "o.dcm") == _sha(src)
    # asked for explicitly, it is decoded (as RGB) and re-encoded losslessly
    r = convert_file(src, tmp_path / "x.dcm", Options(to="jxl"))
    assert r.status == "converted", r.error
    out = pydicom.dcmread(tmp_path / "x.dcm")
    assert out.PhotometricInterpretation == "RGB" and out.LossyImageCompression == "01"
    _same_attributes(src, tmp_path / "x.dcm",
                     {"PhotometricInterpretation", "PlanarConfiguration", "LossyImageCompression"})


def test_lossy_records_the_loss_and_the_source(tmp_path):
    src = _testfile("MR_small.dcm")
    orig = pydicom.dcmread(src)
    r = convert_file(src, tmp_path / "l.dcm", Options(to="j2k", lossy_ratio=8, min_psnr=30))
    assert r.status == "converted", r.error
    assert r.psnr is not None and 30 <= r.psnr < float("inf") and r.max_error > 0
    out = pydicom.dcmread(tmp_path / "l.dcm")
    assert out.file_meta.TransferSyntaxUID == codecs.J2K
    assert out.SOPInstanceUID != orig.SOPInstanceUID
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.LossyImageCompression == "01"
    assert out.LossyImageCompressionMethod == "ISO_15444_1"
    assert float(out.LossyImageCompressionRatio) > 5
    assert out.ImageType[0] == "DERIVED"
    assert "Lossy compression" in out.DerivationDescription
    assert out.DerivationCodeSequence[-1].CodeValue == "113040"
    ref = out.SourceImageSequence[-1]
    assert ref.ReferencedSOPInstanceUID == orig.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == orig.SOPClassUID
    assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121320"
    # every other attribute kept: only the UID (and ImageType if it was ORIGINAL) changed,
    # and only the lossy record was added
    a, b = _elements(orig, PIXEL_KEYS), _elements(out, PIXEL_KEYS)
    changed = {k for k in a.keys() & b.keys() if a[k] != b[k]}
    want = {str(orig["SOPInstanceUID"].tag)}
    if orig.ImageType[0] != "DERIVED":
        want.add(str(orig["ImageType"].tag))
    assert changed == want
    assert not (a.keys() - b.keys())
    added = {k.split("[")[0].split(".")[0] for k in b.keys() - a.keys()}
    assert added == {str(out[kw].tag) for kw in (
        "LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod",
        "DerivationDescription", "DerivationCodeSequence", "SourceImageSequence")}
    # pydicom decodes it, near the original
    assert codecs.psnr(orig.pixel_array, out.pixel_array) > 30


def test_lossy_beyond_the_limit_is_refused(tmp_path):
    src = _testfile("MR_small.dcm")
    r = convert_file(src, tmp_path / "l.dcm", Options(to="htj2k", lossy_ratio=40, min_psnr=80))
    assert r.status == "failed" and "below the limit" in r.error and r.psnr < 80
    assert not (tmp_path / "l.dcm").exists()
    assert not list(tmp_path.glob(".*tmp"))
    r = convert_file(src, tmp_path / "m.dcm", Options(to="j2k", lossy_ratio=10, min_psnr=0,
                                                       max_error=0.5))
    assert r.status == "failed" and "max error" in r.error


def test_damaged_input_is_refused_and_the_rest_goes_on(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "noise.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
    shutil.copy(_testfile("MR_truncated.dcm"), d / "truncated.dcm")
    # a compressed image whose codestream header is damaged (its SOF55 marker)
    raw = bytearray(_testfile("MR_small_jpeg_ls_lossless.dcm").read_bytes())
    i = raw.index(b"\xff\xf7")
    raw[i:i + 8] = b"\xff\x01" + bytes(6)
    (d / "badjls.dcm").write_bytes(bytes(raw))
    # a compressed file cut inside its pixel data
    (d / "cutpx.dcm").write_bytes(_testfile("MR_small_jpeg_ls_lossless.dcm").read_bytes()[:-3000])
    # cut a file inside its header
    (d / "cut.dcm").write_bytes(_testfile("CT_small.dcm").read_bytes()[:700])
    _synthetic(d / "good.dcm")
    shutil.copy(_testfile("rtdose.dcm"), d / "dose32.dcm")
    before = {p.name: _sha(p) for p in d.iterdir()}
    rep = convert_paths([d], tmp_path / "out", Options())
    by = {Path(r.file).name: r for r in rep.results}
    assert by["good.dcm"].status == "converted"
    for n in ("noise.dcm", "truncated.dcm", "badjls.dcm", "cutpx.dcm", "cut.dcm", "dose32.dcm"):
        assert by[n].status == "failed" and by[n].error, n
        assert not (tmp_path / "out" / n).exists()
    assert "not a DICOM" in by["noise.dcm"].error
    assert "BitsAllocated 32" in by["dose32.dcm"].error
    assert "cannot be decoded" in by["badjls.dcm"].error
    assert not rep.ok and rep.count("failed") == 6
    assert {p.name: _sha(p) for p in d.iterdir()} == before
    assert not [p for p in (tmp_path / "out").rglob("*") if "tmp" in p.name]


def test_rerun_skips_what_is_done(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    _synthetic(d / "a.dcm")
    _synthetic(d / "sub" / "b.dcm", signed=False)
    shutil.copy(_testfile("CT_small.dcm"), d / "sub" / "c.dcm")
    out = tmp_path / "out"
    first = convert_paths([d], out, Options())
    assert first.count("converted") == 3 and (out / "sub" / "b.dcm").is_file()
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.dcm")}
    again = convert_paths([d], out, Options())
    assert again.count("skipped") == 3 and again.count("converted") == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.dcm")} == stamp
    # a lost output and a damaged one are made again; a stray temp file is ignored
    (out / "a.dcm").unlink()
    (out / "sub" / "c.dcm").write_bytes(b"garbage")
    (out / ".b.dcm.123.medview-tmp").write_bytes(b"half")
    third = convert_paths([d], out, Options())
    by = {Path(r.file).name: r.status for r in third.results}
    assert by == {"a.dcm": "converted", "b.dcm": "skipped", "c.dcm": "converted"}
    _same_attributes(d / "sub" / "c.dcm", out / "sub" / "c.dcm")
    # another codec asked for: the outputs in the old syntax are redone, not skipped
    fourth = convert_paths([d], out, Options(to="htj2k"))
    assert fourth.count("converted") == 3
    assert all(pydicom.dcmread(p).file_meta.TransferSyntaxUID == codecs.HTJ2K_LOSSLESS_RPCL
               for p in out.rglob("*.dcm"))
    assert convert_paths([d], out, Options(to="htj2k")).count("skipped") == 3


def test_output_never_overwrites_input(tmp_path):
    src = _synthetic(tmp_path / "a.dcm")
    h = _sha(src)
    rep = convert_paths([tmp_path], tmp_path, Options())
    assert rep.results[0].status == "failed" and "overwrite the input" in rep.results[0].error
    assert _sha(src) == h
    # an output folder inside the input folder: its files are not taken as inputs
    first = convert_paths([tmp_path], tmp_path / "out", Options())
    again = convert_paths([tmp_path], tmp_path / "out", Options())
    assert [r.status for r in first.results] == ["converted"]
    assert [r.status for r in again.results] == ["skipped"]


DCMTK_TS_NAMES = {"jpegls": "JPEGLSLossless", "j2k": "JPEG2000LosslessOnly"}


def test_outputs_open_in_dcmtk(tmp_path):
    subprocess.run(["bash", str(REPO / "scripts" / "apt-ensure.sh"), "dcmtk"], check=True,
                   capture_output=True, timeout=900)
    src = _synthetic(tmp_path / "a.dcm", signed=False)
    neg = _synthetic(tmp_path / "n.dcm", signed=True)
    rgb = _testfile("US1_UNCR.dcm")
    for to in ("jpegls", "htj2k", "jxl", "j2k"):
        files = [src, rgb] + ([neg] if to != "jxl" else [])
        rep = convert_paths(files, tmp_path / to, Options(to=to))
        assert rep.ok, [r.error for r in rep.results]
        for r in rep.results:
            p = subprocess.run(["dcmdump", "-q", r.output], capture_output=True, text=True,
                               timeout=60)
            assert p.returncode == 0, (to, p.stderr)
            assert "PatientName" in p.stdout and "PixelData" in p.stdout
            ts_line = next(x for x in p.stdout.splitlines() if x.startswith("(0002,0010)"))
            assert (codecs.by_name(to).transfer_syntax in ts_line
                    or DCMTK_TS_NAMES.get(to, "?") in ts_line), ts_line
    # dcmtk's own JPEG-LS decoder gives the original pixels back (signed and unsigned)
    for name, orig in (("a.dcm", src), ("n.dcm", neg)):
        plain = tmp_path / f"plain-{name}"
        p = subprocess.run(["dcmdjpls", str(tmp_path / "jpegls" / name), str(plain)],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert np.array_equal(pydicom.dcmread(plain).pixel_array, pydicom.dcmread(orig).pixel_array)
        _same_attributes(orig, plain)


def test_cli_parallel_with_report(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(4):
        _synthetic(d / f"s{i}.dcm", rows=30 + i, signed=bool(i % 2))
    shutil.copy(_testfile("US1_UNCR.dcm"), d / "rgb.dcm")
    (d / "junk.dcm").write_bytes(b"not dicom at all" * 20)
    rc = cli_main(["convert", str(d), "--out", str(tmp_path / "out"), "--workers", "2",
                   "--report", str(tmp_path / "rep.json")])
    assert rc == 1                                   # one file failed
    err = capsys.readouterr()
    assert "[6/6] 100%" in err.err and "FAILED" in err.err
    assert "5 converted" in err.out and "1 failed" in err.out
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["counts"] == {"converted": 5, "kept": 0, "skipped": 0, "failed": 1}
    rows = list(csv.DictReader(open(tmp_path / "rep.csv")))
    assert len(rows) == 6
    for row in rows:
        if row["status"] == "converted":
            assert row["verification"] == "bit-exact"
            assert int(row["bytes_after"]) > 0 and float(row["ratio"]) > 1
            assert row["codec"] in ("jpegls", "jxl") and float(row["seconds"]) > 0
    # rerun: everything done is skipped; exit code still reports the bad file
    rc = cli_main(["convert", str(d), "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 1 and "5 done before" in capsys.readouterr().out
    assert (tmp_path / "out" / "convert-report.json").is_file()


def test_cli_usage_errors(tmp_path, capsys):
    assert cli_main(["convert", str(tmp_path)]) == 2
    assert cli_main(["convert", str(tmp_path), "--out", str(tmp_path / "o"), "--lossy", "1"]) == 2
    assert cli_main(["convert", "--summary"]) == 2
    capsys.readouterr()


# --------------------------------------------------------------------------- in the store
def _small_store(tmp_path):
    from server.ingest import ingest_paths
    from server.store import Store

    d = tmp_path / "in"
    d.mkdir()
    _synthetic(d / "mr.dcm", rows=24, cols=20, frames=2, signed=False)
    shutil.copy(_testfile("US1_UNCR.dcm"), d / "rgb.dcm")
    shutil.copy(_testfile("SC_rgb_jpeg_dcmtk.dcm"), d / "jpeg.dcm")
    store = Store(tmp_path / "store")
    rep = ingest_paths([d], store, workers=1)
    assert len(rep.imported) == 3, rep.summary()
    return store, {f.path.name: f.sop_instance_uid for f in rep.imported}


def test_store_final_copies(tmp_path, capsys):
    from server.policy_copies import PolicyCopies, conversion_health, convert_store

    store, sops = _small_store(tmp_path)
    try:
        rep = convert_store(store, workers=2)          # the process pool path
        assert rep.ok and rep.count("converted") == 2 and rep.count("kept") == 1, rep.summary()
        pc = PolicyCopies(store)
        rows = {r["sop"]: r for r in pc.rows()}
        pc.close()
        mr, rgb, jpg = (rows[sops[n]] for n in ("mr.dcm", "rgb.dcm", "jpeg.dcm"))
        assert (mr["codec"], mr["transfer_syntax"], mr["verified"]) == \
            ("jpegls", codecs.JPEGLS_LOSSLESS, "bit-exact")
        assert (rgb["codec"], rgb["transfer_syntax"]) == ("jxl", codecs.JPEGXL_LOSSLESS)
        assert jpg["codec"] == "keep" and jpg["verified"] == "byte copy"
        inst = store.catalogue.find_instance(sops["jpeg.dcm"])
        assert jpg["relpath"] == inst["original_relpath"]          # no second copy
        for r in (mr, rgb):
            assert r["relpath"].startswith("final/") and r["relpath"].endswith(f".{r['codec']}.dcm")
            assert store.check_file(r["relpath"], r["sha256"], r["size"]) is None
            # the copy decodes bit-exact to the original's pixels
            orig = pydicom.dcmread(store.abspath(store.catalogue.find_instance(r["sop"])
                                                 ["original_relpath"]))
            copy = pydicom.dcmread(store.abspath(r["relpath"]))
            c = codecs.get(r["transfer_syntax"])
            from pydicom.encaps import generate_frames
            frames = list(generate_frames(copy.PixelData,
                                          number_of_frames=int(copy.get("NumberOfFrames", 1))))
            ref = orig.pixel_array
            ref = list(ref) if len(frames) > 1 else [ref]
            for f, want in zip(frames, ref):
                assert np.array_equal(c.decode(f), want)
            assert copy.SOPInstanceUID == r["sop"]
        assert conversion_health(store.catalogue) == {"copies": 3, "failed": 0}
        again = convert_store(store)
        assert again.count("skipped") == 3
        # a damaged copy is found by the summary and made again by the next run
        p = store.abspath(mr["relpath"])
        p.write_bytes(p.read_bytes()[:-10])
        assert cli_main(["convert", "--summary", "--store", str(store.root)]) == 0
        out = capsys.readouterr().out
        assert "3 instances: 3 with a verified final copy, 0 failed" in out
        assert "DAMAGED" in out and "jpegls" in out and "jxl" in out
        third = convert_store(store)
        assert third.count("converted") == 1 and third.count("skipped") == 2
    finally:
        store.close()


def test_store_failed_copy_is_an_alarm(tmp_path, capsys):
    """A real failure (the site asks JPEG XL for signed samples, which it cannot hold) is
    recorded, audited, counted by /api/health as degraded and shown by --summary."""
    from server.auth import Authority
    from server.policy_copies import conversion_health

    store, sops = _small_store(tmp_path)
    d = tmp_path / "neg"
    d.mkdir()
    _synthetic(d / "neg.dcm", rows=16, cols=16, frames=1, signed=True)
    from server.ingest import ingest_paths
    neg = ingest_paths([d], store, workers=1).imported[0].sop_instance_uid
    (store.root / "policy.toml").write_text('[codec]\nsmall_grayscale = "jxl"\n')
    root = str(store.root)
    store.close()
    rc = cli_main(["convert", "--store", root, "--policy", "--quiet"])
    assert rc == 1
    out = capsys.readouterr().out
    assert "1 failed" in out
    from server.store import Store
    store = Store(root)
    try:
        assert conversion_health(store.catalogue)["failed"] == 1
        auth = Authority(store.database)
        rows = auth.audit_rows(action="convert")
        assert any(r["outcome"] == "failed" and r["resource"] == neg
                   and "signed" in r["detail"]["error"] for r in rows)
        auth.close()
    finally:
        store.close()
    import requests

    from server.embedded import EmbeddedServer
    with EmbeddedServer(root) as srv:
        h = requests.get(f"{srv.url}/api/health", timeout=30).json()
    assert h["status"] == "degraded" and h["conversion"]["failed"] == 1
    assert cli_main(["convert", "--summary", "--store", root]) == 0
    out = capsys.readouterr().out
    assert f"FAILED {neg} (jxl)" in out and "1 failed" in out
    # the site fixes its policy: the next run converts it and the server is healthy again
    (Path(root) / "policy.toml").write_text('[codec]\nsmall_grayscale = "htj2k"\n')
    assert cli_main(["convert", "--store", root, "--policy", "--quiet"]) == 0
    store = Store(root)
    try:
        assert conversion_health(store.catalogue) == {"copies": 4, "failed": 0}
    finally:
        store.close()


def test_ingest_makes_final_copies_when_the_policy_says_so(tmp_path, capsys):
    from server.policy_copies import PolicyCopies
    from server.store import Store

    root = tmp_path / "store"
    Store(root).close()
    d = tmp_path / "in"
    d.mkdir()
    _synthetic(d / "a.dcm", rows=16, cols=16, frames=1)
    assert cli_main(["ingest", str(d), "--store", str(root), "--quiet"]) == 0
    store = Store(root)
    pc = PolicyCopies(store)
    assert pc.rows() == []                   # on_ingest is off by default
    pc.close()
    store.close()
    (root / "policy.toml").write_text("[codec]\non_ingest = true\n")
    _synthetic(d / "b.dcm", rows=16, cols=16, frames=1)
    assert cli_main(["ingest", str(d), "--store", str(root)]) == 0
    assert "final copies: 1 files: 1 converted" in capsys.readouterr().out
    store = Store(root)
    pc = PolicyCopies(store)
    rows = pc.rows()
    assert len(rows) == 1 and rows[0]["verified"] == "bit-exact" and rows[0]["codec"] == "jpegls"
    pc.close()
    store.close()


def test_ycc_rct_and_mislabelled_encoding(tmp_path):
    """YBR_RCT (JPEG 2000's reversible colour transform, undone exactly by the decoder)
    becomes RGB; a file whose data set is implicit VR under an explicit-VR syntax is
    written correctly as explicit VR; YBR_FULL stored natively is refused."""
    rct = _testfile("US1_J2KR.dcm")
    r = convert_file(rct, tmp_path / "rct.dcm", Options(to="htj2k"))
    assert r.status == "converted" and r.verification == "bit-exact", r.error
    out = pydicom.dcmread(tmp_path / "rct.dcm")
    assert out.PhotometricInterpretation == "RGB"
    assert np.array_equal(out.pixel_array, pydicom.dcmread(rct).pixel_array)
    _same_attributes(rct, tmp_path / "rct.dcm", {"PhotometricInterpretation", "PlanarConfiguration"})
    odd = _testfile("SC_rgb_jpeg.dcm")
    r = convert_file(odd, tmp_path / "odd.dcm", Options(to="htj2k"))
    assert r.status == "converted", r.error
    _same_attributes(odd, tmp_path / "odd.dcm",
                     {"PhotometricInterpretation", "PlanarConfiguration", "LossyImageCompression"})
    r = convert_file(_testfile("SC_ybr_full_uncompressed.dcm"), tmp_path / "ybr.dcm", Options())
    assert r.status == "failed" and "would not be lossless" in r.error


def test_the_in_memory_proof_catches_what_a_read_back_would():
    """verify_encoded (no second parse of the output) refuses: a frame that does not
    decode to the input's values, file bytes that do not carry the encoded frames, and
    a file that names another transfer syntax; and agrees with verify_bytes."""
    import copy as _copy
    from io import BytesIO

    from server.convert import dataset_bytes, encode_dataset, verify_bytes, verify_encoded

    ds = pydicom.dcmread(_testfile("MR_small.dcm"))
    conv = encode_dataset(ds, codecs.by_name("jpegls"))
    out = dataset_bytes(conv.dataset)
    assert verify_encoded(out, conv).ok and verify_bytes(out, conv).ok
    # the reference changed by one value: not bit-exact, found by both
    bad = _copy.copy(conv)
    bad.reference = [conv.reference[0].copy()]
    bad.reference[0][3, 4] += 1
    for v in (verify_encoded(out, bad), verify_bytes(out, bad)):
        assert not v.ok and "NOT bit-exact" in v.text
    # one byte of the written pixel data changed
    i = out.rfind(conv.fragments[0][-200:])
    flipped = out[:i + 10] + bytes([out[i + 10] ^ 0xFF]) + out[i + 11:]
    v = verify_encoded(flipped, conv)
    assert not v.ok and "pixel data" in v.text
    # the file meta names another transfer syntax
    other = _copy.deepcopy(conv.dataset)
    other.file_meta.TransferSyntaxUID = codecs.HTJ2K_LOSSLESS
    v = verify_encoded(dataset_bytes(other), conv)
    assert not v.ok and "transfer syntax" in v.text
    assert pydicom.dcmread(BytesIO(out)).SOPInstanceUID == ds.SOPInstanceUID


def test_lossless_output_keeps_the_input_bytes_of_every_other_element(tmp_path):
    """Written once: the input's dataset bytes up to its pixel data go out verbatim
    when only the pixel data and the transfer syntax change; a file where more changes
    (a stale pixel group length, big endian) is written by pydicom instead. Both open
    with every attribute and decode bit-exact."""
    from server.convert import _splice_plan, convert_bytes

    src = _testfile("emri_small.dcm")              # 10 frames, explicit VR little endian
    data = Path(src).read_bytes()
    ds = pydicom.dcmread(src)
    plan = _splice_plan(data, ds, codecs.by_name("jpegls"))
    assert plan is not None
    res, out = convert_bytes(data, Options(to="jpegls"))
    assert res.status == "converted" and data[plan[0]:plan[1]] in out
    back = pydicom.dcmread(io.BytesIO(out))
    np.testing.assert_array_equal(back.pixel_array, ds.pixel_array)
    assert back.NumberOfFrames == 10 and back.SOPInstanceUID == ds.SOPInstanceUID
    # a (7FE0,0000) group length would go stale: the pydicom writer (693_UNCR has one)
    src2 = _testfile("693_UNCR.dcm")
    d2 = Path(src2).read_bytes()
    ds2 = pydicom.dcmread(src2)
    assert 0x7FE00000 in ds2
    assert _splice_plan(d2, ds2, codecs.by_name("jpegls")) is None
    res, out = convert_bytes(d2, Options(to="jpegls"))
    assert res.status == "converted", res.error
    np.testing.assert_array_equal(pydicom.dcmread(io.BytesIO(out)).pixel_array, ds2.pixel_array)
    big = _testfile("MR_small_bigendian.dcm")
    assert _splice_plan(Path(big).read_bytes(), pydicom.dcmread(big),
                        codecs.by_name("jpegls")) is None


@pytest.mark.parametrize("name", ["emri_small.dcm", "CT_small.dcm", "MR_small.dcm",
                                  "693_UNCR.dcm", "US1_UNCR.dcm"])
def test_spliced_meta_is_what_pydicom_writes(name):
    """The spliced output's file meta information (the input's, the syntax replaced and
    the group length recomputed, without a dataset) is byte for byte what pydicom's
    writer makes of the same meta elements, for every target syntax."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    from server.convert import _meta_with_syntax, register_transfer_syntaxes

    register_transfer_syntaxes()
    data = Path(_testfile(name)).read_bytes()
    start = 144 + int.from_bytes(data[140:144], "little")
    ds = pydicom.dcmread(io.BytesIO(data))
    for c in codecs.all_codecs():
        ds.file_meta.TransferSyntaxUID = c.transfer_syntax
        ref = DicomBytesIO()
        write_file_meta_info(ref, ds.file_meta, enforce_standard=True)
        assert _meta_with_syntax(data[132:start], c.transfer_syntax) == ref.getvalue(), c.label
    assert _meta_with_syntax(b"\x02\x00\x00\x00UL\x04\x00\x00\x00\x00\x00", "1.2") is None


@pytest.mark.parametrize("signed", [False, True])
def test_native_pixels_with_stray_high_bits_convert_as_pydicom_reads_them(tmp_path, signed):
    """Native frames are read straight from the file's bytes (not through pydicom's
    pixel_array); bits above BitsStored set in the file are treated as pydicom treats
    them (masked off, or the sign extended from the high bit): the output decodes to
    pydicom's values of the input, frame by frame, the signedness kept."""
    src = _synthetic(tmp_path / "in.dcm", signed=signed, bits=12, frames=3)
    ds = pydicom.dcmread(src)
    raw = np.frombuffer(ds.PixelData, np.uint16).copy()
    raw[::7] |= 0xB000                       # garbage above the 12 stored bits
    ds.PixelData = raw.tobytes()
    ds.save_as(src, enforce_file_format=True)
    want = _pixels_from_pydicom(src)
    assert want.dtype == (np.int16 if signed else np.uint16)
    for to in ("jpegls", "htj2k"):
        res = convert_file(src, tmp_path / f"{to}.dcm", Options(to=to))
        assert res.status == "converted", res.error
        got = _pixels_from_pydicom(tmp_path / f"{to}.dcm")
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- fast path
def _plain_inputs(tmp_path) -> list[Path]:
    """Files the header walk takes: the sample CT, synthetic MRs (private tags, nested
    sequences, several frames, signed and not) and real explicit VR little endian ones."""
    files = sample.make_sample_ct(tmp_path / "ct", slices=2, size=64, seed=3)
    files += [_synthetic(tmp_path / "s.dcm", signed=True),
              _synthetic(tmp_path / "u.dcm", signed=False, frames=1, bits=16)]
    for name in ("emri_small.dcm", "vlut_04.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm"):
        p = sample.find_test_file(name)
        if p is not None:
            files.append(Path(p))
    return files


@pytest.mark.parametrize("to", ["jpegls", "htj2k", "policy"])
def test_the_header_walk_gives_what_pydicom_s_reading_gives(tmp_path, to):
    """The common case is read without pydicom (server.convert._read_header): its output
    is byte for byte the general path's (pydicom's read of the whole file, spliced), with
    the same result, and proven the same way."""
    from server.convert import FileResult, _convert_dataset, _read_header, convert_bytes

    opts = Options(to=to, codec_policy=load_policy().codec if to == "policy" else None)
    for f in _plain_inputs(tmp_path):
        data = Path(f).read_bytes()
        assert _read_header(data) is not None, f
        res, out = convert_bytes(data, opts, "x")
        ref = FileResult("x", bytes_before=len(data))
        want = _convert_dataset(data, opts, ref)
        assert res.status == ref.status == "converted", (f, res.error)
        assert out == want, f
        for k in ("codec", "transfer_syntax", "verification", "sop_instance_uid",
                  "source_sop_instance_uid", "reason"):
            assert getattr(res, k) == getattr(ref, k), (f, k)
        assert res.sha256 == hashlib.sha256(want).hexdigest()
        back = pydicom.dcmread(io.BytesIO(out))
        np.testing.assert_array_equal(back.pixel_array, pydicom.dcmread(f).pixel_array)


def test_the_header_walk_leaves_anything_else_to_pydicom(tmp_path):
    """Whatever is not the plain layout is read by pydicom (and converted, or refused,
    as before): implicit VR, big endian, a pixel group length, an element after the
    pixel data, elements out of order, a truncated pixel data element, colour, a
    sequence that does not end, a lossy target."""
    from server.convert import _read_header, convert_bytes

    src = _synthetic(tmp_path / "s.dcm", signed=False, frames=2)
    data = src.read_bytes()
    assert _read_header(data) is not None
    ds = pydicom.dcmread(src)
    at = data.rfind(b"\xe0\x7f\x10\x00OW")
    cases = {
        "implicit": None, "big endian": None,
        "after pixels": data + b"\xfc\xff\xfc\xff" + b"OB\x00\x00" + (2).to_bytes(4, "little") + b"\x00\x00",
        "truncated": data[:-10],
        # (0010,0020) moved after (0010,0010): out of order
        "unordered": None,
    }
    from pydicom.uid import ImplicitVRLittleEndian

    imp = copy.deepcopy(ds)
    imp.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buf = io.BytesIO()
    imp.save_as(buf, enforce_file_format=True)
    cases["implicit"] = buf.getvalue()
    big = _testfile("MR_small_bigendian.dcm")
    cases["big endian"] = Path(big).read_bytes()
    pid = data.find(b"\x10\x00\x20\x00LO")
    pname = data.find(b"\x10\x00\x10\x00PN")
    assert 0 < pname < pid < at
    n_name = 8 + int.from_bytes(data[pname + 6:pname + 8], "little")
    n_id = 8 + int.from_bytes(data[pid + 6:pid + 8], "little")
    assert pname + n_name == pid
    cases["unordered"] = (data[:pname] + data[pid:pid + n_id] + data[pname:pname + n_name]
                          + data[pid + n_id:])
    for what, d in cases.items():
        if d is None:
            continue
        assert _read_header(d) is None, what
        res, out = convert_bytes(d, Options(to="jpegls"), what)
        if what == "truncated":
            continue                                  # pydicom says what it makes of it
        assert res.status == "converted", (what, res.error)
        assert res.verification == "bit-exact"
        back = pydicom.dcmread(io.BytesIO(out))
        np.testing.assert_array_equal(back.pixel_array,
                                      pydicom.dcmread(io.BytesIO(d)).pixel_array)
    # a lossy target: the header walk reads the file, the general path converts it
    res, out = convert_bytes(data, Options(to="j2k", lossy_ratio=5, min_psnr=0), "lossy")
    assert res.status == "converted" and res.sop_instance_uid != ds.SOPInstanceUID, res.error
    # colour is not the plain case
    rgb = _testfile("US1_UNCR.dcm")
    assert _read_header(Path(rgb).read_bytes()) is None


def test_a_worker_that_dies_fails_its_files_only(tmp_path, monkeypatch):
    """With worker processes, a worker that dies (a crash in a codec, the OOM killer)
    fails the file it was converting, named in the report; a new worker converts the
    rest, the files the dead one held but had not written included."""
    import multiprocessing as mp
    import os

    import server.convert as conv

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs fork (the workers inherit the crashing stand-in)")
    monkeypatch.setattr(conv, "pool_context", lambda: mp.get_context("fork"))
    real = conv._convert_to_bytes

    def crashing(src, dst, opts):
        if src.name == "s3.dcm":
            os._exit(7)                               # the worker process dies here
        return real(src, dst, opts)
    monkeypatch.setattr(conv, "_convert_to_bytes", crashing)
    d = tmp_path / "in"
    d.mkdir()
    for i in range(8):
        _synthetic(d / f"s{i}.dcm", rows=20 + i, frames=1)
    rep = convert_paths([d], tmp_path / "out", Options(to="jpegls"), workers=2)
    by = {Path(r.file).name: r for r in rep.results}
    assert len(by) == 8 and by["s3.dcm"].status == "failed"
    assert "worker process ended abruptly (exit code 7)" in by["s3.dcm"].error
    for n, r in by.items():
        if n != "s3.dcm":
            assert r.status == "converted" and (tmp_path / "out" / n).is_file(), r.error
    assert not (tmp_path / "out" / "s3.dcm").exists()


def test_more_workers_than_files_to_spread(tmp_path):
    """Fewer files than workers × files sent ahead: every worker that gets nothing is
    told to end, and the batch ends (the workers' first files are spread over them)."""
    d = tmp_path / "in"
    d.mkdir()
    for i in range(3):
        _synthetic(d / f"s{i}.dcm", rows=16 + i, frames=1)
    for workers in (2, 3, 4):
        rep = convert_paths([d], tmp_path / f"out{workers}", Options(to="jpegls"), workers=workers)
        assert rep.count("converted") == 3, rep.summary()


def test_the_header_walk_under_fuzzed_headers(tmp_path):
    """Hostile headers: bytes of a plain file's header changed at random (seeded), lengths
    and VRs among them, or the file cut short. Whatever the header walk accepts must
    convert exactly as pydicom's reading of the same bytes does (same status, same output
    bytes); nothing raises; a converted output holds the input's pixels as pydicom reads
    them."""
    from server.convert import ConvertError, FileResult, _convert_dataset, _read_header, convert_bytes

    opts = Options(to="jpegls")
    src = sample.make_sample_ct(tmp_path / "ct", slices=1, size=64, seed=5)[0]
    data = Path(src).read_bytes()
    pixel_at = data.rfind(b"\xe0\x7f\x10\x00")
    rng = np.random.default_rng(20261204)
    accepted = converted = 0
    for k in range(400):
        b = bytearray(data)
        if k % 10 == 9:
            b = b[:int(rng.integers(132, len(b)))]                 # cut short
        else:
            for _ in range(int(rng.integers(1, 4))):              # 1-3 bytes of the header
                b[int(rng.integers(132, pixel_at + 12))] = int(rng.integers(0, 256))
        b = bytes(b)
        res, out = convert_bytes(b, opts, "x")
        if _read_header(b) is None:
            continue
        accepted += 1
        ref = FileResult("x", bytes_before=len(b))
        try:
            want = _convert_dataset(b, opts, ref)
        except ConvertError:                    # pydicom's reading refuses the file
            assert res.status == "failed" and res.error and out is None, (k, res)
            continue
        assert res.status == ref.status, (k, res, ref)
        assert out == want, k
        if res.status == "converted":
            converted += 1
            back = pydicom.dcmread(io.BytesIO(out))
            np.testing.assert_array_equal(back.pixel_array, pydicom.dcmread(io.BytesIO(b)).pixel_array)
    assert accepted > 50 and converted > 20, (accepted, converted)      # the walk was exercised
