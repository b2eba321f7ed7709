"""Export a study (or one series) as the original DICOM files, bit for bit.

``medview-server export --study UID [--series UID] --out DIR|file.zip [--dicomdir]``

* Without ``--dicomdir`` the files are written as ``SERIES_UID/SOP_UID.dcm`` under the
  output directory.
* With ``--dicomdir`` the output is a DICOM File-set (PS3.10): pydicom's
  :class:`~pydicom.fileset.FileSet` writes the DICOMDIR and chooses the File IDs
  (``PT000000/ST000000/SE000000/IM000000``); pydicom re-encodes the files it stages, so
  each one is then replaced by the original bytes (the DICOMDIR records reference files
  by File ID only, never by offset, so the directory stays valid).

Every written file is checked against the original's SHA-256 recorded in the catalogue;
originals that tiered storage moved to the archive are recalled first.
A ``.zip`` output is built in a temporary directory next to it and renamed into place
once complete.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .store import Store, safe_component, sha256_file

ProgressFn = Callable[[int, int], None]
ReadFn = Callable[[dict], bytes]


class ExportError(Exception):
    """Nothing to export, or the output cannot be written."""


@dataclass
class ExportReport:
    out: Path
    files: list[Path] = field(default_factory=list)
    dicomdir: Path | None = None
    bytes: int = 0

    def summary(self) -> str:
        what = f"{len(self.files)} files, {self.bytes} bytes"
        return f"exported {what} to {self.out}" + (" with a DICOMDIR" if self.dicomdir else "")


def _instances(store: Store, study: str, series: str | None) -> list[dict]:
    cat = store.catalogue
    if cat.get_study(study) is None:
        raise ExportError(f"no study {study} in the store")
    rows = cat.query_instances(StudyInstanceUID=study, SeriesInstanceUID=series)
    if not rows:
        raise ExportError(f"no series {series} in study {study}" if series
                          else f"study {study} holds no instance")
    return rows


def _reader(store: Store) -> ReadFn:
    """The originals as the server reads them: verified, recalled from the archive when
    tiered storage moved them there."""
    from .tiers import Tiers
    tiers = Tiers(store)
    return tiers.read_original


def _copy_checked(read: ReadFn, row: dict, dst: Path) -> int:
    try:
        data = read(row)                      # checked against the recorded SHA-256
    except Exception as e:  # noqa: BLE001 - named, with the instance, for the user
        raise ExportError(f"cannot read the original of {row['SOPInstanceUID']}: {e}; "
                          "run 'medview-server fsck'") from None
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data)
    sha, size = sha256_file(dst)
    if sha != row["original_sha256"]:
        raise ExportError(f"writing {dst} failed: its checksum differs from the original's")
    return size


def _write_tree(read: ReadFn, rows: list[dict], root: Path, dicomdir: bool,
                progress: ProgressFn | None, report: ExportReport) -> None:
    total = len(rows)
    if not dicomdir:
        for n, r in enumerate(rows, 1):
            dst = root / safe_component(r["SeriesInstanceUID"]) / \
                f"{safe_component(r['SOPInstanceUID'])}.dcm"
            report.bytes += _copy_checked(read, r, dst)
            report.files.append(dst)
            if progress:
                progress(n, total)
        return
    import io

    import pydicom
    from pydicom.fileset import FileSet

    fs = FileSet()
    by_sop = {}
    for r in rows:
        try:
            ds = pydicom.dcmread(io.BytesIO(read(r)))
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"cannot read the original of {r['SOPInstanceUID']}: {e}") from None
        for elem in list(ds.group_dataset(0x0000)):     # pydicom refuses to write these
            del ds[elem.tag]
        fs.add(ds)
        by_sop[r["SOPInstanceUID"]] = r
    fs.write(root)
    for n, inst in enumerate(fs, 1):
        dst = Path(inst.path)
        report.bytes += _copy_checked(read, by_sop[inst.SOPInstanceUID], dst)
        report.files.append(dst)
        if progress:
            progress(n, total)
    report.dicomdir = root / "DICOMDIR"


def export_study(store: Store, study: str, out: str | Path, *, series: str | None = None,
                 dicomdir: bool = False, progress: ProgressFn | None = None,
                 read: ReadFn | None = None) -> ExportReport:
    """Write the original files of ``study`` (or of one ``series``) to ``out`` (a directory,
    or a path ending in ``.zip``). ``read(instance_row) -> bytes`` gives an original
    (default: the store's, recalled from the archive if needed)."""
    out = Path(out)
    rows = _instances(store, study, series)
    read = read or _reader(store)
    report = ExportReport(out)
    if out.suffix.lower() == ".zip":
        if out.exists():
            raise ExportError(f"{out} exists; not overwriting it")
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
            tree = Path(tmp) / "tree"
            tree.mkdir()
            _write_tree(read, rows, tree, dicomdir, progress, report)
            part = Path(tmp) / "out.zip"
            with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as z:
                for p in sorted(tree.rglob("*")):
                    if p.is_file():
                        z.write(p, p.relative_to(tree).as_posix())
            os.replace(part, out)
        report.files = [Path(f.relative_to(tree)) for f in report.files]
        report.dicomdir = Path("DICOMDIR") if report.dicomdir else None
        return report
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty; export into a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    _write_tree(read, rows, out, dicomdir, progress, report)
    return report
