"""``medview list --server URL``: the UIDs that ``fetch``, ``snapshot`` and ``render`` need,
asked of an image server through the client :class:`~client.session.Session` (QIDO-RS and
the series image list; the user's rights apply). No Qt.

Same rows and columns as ``medview-server list`` on the store (a test holds them equal):
tab-separated under a header line, UID first, or one JSON object per line. Images are
numbered from 1 in series order, as the viewer shows them and ``snapshot --slice N``
takes them.
"""
from __future__ import annotations

import json
from typing import Any

from .session import ServerError, Session

LEVELS = ("studies", "series", "instances")

COLUMNS = {
    "studies": ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "Modalities",
                "Series", "Instances", "StudyDescription"),
    "series": ("SeriesInstanceUID", "Modality", "SeriesNumber", "Images", "SeriesDescription",
               "StudyInstanceUID", "PatientID"),
    "instances": ("SOPInstanceUID", "InstanceNumber", "Frames", "Images", "SeriesInstanceUID"),
}


def image_numbers(numbers: list[int]) -> str:
    """1-based image numbers as ranges: [3] -> "3", [4, 5, 6] -> "4-6"."""
    out, run = [], []
    for n in sorted(numbers) + [None]:
        if n is not None and run and n == run[-1] + 1:
            run.append(n)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [n]
    return ",".join(out)


def _study_row(s: dict) -> dict:
    return {"StudyInstanceUID": s["StudyInstanceUID"], "PatientID": s.get("PatientID"),
            "PatientName": s.get("PatientName"), "StudyDate": s.get("StudyDate"),
            "Modalities": ",".join(s.get("ModalitiesInStudy") or []),
            "Series": s.get("NumberOfStudyRelatedSeries"),
            "Instances": s.get("NumberOfStudyRelatedInstances"),
            "StudyDescription": s.get("StudyDescription")}


def _series_row(s: dict) -> dict:
    return {"SeriesInstanceUID": s["SeriesInstanceUID"], "Modality": s.get("Modality"),
            "SeriesNumber": s.get("SeriesNumber"), "Images": s.get("NumberOfImages"),
            "SeriesDescription": s.get("SeriesDescription"),
            "StudyInstanceUID": s.get("StudyInstanceUID"), "PatientID": s.get("PatientID")}


def _instance_rows(series_uid: str, images: list[dict]) -> list[dict]:
    rows: dict[str, dict] = {}
    for im in images:
        sop = im["SOPInstanceUID"]
        r = rows.setdefault(sop, {"SOPInstanceUID": sop, "InstanceNumber": im.get("InstanceNumber"),
                                  "Frames": 0, "_numbers": [], "SeriesInstanceUID": series_uid})
        r["Frames"] += 1
        r["_numbers"].append(int(im["index"]) + 1)
    for r in rows.values():
        r["Images"] = image_numbers(r.pop("_numbers"))
    return list(rows.values())


def _studies(session: Session, patient: str | None, study: str | None) -> list[dict]:
    q = {}
    if patient is not None:
        q["PatientID"] = patient
    if study is not None:
        q["StudyInstanceUID"] = study
    return session.studies(**q)


def _series(session: Session, patient: str | None, study: str | None,
            series: str | None) -> list[dict]:
    q = {"SeriesInstanceUID": series} if series is not None else {}
    if patient is None:
        return session.series(study, **q)
    out = []
    for st in _studies(session, patient, study):           # the patient's studies
        out += session.series(st["StudyInstanceUID"], **q)
    return out


def list_server(session: Session, level: str, *, patient: str | None = None,
                study: str | None = None, series: str | None = None,
                refused: list[str] | None = None) -> list[dict]:
    """Rows of ``level`` ("studies", "series", "instances") the server shows this user.
    A series whose images the user may browse but not list is left out of the instances
    and said in ``refused``."""
    if level not in LEVELS:
        raise ValueError(f"list what? one of {', '.join(LEVELS)}, not {level!r}")
    if level == "studies":
        return [_study_row(s) for s in _studies(session, patient, study)]
    found = _series(session, patient, study, series)
    if level == "series":
        return [_series_row(s) for s in found]
    out = []
    for s in found:
        uid = s["SeriesInstanceUID"]
        try:
            images = session.series_images(uid)["images"]
        except ServerError as e:
            if e.status not in (403, 404) or refused is None:
                raise
            refused.append(f"series {uid}: {e.message}")
            continue
        out += _instance_rows(uid, images)
    return out


def format_rows(rows: list[dict], level: str, as_json: bool = False) -> list[str]:
    """Lines to print: a header and tab-separated rows, or one JSON object per row."""
    cols = COLUMNS[level]
    if as_json:
        return [json.dumps({c: r.get(c) for c in cols}, separators=(",", ":")) for r in rows]

    def cell(v: Any) -> str:
        return "" if v is None else str(v).replace("\t", " ").replace("\n", " ")

    return ["\t".join(cols)] + ["\t".join(cell(r.get(c)) for c in cols) for r in rows]
