"""``medview list --server URL``: the UIDs that ``fetch``, ``snapshot`` and ``render`` need,
asked of an image server through the client :class:`~client.session.Session` (QIDO-RS and
the series image list; the user's rights apply). No Qt.

Same rows and columns as ``medview-server list`` on the store (a test holds them equal):
tab-separated under a header line, UID first, or one JSON object per line. Images are
numbered from 1 in series order, as the viewer shows them and ``snapshot --slice N``
takes them.
"""
from __future__ import annotations

from imaging.listing import (COLUMNS, LEVELS, format_rows, image_numbers,  # noqa: F401
                             instance_rows, series_row, study_row)

from .session import ServerError, Session

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
        return [study_row(s) for s in _studies(session, patient, study)]
    found = _series(session, patient, study, series)
    if level == "series":
        return [series_row(s) for s in found]
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
        out += instance_rows(uid, images)
    return out
