"""Prior studies on the client (seed 001): the patient's earlier studies, most relevant
first, the series to compare with, slice correspondence between two series, and the
background fetch of priors at the comparison version. No Qt; calls block (network).

Relevance is the server's (:func:`server.priors.rank_key`, repeated here because
client and server never import each other): the same modality and body part first, then
the same modality, then the rest; newest first within each.

:class:`PriorFetcher` runs after the current series' preview and before its background
fill (the viewer holds the fill meanwhile): each prior's comparable series at the version
the site policy gives for ``purpose=comparison`` (``resources/policy.toml``: V2, about
1:20; the nearest version the prior's diagnosis status allows when that one may not be
sent), at the display's resolution, while the estimate fits the memory budget left. Per
prior it says its state: ``archived`` (layers needed are in the archive: they will be
recalled), ``recalling`` (the server is bringing them back), ``fetching``, ``ready``,
``skipped`` (the budget is spent) or ``failed``; from the transfer's announce on, the
detail names the version sent (``version``, ``version_label``, ``ratio``).
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Iterable, Sequence

from .pool import CancelToken
from .series import Callbacks, Cancelled, SeriesData

log = logging.getLogger("medview.priors")

__all__ = ["rank_key", "find_priors", "comparable_series", "next_series", "SliceSync",
           "PriorFetcher", "PRIOR_STATES", "version_detail"]

PRIOR_STATES = ("waiting", "archived", "recalling", "fetching", "ready", "skipped", "failed")


def _digits(text) -> str:
    return re.sub(r"\D", "", str(text or ""))


def rank_key(modality: str | None, body_part: str | None, study_modalities: Iterable[str],
             study_body_parts: Iterable[str], study_date: str | None) -> tuple:
    mods = {str(m).upper() for m in study_modalities if m}
    parts = {str(b).upper() for b in study_body_parts if b}
    same_mod = bool(modality) and modality.upper() in mods
    same_part = bool(body_part) and body_part.upper() in parts
    date = _digits(study_date)
    return (0 if same_mod and same_part else 1 if same_mod else 2, -int(date) if date else 0)


def comparable_series(current: dict, candidates: Sequence[dict]) -> dict | None:
    """The series of a prior to show next to ``current`` (a series row): the same
    modality, then the same body part, the same description, the most images."""
    if not candidates:
        return None
    mod = (current.get("Modality") or "").upper()
    part = (current.get("BodyPartExamined") or "").upper()
    desc = (current.get("SeriesDescription") or "").strip().lower()

    def key(s: dict) -> tuple:
        return ((s.get("Modality") or "").upper() != mod,
                (s.get("BodyPartExamined") or "").upper() != part,
                (s.get("SeriesDescription") or "").strip().lower() != desc,
                -int(s.get("NumberOfImages") or s.get("NumberOfSeriesRelatedInstances") or 0))
    return min(candidates, key=key)


def find_priors(session, current: dict) -> list[dict]:
    """The patient's other studies up to the current one's date, most relevant first.

    ``current`` is the current series' description (``SeriesData.info``: PatientID,
    StudyInstanceUID, StudyDate, Modality, BodyPartExamined...). Each prior is the study
    row plus ``series`` (its series), ``compare`` (the series to show) and
    ``same_modality``. Only what the user may browse is listed (the server's QIDO)."""
    pid = current.get("PatientID")
    if not pid:
        return []
    this = current.get("StudyInstanceUID")
    date = _digits(current.get("StudyDate"))
    out = []
    for st in session.studies(PatientID=pid):
        uid = st.get("StudyInstanceUID")
        if st.get("PatientID") != pid or uid == this:
            continue                  # an exact patient (the query takes wildcards)
        d = _digits(st.get("StudyDate"))
        if date and d and d > date:
            continue                  # a later study is not a prior
        series = session.series(uid)
        mods = st.get("ModalitiesInStudy") or [s.get("Modality") for s in series]
        if isinstance(mods, str):
            mods = [m for m in re.split(r"[\\,]", mods) if m]
        parts = [s.get("BodyPartExamined") for s in series]
        key = rank_key(current.get("Modality"), current.get("BodyPartExamined"), mods, parts, d)
        out.append((key, dict(st, series=series, compare=comparable_series(current, series),
                              same_modality=key[0] < 2)))
    out.sort(key=lambda kv: kv[0])
    return [p for _k, p in out]


def next_series(session, current: dict) -> str | None:
    """The series hung after the current one (the study's series in Series Number order,
    the order the viewer's browser shows them): the reader's likely next series."""
    study = current.get("StudyInstanceUID")
    if not study:
        return None
    rows = session.series(study)

    def key(r: dict) -> tuple:
        n = r.get("SeriesNumber")
        return (n is None or n == "", int(n) if str(n or "").lstrip("-").isdigit() else 0,
                r.get("SeriesInstanceUID") or "")
    rows = sorted(rows, key=key)
    uids = [r.get("SeriesInstanceUID") for r in rows]
    this = current.get("SeriesInstanceUID")
    if this not in uids:
        return None
    i = uids.index(this)
    return uids[i + 1] if i + 1 < len(uids) else None


class SliceSync:
    """Which slice of ``dst`` goes with a slice of ``src`` (image dicts or
    :class:`imaging.model.ImageMeta`-like objects with a slice position).

    When both series share their frame of reference and have positions, by patient
    position (the nearest slice along the normal); otherwise by relative position along
    the stack (first to first, last to last). ``by_position`` says which; ``words`` says
    it for the screen."""

    def __init__(self, src_positions: Sequence[float | None], dst_positions: Sequence[float | None],
                 src_for: str | None, dst_for: str | None) -> None:
        self.src = list(src_positions)
        self.dst = list(dst_positions)
        self.by_position = (bool(src_for) and src_for == dst_for and bool(self.src)
                            and bool(self.dst) and None not in self.src and None not in self.dst)

    @property
    def words(self) -> str:
        if self.by_position:
            return "Scrolling together by patient position (same frame of reference)."
        return ("Scrolling together by relative position along the stack: the frames of "
                "reference differ, so the slices match only approximately.")

    def map(self, index: int) -> int:
        n, m = len(self.src), len(self.dst)
        if m == 0:
            return 0
        if n <= 1:
            return 0 if n == 0 else min(index, m - 1)
        index = min(max(int(index), 0), n - 1)
        if self.by_position:
            z = self.src[index]
            return min(range(m), key=lambda j: (abs(self.dst[j] - z), j))
        return int(round(index * (m - 1) / (n - 1)))


def version_detail(v: dict | None) -> dict:
    """What a prior's state says of the version its transfer announced: ``version``
    (name), ``version_label`` and ``ratio`` (reached, 1 for lossless); {} if none."""
    if not v or not v.get("name"):
        return {}
    ratio = 1.0 if v.get("lossless") else v.get("actual_ratio") or v.get("target_ratio")
    return {"version": str(v["name"]), "version_label": str(v.get("label") or ""),
            "ratio": float(ratio) if ratio else None}


class PriorFetcher:
    """Fetch priors' comparable series at the comparison version within a byte budget.

    ``get_series(uid)`` gives a :class:`SeriesData` (e.g. the viewer's registry);
    ``on_state(study_uid, state, detail)`` hears every state change (any thread)."""

    def __init__(self, get_series: Callable[[str], SeriesData], budget_bytes: int, *,
                 reduce: int | None = None, purpose: str = "comparison",
                 on_state: Callable[[str, str, dict], None] = lambda *_: None) -> None:
        self.get_series = get_series
        self.budget = int(budget_bytes)
        self.reduce = reduce
        self.purpose = purpose
        self.on_state = on_state
        self.spent = 0
        self.states: dict[str, str] = {}

    def _state(self, study: str, state: str, **detail) -> None:
        self.states[study] = state
        self.on_state(study, state, detail)

    def estimate(self, sd: SeriesData) -> tuple[int, int | None]:
        """(bytes, layers) the comparison version of the series needs at the reduce."""
        v = next((v for v in sd.versions or [] if v.get("purpose") == self.purpose), None)
        layers = None if v is None or v.get("lossless") else v.get("layers")
        full = int(v["bytes"]) if v and v.get("bytes") else sum(im["total_bytes"] for im in sd.images)
        return full >> (2 * (self.reduce or 0)), layers

    def archived(self, sd: SeriesData, layers: int | None) -> bool:
        """True when some layer this fetch needs is in the archive (``hot_layers``)."""
        for im in sd.images:
            hot = im.get("hot_layers")
            if hot is not None and hot < (layers or im.get("nlayers", 0)):
                return True
        return False

    def preview(self, series: str, token: CancelToken | None = None) -> bool:
        """Fetch a series' preview (lowest resolution, first layer) if the budget allows:
        the next series of the hanging order. True if fetched."""
        sd = self.get_series(series)
        if not sd.images:
            return False
        need = sum(im["total_bytes"] for im in sd.images) >> (2 * (sd.images[0]["numres"] - 1))
        if self.spent + need > self.budget:
            return False
        self.spent += need
        lowest = max(im["numres"] for im in sd.images) - 1
        sd.transfer(layers=1, reduce=lowest).run(token)
        return True

    def run(self, priors: Sequence[dict], token: CancelToken | None = None) -> dict[str, str]:
        """Fetch in order (most relevant first); returns the state per prior study."""
        token = token or CancelToken()
        for p in priors:
            self._state(p["StudyInstanceUID"], "waiting")
        for p in priors:
            study = p["StudyInstanceUID"]
            series = (p.get("compare") or {}).get("SeriesInstanceUID")
            if token.cancelled:
                break
            if not series:
                self._state(study, "skipped", reason="no series to compare")
                continue
            try:
                sd = self.get_series(series)
                need, layers = self.estimate(sd)
                if self.spent + need > self.budget:
                    self._state(study, "skipped", reason="memory budget", bytes=need)
                    continue
                self.spent += need
                if self.archived(sd, layers):
                    self._state(study, "archived", series=series)
                if sd.versions and any(v.get("purpose") == self.purpose for v in sd.versions):
                    sd.select(purpose=self.purpose)
                self._state(study, "fetching", series=series, bytes=need)
                sent: dict = {}

                def announced(msg: dict, s=study, series=series, need=need, sent=sent) -> None:
                    sent.update(version_detail(msg.get("version")))
                    if sent:
                        self._state(s, self.states.get(s, "fetching"), series=series,
                                    bytes=need, **sent)

                def recalling(msg: dict, s=study, sent=sent) -> None:
                    self._state(s, "recalling" if msg.get("type") != "recalled" else "fetching",
                                **{**msg, **sent})
                cb = Callbacks(on_announce=announced, on_recalling=recalling)
                tr = sd.transfer(reduce=self.reduce, callbacks=cb)
                end = tr.run(token)
                self._state(study, "ready", series=series, bytes=end.get("bytes_sent", 0), **sent)
            except Cancelled:
                self._state(study, "waiting")
                break
            except Exception as e:  # noqa: BLE001 - said per prior; the others go on
                log.warning("prior %s: %s", study, e)
                self._state(study, "failed", error=str(e))
        return dict(self.states)
