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
from pathlib import Path

from imaging.pyramid import StoredSlide, write_atomic
from server_stub.slide_store import SlideStore, slide_summary
from server_stub.slide_tiers import copy_verified


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
    _row, st = store.open(row["pk"])
    copy_verified(st.path, dest, row["manifest_sha256"])
    return "copied"


def gather_patient(store: SlideStore, patient_id: str, dest: str | Path) -> dict:
    p = store.catalogue.patient(patient_id)
    if p is None:
        raise ValueError(f"unknown patient {patient_id!r}")
    base = Path(dest) / patient_id
    base.mkdir(parents=True, exist_ok=True)
    rows = store.catalogue.slides(patient_id=patient_id)
    done = []
    for row in rows:
        what = _place(store, row, base / row["accession"] / row["slide_uid"])
        done.append({**slide_summary(row), "folder": f"{row['accession']}/{row['slide_uid']}",
                     "copy": what})
    index = {"patient": {k: p[k] for k in ("patient_id", "name", "status")}, "slides": done}
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
