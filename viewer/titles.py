"""Window titles for series (main window, MPR): words, never a bare UID. No Qt."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imaging.overlay import format_date, format_person_name

__all__ = ["series_name", "window_title"]


def series_name(info: Mapping[str, Any]) -> str:
    """The series in words: its description, else "Modality SeriesNumber — date"
    (e.g. "MR 3 — 2024-05-01"), else the modality alone; the UID only as a last resort."""
    desc = str(info.get("SeriesDescription") or "").strip()
    if desc:
        return desc
    modality = str(info.get("Modality") or "").strip()
    number = info.get("SeriesNumber")
    head = " ".join(str(x) for x in (modality, number if number not in (None, "") else "") if str(x))
    date = format_date(str(info.get("SeriesDate") or info.get("StudyDate") or ""))
    text = " — ".join(x for x in (head, date) if x)
    return text or f"series {info.get('SeriesInstanceUID', '?')}"


def window_title(prefix: str, info: Mapping[str, Any]) -> str:
    """"PREFIX — Patient — series" with empty parts left out (no "MPR —  — ...")."""
    patient = format_person_name(str(info.get("PatientName") or "")).strip()
    return " — ".join(x for x in (prefix, patient, series_name(info)) if x)
