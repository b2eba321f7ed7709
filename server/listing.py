"""``medview-server list``: the UIDs that ``medview fetch``, ``snapshot`` and ``render`` need,
read from a store's catalogue.

One row per study, series or instance, tab-separated under a header line (UID first:
``cut -f1`` gives the UIDs), or one JSON object per line. Images are numbered from 1 in
series order, as the viewer shows them and ``medview snapshot --slice N`` takes them.
The client's ``medview list --server URL`` prints the same columns through the HTTP API.
"""
from __future__ import annotations

from imaging.listing import (COLUMNS, LEVELS, format_rows, image_numbers,  # noqa: F401
                             instance_rows, series_row, study_row)

def list_store(catalogue, level: str, *, patient: str | None = None, study: str | None = None,
               series: str | None = None) -> list[dict]:
    """Rows of ``level`` ("studies", "series", "instances") matching the filters
    (``patient``: a Patient ID, ``*``/``?`` wildcards as in QIDO-RS)."""
    if level not in LEVELS:
        raise ValueError(f"list what? one of {', '.join(LEVELS)}, not {level!r}")
    if level == "studies":
        return [study_row(s) for s in catalogue.query_studies(
            PatientID=patient, StudyInstanceUID=study)]
    if patient is None:
        found = catalogue.query_series(StudyInstanceUID=study, SeriesInstanceUID=series)
    else:                   # the patient's studies, newest first, as ``medview list`` does
        found = []
        for st in catalogue.query_studies(PatientID=patient, StudyInstanceUID=study):
            found += catalogue.query_series(StudyInstanceUID=st["StudyInstanceUID"],
                                            SeriesInstanceUID=series)
    if level == "series":
        return [series_row(s) for s in found]
    out = []
    for s in found:
        out += instance_rows(s["SeriesInstanceUID"],
                             catalogue.series_images(s["SeriesInstanceUID"]))
    return out
