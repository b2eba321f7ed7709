"""Progressive loading of a series: the plan as data and a scheduler that follows the user.

No Qt here. The viewer's Qt bridge (:mod:`viewer.workers`) turns the plain-Python
listener calls of this module (made on worker threads) into signals on the UI thread.

The plan (SPEC P9, P12, V4, H2, H5)
-----------------------------------
:func:`plan_stages` turns the state of a series (what every image holds, the slice the
user looks at, the resolution the viewport needs) into an ordered list of
:class:`Stage` s, each one packet request:

1. ``preview``    every image at the lowest resolution and the first quality layer, so
                  the whole series can be scrolled almost at once: nearest to the slice
                  the reader is on first, in requests of what the measured link brings in
                  ``PREVIEW_CHUNK_S`` (on a LAN the whole series in one request), each
                  planned when the previous one ends (a jump: the next one starts around
                  the new slice); a preview request is never cancelled;
2. ``region``     a rectangle the user asked for at full resolution and quality;
3. ``focus``      the shown image, at the resolution the viewport needs (never more,
                  V4) and every layer;
4. ``near``       its neighbours, the same way;
5. ``background`` the rest of the series, nearest to the shown image first, in chunks
                  (so that following the user never has to cancel a big transfer).

Adaptation (H5, V8): when the viewer asked for no particular version, the shown slice,
the prediction and the background fill stop at the layers of the version the server's
automatic choice names for this client's measured link (``PlanState.fill_layers``, from
``SeriesData.auto``); they go on to every layer when the link is faster (a new automatic
choice: the series' ``auto`` event re-plans) or when the reader rests (``IDLE_S`` without
scrolling; ``PlanState.idle``, a timer re-plans). While the reader is active, the
background fill (beyond the neighbourhood and the prediction) brings only what is likely
to be worth its bytes (:func:`background_fill`, from the measured link): the whole series
at the best version the link brings it at within ``FILL_WHOLE_S`` (a LAN: every layer, as
without adaptation), else the smallest version within the slices the link brings in
``FILL_HORIZON_S`` around the reader; and it starts only once the reader pauses
(``PAUSE_S`` without scrolling). On a link too slow for the whole series' preview within
``FILL_WHOLE_S``, the preview of the active reader reaches only as far as that window,
after the shown slice and its neighbours; the rest when the reader rests
(:func:`preview_window_for`). Prediction: while the reader scrolls, ``near`` becomes
the slices ahead of the slice on screen in small requests, as deep as
``neighbours + speed x lookahead_s`` (bounded by the decoded-image budget), then the one
behind; a prediction is cancelled when the reader turns the other way, and kept when the
reader reaches a slice it is bringing. A move of more than ``JUMP_STEPS`` slices is a jump,
not scrolling: no direction, no speed (:func:`follow_scroll`). ``bench/adaptive.py``
replays scroll traces through these functions (simulated links), or through the loader
against the real server over throttled links (``--real``).

:class:`SeriesLoader` runs that plan through the :class:`~client.pool.WorkerPool`, one
network transfer at a time per series (the server's session model stays exact), and
re-plans after every transfer and whenever the user moves: the latest request wins, a
running transfer that a more urgent stage supersedes is cancelled (its data is kept).
Decoding also runs in the pool: the shown image whenever it has more than is shown, then
the next images in the direction the user scrolls; a decoded result never replaces a
better one (:class:`DecodedStore`). :meth:`SeriesLoader.set_focus` with ``fetch=False``
moves only the display (a window scrolling fast moves the plan once the user settles).
Switching series means closing the loader: its transfers are cancelled and nothing it
produces afterwards reaches the listener.

Levels
------
An image's *level* is ``(layers, res)`` as :meth:`client.series.SeriesData.levels`
reports it: quality layers held for every precinct of resolutions ``0..res``. Cine
"consistent" playback (P9) uses ``(res, layers)`` tuples, the common level of the series.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from client.cache import PacketCache
from client.pool import INTERACTION, PREFETCH, VISIBLE, CancelToken, WorkerPool
from imaging.memory import MemoryBudget
from client.series import (Callbacks, Cancelled, ImageProgress, SeriesData, TransferError,
                           TransferProgress)
from client.session import ServerError, Session

from imaging.model import DecodedImage

log = logging.getLogger("medview.loader")

__all__ = [
    "PREVIEW", "REGION", "FOCUS", "NEAR", "BACKGROUND", "Stage", "PlanState", "plan_stages",
    "supersedes", "fill_window_for", "background_fill", "FILL_HORIZON_S", "FILL_WHOLE_S",
    "preview_stages", "preview_chunk_for", "preview_window_for", "PREVIEW_CHUNK_S",
    "follow_scroll", "JUMP_STEPS", "reduce_for_fit", "held_levels", "ImageStatus", "SeriesStatus",
    "DecodedStore", "SeriesRegistry", "LoaderListener", "SeriesLoader", "fetch_thumbnail",
]

PREVIEW, REGION, FOCUS, NEAR, BACKGROUND = "preview", "region", "focus", "near", "background"
_RANK = {PREVIEW: 0, REGION: 1, FOCUS: 2, NEAR: 3, BACKGROUND: 4}
_PRIORITY = {PREVIEW: INTERACTION, REGION: INTERACTION, FOCUS: INTERACTION, NEAR: VISIBLE,
             BACKGROUND: PREFETCH}
PAUSE_S = 1.0
"""Seconds without scrolling after which the background fill (within its window, at the
smallest version) starts, when adapting."""
IDLE_S = 4.0
"""Seconds without scrolling after which the reader rests: the fill goes on beyond the
link's version (H5)."""
MAX_FAILURES = 3
"""Consecutive failed transfers after which a loader stops (and says why)."""


# --------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Stage:
    """One packet request of the plan."""

    kind: str                                   # PREVIEW, REGION, FOCUS, NEAR, BACKGROUND
    comps: tuple[int, ...] | None               # images; None = all
    layers: int | None                          # quality layers; None = all
    reduce: int | None                          # resolution reduction; None = full
    region: tuple[int, int, int, int] | None = None
    order: str = "quality"
    direction: int = 0                          # a prediction ahead (+1/-1) of the reader

    @property
    def priority(self) -> int:
        return _PRIORITY[self.kind]

    def transfer_kwargs(self) -> dict:
        """Keyword arguments for :meth:`SeriesData.transfer`."""
        return {"comps": list(self.comps) if self.comps is not None else None,
                "layers": self.layers, "reduce": self.reduce, "region": self.region,
                "order": self.order}

    def includes(self, index: int) -> bool:
        return self.comps is None or index in self.comps


@dataclass
class PlanState:
    """What :func:`plan_stages` needs to know about a series."""

    numres: list[int]                           # per image
    nlayers: list[int]                          # per image
    levels: list[tuple[int, int]]               # per image: (layers, res) held
    focus: int = 0
    reduce: int = 0                             # resolution reduction the viewport needs
    preview_done: bool = False
    previewed: set[int] = field(default_factory=set)
    """Images a completed preview request covered (they hold what the rights allow)."""
    preview_chunk: int | None = None
    """Images per preview request (:func:`preview_chunk_for`: what the link brings in
    ``PREVIEW_CHUNK_S``); None: the whole preview in one request."""
    preview_window: int | None = None
    """While the reader is active on a link too slow for the whole series' preview within
    ``FILL_WHOLE_S`` (:func:`preview_window_for`), the preview reaches only this many
    slices around the reader, after the shown slice and its neighbours; the rest of it
    when the reader rests. None: the whole preview first."""
    settled: dict[int, int] = field(default_factory=dict)
    """image -> smallest reduce at which a complete transfer left nothing more to fetch."""
    region: tuple[int, tuple[int, int, int, int]] | None = None   # (image, x, y, w, h)
    allow_preview: bool = True
    allow_focus: bool = True
    prefetch: bool = True                       # background stages wanted
    neighbours: int = 2
    chunk: int = 8
    # adaptation (H5, V8): on a slow link the fill stops at the link's version
    fill_layers: int | None = None
    """Layers of the version the policy names for the measured link (None: every layer):
    the shown slice, the prediction and the background fill stop there..."""
    idle: bool = False
    """...unless the reader rests (then everything goes on to every layer)."""
    spec_layers: int | None = None
    """Layers of the background fill beyond the reader's neighbourhood and prediction while
    the reader is active: the smallest version (None: as ``fill_layers``). What the reader
    looks at still gets the link's version; a jump brings the rest of one slice."""
    scrolling: bool = False
    """The reader moved less than ``PAUSE_S`` ago (adaptation only): no background fill
    beyond the neighbourhood and prediction until the reader pauses."""
    fill_window: int | None = None
    """While the reader is active, the background fill covers only the slices within this
    many of the reader (:func:`fill_window_for`: what the link brings in
    ``FILL_HORIZON_S``); None: the whole series."""
    # prediction (H5)
    predict: bool = False
    shown: int | None = None                    # the slice on screen (None: the focus)
    direction: int = 0                          # the way the reader scrolls (-1, 0, +1)
    speed: float = 0.0                          # slices per second
    lookahead_s: float = 0.6                    # the prediction covers this much scrolling
    max_ahead: int = 32                         # the memory budget, in images
    near_chunk: int = 2                         # predicted slices per request

    @property
    def count(self) -> int:
        return len(self.levels)

    @property
    def cap(self) -> int | None:
        """Layers the plan asks for now (None: every layer)."""
        return None if self.idle else self.fill_layers

    @property
    def fill_cap(self) -> int | None:
        """Layers the background fill asks for now (None: every layer)."""
        if self.idle:
            return None
        caps = [c for c in (self.fill_layers, self.spec_layers) if c is not None]
        return min(caps) if caps else None

    @property
    def holds_back(self) -> bool:
        """True when the plan keeps something for when the reader rests."""
        return not self.idle and (self.fill_cap is not None or self.fill_window is not None
                                  or self.scrolling or (self.preview_window is not None
                                                        and not self.preview_done))

    def target_res(self, i: int) -> int:
        return max(0, self.numres[i] - 1 - self.reduce)

    def at_target(self, i: int, layers_cap: int | None = None) -> bool:
        """True when image ``i`` holds everything the viewport can use (up to
        ``layers_cap`` layers, when given)."""
        if self.settled.get(i, 1 << 30) <= self.reduce:
            return True
        layers, res = self.levels[i]
        want = self.nlayers[i] if layers_cap is None else min(layers_cap, self.nlayers[i])
        return res >= self.target_res(i) and layers >= want

    def depth(self) -> int:
        """How many slices ahead the prediction reaches: grows with the scroll speed,
        bounded by the memory budget."""
        ahead = self.neighbours + math.ceil(max(self.speed, 0.0) * self.lookahead_s)
        return max(1, min(ahead, self.max_ahead))


def plan_stages(s: PlanState) -> list[Stage]:
    """The remaining stages for a series, most urgent first (see the module docstring)."""
    stages: list[Stage] = []
    n = s.count
    if n == 0:
        return stages
    windowed = s.preview_window is not None and not s.idle
    if not windowed:
        stages.extend(preview_stages(s))     # the whole series at low resolution first
    if s.region is not None:
        index, rect = s.region
        stages.append(Stage(REGION, (index,), None, 0, tuple(rect)))
    if not s.allow_focus:
        return stages + (preview_stages(s) if windowed else [])
    cap = s.cap
    focus = min(max(s.focus, 0), n - 1)
    if not s.at_target(focus, cap):
        stages.append(Stage(FOCUS, (focus,), cap, s.reduce))
    planned = {focus}
    shown = focus if s.shown is None or not s.predict else min(max(s.shown, 0), n - 1)
    if shown != focus and not s.at_target(shown, cap):
        stages.append(Stage(FOCUS, (shown,), cap, s.reduce))     # the plan follows the reader
    planned.add(shown)
    if s.predict and s.direction:
        # the slices ahead of the reader, nearest first, in small requests (cheap to
        # cancel when the reader turns away), then the one behind
        ahead = [shown + d * s.direction for d in range(1, s.depth() + 1)]
        ahead = [i for i in ahead if 0 <= i < n and i not in planned]
        planned.update(ahead)
        ahead = [i for i in ahead if not s.at_target(i, cap)]
        step = max(1, s.near_chunk)
        for k in range(0, len(ahead), step):
            stages.append(Stage(NEAR, tuple(sorted(ahead[k:k + step])), cap, s.reduce,
                                direction=s.direction))
        behind = shown - s.direction
        if 0 <= behind < n and behind not in planned:
            planned.add(behind)
            if not s.at_target(behind, cap):
                stages.append(Stage(NEAR, (behind,), cap, s.reduce))
    else:
        near = tuple(i for d in range(1, s.neighbours + 1) for i in (shown - d, shown + d)
                     if 0 <= i < n and i not in planned and not s.at_target(i, cap))
        planned.update(i for d in range(1, s.neighbours + 1) for i in (shown - d, shown + d))
        if near:
            stages.append(Stage(NEAR, tuple(sorted(near)), cap, s.reduce))
    if windowed:                     # a slow link, the reader active: the window's preview
        stages.extend(preview_stages(s, skip=planned))
    if s.prefetch and not (s.scrolling and not s.idle):
        bg = s.fill_cap
        reach = n if s.idle or s.fill_window is None else max(s.fill_window, 0)
        rest = sorted((i for i in range(n) if i not in planned and abs(i - focus) <= reach
                       and not s.at_target(i, bg)),
                      key=lambda i: (abs(i - focus), i))
        for k in range(0, len(rest), max(1, s.chunk)):
            stages.append(Stage(BACKGROUND, tuple(sorted(rest[k:k + s.chunk])), bg, s.reduce))
    return stages


JUMP_STEPS = 8
"""A move of more slices than this at once is a jump (a click in the strip, a typed image
number), not scrolling: it predicts no direction and adds nothing to the speed."""


def follow_scroll(speed: float, dt: float, steps: int) -> tuple[float, bool]:
    """The scroll speed (slices per second) after a move of ``steps`` slices ``dt``
    seconds after the last one, and whether the move was a jump (then the speed is 0)."""
    if steps > JUMP_STEPS:
        return 0.0, True
    rate = steps / max(dt, 1e-3)
    return (rate if dt > 1.0 else 0.5 * speed + 0.5 * rate), False


FILL_HORIZON_S = 0.5
"""While the reader is active, the background fill reaches as far around the reader as the
measured link brings (at the smallest version) in this many seconds..."""
FILL_WHOLE_S = 2.0
"""...unless the link brings the whole series at some version within this many seconds:
then the whole series at the best such version (a LAN: everything, as before)."""


def background_fill(link_bps: float | None, versions: list[tuple[int | None, float]],
                    count: int, neighbours: int = 2, link_layers: int | None = None,
                    whole_s: float = FILL_WHOLE_S,
                    horizon_s: float = FILL_HORIZON_S) -> tuple[int | None, int | None]:
    """``(layers, window)`` of the background fill while the reader is active.

    ``versions``: ``(layers or None for lossless, bytes of the whole series at it)``, best
    first; ``link_layers`` the version the policy names for the link (None: lossless).
    The best version no better than the link's whose whole series the link brings in
    ``whole_s``: ``(its layers, None)``; else the smallest version within
    :func:`fill_window_for`; ``(None, None)`` (no limit) when the link is not measured."""
    if not link_bps or link_bps <= 0 or not versions or count <= 0:
        return None, None
    cap = link_layers if link_layers is not None else 1 << 30
    fit = [(q, b) for q, b in versions if (q if q is not None else 1 << 30) <= cap] or versions[-1:]
    for q, b in fit:
        if b * 8 / link_bps <= whole_s:
            return q, None
    q, b = fit[-1]
    return q, fill_window_for(link_bps, b / count, count, neighbours, horizon_s)


def fill_window_for(link_bps: float | None, slice_bytes: float, count: int,
                    neighbours: int = 2, horizon_s: float = FILL_HORIZON_S) -> int | None:
    """Slices on each side of the reader the background fill covers while the reader is
    active: half of what the link brings in ``horizon_s`` at ``slice_bytes`` a slice;
    None (the whole series) when it brings all ``count`` slices or the link is unknown."""
    if not link_bps or link_bps <= 0 or slice_bytes <= 0:
        return None
    slices = int(link_bps / 8 * horizon_s / slice_bytes)
    return None if slices >= count else max(slices // 2, neighbours)


def preview_stages(s: PlanState, skip: set[int] = frozenset()) -> list[Stage]:
    """The preview requests (every image at the lowest resolution and the first layer)
    still to make, nearest to the slice the reader is on first, ``s.preview_chunk``
    images each (a request brings its images in index order); within
    ``s.preview_window`` of the reader only, unless the reader rests. Re-planned at every
    request's end, so the next request starts around where the reader is then. Not the
    images in ``skip`` (stages before it bring their preview)."""
    n = s.count
    if not s.allow_preview or s.preview_done or n == 0:
        return []
    centre = min(max(s.focus if s.shown is None else s.shown, 0), n - 1)
    reach = n if s.idle or s.preview_window is None else max(s.preview_window, 0)
    empty = sorted((i for i in range(n) if s.levels[i][1] < 0 and i not in s.previewed
                    and i not in skip and abs(i - centre) <= reach),
                   key=lambda i: (abs(i - centre), i))
    if not empty:
        return []
    lowest = max(nr - 1 for nr in s.numres)
    size = len(empty) if s.preview_chunk is None else max(1, s.preview_chunk)
    return [Stage(PREVIEW, None if len(part) == n else tuple(sorted(part)), 1, lowest)
            for part in (empty[k:k + size] for k in range(0, len(empty), size))]


PREVIEW_CHUNK_S = 0.5
"""A preview request brings what the measured link brings in about this many seconds (a
reader who jumps waits at most that long for the preview to start around the new slice)..."""
PREVIEW_FIRST = 32
"""...and this many images while the link is not measured yet (twice as many for every
preview request done since)."""
PREVIEW_IMAGE_BYTES = 4096
"""Bytes of one image's preview until a preview request measured it."""


def preview_chunk_for(link_bps: float | None, image_bytes: float, done: int = 0) -> int:
    """Images per preview request: what the link brings in ``PREVIEW_CHUNK_S`` at
    ``image_bytes`` an image (on a LAN: the whole series in one request); while the link
    is not measured, ``PREVIEW_FIRST`` doubled for each of the ``done`` requests made."""
    if not link_bps or link_bps <= 0 or image_bytes <= 0:
        return PREVIEW_FIRST << min(max(done, 0), 16)
    return max(1, int(link_bps / 8 * PREVIEW_CHUNK_S / image_bytes))


def preview_window_for(link_bps: float | None, image_bytes: float, count: int,
                       fill_window: int | None, neighbours: int = 2,
                       whole_s: float = FILL_WHOLE_S) -> int | None:
    """Slices around the reader the preview covers while the reader is active: None (the
    whole series, first) when the link brings the whole series' preview within
    ``whole_s`` or is not measured; else as far as the background fill reaches
    (``fill_window``, at least the neighbours)."""
    if not link_bps or link_bps <= 0 or image_bytes <= 0 or count <= 0:
        return None
    if count * image_bytes * 8 / link_bps <= whole_s:
        return None
    if fill_window is None:
        fill_window = fill_window_for(link_bps, image_bytes, count, neighbours)
    return None if fill_window is None else max(fill_window, neighbours)


def supersedes(first: Stage | None, running: Stage) -> bool:
    """True when ``first`` (the new head of the plan) should cancel ``running``.

    The preview and an explicit region request always finish; otherwise a more urgent
    kind wins, a focus on another image wins, a need for more resolution wins, and a
    stage of the same kind capped at fewer layers wins (the adaptive cap came down).
    """
    if first is None or running.kind in (PREVIEW, REGION):
        return False
    if running.direction and first.direction == -running.direction:
        return True                  # the reader turned away from the prediction
    if (running.direction and first.kind == FOCUS and first.comps
            and running.includes(first.comps[0]) and running.reduce == first.reduce
            and (running.layers is None or (first.layers is not None
                                            and running.layers >= first.layers))):
        return False                 # the prediction is bringing the shown slice already
    if _RANK[first.kind] < _RANK[running.kind]:
        return True
    if first.kind == running.kind == FOCUS and first.comps != running.comps:
        return True
    if (first.kind == running.kind and first.layers is not None
            and (running.layers is None or running.layers > first.layers)):
        return True                  # the link's version dropped (measured, or the reader
                                     # is active again): stop bringing layers it does not want
    if (first.kind == running.kind and first.reduce is not None
            and running.reduce is not None and first.reduce < running.reduce):
        return True
    return False


def reduce_for_fit(columns: int, rows: int, view_w: int, view_h: int, numres: int) -> int:
    """Resolution reduction an image needs when fitted into a ``view_w x view_h`` viewport
    (device pixels): the coarsest level that still gives every device pixel its own
    sample (as :meth:`imaging.viewstate.ViewState.useful_reduce` in fit mode)."""
    if columns <= 0 or rows <= 0 or view_w <= 0 or view_h <= 0:
        return 0
    zoom = min(view_w / columns, view_h / rows)
    if zoom >= 1.0:
        return 0
    return int(min(max(math.floor(math.log2(1.0 / zoom) + 1e-9), 0), max(numres - 1, 0)))


def held_levels(sd: SeriesData, index: int, max_res: int | None = None) -> tuple[int, int]:
    """(layers, res) image ``index`` holds when looking no higher than ``max_res``: a
    partly received finer resolution does not lower the layer count of the coarser ones
    the viewport actually uses."""
    return sd.levels(index, max_res)


# --------------------------------------------------------------------------- status

@dataclass(frozen=True)
class ImageStatus:
    """Progress of one image, for the per-image bars and the series strip (P12)."""

    index: int
    layers: int                 # quality layers reached (up to ``res``)
    res: int                    # resolution index reached (-1: nothing)
    max_layers: int
    numres: int
    target_res: int             # resolution index the viewport needs
    requested_layers: int       # layers asked for by the latest request naming the image
    held_bytes: int             # bytes this client holds for the image
    requested_bytes: int        # held + still to come in the running transfer
    total_bytes: int            # the whole codestream

    @property
    def level(self) -> int:
        """(layer, resolution) pairs completed up to the target resolution."""
        if self.res < 0:
            return 0
        return self.layers * (min(self.res, self.target_res) + 1)

    @property
    def max_level(self) -> int:
        return self.max_layers * (self.target_res + 1)

    @property
    def done(self) -> bool:
        return self.level >= self.max_level


@dataclass(frozen=True)
class SeriesStatus:
    """Progress of the whole series (series strip label: bytes, speed, time left)."""

    held: int                   # bytes held for the whole series
    requested: int              # held + still to come in the running transfer
    total: int                  # every codestream of the series
    elapsed: float              # seconds spent transferring (idle time not counted)
    stage: str | None           # kind of the running stage, None when idle
    images_done: int
    count: int


# --------------------------------------------------------------------------- decoded images

def _quality(img: DecodedImage, numres: int, target_res: int) -> tuple[int, int, int]:
    res = numres - 1 - img.reduce
    return (min(res, target_res), img.layers, res)


class DecodedStore:
    """Best decoded image per index, under the one memory budget (shared with volumes
    and slide tiles, or a private one of ``budget`` bytes): least recently used evicted
    first, never the ones in ``keep`` (on screen). A result never replaces a better one."""

    def __init__(self, budget: "int | MemoryBudget" = 512 << 20) -> None:
        self.memory = MemoryBudget.of(budget)
        self._hid = self.memory.register(self)
        self._items: dict[int, DecodedImage] = {}
        self._lock = threading.Lock()

    @property
    def budget(self) -> int:
        return self.memory.budget

    def __len__(self) -> int:
        return len(self._items)

    def get(self, index: int) -> DecodedImage | None:
        img = self._items.get(index)
        if img is not None:
            self.memory.touch(self._hid, index)
        return img

    def offer(self, img: DecodedImage, numres: int, target_res: int,
              keep: set[int] = frozenset()) -> bool:
        """Keep ``img`` unless the stored one is at least as good; True if kept."""
        with self._lock:
            cur = self._items.get(img.index)
            if cur is not None and _quality(cur, numres, target_res) >= _quality(img, numres, target_res):
                return False
            self._items[img.index] = img
        self.memory.pin(self._hid, keep)          # on screen: never evicted
        self.memory.charge(self._hid, img.index, img.pixels.nbytes)
        return True

    def drop(self, index: int) -> None:
        """Evicted by the budget."""
        with self._lock:
            self._items.pop(index, None)

    def clear(self) -> None:
        with self._lock:
            keys = list(self._items)
            self._items.clear()
        for k in keys:
            self.memory.release(self._hid, k)

    def close(self) -> None:
        self.clear()
        self.memory.unregister(self._hid)


# --------------------------------------------------------------------------- registry

class SeriesRegistry:
    """One :class:`SeriesData` per series and session, shared by the series loader and
    the thumbnails, with one transfer at a time per series (so the server's model of
    what this client holds stays exact)."""

    def __init__(self, session: Session, cache: PacketCache | None) -> None:
        self.session = session
        self.cache = cache
        self._lock = threading.Lock()
        self._series: dict[str, SeriesData] = {}
        self._create: dict[str, threading.Lock] = {}
        self._transfer: dict[str, threading.Lock] = {}

    def get(self, uid: str) -> SeriesData:
        """The series (fetched from the server on first use: call from a worker)."""
        with self._lock:
            sd = self._series.get(uid)
            if sd is not None:
                return sd
            create = self._create.setdefault(uid, threading.Lock())
        with create:
            with self._lock:
                sd = self._series.get(uid)
            if sd is None:
                sd = SeriesData(self.session, self.cache, uid)
                with self._lock:
                    self._series[uid] = sd
            return sd

    def peek(self, uid: str) -> SeriesData | None:
        with self._lock:
            return self._series.get(uid)

    @contextmanager
    def transferring(self, uid: str, token: CancelToken | None = None) -> Iterator[None]:
        """Hold the series' transfer slot; waits, but gives up (Cancelled) on ``token``."""
        with self._lock:
            lock = self._transfer.setdefault(uid, threading.Lock())
        while not lock.acquire(timeout=0.05):
            if token is not None and token.cancelled:
                raise Cancelled()
        try:
            yield
        finally:
            lock.release()


# --------------------------------------------------------------------------- listener

class LoaderListener:
    """What a :class:`SeriesLoader` reports; called from worker threads. Override what
    you need (the Qt bridge turns each call into a queued signal)."""

    def on_opened(self, loader: "SeriesLoader", info: dict, images: list[dict],
                  statuses: list[ImageStatus]) -> None: ...

    def on_image_status(self, loader: "SeriesLoader", status: ImageStatus) -> None: ...

    def on_series_status(self, loader: "SeriesLoader", status: SeriesStatus) -> None: ...

    def on_stage(self, loader: "SeriesLoader", stage: Stage, state: str, message: str) -> None:
        """``state``: started, complete, cancelled or failed."""

    def on_decoded(self, loader: "SeriesLoader", image: DecodedImage) -> None: ...

    def on_cine_level(self, loader: "SeriesLoader", level: tuple[int, int]) -> None:
        """Every image is now decoded at this common ``(res, layers)`` level."""

    def on_state(self, loader: "SeriesLoader", state: str) -> None:
        """``loading``, ``idle`` (nothing left to fetch), ``paused`` or ``failed``."""

    def on_failed(self, loader: "SeriesLoader", message: str) -> None: ...


class _Running:
    """The loader's one network transfer in flight."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self.started = time.monotonic()      # for the active transfer time
        self.token: CancelToken | None = None
        self.transfer = None
        self.cancelled = False
        self.requested = 0
        self.received = 0
        self.image_req: dict[int, int] = {}
        self.image_rx: dict[int, int] = {}

    def cancel(self) -> None:
        self.cancelled = True
        if self.transfer is not None:
            self.transfer.cancel()           # closes the connection: the server stops too
        elif self.token is not None:
            self.token.cancel()

    @property
    def outstanding(self) -> int:
        return max(self.requested - self.received, 0)


@dataclass
class _Cine:
    consistent: bool = False
    level: tuple[int, int] | None = None        # (res, layers) every frame is decoded at
    frames: dict[int, DecodedImage] = field(default_factory=dict)
    building: tuple[int, int] | None = None     # level being decoded now


# --------------------------------------------------------------------------- the loader

class SeriesLoader:
    """Loads one series progressively and follows the user (see the module docstring).

    Methods are called from the UI thread and return at once; all network, cache and
    decode work runs in ``pool``. Call :meth:`start` once, :meth:`close` when done.
    """

    def __init__(self, registry: SeriesRegistry, uid: str, pool: WorkerPool,
                 listener: LoaderListener | None = None, *, focus: int = 0,
                 viewport: tuple[int, int] = (512, 512), reduce: int | None = None,
                 prefetch: bool = True, neighbours: int = 2, chunk: int = 8,
                 decoded_budget: "int | MemoryBudget" = 512 << 20, adaptive: bool = True,
                 predict: bool = True, idle_s: float = IDLE_S,
                 preview_chunk: int | None = None, clock=time.monotonic) -> None:
        self.registry = registry
        self.uid = uid
        self.pool = pool
        self.listener = listener or LoaderListener()
        self.sd: SeriesData | None = None
        self._lock = threading.RLock()
        self._closed = False
        self._focus = focus
        self._shown = focus               # the image on screen (focus, or scrolled to)
        self._direction = 0               # the way the user last scrolled (-1, 0, +1)
        self._viewport = viewport
        self._reduce = reduce
        self._prefetch = prefetch
        self._neighbours = neighbours
        self._chunk = chunk
        self._paused = False
        self._allow_focus = True
        self._preview_done = False
        self._previewed: set[int] = set()     # images a completed preview request covered
        self._preview_requests = 0            # preview requests completed
        self._preview_image_bytes: float | None = None   # measured by the first of them
        self._preview_chunk = preview_chunk   # images per preview request (None: the link's)
        self._settled: dict[int, int] = {}
        self._region: tuple[int, tuple[int, int, int, int]] | None = None
        self._levels: list[tuple[int, int]] = []
        self._held: list[int] = []
        self._total_bytes = 0
        self._requested_layers: list[int] = []
        self._net: _Running | None = None
        self._failures = 0
        self._state = "new"
        self._decoding: set[tuple[str, int]] = set()
        self._redecode: set[tuple[str, int]] = set()
        self._best = DecodedStore(decoded_budget)
        self._patches: dict[int, list[DecodedImage]] = {}
        self._cine = _Cine()
        self._t0 = time.monotonic()
        self._active_s = 0.0                 # seconds spent in finished network stages
        # adaptation and prediction (H5)
        self._adaptive = adaptive
        self._predict = predict
        self._idle_s = idle_s
        self._clock = clock
        self._budget = self._best.budget    # bytes of the one memory budget
        self._speed = 0.0                 # slices per second
        self._last_move = clock()
        self._moved_at: float | None = None  # the reader's last scroll (None: not yet)
        self._idle_timer: threading.Timer | None = None
        self._timer_at = 0.0

    # ------------------------------------------------------------------ public API
    def start(self) -> None:
        """Fetch the series description, then run the plan."""
        self._set_state("loading")
        self.pool.submit(self._guard(self._open_job), INTERACTION, tag=self)

    def close(self) -> None:
        """Cancel everything; nothing reaches the listener afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            running = self._net
            timer, self._idle_timer = self._idle_timer, None
        if timer is not None:
            timer.cancel()
        if self.sd is not None:
            try:
                self.sd.listeners.remove(self._sd_event)
            except ValueError:
                pass
        if running is not None:
            running.cancel()
        self.pool.cancel_where(lambda job: job.tag is self)   # queued jobs never start
        with self._lock:
            self._net = None
            self._cine = _Cine()
        self._best.close()                   # its images leave the one memory budget

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def decoded_budget(self) -> int:
        """Bytes of decoded images this loader keeps (the one memory budget)."""
        return self._budget

    @property
    def count(self) -> int:
        return len(self._levels)

    @property
    def focus(self) -> int:
        """The image the network plan centres on."""
        return self._focus

    @property
    def shown(self) -> int:
        """The image on screen (decoded first)."""
        return self._shown

    @property
    def reduce(self) -> int | None:
        return self._reduce

    @property
    def state(self) -> str:
        """``new`` until started, then ``loading``, ``idle``, ``paused`` or ``failed``."""
        return self._state

    @property
    def paused(self) -> bool:
        return self._paused

    def running_stage(self) -> Stage | None:
        with self._lock:
            return self._net.stage if self._net is not None else None

    def set_focus(self, index: int, fetch: bool = True) -> tuple[DecodedImage | None, list[DecodedImage]]:
        """The user looks at image ``index`` now: it (then its neighbours) comes first.

        Returns what can be shown at once: the best decoded image held for it (or None)
        and its region patches; better results follow through ``on_decoded``. With
        ``fetch=False`` only the display follows (decodes of what is held), not the
        network plan: a window scrolling fast calls this on every step and moves the
        plan once the user settles, instead of cancelling a transfer per step.
        """
        with self._lock:
            if self._closed or not self._levels:
                self._focus = self._shown = index
                return None, []
            index = min(max(int(index), 0), len(self._levels) - 1)
            moved = index != self._shown
            if moved:
                now = self._clock()
                self._speed, jump = follow_scroll(self._speed, now - self._last_move,
                                                  abs(index - self._shown))
                self._direction = 0 if jump else (1 if index > self._shown else -1)
                self._last_move = self._moved_at = now
            self._shown = index
            changed = fetch and index != self._focus
            if moved and not fetch and self._predict:
                changed = True            # the prediction follows the reader
            if fetch:
                self._focus = index
            if changed and self._paused:
                self._allow_focus = True
            best = self._best.get(index)
            patches = list(self._patches.get(index, []))
        self._refresh_decodes(index)
        if changed:
            self._replan()
        return best, patches

    def set_reduce(self, reduce: int) -> None:
        """The viewport now needs this resolution reduction (V4: never more)."""
        with self._lock:
            if self._closed or reduce == self._reduce:
                return
            more = self._reduce is None or reduce < self._reduce
            self._reduce = max(int(reduce), 0)
            if more and self._paused:
                self._allow_focus = True
            shown = self._shown
        if self.sd is not None:
            self._refresh_decodes(shown)
            self._replan()
            self._check_cine()

    def set_prefetch(self, on: bool) -> None:
        """Fetch the rest of the series in the background (H5 prefetch) or not. Turned
        off, a background stage already running stops now (what it received is kept)."""
        with self._lock:
            self._prefetch = bool(on)
            running = self._net
            if not on and running is not None and running.stage.kind == BACKGROUND \
                    and not running.cancelled:
                running.cancel()
        self._replan()

    def request_region(self, index: int, region: tuple[int, int, int, int]) -> None:
        """Fetch only this rectangle (full-res x, y, w, h) of image ``index``, at full
        resolution and quality (P12); the patch arrives through ``on_decoded``."""
        with self._lock:
            if self._closed or self.sd is None:
                return
            im = self.sd.images[index]
            x, y, w, h = (int(v) for v in region)
            x, y = max(x, 0), max(y, 0)
            w, h = min(w, im["Columns"] - x), min(h, im["Rows"] - y)
            if w <= 0 or h <= 0:
                return
            self._region = (index, (x, y, w, h))
        self._replan()

    def cancel(self) -> None:
        """Stop the transfers of this series (the data received is kept). Later user
        actions (another slice, more zoom, a region) fetch just what they need;
        :meth:`resume` restarts the whole plan."""
        with self._lock:
            self._paused = True
            self._allow_focus = False
            self._region = None
            running = self._net
        if running is not None:
            running.cancel()
        self._set_state("paused")

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._allow_focus = True
            self._failures = 0
        self._pump()

    def best(self, index: int) -> DecodedImage | None:
        """The best decoded image held for ``index`` (no work scheduled)."""
        with self._lock:
            return self._best.get(index)

    def patches(self, index: int) -> list[DecodedImage]:
        with self._lock:
            return list(self._patches.get(index, []))

    def peek(self, index: int, ahead: tuple[int, ...] = ()) -> DecodedImage | None:
        """Best image for ``index`` now; schedules decodes for it and ``ahead`` when more
        data is held than decoded (used by cine, which must not move the network
        focus)."""
        best = self.best(index)
        for i in (index, *ahead):
            if 0 <= i < self.count:
                self._maybe_decode(i, INTERACTION if i == index else VISIBLE)
        return best

    def levels(self) -> list[tuple[int, int]]:
        """(layers, res) held per image."""
        with self._lock:
            return list(self._levels)

    def statuses(self) -> list[ImageStatus]:
        with self._lock:
            return [self._status(i) for i in range(len(self._levels))]

    def image_status(self, index: int) -> ImageStatus | None:
        with self._lock:
            if not 0 <= index < len(self._levels):
                return None
            return self._status(index)

    def series_status(self) -> SeriesStatus:
        with self._lock:
            return self._series_status()

    def plan(self) -> list[Stage]:
        """The remaining stages, most urgent first (the plan as data)."""
        with self._lock:
            return plan_stages(self._plan_state()) if self._levels else []

    # ---- cine (P9) ----------------------------------------------------------------
    def set_cine_consistent(self, on: bool) -> None:
        """Keep every image decoded at the series' common level for consistent cine."""
        with self._lock:
            self._cine.consistent = bool(on)
        if on:
            self._check_cine()

    def common_level(self) -> tuple[int, int] | None:
        """(res, layers) every image has reached (res capped at what the viewport needs),
        None while an image has nothing."""
        with self._lock:
            return self._common_level()

    def cine_levels(self) -> list[tuple[int, int] | None]:
        """For :class:`client.cine.CineController`: the level every frame is decoded at
        (None for all until a complete set is ready)."""
        with self._lock:
            n = len(self._levels)
            if self._cine.level is None or len(self._cine.frames) < n:
                return [None] * n
            return [self._cine.level] * n

    def cine_frame(self, index: int, level: tuple[int, int] | None) -> DecodedImage | None:
        """For :class:`client.cine.CineController`: image ``index`` at ``level`` (None: the
        best available, decoding ahead as playback goes)."""
        if level is None:
            return self.peek(index, (index + 1, index + 2))
        with self._lock:
            if self._cine.level != tuple(level):
                return None
            return self._cine.frames.get(index)

    # ------------------------------------------------------------------ internals
    def _guard(self, fn):
        """Wrap a pool job: report errors instead of losing them in a future."""
        def job(token: CancelToken):
            try:
                return fn(token)
            except Exception as e:  # noqa: BLE001 - reported to the listener
                log.exception("loader job failed")
                self._notify("on_failed", f"{type(e).__name__}: {e}")
                return None
        return job

    def _notify(self, method: str, *args) -> None:
        if self._closed:
            return
        try:
            getattr(self.listener, method)(self, *args)
        except Exception:  # noqa: BLE001 - a listener bug must not kill the worker
            log.exception("loader listener %s failed", method)

    def _set_state(self, state: str) -> None:
        # notified under the lock, so that listeners see the states in the order they
        # were taken (listeners only queue the news; the lock is re-entrant)
        with self._lock:
            if state == self._state:
                return
            self._state = state
            self._notify("on_state", state)

    def _open_job(self, token: CancelToken) -> None:
        try:
            sd = self.registry.get(self.uid)
        except ServerError as e:
            self._notify("on_failed", str(e))
            self._set_state("failed")
            return
        levels = [sd.levels(i) for i in range(len(sd))]
        held = [sd.held_bytes(i) for i in range(len(sd))]
        with self._lock:
            if self._closed:
                return
            self.sd = sd
            sd.listeners.append(self._sd_event)
            self._levels = levels
            self._held = held
            self._requested_layers = [q for q, _ in levels]
            self._total_bytes = sum(im["total_bytes"] for im in sd.images)
            if self._reduce is None:
                im = sd.images[0] if sd.images else {"Columns": 1, "Rows": 1, "numres": 1}
                self._reduce = reduce_for_fit(im["Columns"], im["Rows"], *self._viewport,
                                              im["numres"])
            self._focus = min(max(self._focus, 0), max(len(sd) - 1, 0))
            self._shown = min(max(self._shown, 0), max(len(sd) - 1, 0))
            statuses = [self._status(i) for i in range(len(sd))]
            focus = self._shown
        self._notify("on_opened", sd.info, sd.images, statuses)
        if len(sd):
            self._refresh_decodes(focus)
        self._pump()

    def set_adaptive(self, adaptive: bool | None = None, predict: bool | None = None) -> None:
        """Adapt the fill to the link's version (``adaptive``) and prefetch ahead of the
        reader (``predict``); None leaves a setting as it is."""
        with self._lock:
            if adaptive is not None:
                self._adaptive = bool(adaptive)
            if predict is not None:
                self._predict = bool(predict)
        self._replan()

    def fill_layers(self) -> int | None:
        """Layers of the version the server's automatic choice names for this client's
        measured link and computer (None: every layer). Only when the viewer asked for no
        particular version: a chosen version caps every request at the server anyway."""
        sd = self.sd
        if not self._adaptive or sd is None or sd.selection or not sd.auto or not sd.versions:
            return None
        v = next((v for v in sd.versions if v.get("name") == sd.auto.get("version")), None)
        if v is None or v.get("lossless") or v.get("layers") is None:
            return None
        return int(v["layers"])

    def _adapting(self) -> bool:
        """Adaptation applies: wanted, and the viewer asked for no particular version."""
        sd = self.sd
        return bool(self._adaptive and sd is not None and not sd.selection and sd.auto
                    and sd.versions)

    def background_fill(self) -> tuple[int | None, int | None]:
        """``(layers, window)`` of the background fill while the reader is active
        (:func:`background_fill` from this session's measured link and the series'
        versions at the display's resolution); ``(None, None)`` when not adapting."""
        if not self._adapting():
            return None, None
        sd = self.sd
        meter = getattr(getattr(sd, "session", None), "link", None)
        if meter is None or not len(sd):
            return None, None
        shrink = 4 ** (self._reduce or 0)
        versions = [(None if v.get("lossless") else int(v["layers"]),
                     int(v.get("bytes") or 0) / shrink)
                    for v in sd.versions if v.get("lossless") or v.get("layers")]
        return background_fill(meter.throughput_bps, versions, len(sd), self._neighbours,
                               self.fill_layers())

    def spec_layers(self) -> int | None:
        """Layers of the background fill while the reader is active (None: no limit)."""
        return self.background_fill()[0]

    def _sd_event(self, kind: str, _msg) -> None:          # any thread
        if kind == "auto" and not self._closed:      # the automatic choice changed
            self._replan()

    def _max_ahead(self) -> int:
        """Predicted slices the decoded-image budget holds (float32 at the reduce)."""
        im = self.sd.images[0] if self.sd.images else {"Columns": 1, "Rows": 1}
        per = max(1, (im["Columns"] * im["Rows"] * 4) >> (2 * (self._reduce or 0)))
        return int(min(max(self._budget // (2 * per), self._neighbours), 64))

    def _plan_state(self) -> PlanState:
        sd = self.sd
        now = self._clock()
        quiet = now - self._last_move
        adapting = self._adapting()
        bg = self.background_fill() if adapting else (None, None)
        meter = getattr(sd.session, "link", None)
        link_bps = meter.throughput_bps if meter is not None else None
        image_bytes = self._preview_image_bytes or PREVIEW_IMAGE_BYTES
        return PlanState(
            numres=[im["numres"] for im in sd.images], nlayers=[im["nlayers"] for im in sd.images],
            levels=self._levels, focus=self._focus, reduce=self._reduce or 0,
            preview_done=self._preview_done, previewed=self._previewed,
            preview_chunk=(self._preview_chunk if self._preview_chunk is not None else
                           preview_chunk_for(link_bps, image_bytes, self._preview_requests)),
            preview_window=(preview_window_for(link_bps, image_bytes, len(sd.images), bg[1],
                                               self._neighbours) if adapting else None),
            settled=self._settled, region=self._region,
            allow_preview=not self._paused, allow_focus=self._allow_focus,
            prefetch=self._prefetch and not self._paused, neighbours=self._neighbours,
            chunk=self._chunk, fill_layers=self.fill_layers(), idle=quiet >= self._idle_s,
            spec_layers=bg[0], fill_window=bg[1],
            scrolling=adapting and self._moved_at is not None and now - self._moved_at < PAUSE_S,
            predict=self._predict, shown=self._shown, direction=self._direction,
            speed=self._speed if quiet < 1.0 else 0.0, max_ahead=self._max_ahead())

    def _replan(self) -> None:
        """After a state change: cancel a superseded transfer, start the next stage."""
        with self._lock:
            running = self._net
            if self._closed or self.sd is None:
                return
            if running is not None and not running.cancelled:
                stages = plan_stages(self._plan_state())
                if supersedes(stages[0] if stages else None, running.stage):
                    log.debug("%s supersedes running %s", stages[0], running.stage)
                    running.cancel()
        self._pump()

    def _pump(self) -> None:
        """Start the next stage unless a transfer is running (one per series)."""
        with self._lock:
            if self._closed or self.sd is None or self._net is not None:
                return
            if self._failures >= MAX_FAILURES:
                state = "failed"
                stage = None
            else:
                stages = plan_stages(self._plan_state())
                stage = stages[0] if stages else None
                state = "loading" if stage else ("paused" if self._paused else "idle")
            if stage is None and state == "idle" and self._adaptive:
                # the fill waits for the reader to pause (PAUSE_S), or stopped at the
                # link's version and the window: go on once the reader pauses / rests
                ps = self._plan_state()
                if ps.holds_back:
                    now = self._clock()
                    wait = (PAUSE_S - (now - self._moved_at) if ps.scrolling
                            else self._idle_s - (now - self._last_move))
                    at = time.monotonic() + max(wait, 0.0) + 0.05
                    if self._idle_timer is not None and at < self._timer_at - 0.01:
                        self._idle_timer.cancel()
                        self._idle_timer = None
                    if self._idle_timer is None:
                        self._timer_at = at
                        t = self._idle_timer = threading.Timer(at - time.monotonic(),
                                                               self._idle_reached)
                        t.daemon = True
                        t.start()
            if stage is not None:
                running = self._net = _Running(stage)
                for i in (stage.comps if stage.comps is not None else range(len(self._levels))):
                    if stage.region is None:
                        nl = self.sd.images[i]["nlayers"]
                        self._requested_layers[i] = min(stage.layers or nl, nl)
            self._set_state(state)     # before the job can finish and take the next state
            if stage is not None:
                self.pool.submit(self._guard(lambda token: self._net_job(running, token)),
                                 stage.priority, tag=self)
        if stage is None:
            self._notify("on_series_status", self.series_status())

    def _idle_reached(self) -> None:
        with self._lock:
            self._idle_timer = None
        self._replan()

    def _net_job(self, running: _Running, token: CancelToken) -> None:
        stage = running.stage
        sd = self.sd
        running.token = token
        outcome, message = "complete", ""
        try:
            if running.cancelled or self._closed:
                raise Cancelled()
            with self.registry.transferring(self.uid, token):
                cb = Callbacks(on_announce=lambda m: self._on_announce(running, m),
                               on_image=lambda p: self._on_image(running, p),
                               on_progress=lambda p: self._on_progress(running, p))
                tr = sd.transfer(**stage.transfer_kwargs(), callbacks=cb)
                with self._lock:
                    running.transfer = tr
                    cancelled = running.cancelled or self._closed
                if cancelled:
                    raise Cancelled()
                self._notify("on_stage", stage, "started", "")
                tr.run(token)
        except Cancelled:
            outcome = "cancelled"
        except (TransferError, ServerError) as e:
            outcome, message = "failed", str(e)
        except Exception as e:  # noqa: BLE001 - reported, and the loader goes on
            log.exception("transfer failed")
            outcome, message = "failed", f"{type(e).__name__}: {e}"
        finally:
            self._net_done(running, outcome, message)

    def _net_done(self, running: _Running, outcome: str, message: str) -> None:
        stage = running.stage
        sd = self.sd
        comps = stage.comps if stage.comps is not None else range(len(sd))
        held = {i: sd.held_bytes(i) for i in comps}
        levels = {i: sd.levels(i) for i in comps}
        with self._lock:
            if self._net is running:
                self._active_s += time.monotonic() - running.started
            self._net = None
            for i in comps:
                self._held[i] = held[i]
                self._levels[i] = levels[i]
            if outcome == "complete":
                self._failures = 0
                if stage.kind == PREVIEW:
                    self._previewed.update(comps)
                    self._preview_requests += 1
                    if self._preview_image_bytes is None and running.received > 0:
                        self._preview_image_bytes = running.received / max(len(comps), 1)
                    self._preview_done = all(r >= 0 or i in self._previewed
                                             for i, (_q, r) in enumerate(self._levels))
                elif stage.kind == REGION:
                    if self._region is not None and self._region[1] == stage.region:
                        self._region = None
                elif stage.layers is None:
                    for i in comps:
                        self._settled[i] = min(self._settled.get(i, 1 << 30), stage.reduce or 0)
            elif outcome == "failed":
                self._failures += 1
            statuses = [self._status(i) for i in comps]
            focus = self._shown
        for st in statuses:
            self._notify("on_image_status", st)
        self._notify("on_stage", stage, outcome, message)
        if outcome == "failed":
            self._notify("on_failed", f"transfer of {stage.kind} failed: {message}")
        if stage.kind == REGION and outcome == "complete":
            self._request_decode("region", stage.comps[0], INTERACTION, stage.region)
        if stage.includes(focus):
            self._maybe_decode(focus, INTERACTION)
        if stage.kind == NEAR:
            for i in stage.comps:
                self._maybe_decode(i, PREFETCH)
        self._check_cine()
        self._pump()

    # ---- transfer callbacks (worker thread) ------------------------------------------
    def _on_announce(self, running: _Running, msg: dict) -> None:
        with self._lock:
            running.requested = int(msg["bytes"])
            for csn, _layer, _res, nbytes in msg["increments"]:
                running.image_req[csn] = running.image_req.get(csn, 0) + nbytes
            statuses = [self._status(i) for i in running.image_req if i < len(self._levels)]
            series = self._series_status()
        for st in statuses:
            self._notify("on_image_status", st)
        self._notify("on_series_status", series)

    def _on_image(self, running: _Running, p: ImageProgress) -> None:
        held = self.sd.held_bytes(p.csn)
        with self._lock:
            running.image_rx[p.csn] = p.received
            self._levels[p.csn] = (p.layers, p.res)
            self._held[p.csn] = held
            status = self._status(p.csn)
            shown = self._shown
        self._notify("on_image_status", status)
        if running.stage.kind == REGION:
            self._request_decode("region", p.csn, INTERACTION, running.stage.region)
        elif p.csn == shown:
            self._maybe_decode(p.csn, INTERACTION)

    def _on_progress(self, running: _Running, p: TransferProgress) -> None:
        with self._lock:
            running.received = p.received
            running.requested = max(running.requested, p.requested)
            series = self._series_status()
        self._notify("on_series_status", series)

    # ---- status ---------------------------------------------------------------------
    def _target_res(self, i: int) -> int:
        return max(0, self.sd.images[i]["numres"] - 1 - (self._reduce or 0))

    def _status(self, i: int) -> ImageStatus:
        im = self.sd.images[i]
        layers, res = self._levels[i]
        outstanding = 0
        run = self._net
        if run is not None:
            outstanding = max(run.image_req.get(i, 0) - run.image_rx.get(i, 0), 0)
        return ImageStatus(i, layers, res, im["nlayers"], im["numres"], self._target_res(i),
                           self._requested_layers[i], self._held[i], self._held[i] + outstanding,
                           im["total_bytes"])

    def _series_status(self) -> SeriesStatus:
        held = sum(self._held)
        run = self._net
        outstanding = run.outstanding if run is not None else 0
        total = self._total_bytes
        done = sum(1 for i, (q, r) in enumerate(self._levels)
                   if r >= self._target_res(i) and q >= self.sd.images[i]["nlayers"])
        active = self._active_s + (time.monotonic() - run.started if run is not None else 0.0)
        return SeriesStatus(held, held + outstanding, total, active,
                            run.stage.kind if run is not None else None, done, len(self._levels))

    # ---- decoding -------------------------------------------------------------------
    def _refresh_decodes(self, shown: int) -> None:
        """Decode the shown image where more is held than shown, then the next ones in
        the direction the user scrolls (both sides when standing still)."""
        self._maybe_decode(shown, INTERACTION)
        step = self._direction
        ahead = ([shown + d * step for d in range(1, self._neighbours + 1)] if step else
                 [shown - 1, shown + 1])
        for i in ahead:
            if 0 <= i < len(self._levels):
                self._maybe_decode(i, PREFETCH)

    def _maybe_decode(self, index: int, priority: int) -> None:
        """Schedule a decode of ``index`` if it holds better data than its best image.

        Cheap (it runs on the UI thread when the user scrolls): it compares the levels
        last reported; the decode job checks precisely before decoding."""
        with self._lock:
            if self._closed or self.sd is None:
                return
            layers, res = self._levels[index]
            if res < 0:
                return
            target = self._target_res(index)
            cur = self._best.get(index)
            if cur is not None:
                have = _quality(cur, self.sd.images[index]["numres"], target)
                if have[:2] >= (min(res, target), layers):
                    return
        self._request_decode("full", index, priority)

    def _request_decode(self, kind: str, index: int, priority: int, region=None) -> None:
        key = (kind, index)
        with self._lock:
            if self._closed:
                return
            if key in self._decoding:
                self._redecode.add(key)      # coalesce: decode again once this one ends
                return
            self._decoding.add(key)
        self.pool.submit(self._guard(lambda token: self._decode_job(kind, index, region, priority)),
                         priority, tag=self)

    def _decode_job(self, kind: str, index: int, region, priority: int) -> None:
        try:
            img = self._decode(kind, index, region)
        finally:
            with self._lock:
                self._decoding.discard((kind, index))
                again = (kind, index) in self._redecode
                self._redecode.discard((kind, index))
        if img is not None:
            self._notify("on_decoded", img)
        if again:
            if kind == "region":
                self._request_decode(kind, index, priority, region)
            else:
                self._maybe_decode(index, priority)

    def _decode(self, kind: str, index: int, region) -> DecodedImage | None:
        sd = self.sd
        if self._closed or sd is None:
            return None
        im = sd.images[index]
        numres, nlayers = im["numres"], im["nlayers"]
        if kind == "region":
            layers, res = sd.levels_in_region(index, region)
            if res < 0:
                return None
            d = sd.decode(index, reduce=0, area=region)
            img = DecodedImage(index, d.pixels, layers, nlayers, d.reduce, region=region)
            with self._lock:
                if self._closed:
                    return None
                patches = [p for p in self._patches.get(index, [])
                           if not _inside(p.region, region)
                           or _quality(p, numres, numres - 1) > _quality(img, numres, numres - 1)]
                if any(p.region == region for p in patches):
                    return None              # a better patch of this very region is held
                self._patches[index] = patches + [img]
            return img
        with self._lock:
            target = self._target_res(index)
            cur = self._best.get(index)
        layers, res = held_levels(sd, index, target)
        if res < 0:
            return None
        if cur is not None and _quality(cur, numres, target)[:2] >= (res, layers):
            return None                      # nothing better to show than what is shown
        d = sd.decode(index, reduce=numres - 1 - res)
        img = DecodedImage(index, d.pixels, layers, nlayers, d.reduce)
        with self._lock:
            if self._closed:
                return None
            kept = self._best.offer(img, numres, self._target_res(index),
                                    keep={self._focus, self._shown})
        return img if kept else None

    # ---- consistent cine --------------------------------------------------------------
    def _common_level(self) -> tuple[int, int] | None:
        if not self._levels or self.sd is None:
            return None
        res = min(min(r, self._target_res(i)) for i, (_q, r) in enumerate(self._levels))
        layers = min(q for q, _r in self._levels)
        if res < 0 or layers <= 0:
            return None
        return (res, layers)

    def _check_cine(self) -> None:
        """Start decoding every frame at a higher common level when there is one."""
        with self._lock:
            cine = self._cine
            if self._closed or not cine.consistent or cine.building is not None:
                return
            level = self._common_level()
            if level is None or level == cine.level:
                return
            cine.building = level
        self.pool.submit(self._guard(lambda token: self._cine_job(level, token)), VISIBLE, tag=self)

    def _cine_job(self, level: tuple[int, int], token: CancelToken) -> None:
        res, layers = level
        frames: dict[int, DecodedImage] = {}
        try:
            for i, im in enumerate(self.sd.images):
                if token.cancelled or self._closed:
                    return
                d = self.sd.decode(i, reduce=max(im["numres"] - 1 - res, 0), layers=layers)
                frames[i] = DecodedImage(i, d.pixels, min(layers, d.layers), im["nlayers"], d.reduce)
            with self._lock:
                if self._closed:
                    return
                self._cine.level, self._cine.frames = level, frames
        finally:
            with self._lock:
                self._cine.building = None
        self._notify("on_cine_level", level)
        self._check_cine()


def _inside(inner, outer) -> bool:
    if inner is None or outer is None:
        return False
    ix, iy, iw, ih = inner
    ox, oy, ow, oh = outer
    return ox <= ix and oy <= iy and ix + iw <= ox + ow and iy + ih <= oy + oh


# --------------------------------------------------------------------------- thumbnails

def fetch_thumbnail(registry: SeriesRegistry, uid: str, token: CancelToken, on_image,
                    size: int = 64) -> None:
    """Series thumbnail, progressively: the middle image at ``size`` px, first layer, then
    every layer. ``on_image(uid, uint8 array)`` is called after each step (grayscale
    windowed with the image's default window, or RGB). Blocking: run it in the pool."""
    from imaging.model import ImageMeta
    from imaging.windowing import default_window, render_display

    sd = registry.get(uid)
    if not len(sd) or token.cancelled:
        return
    mid = len(sd) // 2
    im = sd.images[mid]
    meta = ImageMeta.from_dict(im)
    meta.modality = meta.modality or sd.info.get("Modality")
    red = sd.reduce_for_display((size, size), [mid])
    window = None
    for layers in (1, None):
        q, r = sd.levels(mid)
        want_res = im["numres"] - 1 - red
        if r < want_res or (layers is None and q < im["nlayers"]) or r < 0:
            with registry.transferring(uid, token):
                tr = sd.transfer(comps=[mid], layers=layers, reduce=red)
                tr.run(token)
        if token.cancelled:
            return
        d = sd.decode(mid, reduce=red)
        if window is None:
            window = default_window(meta, d.pixels)
        on_image(uid, render_display(d.pixels, meta, *window))
        if d.layers >= im["nlayers"]:
            return
