"""Super-resolution jobs: a priority queue with pre-emption, and the generated-tile cache.

:class:`SRQueue` schedules jobs on the app's one :class:`~client.pool.WorkerPool` (no
threads of its own; a tile on screen runs in the pool's VISIBLE class, the rest in
PREFETCH and BACKGROUND, under the pool's caps). Priorities, most urgent first:
``VIEW`` (a tile the pathologist is looking at), ``NEAR`` (next to the view, likely next),
``BACKGROUND`` (the rest of the slide while the pathologist reads). A job for a key that is
already queued is *raised* to the better priority, never duplicated. When a ``VIEW`` (or
``NEAR``) job arrives and every worker is busy with less urgent work, the least urgent
running job is *pre-empted*: its ``cancel()`` turns true, the generator stops between two
layers (:class:`~imaging.sr.SRCancelled`) and the job goes back to the queue, first in
its class, to be redone later — nothing is lost, only postponed. :meth:`SRQueue.retarget`
re-ranks everything when the view moves.

:class:`SRTileService` makes the tiles: a level-0 region of ``tile/scale`` pixels plus a
context margin (so neighbouring tiles join without seams) goes through the ×2 or ×4
generator. Every result is a :class:`GeneratedTile` (``generated = True``) and is cached
in the *temporary tier* as a PNG whose text chunks say ``MedView-Generated:
super-resolution xN - not scanned detail``; a catalogue row (``temp_tile``) ties it to
the slide so it is purged when the patient is discharged. Readers of the cache get the
flag back: a generated tile can never pass for a scanned one.

Where the tiles go (W3):

* the bundled desktop (its own server on the same machine) gives the service an
  :class:`SRTileCache` over the slide store's ``temp`` tier and catalogue
  (``viewer.services.Backend.sr_cache_for``): the catalogue holds each tile's SHA-256,
  the tier job purges them at discharge (``SlideTiers.purge_temp``);
* against a remote server the client may not write into the server's store, so the
  tiles go to a client-side folder (:func:`client_tile_cache`, by default
  ``~/.cache/medview/sr/<server+user>/<slide>/``) in the same PNG format, each with a
  ``.sha256`` sidecar written after it (a tile whose checksum does not match is
  regenerated). The client purges a slide's folder as soon as it learns from the server
  that the patient was discharged — when it lists slides or opens one
  (:func:`purge_client_tiles`) — and generates nothing to disk for a discharged patient;
  the folder is kept under a size limit, least recently used slides first
  (:func:`prune_client_tiles`).
  Only slides the user may see without limits are cached there: a tile generated from
  a rights-limited view (grey outside the allowed region) is kept in memory only.
"""
from __future__ import annotations

import hashlib
import heapq
import io
import itertools
import logging
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import CancelledError, Future, InvalidStateError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from client import pool
from imaging.sr import SRCancelled, load_generator

log = logging.getLogger("medview.imaging.sr")

VIEW, NEAR, BACKGROUND = 0, 1, 2
PRIORITY_NAMES = {VIEW: "view", NEAR: "near", BACKGROUND: "background"}
POOL_CLASS = {VIEW: pool.VISIBLE, NEAR: pool.PREFETCH, BACKGROUND: pool.BACKGROUND}
"""The worker-pool class an SR job runs in: a tile on screen is visible work, the rest
prefetch and background (the pool's caps hold for SR as for every other job)."""
GENERATED_TEXT = "super-resolution x{scale} - generated, not scanned detail"


class SRJob:
    """One queued computation. ``future`` carries the result (or the exception)."""

    def __init__(self, key, fn: Callable[[Callable[[], bool]], object], priority: int) -> None:
        self.key = key
        self.fn = fn
        self.priority = priority
        self.future: Future = Future()
        self.preemptions = 0
        self._preempt = threading.Event()
        self._cancel = threading.Event()
        self._lane: pool.CancelToken | None = None    # the pool job's token while it runs
        self.seq = 0

    def should_stop(self) -> bool:
        lane = self._lane
        return (self._preempt.is_set() or self._cancel.is_set()
                or (lane is not None and lane.cancelled))

    def cancel(self) -> None:
        self._cancel.set()
        if not self.future.cancel() and self.future.running() and self._lane is None:
            # pre-empted and waiting to be redone: nothing runs it any more
            try:
                self.future.set_exception(CancelledError())
            except InvalidStateError:               # settled meanwhile
                pass

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


class SRQueue:
    """Priority queue of SR jobs with pre-emption of less urgent running work, scheduled
    on the app's :class:`~client.pool.WorkerPool` (no threads of its own).

    At most ``workers`` SR jobs run at once. Each runs in a pool job (a *lane*) of the
    pool class of its priority (:data:`POOL_CLASS`), so the pool's caps and cancel hold;
    a lane takes the most urgent SR job when it starts (not when it was queued), so the
    ranking of :meth:`retarget` decides. ``pool.cancel_where`` on a lane (its ``tag`` is
    the queue) cancels the SR job it runs."""

    def __init__(self, workers: int = 1, worker_pool: pool.WorkerPool | None = None) -> None:
        self.workers = max(1, workers)
        self.pool = worker_pool or pool.default_pool()
        self._heap: list = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._jobs: dict = {}            # key -> queued or running job
        self._running: set[SRJob] = set()
        self._lanes: set[pool.Job] = set()          # pool jobs queued or running
        self._stop = False
        self.log: list[tuple[str, object]] = []     # ("start"|"done"|"preempted", key)

    # ------------------------------------------------------------------ API
    def submit(self, key, fn: Callable[[Callable[[], bool]], object],
               priority: int = BACKGROUND) -> SRJob:
        """Queue ``fn(should_stop)`` under ``key``; an existing job for ``key`` is
        reused (and raised to ``priority`` if that is more urgent)."""
        with self._cv:
            job = self._jobs.get(key)
            if job is not None and not job.future.done() and not job.cancelled:
                if priority < job.priority:
                    self._raise(job, priority)
                    self._maybe_preempt(priority)
                    self._pump()
                return job
            job = SRJob(key, fn, priority)
            if self._stop:
                job.cancel()
                return job
            job.seq = next(self._seq)
            self._jobs[key] = job
            heapq.heappush(self._heap, (priority, job.seq, job))
            self._maybe_preempt(priority)
            self._pump()
            return job

    def retarget(self, view: set, near: set = frozenset(), drop_others: bool = False) -> None:
        """The view moved: jobs for ``view`` keys become VIEW, ``near`` NEAR, the others
        BACKGROUND (or are dropped)."""
        with self._cv:
            for key, job in list(self._jobs.items()):
                if job.future.done():
                    continue
                want = VIEW if key in view else NEAR if key in near else BACKGROUND
                if want == BACKGROUND and drop_others and job not in self._running:
                    job.cancel()
                    continue
                if want != job.priority:
                    if job in self._running:
                        job.priority = want
                    else:
                        self._raise(job, want)
            self._rebuild()
            self._maybe_preempt(min((j.priority for j in self._queued()), default=BACKGROUND))
            self._pump()
            self._cv.notify_all()

    def pending(self) -> list:
        with self._cv:
            return [j.key for _, _, j in sorted(self._heap) if not j.future.done()]

    def wait_idle(self, timeout: float = 30.0) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: not self._running and not self._queued(), timeout)

    def shutdown(self, wait: float = 10.0) -> None:
        """Cancel every job, queued or running; wait (at most ``wait`` s) for the
        running ones to stop."""
        with self._cv:
            self._stop = True
            for _, _, j in self._heap:
                j.cancel()
            for j in self._running:
                j.cancel()
            self._heap.clear()
            lanes = list(self._lanes)
        for lane in lanes:
            if not self.pool.run_now(lane):       # a queued lane: it finds nothing to do
                lane.token.cancel()
        with self._cv:
            self._cv.wait_for(lambda: not self._lanes, wait)

    # ------------------------------------------------------------------ internals
    def _queued(self) -> list[SRJob]:
        return [j for _, _, j in self._heap if not j.future.done() and not j.cancelled]

    def _raise(self, job: SRJob, priority: int) -> None:
        job.priority = priority
        self._rebuild()

    def _rebuild(self) -> None:
        self._heap = [(j.priority, j.seq, j) for _, _, j in self._heap
                      if not j.future.done() and not j.cancelled]
        heapq.heapify(self._heap)

    def _maybe_preempt(self, priority: int) -> None:
        """A job of ``priority`` waits: if every lane is busy, stop the least urgent
        running job that is less urgent than it."""
        if len(self._running) < self.workers:
            return
        victims = [j for j in self._running if j.priority > priority and not j.should_stop()]
        if victims:
            v = max(victims, key=lambda j: (j.priority, j.seq))
            v._preempt.set()

    def _pump(self) -> None:
        """Keep one lane queued in the pool per waiting job, ``workers`` at most, each in
        the pool class of the most urgent waiting job (lock held)."""
        if self._stop:
            return
        queued = sorted(self._queued(), key=lambda j: (j.priority, j.seq))
        idle = [lane for lane in self._lanes if not lane.started]
        want = min(len(queued), self.workers - (len(self._lanes) - len(idle)))
        for k, lane in enumerate(idle):
            if k < want:                           # a lane still queued: the right class
                self.pool.reprioritize(lane, POOL_CLASS[queued[k].priority])
        for k in range(len(idle), want):
            cls = POOL_CLASS[queued[k].priority]
            # the lane starts with this lock: the holder is filled before it reads it
            holder: list = []
            lane = self.pool.submit(lambda tok, h=holder: self._lane(h[0], tok), cls, tag=self)
            holder.append(lane)
            if lane.future.cancelled():            # the pool is shut down: nothing runs
                self._drop_waiting(lambda j: True)
                return
            self._lanes.add(lane)
            lane.future.add_done_callback(lambda _f, ln=lane: self._lane_gone(ln))

    def _lane_gone(self, lane: pool.Job) -> None:
        """A lane ended or was cancelled while queued (pool.cancel_where, shutdown)."""
        with self._cv:
            self._lanes.discard(lane)
            if lane.future.cancelled():
                # the pool dropped a queued lane (cancel_where, shutdown): the jobs
                # waiting for a lane of its class are cancelled with it
                self._drop_waiting(lambda j: POOL_CLASS[j.priority] == lane.priority)
            self._cv.notify_all()

    def _drop_waiting(self, pred) -> None:
        for _, _, j in self._heap:
            if pred(j):
                j.cancel()
        self._rebuild()

    def _take(self) -> SRJob | None:
        """The most urgent waiting job (lock held); finished or cancelled ones leave."""
        while self._heap:
            job = heapq.heappop(self._heap)[2]
            if job.future.done() or job.cancelled:
                if self._jobs.get(job.key) is job:
                    del self._jobs[job.key]
                if job.future.running():           # pre-empted, then cancelled
                    try:
                        job.future.set_exception(CancelledError())
                    except InvalidStateError:      # settled by SRJob.cancel meanwhile
                        pass
                continue
            if not job.future.running() and not job.future.set_running_or_notify_cancel():
                continue                           # (a requeued job's future is running)
            return job
        return None

    def _lane(self, lane: pool.Job, token: pool.CancelToken) -> None:
        """One pool job: run the most urgent SR job, then leave (the pool decides what
        runs next; :meth:`_pump` queues the next lane)."""
        with self._cv:
            job = None if self._stop or token.cancelled else self._take()
            if job is None:
                self._lanes.discard(lane)
                self._pump()
                self._cv.notify_all()
                return
            job._preempt.clear()
            job._lane = token
            self._running.add(job)
            self.log.append(("start", job.key))
        try:
            result, error = job.fn(job.should_stop), None
        except SRCancelled:
            result, error = None, SRCancelled()
        except BaseException as e:  # delivered through the future
            result, error = None, e
        with self._cv:
            job._lane = None
            self._running.discard(job)
            self._lanes.discard(lane)
            requeue = (isinstance(error, SRCancelled) and not job.cancelled
                       and not self._stop and not token.cancelled)
            if requeue:
                # back in the queue, first of its class; its future stays pending
                job.preemptions += 1
                self.log.append(("preempted", job.key))
                heapq.heappush(self._heap, (job.priority, job.seq, job))
            else:
                if self._jobs.get(job.key) is job:
                    del self._jobs[job.key]
                self.log.append(("done", job.key))
            self._pump()
            self._cv.notify_all()
        if requeue or job.future.done():           # (cancelled by SRJob.cancel meanwhile)
            return
        try:
            if job.cancelled or token.cancelled or isinstance(error, SRCancelled):
                job._cancel.set()
                job.future.set_exception(CancelledError())
            elif error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
        except InvalidStateError:                   # settled by SRJob.cancel meanwhile
            pass


# --------------------------------------------------------------------------- tiles
@dataclass
class GeneratedTile:
    """A super-resolved tile: ``generated`` is always True and travels with the pixels."""

    pixels: np.ndarray
    scale: int
    key: tuple
    generated: bool = field(default=True, init=False)

    @property
    def label(self) -> str:
        return f"SR x{self.scale} - generated"


def png_with_text(rgb: np.ndarray, text: dict[str, str]) -> bytes:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_png_with_text(data: bytes) -> tuple[np.ndarray, dict[str, str]]:
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    return np.asarray(im.convert("RGB")), dict(getattr(im, "text", {}) or {})


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _safe_part(name: str, what: str) -> str:
    """``name`` as one path component (a UID, a hash); refuses anything else."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{what} {name!r} cannot name a cache folder")
    return name


class SRTileCache:
    """Generated tiles on disk (one folder per slide): in the server's temporary tier with
    a ``catalogue`` (its ``temp_tile`` rows hold the checksums), or in a client-side
    folder without one (a ``<tile>.png.sha256`` sidecar holds the checksum)."""

    def __init__(self, root: Path, catalogue=None, slide_pk: int | None = None,
                 slide_uid: str = "slide") -> None:
        self.dir = Path(root) / _safe_part(slide_uid, "slide UID")
        self.cat = catalogue
        self.slide_pk = slide_pk
        self._lock = threading.Lock()
        self.hits = 0
        self.writes = 0

    @property
    def catalogued(self) -> bool:
        return self.cat is not None and self.slide_pk is not None

    @staticmethod
    def name(key: tuple) -> str:
        return "sr-" + "-".join(str(k) for k in key) + ".png"

    def _expected_sha(self, name: str) -> str | None:
        if self.catalogued:
            row = self.cat.temp_tile(self.slide_pk, name)
            return row["sha256"] if row is not None else None
        try:
            return (self.dir / (name + ".sha256")).read_text().strip()
        except OSError:
            return None

    def get(self, key: tuple, scale: int, generator: str | None = None) -> GeneratedTile | None:
        """The cached tile of ``key``, or None (absent, altered, or — when ``generator``
        is given — made by other weights than those now shipped)."""
        name = self.name(key)
        try:
            data = (self.dir / name).read_bytes()
        except OSError:
            return None
        if self._expected_sha(name) != hashlib.sha256(data).hexdigest():
            return None                     # unrecorded or altered: regenerated
        try:
            px, text = read_png_with_text(data)
        except Exception:  # noqa: BLE001 - damaged cache entry: regenerate
            return None
        if "MedView-Generated" not in text:
            return None
        if generator and text.get("MedView-Generator") != generator:
            return None                     # other weights: regenerated
        self.hits += 1
        if not self.catalogued:             # recency for prune_client_tiles
            try:
                os.utime(self.dir)
            except OSError:
                pass
        return GeneratedTile(px, scale, key)

    def put(self, tile: GeneratedTile, generator: str | None = None) -> None:
        from imaging.files import write_atomic

        text = {"MedView-Generated": GENERATED_TEXT.format(scale=tile.scale),
                "Software": "MedView pathology super-resolution"}
        if generator:
            text["MedView-Generator"] = generator       # the weights' SHA-256 (16 digits)
        data = png_with_text(tile.pixels, text)
        name = self.name(tile.key)
        with self._lock:
            sha = write_atomic(self.dir / name, data)
            if self.catalogued:
                self.cat.add_temp_tile(self.slide_pk, name, str(self.dir / name), sha, len(data))
            else:                           # the checksum last: a torn pair is a miss
                write_atomic(self.dir / (name + ".sha256"), sha.encode())
            self.writes += 1


def client_namespace(base_url: str, user: str | None) -> str:
    """The folder name of one server and user in the client-side SR cache."""
    return hashlib.sha256(f"{base_url.rstrip('/')}\n{user or ''}".encode()).hexdigest()[:20]


def client_tile_cache(root: str | Path, base_url: str, user: str | None,
                      slide_uid: str) -> SRTileCache:
    """The client-side cache of the generated tiles of one slide of a remote server."""
    return SRTileCache(Path(root) / client_namespace(base_url, user), slide_uid=slide_uid)


def prune_client_tiles(root: str | Path, max_bytes: int, keep: set[Path] = frozenset()) -> int:
    """Keep the client-side SR folder under ``max_bytes``: whole slide folders, least
    recently used first (``keep``: folders in use), are deleted; returns bytes freed."""
    import shutil

    folders = []
    for ns in Path(root).iterdir() if Path(root).is_dir() else []:
        for d in ns.iterdir() if ns.is_dir() else []:
            if d.is_dir():
                size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
                folders.append((d.stat().st_mtime, size, d))
    total = sum(f[1] for f in folders)
    freed = 0
    for _mtime, size, d in sorted(folders, key=lambda f: f[0]):
        if total - freed <= max_bytes:
            break
        if d in keep:
            continue
        shutil.rmtree(d, ignore_errors=True)
        freed += size
    return freed


def purge_client_tiles(root: str | Path, base_url: str, user: str | None,
                       slides: list[dict]) -> int:
    """Delete the client-side generated tiles of the slides (catalogue rows as the server
    lists them) whose patient is discharged; returns the tiles deleted."""
    import shutil

    base = Path(root) / client_namespace(base_url, user)
    n = 0
    for row in slides:
        if row.get("patient_status") != "discharged":
            continue
        try:
            d = base / _safe_part(row.get("slide_uid"), "slide UID")
        except ValueError:
            continue
        if d.is_dir():
            n += sum(1 for p in d.iterdir() if p.suffix == ".png")
            shutil.rmtree(d, ignore_errors=True)
    return n


class SRTileService:
    """Super-resolved tiles of one slide: level-0 pixels in, generated tiles out.

    ``read_level0(x, y, w, h)`` returns scanned level-0 pixels (white outside). A tile of
    the virtual level ``-k`` (scale ``s = 2**k``) covers ``tile/s`` level-0 pixels."""

    def __init__(self, read_level0: Callable[[int, int, int, int], np.ndarray], *,
                 width: int, height: int, tile: int = 512, margin: int = 8,
                 queue: SRQueue | None = None, cache: SRTileCache | None = None) -> None:
        self.read = read_level0
        self.width, self.height = width, height
        self.tile = tile
        self.margin = margin
        self.queue = queue or SRQueue(1)
        self._own_queue = queue is None
        self.cache = cache
        self._mem: OrderedDict = OrderedDict()      # recent results (the view keeps its own)
        self._mem_max = 128
        self._mem_lock = threading.Lock()

    def _remember(self, t: GeneratedTile) -> GeneratedTile:
        with self._mem_lock:
            self._mem[t.key] = t
            self._mem.move_to_end(t.key)
            while len(self._mem) > self._mem_max:
                self._mem.popitem(last=False)
        return t

    def grid(self, scale: int) -> tuple[int, int]:
        """(cols, rows) of the virtual level at ``scale``."""
        return -(-self.width * scale // self.tile), -(-self.height * scale // self.tile)

    def compute(self, scale: int, col: int, row: int,
                should_stop: Callable[[], bool] = lambda: False) -> GeneratedTile:
        key = (scale, col, row)
        hit = self.cached(scale, col, row)
        if hit is not None:
            return hit
        gen = load_generator(scale)
        if self.cache is not None:
            hit = self.cache.get(key, scale, gen.weights_id)
            if hit is not None:
                return self._remember(hit)
        n = self.tile // scale
        m = self.margin
        src = self.read(col * n - m, row * n - m, n + 2 * m, n + 2 * m)
        px = gen.upscale(src, should_stop)[m * scale: (m + n) * scale, m * scale: (m + n) * scale]
        t = GeneratedTile(px, scale, key)
        if self.cache is not None:
            self.cache.put(t, gen.weights_id)
        return self._remember(t)

    def request(self, scale: int, col: int, row: int, priority: int = VIEW) -> SRJob:
        return self.queue.submit((scale, col, row),
                                 lambda stop, s=scale, c=col, r=row: self.compute(s, c, r, stop),
                                 priority)

    def cached(self, scale: int, col: int, row: int) -> GeneratedTile | None:
        with self._mem_lock:
            return self._mem.get((scale, col, row))

    def close(self) -> None:
        if self._own_queue:
            self.queue.shutdown()
