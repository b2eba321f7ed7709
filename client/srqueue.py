"""Super-resolution jobs: a priority queue with pre-emption, and the generated-tile cache.

:class:`SRQueue` runs jobs on a few worker threads. Priorities, most urgent first:
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
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from imaging.sr import SRCancelled, load_generator

log = logging.getLogger("medview.imaging.sr")

VIEW, NEAR, BACKGROUND = 0, 1, 2
PRIORITY_NAMES = {VIEW: "view", NEAR: "near", BACKGROUND: "background"}
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
        self.seq = 0

    def should_stop(self) -> bool:
        return self._preempt.is_set() or self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()
        self.future.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


class SRQueue:
    """Priority queue of SR jobs with pre-emption of less urgent running work."""

    def __init__(self, workers: int = 1) -> None:
        self._heap: list = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._jobs: dict = {}            # key -> queued or running job
        self._running: set[SRJob] = set()
        self._stop = False
        self.log: list[tuple[str, object]] = []     # ("start"|"done"|"preempted", key)
        self._threads = [threading.Thread(target=self._loop, name=f"sr-worker-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for t in self._threads:
            t.start()

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
                return job
            job = SRJob(key, fn, priority)
            job.seq = next(self._seq)
            self._jobs[key] = job
            heapq.heappush(self._heap, (priority, job.seq, job))
            self._maybe_preempt(priority)
            self._cv.notify()
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
            self._cv.notify_all()

    def pending(self) -> list:
        with self._cv:
            return [j.key for _, _, j in sorted(self._heap) if not j.future.done()]

    def wait_idle(self, timeout: float = 30.0) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: not self._running and not self._queued(), timeout)

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            for _, _, j in self._heap:
                j.cancel()
            for j in self._running:
                j.cancel()
            self._heap.clear()
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=10)

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
        """A job of ``priority`` waits: if no worker is free, stop the least urgent
        running job that is less urgent than it."""
        if len(self._running) < len(self._threads):
            return
        victims = [j for j in self._running if j.priority > priority and not j.should_stop()]
        if victims:
            v = max(victims, key=lambda j: (j.priority, j.seq))
            v._preempt.set()

    def _loop(self) -> None:
        while True:
            with self._cv:
                job = None
                while not self._stop:
                    while self._heap and (self._heap[0][2].future.done() or self._heap[0][2].cancelled):
                        dead = heapq.heappop(self._heap)[2]
                        self._jobs.pop(dead.key, None) if self._jobs.get(dead.key) is dead else None
                        if dead.future.running():      # pre-empted, then cancelled
                            dead.future.set_exception(CancelledError())
                    if self._heap:
                        job = heapq.heappop(self._heap)[2]
                        break
                    self._cv.wait(0.5)
                if self._stop or job is None:
                    return
                # a requeued (pre-empted) job's future is already running
                if not job.future.running() and not job.future.set_running_or_notify_cancel():
                    continue
                job._preempt.clear()
                self._running.add(job)
                self.log.append(("start", job.key))
            try:
                result, error = job.fn(job.should_stop), None
            except SRCancelled:
                result, error = None, SRCancelled()
            except BaseException as e:  # delivered through the future
                result, error = None, e
            with self._cv:
                self._running.discard(job)
                if isinstance(error, SRCancelled) and not job.cancelled and not self._stop:
                    # back in the queue, first of its class; its future stays pending
                    job.preemptions += 1
                    self.log.append(("preempted", job.key))
                    heapq.heappush(self._heap, (job.priority, job.seq, job))
                    self._cv.notify_all()
                    continue
                self._jobs.pop(job.key, None)
                self.log.append(("done", job.key))
                self._cv.notify_all()
            if job.cancelled or isinstance(error, SRCancelled):
                job.future.set_exception(CancelledError())
            elif error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)


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
