"""What a request is about: every UID of its path resolved against its parent.

A route names its object by a chain of path elements — ``study ⊃ series ⊃ sop ⊃ frame``,
``study ⊃ item`` (a note, annotation or report), a ``slide`` (whose exam and patient are
its rights scopes), or the JPIP ``target`` (a series). :func:`resolve` looks every one of
them up in the catalogue, checks that each lies inside the one before it (a series of
that study, an instance of that series, a frame of that instance, an item of that study)
and answers 404 otherwise, so that the one authorisation point
(:meth:`server.auth.Authority.authorize`) decides on the object that will actually
be served — never on the first UID of the path while the handler serves another one.

The :class:`Target` goes into ``request.state.target``; handlers serve exactly that.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

INT64_MAX = (1 << 63) - 1

#: Path (and query) parameters that name an object, in parent-to-child order.
UID_PARAMS = ("study", "series", "sop", "frame", "item", "slide", "target")


class NotFound(Exception):
    """A path element that does not exist, or does not belong to its parent (404)."""

    status = 404

    def __init__(self, message: str, field_name: str):
        super().__init__(message)
        self.field = field_name


class BadParam(Exception):
    """A path element of the wrong form (400, naming it)."""

    status = 400

    def __init__(self, message: str, field_name: str):
        super().__init__(message)
        self.field = field_name


def parse_int(value: str, name: str, *, lo: int = 0, hi: int = INT64_MAX) -> int:
    """A decimal integer parameter within [lo, hi] (64-bit at most), else 400 naming it."""
    s = str(value).strip()
    if not re.fullmatch(r"[+-]?[0-9]{1,20}", s):         # ASCII digits only
        raise BadParam(f"{name} must be an integer from {lo} to {hi}, got {value!r}", name)
    v = int(s)
    if not lo <= v <= hi:
        raise BadParam(f"{name} must be an integer from {lo} to {hi}, got {value!r}", name)
    return v


@dataclass
class Target:
    """The object a request is about, every part resolved and checked against its parent.

    ``images`` are the series image indices (JPIP components) of the object actually
    served when it is part of a series (an instance: its frames; a frame: itself); None
    when the request is about a whole series or study."""

    study: str | None = None
    series: str | None = None
    sop: str | None = None
    frame: int | None = None
    frames: list[int] | None = None          # a frame list (several frames in one request)
    images: list[int] | None = None
    item: int | None = None
    slide: str | None = None
    scopes: list[str] | None = None          # a slide's rights scopes, finest first
    series_row: dict | None = field(default=None, repr=False)
    item_row: dict | None = field(default=None, repr=False)
    image_rows: list[dict] | None = field(default=None, repr=False)

    @property
    def resource(self) -> str | None:
        """The name of the target in the audit log's ``resource`` column."""
        return self.slide or self.series or self.study

    def served(self) -> dict:
        """What the audit row records as the object served."""
        d = {"study": self.study, "series": self.series, "sop": self.sop, "frame": self.frame,
             "frames": self.frames if self.frames and len(self.frames) > 1 else None,
             "item": self.item, "slide": self.slide}
        return {k: v for k, v in d.items() if v is not None}


def resolve(srv, path: dict, query=None) -> Target:
    """Resolve the object of a request from its path parameters (and the JPIP ``target``
    query parameter when the path names no series). Raises :class:`NotFound` (404) when
    an element is unknown or outside its parent, :class:`BadParam` (400) when it is
    malformed. ``srv`` is the app's :class:`~server.app.Server`."""
    cat = srv.catalogue
    t = Target()
    study = path.get("study")
    series = path.get("series")
    if query is not None and "target" in query and "slide" not in path:
        if series is None:
            series = query.get("target") or None
        elif query.get("target") != series:
            raise BadParam("target must be the series of the path (or left out)", "target")
    if study is not None:
        if cat.get_study(study) is None:
            raise NotFound(f"unknown study {study}", "study")
        t.study = study
    facts = getattr(srv, "facts", None)        # kept per series generation (app.Server)
    if series is not None:
        row = facts.series_row(series) if facts is not None else cat.get_series(series)
        if row is None or (study is not None and row.get("StudyInstanceUID") != study):
            if "series" not in path:
                raise NotFound(f"unknown target {series!r}: no such series", "target")
            where = f"no series {series} in study {study}" if study is not None \
                else f"unknown series {series}"
            raise NotFound(where, "series")
        t.series, t.series_row = series, row
        t.study = row.get("StudyInstanceUID")
    sop = path.get("sop")
    if sop is not None:
        if t.series is None:
            raise NotFound("an instance needs its series", "sop")
        rows = (facts.images_of(t.series, sop) if facts is not None else
                [r for r in cat.series_images(t.series) if r["SOPInstanceUID"] == sop])
        if not rows:
            raise NotFound(f"no instance {sop} in series {t.series}", "sop")
        t.sop, t.image_rows = sop, rows
        t.images = [r["index"] for r in rows]
    if "frame" in path:
        # one frame number, or a frame list ("1,3,5": PS3.18 retrieve of several frames)
        parts = str(path["frame"]).split(",")
        if len(parts) > 100_000:
            raise BadParam("too many frame numbers in one request", "frame")
        fnos = [parse_int(f, "frame", lo=1, hi=(1 << 31) - 1) for f in parts]
        by_frame = {r["frame"]: r for r in (t.image_rows or [])}
        missing = [f for f in fnos if f not in by_frame]
        if missing:
            raise NotFound(f"instance {sop} has no frame {missing[0]}", "frame")
        rows = [by_frame[f] for f in fnos]
        t.frame = fnos[0] if len(fnos) == 1 else None
        t.frames, t.image_rows = fnos, rows
        t.images = [r["index"] for r in rows]
    if "item" in path:
        item_id = parse_int(path["item"], "item", lo=1)
        if t.study is None:
            raise NotFound("an item needs its study", "item")
        from .diagnosis import DiagnosisError

        try:
            row = srv.diagnosis.get(item_id)
        except DiagnosisError:
            raise NotFound(f"no item {item_id} in study {t.study}", "item") from None
        if row.get("study") != t.study:
            raise NotFound(f"no item {item_id} in study {t.study}", "item")
        t.item, t.item_row = item_id, row
    if "slide" in path:
        svc = getattr(srv, "slides", None)
        if svc is None:
            raise NotFound("this server has no slides", "slide")
        from .packets import RequestError

        try:
            scopes = svc.scopes(path["slide"])
        except RequestError as e:
            raise NotFound(str(e), "slide") from None
        t.slide, t.scopes = scopes[0], scopes
        if query is not None and query.get("target") not in (None, path["slide"], scopes[0]):
            raise BadParam("target must be the slide of the path (or left out)", "target")
    return t


# --------------------------------------------------------------------------- listings
def may_hide(srv, user: str, action: str) -> bool:
    """Whether any rule of the user (or their groups) can take ``action`` away."""
    subjects = [user] + [f"@{g}" for g in srv.auth.groups_of(user)]
    return any(r.actions is not None and action not in r.actions
               for r in srv.auth.rules(subjects))


def visible_rows(srv, user: str, rows: list[dict], action: str = "browse") -> list[dict]:
    """The rows of a listing (studies, series: keyword dicts with the UIDs and PatientID)
    that the user's rules let them ``action``: the grant of each row on its series, its
    study, its patient — the same decision as for a request on it."""
    from .rights import patient_scope

    grants = srv.auth.grants_for(user, [
        [r.get("SeriesInstanceUID"), r.get("StudyInstanceUID"), patient_scope(r.get("PatientID"))]
        for r in rows])
    return [r for r, g in zip(rows, grants) if g.actions is None or action in g.actions]


def visible_instances(srv, grant, series: str, rows: list[dict]) -> list[dict]:
    """Instance rows of one series with only the instances whose images are all within
    the grant's image ranges (as :meth:`Authority.authorize` decides on an instance)."""
    if grant.images is None:
        return rows
    images: dict[str, set[int]] = {}
    for r in srv.catalogue.series_images(series):
        images.setdefault(r["SOPInstanceUID"], set()).add(r["index"])
    return [r for r in rows if images.get(r["SOPInstanceUID"], {-1}) <= grant.images]
