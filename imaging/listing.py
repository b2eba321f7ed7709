"""The UID listing format of ``medview-server list`` (on a store) and ``medview list``
(through the HTTP API): the same columns and rows, one definition. Images are numbered
from 1 in series order, as the viewer shows them and ``snapshot --slice N`` takes them.
Tab-separated under a header line (UID first: ``cut -f1`` gives the UIDs), or one JSON
object per line.
"""
from __future__ import annotations

import json
from typing import Any

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


def instance_rows(series_uid: str, images: list[dict]) -> list[dict]:
    """Instance rows of one series from its images in series order (``index`` 0-based)."""
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


def study_row(s: dict) -> dict:
    return {"StudyInstanceUID": s["StudyInstanceUID"], "PatientID": s.get("PatientID"),
            "PatientName": s.get("PatientName"), "StudyDate": s.get("StudyDate"),
            "Modalities": ",".join(s.get("ModalitiesInStudy") or []),
            "Series": s.get("NumberOfStudyRelatedSeries"),
            "Instances": s.get("NumberOfStudyRelatedInstances"),
            "StudyDescription": s.get("StudyDescription")}


def series_row(s: dict) -> dict:
    return {"SeriesInstanceUID": s["SeriesInstanceUID"], "Modality": s.get("Modality"),
            "SeriesNumber": s.get("SeriesNumber"), "Images": s.get("NumberOfImages"),
            "SeriesDescription": s.get("SeriesDescription"),
            "StudyInstanceUID": s.get("StudyInstanceUID"), "PatientID": s.get("PatientID")}


def format_rows(rows: list[dict], level: str, as_json: bool = False) -> list[str]:
    """Lines to print: a header and tab-separated rows, or one JSON object per row."""
    cols = COLUMNS[level]
    if as_json:
        return [json.dumps({c: r.get(c) for c in cols}, separators=(",", ":")) for r in rows]

    def cell(v: Any) -> str:
        return "" if v is None else str(v).replace("\t", " ").replace("\n", " ")

    return ["\t".join(cols)] + ["\t".join(cell(r.get(c)) for c in cols) for r in rows]
