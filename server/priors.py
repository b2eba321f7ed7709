"""Prior studies ahead of reading (seed 001): which earlier studies of a patient are
relevant to a scheduled exam, and ``medview-server prefetch --worklist FILE``, which
recalls them from the archive and prepares them before the radiologist opens the new one.

A worklist is CSV (a header row naming the columns) or JSON (a list of objects, or
``{"exams": [...]}``), one scheduled exam per row: ``patient_id`` (also ``PatientID``),
``date`` (also ``ScheduledDate``/``StudyDate``; ``YYYY-MM-DD`` or ``YYYYMMDD``),
``modality`` (also ``Modality``) and optionally ``body_part`` (``BodyPartExamined``).

Relevance (the same order as the viewer's prior list, :func:`client.priors.rank`): studies
of the patient strictly before the exam's date; the same modality and body part first,
then the same modality, then the rest; most recent first within each. ``prefetch`` takes
the first ``limit`` of the same modality (none of another modality unless asked).

Preparing a prior: every archived codestream of its series is recalled (joined, checked
against the SHA-256 recorded at ingest, written back hot: :meth:`server.tiers.Tiers.
recall_frame`) and its versions are measured and recorded (:class:`server.versions.
VersionTable`), so that the viewer's first request is served from the hot store.
Running it twice does nothing the second time. A scheduler can run it every night.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

__all__ = ["Exam", "WorklistError", "read_worklist", "rank_key", "relevant_priors",
           "PrefetchReport", "prefetch"]

_KEYS = {"patient_id": ("patient_id", "patientid", "patient"),
         "date": ("date", "scheduleddate", "scheduled_date", "studydate", "study_date"),
         "modality": ("modality",),
         "body_part": ("body_part", "bodypartexamined", "bodypart")}


class WorklistError(ValueError):
    """The worklist cannot be read (with the file and the row)."""


@dataclass(frozen=True)
class Exam:
    patient_id: str
    date: str                     # YYYYMMDD
    modality: str
    body_part: str | None = None
    row: int = 0                  # 1-based row in the file (errors, report)


def _date(text: str, where: str) -> str:
    t = str(text).strip()
    m = re.fullmatch(r"(\d{4})-?(\d{2})-?(\d{2})", t)
    if not m:
        raise WorklistError(f"{where}: date {t!r} is not YYYY-MM-DD or YYYYMMDD")
    y, mo, d = (int(g) for g in m.groups())
    if not (1 <= mo <= 12 and 1 <= d <= 31):
        raise WorklistError(f"{where}: date {t!r} is not a date")
    return f"{y:04d}{mo:02d}{d:02d}"


def _exam(obj: dict, where: str, row: int) -> Exam:
    low = {str(k).strip().lower(): v for k, v in obj.items() if k is not None}
    got: dict[str, Any] = {}
    for key, names in _KEYS.items():
        got[key] = next((low[n] for n in names if low.get(n) not in (None, "")), None)
    missing = [k for k in ("patient_id", "date", "modality") if not got[k]]
    if missing:
        raise WorklistError(f"{where}: missing {', '.join(missing)}")
    return Exam(str(got["patient_id"]).strip(), _date(got["date"], where),
                str(got["modality"]).strip().upper(),
                str(got["body_part"]).strip().upper() if got["body_part"] else None, row)


def read_worklist(path: str | Path) -> list[Exam]:
    """The scheduled exams of a CSV or JSON worklist (format by content)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise WorklistError(f"{p}: cannot read the worklist: {e}") from None
    if text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise WorklistError(f"{p}: not valid JSON: {e}") from None
        if isinstance(data, dict):
            data = data.get("exams")
        if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
            raise WorklistError(f"{p}: JSON must be a list of exams or {{\"exams\": [...]}}")
        return [_exam(x, f"{p} exam {i}", i) for i, x in enumerate(data, 1)]
    rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        raise WorklistError(f"{p}: no exams (a CSV worklist needs a header row and rows)")
    return [_exam(r, f"{p} row {i + 1}", i + 1) for i, r in enumerate(rows, 1)]


def rank_key(modality: str | None, body_part: str | None, study_modalities: Iterable[str],
             study_body_parts: Iterable[str], study_date: str | None) -> tuple:
    """Sort key of a prior: same modality and body part, same modality, the rest; newest
    first within each."""
    mods = {str(m).upper() for m in study_modalities if m}
    parts = {str(b).upper() for b in study_body_parts if b}
    same_mod = bool(modality) and modality.upper() in mods
    same_part = bool(body_part) and body_part.upper() in parts
    group = 0 if same_mod and same_part else 1 if same_mod else 2
    date = re.sub(r"\D", "", str(study_date or ""))
    return (group, -int(date) if date else 0)


def relevant_priors(catalogue, exam: Exam, *, exclude: Iterable[str] = ()) -> list[dict]:
    """Studies of the exam's patient before its date, most relevant first; each row is
    the study's with ``series`` (its series rows) and ``same_modality``."""
    skip = set(exclude)
    out = []
    for st in catalogue.query_studies(PatientID=exam.patient_id):
        if st.get("PatientID") != exam.patient_id or st["StudyInstanceUID"] in skip:
            continue                      # an exact match (the query takes wildcards)
        date = re.sub(r"\D", "", str(st.get("StudyDate") or ""))
        if not date or date >= exam.date:
            continue
        series = catalogue.query_series(StudyInstanceUID=st["StudyInstanceUID"])
        mods = st.get("ModalitiesInStudy") or [s.get("Modality") for s in series]
        parts = [s.get("BodyPartExamined") for s in series]
        out.append(dict(st, series=series,
                        same_modality=exam.modality in {str(m).upper() for m in mods if m},
                        _key=rank_key(exam.modality, exam.body_part, mods, parts, date)))
    out.sort(key=lambda s: s.pop("_key"))
    return out


@dataclass
class PrefetchReport:
    exams: int = 0
    priors: list[dict] = field(default_factory=list)    # {exam, patient, study, date, ...}
    frames_recalled: int = 0
    frames_hot: int = 0
    bytes_recalled: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        return (f"{self.exams} exams, {len(self.priors)} priors prepared: "
                f"{self.frames_recalled} codestreams recalled from the archive "
                f"({self.bytes_recalled / 1e6:.1f} MB), {self.frames_hot} already hot"
                + (f"; {len(self.errors)} errors" if self.errors else ""))


def prefetch(catalogue, tiers, versions, exams: Iterable[Exam], *, limit: int = 2,
             other_modalities: bool = False,
             log: Callable[[str], None] = lambda m: None) -> PrefetchReport:
    """Recall and prepare the relevant priors of every exam (see the module docstring)."""
    rep = PrefetchReport()
    done: set[str] = set()
    for exam in exams:
        rep.exams += 1
        priors = [p for p in relevant_priors(catalogue, exam)
                  if other_modalities or p["same_modality"]][:max(limit, 0)]
        if not priors:
            log(f"row {exam.row}: patient {exam.patient_id}: no {exam.modality} prior before "
                f"{exam.date}")
        for p in priors:
            uid = p["StudyInstanceUID"]
            entry = {"exam": exam.row, "patient": exam.patient_id, "study": uid,
                     "date": p.get("StudyDate"), "modalities": p.get("ModalitiesInStudy"),
                     "recalled": 0, "hot": 0}
            rep.priors.append(entry)
            if uid in done:
                continue
            done.add(uid)
            for se in p["series"]:
                suid = se["SeriesInstanceUID"]
                states = tiers.frame_states(suid)
                for row in catalogue.series_images(suid):
                    pk, t = states.get((row["SOPInstanceUID"], row["frame"]), (None, None))
                    if t is None or t.state != "archived":
                        entry["hot"] += 1
                        continue
                    try:
                        cs = tiers.recall_frame(row, pk)
                    except Exception as e:  # noqa: BLE001 - reported; the others go on
                        rep.errors.append(f"{uid} {row['SOPInstanceUID']}/{row['frame']}: {e}")
                        continue
                    entry["recalled"] += 1
                    rep.bytes_recalled += len(cs)
                try:
                    versions(suid)                 # measured and recorded once
                except Exception as e:  # noqa: BLE001
                    rep.errors.append(f"{suid}: versions: {e}")
            rep.frames_recalled += entry["recalled"]
            rep.frames_hot += entry["hot"]
            log(f"row {exam.row}: patient {exam.patient_id}: prior {uid} of "
                f"{p.get('StudyDate')}: {entry['recalled']} recalled, {entry['hot']} hot")
    return rep
