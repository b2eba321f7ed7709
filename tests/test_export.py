"""Study export: the original files bit for bit, with a DICOMDIR that dcmtk reads."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import zipfile
from pathlib import Path

import pydicom
import pytest

from server import sample
from server.cli import main as cli_main
from server.ingest import ingest_paths
from server.store import Store

REPO = Path(__file__).resolve().parents[1]


def sha(p: Path | bytes) -> str:
    return hashlib.sha256(p if isinstance(p, bytes) else Path(p).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("export")
    files = sample.make_sample_ct(root / "ct", slices=4, size=64, seed=2)
    extra = sample.find_test_file("MR_small_jpeg_ls_lossless.dcm")   # JPEG-LS original
    srcs = list(files) + ([Path(extra)] if extra else [])
    with Store(root / "store") as st:
        rep = ingest_paths(srcs, st)
        assert len(rep.imported) == len(srcs), rep.summary()
    return root / "store", srcs


def _study_of(p: Path) -> str:
    return str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)


def test_export_folder_bit_for_bit(store_dir, tmp_path):
    store, srcs = store_dir
    study = _study_of(srcs[0])
    out = tmp_path / "out"
    assert cli_main(["export", "--store", str(store), "--study", study, "--out", str(out)]) == 0
    got = sorted(sha(p) for p in out.rglob("*.dcm"))
    want = sorted(sha(p) for p in srcs if _study_of(p) == study)
    assert got == want
    # a non-empty folder is refused, nothing overwritten
    assert cli_main(["export", "--store", str(store), "--study", study, "--out", str(out)]) == 1
    assert cli_main(["export", "--store", str(store), "--study", "1.2.3.4",
                     "--out", str(tmp_path / "none")]) == 1


def test_export_dicomdir_read_by_dcmtk(store_dir, tmp_path):
    r = subprocess.run(["bash", str(REPO / "scripts/apt-ensure.sh"), "dcmtk"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    store, srcs = store_dir
    mr = srcs[-1]
    study = _study_of(mr)
    out = tmp_path / "fileset"
    assert cli_main(["export", "--store", str(store), "--study", study, "--out", str(out),
                     "--dicomdir"]) == 0
    dicomdir = out / "DICOMDIR"
    # dcmtk: the DICOMDIR parses, and dcmftest accepts it and every referenced file
    r = subprocess.run(["dcmdump", str(dicomdir)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "DirectoryRecordSequence" in r.stdout and "IMAGE" in r.stdout
    refs = [p for p in out.rglob("*") if p.is_file() and p.name != "DICOMDIR"]
    assert len(refs) == 1
    r = subprocess.run(["dcmftest", str(dicomdir), *map(str, refs)], capture_output=True,
                       text=True, timeout=60)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(lines) == 2, r.stdout
    assert all(line.startswith("yes: ") for line in lines), r.stdout
    assert sha(refs[0]) == sha(mr)                  # the original, bit for bit
    # pydicom reads the File-set back and finds the instance
    fs = pydicom.fileset.FileSet(dicomdir)
    assert [str(i.SOPInstanceUID) for i in fs] == [str(pydicom.dcmread(mr).SOPInstanceUID)]
    # dcmtk resolves the File ID of the record to that file
    fid = "\\".join(fs._instances[0].node._record.ReferencedFileID)
    assert (out / fid.replace("\\", "/")).resolve() == refs[0].resolve()


def test_export_series_to_zip(store_dir, tmp_path):
    store, srcs = store_dir
    ds = pydicom.dcmread(srcs[0], stop_before_pixels=True)
    z = tmp_path / "study.zip"
    assert cli_main(["export", "--store", str(store), "--study", str(ds.StudyInstanceUID),
                     "--series", str(ds.SeriesInstanceUID), "--out", str(z),
                     "--dicomdir"]) == 0
    with zipfile.ZipFile(z) as zf:
        names = zf.namelist()
        assert "DICOMDIR" in names
        got = sorted(sha(zf.read(n)) for n in names if n != "DICOMDIR")
    assert got == sorted(sha(p) for p in srcs[:4])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export-")]
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_export_names_a_damaged_original(tmp_path, capsys):
    files = sample.make_sample_ct(tmp_path / "ct", slices=2, size=32, seed=4)
    with Store(tmp_path / "store") as st:
        ingest_paths(files, st)
        inst = st.catalogue.query_instances()[0]
        p = st.abspath(inst["original_relpath"])
        p.write_bytes(p.read_bytes()[:-10] + b"0123456789")        # same size, new bytes
    study = _study_of(files[0])
    z = tmp_path / "out.zip"
    assert cli_main(["export", "--store", str(tmp_path / "store"), "--study", study,
                     "--out", str(z)]) == 1
    err = capsys.readouterr().err
    assert inst["SOPInstanceUID"] in err and "fsck" in err
    assert not z.exists()                                         # no partial archive


def test_export_recalls_archived_originals(tmp_path):
    files = sample.make_sample_ct(tmp_path / "ct", slices=2, size=32, seed=9)
    store = tmp_path / "store"
    with Store(store) as st:
        ingest_paths(files, st)
    (tmp_path / "archive").mkdir()
    assert cli_main(["migrate", "--store", str(store), "--days", "0", "--archive",
                     str(tmp_path / "archive"), "--min-status", "0", "--quiet"]) == 0
    assert not list((store / "originals").rglob("*.dcm"))          # all in the archive
    out = tmp_path / "out"
    assert cli_main(["export", "--store", str(store), "--study", _study_of(files[0]),
                     "--out", str(out), "--dicomdir"]) == 0
    got = sorted(sha(p) for p in out.rglob("*") if p.is_file() and p.name != "DICOMDIR")
    assert got == sorted(sha(p) for p in files)
