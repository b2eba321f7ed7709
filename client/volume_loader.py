"""Progressive volume loading from the image server (H2, P9, P10, P11). No Qt.

A loader fills a :class:`~imaging.volume.Volume` with the data of a series as it arrives.
Its plan is data (STYLE 9): a list of :class:`LoadStage` — which images, at which
resolution reduction and how many quality layers. Each stage is one packet transfer; the
server sends a *recommendation* after every consistent set (every requested image at the
same layer and resolution). On each "render" recommendation the loader decodes the images
of that set and applies them to the volume in one batch, so a view redraws once per
level and never shows slices at mixed levels (P9). Recommendations that arrive while a
decode is running are coalesced: the latest wins.

The full-quality stage of a whole-volume load (H1, "HTJ2K where it wins") takes the
sooner of two routes to the same lossless values: the rest of the layered J2K transport,
or every frame's HTJ2K copy through WADO-RS (:mod:`client.frames`), decided by
:func:`client.frames.choose_full_load` from the link rate (given, or measured on one
HTJ2K frame's body, :func:`client.frames.probe_frame` — the previews' small packet
transfers understate a fast link), what the cache already holds, the previews each route
still runs and the decodes' cost, once the first preview is shown. The previews stay
layered J2K; when the copies win, the further previews are left out. The full stage's
events say the route taken and why (:attr:`LoadEvent.route`, :attr:`LoadEvent.why`). If
the HTJ2K route fails (rights, a syntax the server cannot make, the network) the stage
runs through the transport as before.

Two plans:

* :func:`interleaved_plan` (H2): every n-th slice at a coarse resolution first, then all
  slices coarse (the volume fills in between; slots not loaded yet are interpolated from
  their neighbours), then everything at full resolution and quality.
* :func:`slab_plan` with :class:`SlabVolumeLoader` (P10): thick slabs first, then the
  details that make them thinner, each level at a resolution that keeps the voxels near
  isotropic, down to the thin slices, bit-exact.

:meth:`VolumeLoader.run` is a generator of :class:`LoadEvent` (STYLE 2): a worker turns
each yield into a signal for the UI thread; :meth:`VolumeLoader.cancel` stops the
transfer, and the generator ends at the next yield. The transfer, the decodes and the
HTJ2K fetches are sub-jobs of the app's one :class:`~client.pool.WorkerPool` (tagged with
the loader and sharing its cancel token); the thread that runs the generator, a pool
worker itself, runs its own sub-jobs while it waits for them.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from client.pool import INTERACTION, CancelToken, WorkerPool, default_pool
from client.series import Callbacks, Cancelled, SeriesData, TransferProgress

from imaging.volume import SliceGeometry, Volume, VolumeError, VolumeUpdate, quality_key, volume_for_slices

log = logging.getLogger("medview.volume_loader")

__all__ = [
    "LoadStage",
    "LoadEvent",
    "usable_images",
    "volume_for_series",
    "interleaved_plan",
    "full_plan",
    "slab_plan",
    "VolumeLoader",
    "SlabVolumeLoader",
    "FolderVolumeLoader",
    "load_all",
]


@dataclass(frozen=True)
class LoadStage:
    """One step of a progressive plan."""

    name: str
    comps: tuple[int, ...] | None        # series image indices (None: every volume image)
    reduce: int | None                   # resolution reduction (None: full)
    layers: int | None                   # quality layers (None: all)
    level: int = 0                       # slab level (0 = thin slices)


@dataclass(frozen=True)
class LoadEvent:
    """A consistent set applied to the volume."""

    stage: LoadStage
    layers: int
    reduce: int
    update: VolumeUpdate | None
    received: int                        # bytes received so far (whole load)
    final: bool                          # the last event of the plan
    route: str = ""                      # full stage of a whole-volume load: "htj2k" | "j2k"
    why: str = ""                        # why that route (client.frames.FullLoadChoice.reason)


# --------------------------------------------------------------------------- volumes
def _floats(v, n):
    if v is None or v == "":
        return None
    if isinstance(v, str):
        v = v.split("\\")
    out = tuple(float(x) for x in v)
    return out if len(out) >= n else None


def _geometry_flags(im: dict) -> list[str]:
    from imaging.model import GEOMETRY_KEYWORDS

    return [f for f in (im.get("geometry_flags") or ())
            if str(f).split(":", 1)[0] in GEOMETRY_KEYWORDS]


def geometry_refusal(images: Sequence[dict]) -> str | None:
    """Why MPR is refused for a series whose geometry the server flagged as impossible
    at ingest (NaN or non-positive spacing, non-orthonormal orientation, ...), or None."""
    bad = [(im, _geometry_flags(im)) for im in images]
    bad = [(im, f) for im, f in bad if f]
    if not bad:
        return None
    im, flags = bad[0]
    return (f"MPR refused: the geometry of {len(bad)} of {len(images)} images is impossible "
            f"(image {im['index'] + 1}: {'; '.join(flags)}). Reformatting it would draw "
            "nonsense; the original files are kept unchanged in the store.")


def usable_images(images: Sequence[dict]) -> tuple[list[int], list[str]]:
    """Indices of the series images that can form one volume (grey-level, placed, the
    common orientation and size, geometry not flagged as impossible) and the reasons the
    others were left out (images numbered from 1, as the viewer shows them)."""
    notes: list[str] = []
    cand = []
    for im in images:
        if (im.get("SamplesPerPixel") or 1) != 1:
            notes.append(f"image {im['index'] + 1}: colour")
            continue
        if _geometry_flags(im):
            notes.append(f"image {im['index']}: impossible geometry "
                         f"({'; '.join(_geometry_flags(im))})")
            continue
        if not (_floats(im.get("ImagePositionPatient"), 3) and _floats(im.get("ImageOrientationPatient"), 6)
                and _floats(im.get("PixelSpacing"), 2)):
            notes.append(f"image {im['index'] + 1}: no position/orientation/spacing")
            continue
        cand.append(im)
    if not cand:
        return [], notes
    key = lambda im: (tuple(round(v, 3) for v in _floats(im["ImageOrientationPatient"], 6)[:6]),  # noqa: E731
                      im["Rows"], im["Columns"])
    counts: dict = {}
    for im in cand:
        counts[key(im)] = counts.get(key(im), 0) + 1
    best = max(counts, key=counts.get)
    keep = []
    for im in cand:
        if key(im) == best:
            keep.append(im["index"])
        else:
            notes.append(f"image {im['index'] + 1}: other orientation or size (localizer?)")
    return keep, notes


def volume_for_series(images: Sequence[dict], *, modality: str = "", series_uid: str = "",
                      ) -> tuple[Volume, dict[int, int]]:
    """An empty volume for the usable images of a server series (the ``images`` list of
    ``/api/series/{uid}/images``); returns it and {image index: slot}."""
    keep, notes = usable_images(images)
    if not keep:
        raise VolumeError("no image of this series can be placed in space")
    ims = [images[i] for i in keep]
    geoms = [SliceGeometry(_floats(im["ImagePositionPatient"], 3), _floats(im["ImageOrientationPatient"], 6),
                           _floats(im["PixelSpacing"], 2)[:2], int(im["Rows"]), int(im["Columns"]),
                           im.get("SpacingBetweenSlices") or im.get("SliceThickness"))
             for im in ims]
    rescales = [(float(im.get("RescaleSlope") or 1.0), float(im.get("RescaleIntercept") or 0.0)) for im in ims]
    lo, hi = 0, 0
    for im in ims:
        b = int(im.get("bits_stored") or im.get("BitsStored") or 16)
        if im.get("signed"):
            lo, hi = min(lo, -(1 << (b - 1))), max(hi, (1 << (b - 1)) - 1)
        else:
            hi = max(hi, (1 << b) - 1)
    raw = max(1, int(ims[0].get("BitsAllocated") or 16) // 8)
    vol, slots = volume_for_slices(geoms, rescales, (lo, hi), modality=modality, series_uid=series_uid,
                                   slice_ids=keep, raw_bytes_per_voxel=raw)
    vol.warnings = notes + vol.warnings
    return vol, dict(zip(keep, slots))


# --------------------------------------------------------------------------- plans
def _coarse_reduce(numres: int, size: int, target: int = 128) -> int:
    r = 0
    while r < numres - 1 and size >> (r + 1) >= target:
        r += 1
    return r


def interleaved_plan(comps: Sequence[int], numres: int, size: int, *, step: int = 4,
                     coarse_side: int = 128) -> list[LoadStage]:
    """H2: every ``step``-th slice coarse (about ``coarse_side`` pixels), then all
    slices coarse, then all at full resolution and quality. ``comps`` in slice order."""
    comps = list(comps)
    r = _coarse_reduce(numres, size, coarse_side)
    sparse = comps[::step]
    if comps and comps[-1] not in sparse:
        sparse.append(comps[-1])
    stages = []
    if step > 1 and len(sparse) < len(comps):
        nth = {2: "2nd", 3: "3rd"}.get(step, f"{step}th")
        stages.append(LoadStage(f"every {nth} slice, 1/{1 << r} resolution", tuple(sparse), r, 1))
    if r > 0:
        stages.append(LoadStage(f"all slices, 1/{1 << r} resolution", None, r, 1))
    stages.append(LoadStage("all slices, full resolution and quality", None, 0, None))
    return stages


def full_plan() -> list[LoadStage]:
    """Everything at full resolution and quality in one transfer."""
    return [LoadStage("all slices, full resolution and quality", None, 0, None)]


def slab_plan(levels: int, numres: int, slice_spacing: float, pixel_spacing: float,
              ) -> list[LoadStage]:
    """P10: slabs of level L, L-1, ... 0, each at the resolution that keeps voxels near
    isotropic (:func:`codestream.slabs.isotropic_reduce`); the last stage is full."""
    from codestream.slabs import isotropic_reduce

    stages = []
    for k in range(levels, -1, -1):
        r = isotropic_reduce(k, slice_spacing, pixel_spacing, numres) if k else 0
        label = f"slabs of {1 << k} slices" if k else "thin slices"
        stages.append(LoadStage(f"{label}, 1/{1 << r} resolution", None, r, None, k))
    return stages


# --------------------------------------------------------------------------- loaders
class _RouteFailed(Exception):
    """The HTJ2K route could not be taken (nothing applied yet)."""


class VolumeLoader:
    """Fills a volume from a :class:`~client.series.SeriesData` following a plan."""

    def __init__(self, series: SeriesData, volume: Volume | None = None,
                 slots: dict[int, int] | None = None, plan: Sequence[LoadStage] | None = None, *,
                 decode_threads: int = 2,
                 on_progress: Callable[[TransferProgress], None] | None = None,
                 full_route: str = "auto", link_bytes_s: float | None = None,
                 pool: WorkerPool | None = None, priority: int = INTERACTION) -> None:
        self.series = series
        if volume is None:
            volume, slots = volume_for_series(series.images, modality=str(series.info.get("Modality") or ""),
                                              series_uid=series.uid)
        self.volume = volume
        self.volume.target_quality = quality_key(0, max(int(im["nlayers"]) for im in series.images))
        self.slots = dict(slots or {})
        self.comps = sorted(self.slots, key=lambda c: self.slots[c])      # slice order
        if plan is None:
            im = series.images[self.comps[0]]
            plan = interleaved_plan(self.comps, int(im["numres"]), max(int(im["Rows"]), int(im["Columns"])))
        self.plan = list(plan)
        self._init_run_state(decode_threads, on_progress, pool, priority)
        if full_route not in ("auto", "j2k", "htj2k"):
            raise ValueError(f"full_route must be auto, j2k or htj2k, got {full_route!r}")
        self.full_route = full_route
        self.link_bytes_s = link_bytes_s          # None: measured on the earlier stages

    def _init_run_state(self, decode_threads: int, on_progress, pool: WorkerPool | None,
                        priority: int) -> None:
        """What every loader holds while it runs (also set by :class:`SlabVolumeLoader`,
        which has no series of its own at first). ``decode_threads``: images decoded at
        once (the generator's thread included) in ``pool`` (default: the app's one)."""
        self.pool = pool or default_pool()
        self.priority = priority
        self.decode_threads = max(1, decode_threads)
        self.on_progress = on_progress
        self.token = CancelToken()
        self.received = 0
        self._last_update: VolumeUpdate | None = None
        self._transfer = None
        self._lock = threading.Lock()
        self._link = [0, 0.0]                      # bytes, seconds of finished transfers
        self._probe = None                         # (image, HTJ2K frame) fetched to time the link
        self.full_choice = None                    # client.frames.FullLoadChoice, once made

    # ------------------------------------------------------------------ control
    def cancel(self) -> None:
        self.token.cancel()
        with self._lock:
            t = self._transfer
        if t is not None:
            t.cancel()

    @property
    def cancelled(self) -> bool:
        return self.token.cancelled

    # ------------------------------------------------------------------ running
    def stage_comps(self, stage: LoadStage) -> list[int]:
        return list(stage.comps) if stage.comps is not None else list(self.comps)

    def run(self) -> Iterator[LoadEvent]:
        """Run the plan; yields a :class:`LoadEvent` after each consistent set applied."""
        early: bool | None = None
        n = 0
        while n < len(self.plan):               # the plan may lose stages on the way
            stage = self.plan[n]
            if self.cancelled:
                return
            last_stage = n == len(self.plan) - 1
            why = ""
            if early if last_stage and early is not None else self._htj2k_chosen(stage):
                try:
                    yield from self._said(self._run_htj2k(stage, last_stage), "htj2k")
                    n += 1
                    continue
                except _RouteFailed as e:       # nothing applied: the transport instead
                    log.warning("HTJ2K route failed (%s); loading through the J2K layers",
                                e)
                    why = f"HTJ2K copies failed ({e}): the J2K layers"
            if last_stage and (why or self.full_choice is not None):
                yield from self._said(self._run_stage(stage, last_stage), "j2k", why)
            else:
                yield from self._run_stage(stage, last_stage)
            if n == 0 and not last_stage and not self.cancelled:
                early = self._early_route()     # once the first preview is shown
            n += 1

    # ------------------------------------------------------------------ HTJ2K route
    def _said(self, events: Iterator[LoadEvent], route: str, why: str = "") -> Iterator[LoadEvent]:
        """The full stage's events, saying its route and why (the choice's reason)."""
        if not why:
            c = self.full_choice
            why = c.reason if c is not None else ("HTJ2K copies asked for" if route == "htj2k" else "")
        for ev in events:
            yield replace(ev, route=route, why=why)

    def _early_route(self) -> bool | None:
        """With three stages or more (a first preview, more previews, full quality): the
        full stage's route chosen once the first preview is shown (HTJ2K asked for, or
        the link rate given or timed on one HTJ2K frame). When the copies win, the
        further previews are left out: the whole volume at full quality then arrives
        sooner than they would. None: decided at the full stage."""
        if type(self) is not VolumeLoader or len(self.plan) < 3 or self.full_route == "j2k":
            return None
        last = self.plan[-1]
        chosen = self._htj2k_chosen(last, self.plan[1:-1])
        if chosen:
            dropped = self.plan[1:-1]
            self.plan = [self.plan[0], last]
            log.info("HTJ2K copies for the full stage: previews %s left out",
                     ", ".join(s.name for s in dropped))
        return chosen

    def measured_link(self) -> float | None:
        """Bytes/s of this load's transfers so far (None below 64 KiB: not a measure)."""
        n, secs = self._link
        return n / secs if n >= 65536 and secs > 0 else None

    def _htj2k_chosen(self, stage: LoadStage, previews: Sequence[LoadStage] = ()) -> bool:
        """Whether ``stage`` (the full one) takes the HTJ2K copies. ``previews``: the J2K
        preview stages before it that the copies' route leaves out (the layers' route
        still runs them: the choice counts their cost)."""
        from client.frames import choose_full_load, cpu_share

        if (type(self) is not VolumeLoader or self.full_route == "j2k"
                or stage.level or stage.reduce or stage.layers is not None):
            return False                       # only whole-volume loads at full quality
        comps = self.stage_comps(stage)
        ims = [self.series.images[c] for c in comps]
        if (self.series.limits.limited or self.series.selection
                or any(im.get("allowed") is False for im in ims)):
            return False                       # WADO-RS sends only what is wholly granted
        if self.full_route == "htj2k":
            return True
        link = self.link_bytes_s
        if link is None:
            # the previews' packet rate understates the link (small transfers, latency,
            # the server's packet work): time one HTJ2K frame, which the load keeps
            link = self._probe_link(comps)
            if link is None:
                return False                   # the copies cannot be had: the layers
        at = {c: i for i, c in enumerate(comps)}
        ratio = None
        if self._probe is not None:            # the copies' size, measured on one frame
            total = int(self.series.images[self._probe[0]].get("total_bytes") or 0)
            ratio = len(self._probe[1]) / total if total else None
        self.full_choice = choose_full_load(
            ims, [self.series.held_bytes(c) for c in comps], link, htj2k_ratio=ratio, share=cpu_share(),
            previews=[([at[c] for c in self.stage_comps(s) if c in at], s.reduce or 0, s.layers or 0)
                      for s in previews])
        log.info("full-quality load: %s", self.full_choice.reason)
        return self.full_choice.route == "htj2k"

    def _probe_link(self, comps: list[int]) -> float | None:
        """Bytes/s of one whole HTJ2K frame fetched (its server time included), the
        larger of that and the previews' rate; None if the frame cannot be had."""
        from client.frames import probe_frame

        c = comps[len(comps) // 2]
        im = self.series.images[c]
        try:
            data, rate = probe_frame(self.series.session, str(self.series.info.get("StudyInstanceUID") or ""),
                                     self.series.uid, im["SOPInstanceUID"], int(im.get("frame") or 1))
        except Exception as e:  # noqa: BLE001 - rights, a syntax it cannot make, the network
            log.info("no HTJ2K copies for this load (%s): the layers", e)
            return None
        self._probe = (c, data)
        self.received += len(data)
        return max(rate, self.measured_link() or 0.0)

    def _run_htj2k(self, stage: LoadStage, last_stage: bool) -> Iterator[LoadEvent]:
        """Every frame's HTJ2K copy, decoded in the pool, applied in one batch; progress
        as bytes arrive. The frames come in one request (the series' Pixel Data
        resource), read part by part by whichever pool thread takes the next frame,
        which then decodes it while the next part is read; from a server without that
        resource, one request per frame. Raises _RouteFailed before anything is applied."""
        from client.frames import choose_full_load, decode_frame, fetch_frame, fetch_series_frames
        from client.session import ServerError

        comps = self.stage_comps(stage)
        images = self.series.images
        study = str(self.series.info.get("StudyInstanceUID") or "")
        top = max(int(images[c]["nlayers"]) for c in comps)
        with self.volume.lock:
            todo = [c for c in comps
                    if self.volume.own[self.slots[c]] < quality_key(0, int(images[c]["nlayers"]))]
        estimate = choose_full_load([images[c] for c in todo], [0] * len(todo), None).htj2k_bytes
        base, got, t0 = self.received, 0, time.monotonic()
        decoded: dict[int, object] = {}
        probe = getattr(self, "_probe", None)
        self._probe = None

        resp = None
        try:
            resp, parts = fetch_series_frames(self.series.session, study, self.series.uid)
        except ServerError as e:
            if e.status not in (404, 405):             # rights, syntax: the layers
                raise _RouteFailed(f"{type(e).__name__}: {e}") from e
        except Exception as e:  # noqa: BLE001 - the network, an answer not multipart
            raise _RouteFailed(f"{type(e).__name__}: {e}") from e

        if resp is not None:
            where = {(images[c]["SOPInstanceUID"], int(images[c].get("frame") or 1)): c for c in todo}

            def items():
                """(image, frame bytes, bytes read) as the parts arrive; frames the load
                does not need (a localizer, a slice already held) only count as read."""
                skipped = 0
                try:
                    for sop, frame, data in parts:
                        if self.cancelled:
                            return
                        c = where.get((sop, frame))
                        if c is None:
                            skipped += len(data)
                            continue
                        yield c, data, len(data) + skipped
                        skipped = 0
                except Exception as e:  # noqa: BLE001 - delivered with the next item
                    yield None, e, 0
            source = items()
        else:
            source = [(c, probe[1] if probe is not None and probe[0] == c else None, 0)
                      for c in todo]

        def one(item):
            c, data, n = item
            if isinstance(data, BaseException):
                raise data
            if self.cancelled:
                return c, None, n
            if data is None:                   # one request per frame
                im = images[c]
                data = fetch_frame(self.series.session, study, self.series.uid,
                                   im["SOPInstanceUID"], int(im.get("frame") or 1))
                n = len(data)
            return c, decode_frame(data, images[c]), n

        # reads and decodes in the pool, this thread among them; closing the batch (an
        # error, a cancel) stops the helpers after their current frame
        batch = self.pool.imap_unordered(one, source, self.priority, tag=self, token=self.token,
                                         parallel=max(2, 2 * self.decode_threads))
        try:
            for fut in batch:
                if self.cancelled:
                    return
                try:
                    c, arr, n = fut.result()
                except Exception as e:  # noqa: BLE001 - 403/406/network: fall back
                    raise _RouteFailed(f"{type(e).__name__}: {e}") from e
                decoded[c] = arr
                got += n
                self.received = base + got
                if self.on_progress:
                    self.on_progress(TransferProgress(self.received, base + max(estimate, got),
                                                      base + max(estimate, got),
                                                      time.monotonic() - t0))
        finally:
            batch.close()
            if resp is not None:
                resp.close()
        if self.cancelled:
            return
        missing = [c for c in todo if decoded.get(c) is None]
        if missing:
            raise _RouteFailed(f"the server's answer lacked {len(missing)} of the frames")
        if self.cancelled:
            return
        updates: list[VolumeUpdate] = []
        self.volume.subscribe(updates.append)
        try:
            with self.volume.batch(f"{stage.name} (HTJ2K copies)"):
                for c in todo:
                    im = images[c]
                    self.volume.set_slice(self.slots[c], decoded[c],
                                          slope=float(im.get("RescaleSlope") or 1.0),
                                          intercept=float(im.get("RescaleIntercept") or 0.0),
                                          quality=quality_key(0, int(im["nlayers"]), 0))
        finally:
            self.volume.unsubscribe(updates.append)
        if updates:
            self._last_update = updates[-1]
        yield LoadEvent(stage, top, 0, self._last_update, self.received, last_stage)

    def _run_stage(self, stage: LoadStage, last_stage: bool) -> Iterator[LoadEvent]:
        comps = self.stage_comps(stage)
        q: queue.Queue = queue.Queue()
        base = self.received
        link = [0, 0.0]

        def progress(p: TransferProgress) -> None:
            self.received = base + p.received
            link[:] = [p.received, p.elapsed]
            if self.on_progress:
                self.on_progress(TransferProgress(self.received, p.requested, p.total, p.elapsed))

        cb = Callbacks(on_recommend=lambda m: q.put(("rec", m)), on_progress=progress)
        transfer = self.series.transfer(comps=comps, layers=stage.layers, reduce=stage.reduce,
                                        order="quality", callbacks=cb)
        with self._lock:
            self._transfer = transfer

        def work() -> None:
            try:
                q.put(("done", transfer.run(self.token)))
            except BaseException as e:  # noqa: BLE001 - delivered to the generator
                q.put(("error", e))

        # beside this generator, in the pool; if no worker takes it, this thread runs it
        job = self.pool.submit(lambda _token: work(), self.priority, tag=self, token=self.token)
        want_layers = stage.layers or max(int(self.series.images[c]["nlayers"]) for c in comps)
        want_reduce = stage.reduce or 0
        applied: tuple[int, int] | None = None
        try:
            finished = False
            while not finished:
                items = [self._next_item(q, job)]
                while True:                        # coalesce: the latest recommendation wins
                    try:
                        items.append(q.get_nowait())
                    except queue.Empty:
                        break
                rec = None
                for kind, payload in items:
                    if kind == "rec" and payload.get("action") == "render":
                        rec = payload
                    elif kind == "error":
                        if isinstance(payload, Cancelled) or self.cancelled:
                            return
                        raise payload
                    elif kind == "done":
                        finished = True
                if self.cancelled:
                    return
                if finished:
                    # the final level, also when the cache already held it (no recommendation)
                    if applied != (want_layers, want_reduce):
                        ev = self._apply(stage, comps, want_layers, want_reduce, last_stage)
                        if ev is not None:
                            yield ev
                    elif last_stage:        # already shown: only say that it is the end
                        yield LoadEvent(stage, want_layers, want_reduce, self._last_update,
                                        self.received, True)
                    break
                if rec is not None:
                    layers = int(rec["layers"])
                    reduce = max(int(self.series.images[comps[0]]["numres"]) - 1 - int(rec["res"]), 0)
                    ev = self._apply(stage, comps, layers, reduce, False)
                    applied = (layers, reduce)
                    if ev is not None:
                        yield ev
        finally:
            if not job.future.done() and self.cancelled:
                transfer.cancel()
            with self._lock:
                self._transfer = None
            self._link[0] += link[0]               # the link rate, for the full stage
            self._link[1] += link[1]

    def _next_item(self, q: queue.Queue, job) -> tuple:
        """The transfer's next message. While waiting, a transfer job no worker has taken
        yet is run here (the pool may be busy: this generator must not wait for ever)."""
        while True:
            try:
                return q.get(timeout=0.05 if not job.started else None)
            except queue.Empty:
                if job.future.cancelled():        # dropped from the pool before it ran
                    return ("error", Cancelled())
                self.pool.run_now(job)

    def _decode(self, comps: list[int], layers: int, reduce: int) -> dict[int, object]:
        """Decode ``comps`` in parallel (``decode_threads`` at once, in the pool;
        OpenJPEG releases the GIL)."""
        def one(c):
            if self.cancelled:
                return c, None
            try:
                return c, self.series.decode(c, reduce=reduce, layers=layers)
            except Exception as e:  # noqa: BLE001 - an image with nothing held yet
                log.debug("image %d not decodable yet: %s", c, e)
                return c, None
        if self.decode_threads == 1 or len(comps) < 2:
            return dict(one(c) for c in comps)
        return dict(self.pool.map(one, comps, self.priority, parallel=self.decode_threads,
                                  tag=self, token=self.token))

    def _apply(self, stage: LoadStage, comps: list[int], layers: int, reduce: int,
               final: bool) -> LoadEvent | None:
        target = quality_key(reduce, layers, stage.level)
        with self.volume.lock:
            comps = [c for c in comps if self.volume.own[self.slots[c]] < target]
        decoded = self._decode(comps, layers, reduce)
        if self.cancelled:
            return None
        updates: list[VolumeUpdate] = []
        self.volume.subscribe(updates.append)
        try:
            with self.volume.batch(f"{stage.name}: {layers} layer(s), reduce {reduce}"):
                for c in comps:
                    d = decoded.get(c)
                    if d is None:
                        continue
                    im = self.series.images[c]
                    self.volume.set_slice(self.slots[c], d.pixels,
                                          slope=float(im.get("RescaleSlope") or 1.0),
                                          intercept=float(im.get("RescaleIntercept") or 0.0),
                                          quality=quality_key(d.reduce, min(d.layers, layers), stage.level))
        finally:
            self.volume.unsubscribe(updates.append)
        if updates:
            self._last_update = updates[-1]
        return LoadEvent(stage, layers, reduce, self._last_update, self.received, final)


class SlabVolumeLoader(VolumeLoader):
    """Thick to thin (P10): fills the volume from the slab pyramid of a series.

    ``slab_series`` is a :class:`client.slabs.SlabSeries`, or a no-argument callable that
    makes one: it is then called at the start of :meth:`run` (on the loader's thread —
    the server builds a pyramid on first use, which can take a while). ``plain_images``
    is the images list of the plain series, for the volume geometry (default: fetched
    through the slab series' session; required with a callable).
    """

    def __init__(self, slab_series, plain_images: Sequence[dict] | None = None, *,
                 decode_threads: int = 2, modality: str | None = None,
                 on_progress: Callable[[TransferProgress], None] | None = None,
                 pool: WorkerPool | None = None, priority: int = INTERACTION) -> None:
        factory = None
        if callable(slab_series) and not isinstance(slab_series, SeriesData):
            factory, slab_series = slab_series, None
            if plain_images is None:
                raise ValueError("plain_images is needed when the slab series is made later")
        images = plain_images or slab_series.session.series_images(slab_series.uid)["images"]
        if modality is None:
            modality = str(slab_series.info.get("Modality") or "") if slab_series is not None else ""
        uid = slab_series.uid if slab_series is not None else ""
        volume, self.plain_slots = volume_for_series(images, modality=modality, series_uid=uid)
        # what VolumeLoader.__init__ sets, without a series yet
        self.series = slab_series
        self.volume = volume
        self.slots: dict[int, int] = {}
        self.comps: list[int] = []
        self.plan: list[LoadStage] = []
        self._init_run_state(decode_threads, on_progress, pool, priority)
        self._factory = factory
        self.slab_series = slab_series
        self.thin_slots: list[int] = []
        if slab_series is not None:
            self._prepare()

    def _prepare(self) -> None:
        """Fit the pyramid to the volume and write the plan (once the slab series exists)."""
        if self.slab_series is None:
            self.slab_series = self._factory()
        ss = self.series = self.slab_series
        if sorted(ss.order) != sorted(self.plain_slots):
            raise VolumeError("the slab pyramid and the usable images of the series differ")
        self.volume.series_uid = ss.uid
        self.thin_slots = [self.plain_slots[c] for c in ss.order]
        self.volume.target_quality = quality_key(0, max(int(im["nlayers"]) for im in ss.images))
        geom = self.volume.geometry
        self.plan = slab_plan(ss.depth, int(ss.images[0]["numres"]), geom.slice_spacing,
                              min(geom.spacing[:2]))

    def run(self) -> Iterator[LoadEvent]:
        if not self.plan:
            self._prepare()
        yield from super().run()

    def stage_comps(self, stage: LoadStage) -> list[int]:
        return self.slab_series.comps_for_level(stage.level)

    def _decode(self, comps, layers, reduce):     # not used: reconstruct() decodes
        raise NotImplementedError

    def _apply(self, stage: LoadStage, comps: list[int], layers: int, reduce: int,
               final: bool) -> LoadEvent | None:
        if self.cancelled:
            return None
        try:
            lv = self.slab_series.reconstruct(stage.level, reduce=reduce, layers=layers)
        except ValueError as e:                    # a band with nothing decodable yet
            log.debug("slabs of level %d not ready: %s", stage.level, e)
            return None
        info = self.slab_series.images[0]
        slope = float(info.get("RescaleSlope") or 1.0)
        intercept = float(info.get("RescaleIntercept") or 0.0)
        q = quality_key(lv.reduce, layers, stage.level)
        updates: list[VolumeUpdate] = []
        self.volume.subscribe(updates.append)
        try:
            with self.volume.batch(f"{stage.name}: {layers} layer(s), reduce {lv.reduce}"):
                for slab, (start, stop) in zip(lv.slabs, lv.spans):
                    for t in range(start, stop):
                        self.volume.set_slice(self.thin_slots[t], slab, slope=slope,
                                              intercept=intercept, quality=q)
        finally:
            self.volume.unsubscribe(updates.append)
        if updates:
            self._last_update = updates[-1]
        return LoadEvent(stage, layers, lv.reduce, self._last_update, self.received, final)


class FolderVolumeLoader:
    """Fills the volume of a :class:`~imaging.series_select.SeriesSelection` from the files
    on disk, interleaved too: every ``step``-th slice first (the rest interpolated), then
    the others. Same ``run()`` / ``cancel()`` contract as :class:`VolumeLoader`."""

    def __init__(self, selection, *, step: int = 4) -> None:
        self.selection = selection
        self.volume, self.slots = selection.empty_volume()
        self.comps: list[int] = []
        self.step = max(1, step)
        self.token = CancelToken()
        self.on_progress = None
        self.received = 0

    def cancel(self) -> None:
        self.token.cancel()

    @property
    def cancelled(self) -> bool:
        return self.token.cancelled

    def run(self) -> Iterator[LoadEvent]:
        kept = self.selection.kept
        order = list(range(0, len(kept), self.step))
        rest = [k for k in range(len(kept)) if k not in set(order)]
        nth = {2: "2nd", 3: "3rd"}.get(self.step, f"{self.step}th")
        stages = [(LoadStage(f"every {nth} slice from disk", tuple(order), 0, None), order)]
        if rest:
            stages.append((LoadStage("all slices from disk", None, 0, None), rest))
        datasets: dict = {}
        for n, (stage, ks) in enumerate(stages):
            updates: list[VolumeUpdate] = []
            self.volume.subscribe(updates.append)
            try:
                with self.volume.batch(stage.name):
                    for k in ks:
                        if self.cancelled:
                            return
                        c = kept[k]
                        key = c.path if c.path is not None else c.sop_uid
                        ds = datasets.get(key)
                        if ds is None:
                            datasets.clear()
                            ds = datasets[key] = c.dataset()
                        self.volume.set_slice(self.slots[k], c.load_stored(ds), slope=c.slope,
                                              intercept=c.intercept)
                        self.received += 1
            finally:
                self.volume.unsubscribe(updates.append)
            yield LoadEvent(stage, 0, 0, updates[-1] if updates else None, self.received,
                            n == len(stages) - 1)


def load_all(loader: VolumeLoader, on_event: Callable[[LoadEvent], None] | None = None) -> Volume:
    """Run a loader to the end on this thread (CLI, tests)."""
    for ev in loader.run():
        if on_event:
            on_event(ev)
    return loader.volume
