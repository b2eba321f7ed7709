"""Organise and distribute slides (W7).

:func:`gather_patient` copies every slide of one patient — all exams — into one folder::

    DEST/<patient_id>/
      index.json                       patient, exams, slides (catalogue facts, QC)
      <accession>/<slide_uid>/         the stored pyramid, verified after copying

:func:`distribute` pre-loads the cases assigned to reading stations (``station`` and
``assignment`` tables) into each station's cache folder, ahead of time, so the reading
station opens them locally (:meth:`client.slides.LocalSlide.from_folder`). Every copy
is verified (SHA-256 of every file against the manifest) before it is renamed into place;
a station cache that already holds a verified copy is left alone. An assignment is marked
distributed only when all its slides are in place.
"""
from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from imaging.pyramid import StoredSlide, write_atomic
from server.slide_store import SlideStore, slide_summary
from server.slide_tiers import copy_verified


def _place(store: SlideStore, row: dict, dest: Path) -> str:
    """Copy one slide folder to ``dest`` (verified); 'copied' or 'present'."""
    if dest.exists():
        try:
            if not StoredSlide.open(dest).verify():
                return "present"
        except Exception:  # noqa: BLE001 - damaged: replaced below
            pass
        import shutil

        shutil.rmtree(dest)
    if store.objects is not None:            # in the object store (S3): downloaded
        copy_verified(None, dest, row["manifest_sha256"], fill=lambda staging:
                      store.objects.fetch_into(row["path"], staging, row["manifest_sha256"]))
        return "copied"
    _row, st = store.open(row["pk"])
    copy_verified(st.path, dest, row["manifest_sha256"])
    return "copied"


def _gather_study(image_store, study_uid: str, dest: Path) -> dict:
    """The original files of one study into ``dest`` (through a staging folder); a
    folder already holding every original with its recorded checksum is left alone."""
    from server.export import export_study
    from server.store import sha256_file

    rows = image_store.catalogue.query_instances(StudyInstanceUID=study_uid)
    if dest.exists():
        present = all((f := dest / _inst_path(r)).is_file()
                      and sha256_file(f)[0] == r["original_sha256"] for r in rows)
        n_files = sum(1 for p in dest.rglob("*") if p.is_file())
        if present and n_files == len(rows):
            return {"files": len(rows), "copy": "present"}
        shutil.rmtree(dest)
    staging = dest.parent / f".incoming-{dest.name}-{uuid.uuid4().hex[:8]}"
    try:
        rep = export_study(image_store, study_uid, staging)      # checked file by file
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"files": len(rep.files), "bytes": rep.bytes, "copy": "copied"}


def _inst_path(row: dict) -> Path:
    from server.store import safe_component

    return Path(safe_component(row["SeriesInstanceUID"])) / \
        f"{safe_component(row['SOPInstanceUID'])}.dcm"


def gather_patient(store: SlideStore, patient_id: str, dest: str | Path, *,
                   image_store=None) -> dict:
    """Copy every slide and every radiology study of ``patient_id`` under
    ``dest/<patient_id>``; returns the index (also written as ``index.json``).
    ``image_store``: the radiology :class:`~server.store.Store` (default: the one
    the slide store belongs to)."""
    from server.store import Store, safe_component

    p = store.catalogue.patient(patient_id)
    if p is None:
        raise ValueError(f"unknown patient {patient_id!r}")
    plain = patient_id not in (".", "..") and not any(c in patient_id for c in "/\\\0")
    base = Path(dest) / (patient_id if plain else safe_component(patient_id))
    base.mkdir(parents=True, exist_ok=True)
    rows = store.catalogue.slides(patient_id=patient_id)
    done = []
    for row in rows:
        what = _place(store, row, base / row["accession"] / row["slide_uid"])
        done.append({**slide_summary(row), "folder": f"{row['accession']}/{row['slide_uid']}",
                     "copy": what})
    own = image_store is None
    images = image_store or Store(store.root.parent)
    studies = []
    try:
        found = [s for s in images.catalogue.query_studies(PatientID=patient_id)
                 if s.get("PatientID") == patient_id]          # exact: no wildcards
        for st in sorted(found, key=lambda s: (s.get("StudyDate") or "", s["StudyInstanceUID"])):
            uid = st["StudyInstanceUID"]
            folder = f"radiology/{safe_component(uid)}"
            got = _gather_study(images, uid, base / folder)
            studies.append({"study_uid": uid, "date": st.get("StudyDate"),
                            "description": st.get("StudyDescription"),
                            "modalities": st.get("ModalitiesInStudy"),
                            "accession": st.get("AccessionNumber"), "folder": folder, **got})
    finally:
        if own:
            images.close()
    index = {"patient": {k: p[k] for k in ("patient_id", "name", "status")}, "slides": done,
             "studies": studies}
    write_atomic(base / "index.json", json.dumps(index, indent=2, default=str).encode())
    return index


def distribute(store: SlideStore, station: str | None = None) -> list[dict]:
    """Copy pending assigned exams into their stations' caches; returns what was done."""
    out = []
    for a in store.catalogue.assignments(station, pending_only=True):
        cache = Path(a["cache_dir"])
        slides = store.catalogue.slides(accession=a["accession"])
        placed = [(_place(store, r, cache / r["slide_uid"]), r["slide_uid"]) for r in slides]
        store.catalogue.mark_distributed(a["station"], a["accession"])
        out.append({"station": a["station"], "accession": a["accession"],
                    "slides": [{"slide_uid": u, "copy": w} for w, u in placed]})
    return out
