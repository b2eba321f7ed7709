"""The worker pool with priority classes (Cornerstone's request pool, in threads).

Classes, most urgent first: INTERACTION (what the user looks at), VISIBLE (thumbnails,
other panes), PREFETCH, BACKGROUND (work nobody waits for: super-resolution of the rest
of a slide). Each class has its own concurrency cap so background work never takes every
worker. Queued jobs can be cancelled or filtered out; a running job gets a cancel token
it is expected to poll between steps.

One pool serves the whole app — stack, MPR, VR, slides and super-resolution alike
(:class:`viewer.services.Backend` makes it and installs it as :func:`default_pool`).

A job may split its work into sub-jobs and wait for them (:meth:`WorkerPool.map`,
:meth:`WorkerPool.imap_unordered`, :meth:`WorkerPool.run_now`). The waiting thread never
only waits while work remains: it takes items itself, or runs a sub-job that no worker
has taken yet, so a job waiting on sub-jobs of its own pool cannot starve it, even in a
pool of one worker.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future

log = logging.getLogger("medview.pool")

INTERACTION, VISIBLE, PREFETCH, BACKGROUND = 0, 1, 2, 3
CLASSES = (INTERACTION, VISIBLE, PREFETCH, BACKGROUND)
CLASS_NAMES = {INTERACTION: "interaction", VISIBLE: "visible", PREFETCH: "prefetch",
               BACKGROUND: "background"}


class CancelToken:
    def __init__(self) -> None:
        self._ev = threading.Event()

    def cancel(self) -> None:
        self._ev.set()

    @property
    def cancelled(self) -> bool:
        return self._ev.is_set()


class Job:
    """A queued computation: ``fn(token)``; ``future`` carries the result. ``token`` may
    be shared by several jobs (a loader and its sub-jobs): cancelling one cancels all."""

    def __init__(self, fn: Callable, priority: int, tag=None,
                 token: CancelToken | None = None) -> None:
        self.fn = fn
        self.priority = priority
        self.tag = tag
        self.token = token if token is not None else CancelToken()
        self.future: Future = Future()
        self.seq = 0
        self.started = False            # taken by a worker or by a waiting caller

    def cancel(self) -> None:
        self.token.cancel()
        self.future.cancel()


_END = object()


class WorkerPool:
    def __init__(self, workers: int = 4, caps: dict[int, int] | None = None,
                 name: str = "medview-worker") -> None:
        self.workers = max(1, int(workers))
        self.caps = caps or {INTERACTION: self.workers, VISIBLE: max(1, self.workers - 1),
                             PREFETCH: max(1, self.workers // 2),
                             BACKGROUND: max(1, self.workers // 4)}
        self._heap: list = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._running = dict.fromkeys(CLASSES, 0)
        self._stop = False
        self._active: set[Job] = set()
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
                         for i in range(self.workers)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ jobs
    def submit(self, fn: Callable[[CancelToken], object], priority: int = VISIBLE, tag=None,
               token: CancelToken | None = None) -> Job:
        """Queue ``fn(token)``; returns the Job (``job.future`` has the result)."""
        job = Job(fn, priority, tag, token)
        with self._cv:
            stopped = self._stop
            if not stopped:
                job.seq = next(self._seq)
                heapq.heappush(self._heap, (priority, job.seq, job))
                self._cv.notify()
        if stopped:
            job.future.cancel()
        return job

    def cancel_where(self, pred: Callable[[Job], bool]) -> int:
        """Cancel queued and running jobs matching pred; returns how many."""
        with self._cv:
            queued = [job for _, _, job in self._heap
                      if not job.started and not job.future.cancelled() and pred(job)]
            running = [job for job in self._active if not job.token.cancelled and pred(job)]
        # outside the lock: a future's callbacks may take their owner's lock, and the
        # owner may be submitting (holding its lock, wanting this one)
        for job in queued:
            job.cancel()
        for job in running:
            job.token.cancel()
        return len(queued) + len(running)

    def reprioritize(self, job: Job, priority: int) -> bool:
        """Move a job that is still queued to another class; False once it has started."""
        with self._cv:
            if job.started or job.future.done():
                return False
            if job.priority != priority:
                job.priority = priority
                self._heap = [(j.priority, j.seq, j) for _, _, j in self._heap]
                heapq.heapify(self._heap)
                self._cv.notify_all()
            return True

    def run_now(self, job: Job) -> bool:
        """Run ``job`` on this thread if no worker has taken it yet (a caller that needs
        it done and would otherwise wait); False if it has started or was cancelled."""
        with self._cv:
            if not self._claim(job):
                return False
        self._execute(job)
        return True

    # ------------------------------------------------------------------ batches
    def imap_unordered(self, fn: Callable[[object], object], items: Iterable,
                       priority: int = VISIBLE, *, parallel: int | None = None, tag=None,
                       token: CancelToken | None = None) -> Iterator[Future]:
        """``fn(item)`` for every item, on free workers of ``priority``'s class *and* on
        this thread; yields each item's future as it completes (``.result()`` gives the
        value or raises). At most ``parallel`` items run at once (this thread included;
        default: the class's cap plus this thread).

        ``parallel - 1`` helper jobs are queued; each, and this thread, takes the next
        item until none is left, so nobody waits for a hand-out. This thread never only
        waits while items remain: with no worker free it does them all, so a pool job may
        call this without risk of starving the pool. Closing the generator early stops
        the helpers after their current item (the ones not started never run)."""
        it = iter(items)
        width = max(1, parallel if parallel is not None else self.caps.get(priority, 1) + 1)
        lock = threading.Lock()
        results: queue.SimpleQueue = queue.SimpleQueue()
        state = {"taken": 0, "exhausted": False, "closed": False}

        def take():
            with lock:
                if state["exhausted"] or state["closed"]:
                    return _END
                x = next(it, _END)
                if x is _END:
                    state["exhausted"] = True
                else:
                    state["taken"] += 1
                return x

        def helper(_token) -> None:
            while (x := take()) is not _END:
                results.put(_run_inline(fn, x))

        helpers = [self.submit(helper, priority, tag, token) for _ in range(width - 1)]
        given = 0
        try:
            while True:
                try:
                    fut = results.get_nowait()
                except queue.Empty:
                    x = take()
                    if x is not _END:                   # this thread's share
                        fut = _run_inline(fn, x)
                    else:
                        with lock:
                            if given == state["taken"]:
                                return
                        fut = results.get()             # a helper's item, running now
                given += 1
                yield fut
        finally:
            state["closed"] = True
            with self._cv:
                unstarted = [j for j in helpers if self._claim(j)]
            for j in unstarted:
                j.future.cancel()

    def map(self, fn: Callable[[object], object], items: Iterable, priority: int = VISIBLE, *,
            parallel: int | None = None, tag=None, token: CancelToken | None = None) -> list:
        """``[fn(item) for item in items]`` in parallel (see :meth:`imap_unordered`);
        results in order; the first error is raised."""
        indexed = list(enumerate(items))
        out: list = [None] * len(indexed)
        batch = self.imap_unordered(lambda ix: (ix[0], fn(ix[1])), indexed, priority,
                                    parallel=parallel, tag=tag, token=token)
        try:
            for fut in batch:
                i, value = fut.result()
                out[i] = value
        finally:
            batch.close()
        return out

    def mapper(self, priority: int = VISIBLE, parallel: int | None = None):
        """A ``map(fn, items)`` callable running on this pool (for the compute layer,
        which cannot import the pool: e.g. :attr:`imaging.mpr.MprState.mapper`)."""
        return lambda fn, items: self.map(fn, items, priority, parallel=parallel)

    # ------------------------------------------------------------------ internals
    def _claim(self, job: Job) -> bool:
        """Mark a queued job taken (lock held); it stays in the heap, skipped later."""
        if job.started or job.future.done():
            return False
        job.started = True
        return True

    def _execute(self, job: Job) -> None:
        """Run a claimed job on this thread (outside the lock)."""
        with self._cv:
            self._active.add(job)
        try:
            if job.future.set_running_or_notify_cancel():
                try:
                    job.future.set_result(job.fn(job.token))
                except BaseException as e:  # delivered through the future
                    job.future.set_exception(e)
        finally:
            with self._cv:
                self._active.discard(job)
                self._cv.notify_all()

    def _next(self) -> Job | None:
        # highest priority job whose class is under its cap
        skipped = []
        job = None
        while self._heap:
            item = heapq.heappop(self._heap)
            j = item[2]
            if j.started or j.future.cancelled():
                continue
            if self._running.get(j.priority, 0) < self.caps.get(j.priority, 1):
                job = j
                break
            skipped.append(item)
        for item in skipped:
            heapq.heappush(self._heap, item)
        return job

    def _loop(self) -> None:
        while True:
            with self._cv:
                job = None
                while not self._stop and (job := self._next()) is None:
                    self._cv.wait(0.5)
                if self._stop:
                    return
                job.started = True
                prio = job.priority
                self._running[prio] = self._running.get(prio, 0) + 1
            try:
                self._execute(job)
            finally:
                with self._cv:
                    self._running[prio] -= 1
                    self._cv.notify_all()

    def running(self, priority: int) -> int:
        """Jobs of ``priority``'s class running on the pool's workers now."""
        with self._cv:
            return self._running.get(priority, 0)

    def shutdown(self, wait: bool = True) -> None:
        with self._cv:
            self._stop = True
            queued = [job for _, _, job in self._heap if not job.started]
            self._heap.clear()
            running = list(self._active)
            self._cv.notify_all()
        for job in queued:                  # outside the lock (see cancel_where)
            job.cancel()
        for job in running:
            job.token.cancel()
        uninstall_default_pool(self)
        if wait:
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join(timeout=5)

    @property
    def closed(self) -> bool:
        return self._stop


def _run_inline(fn, x) -> Future:
    fut: Future = Future()
    fut.set_running_or_notify_cancel()
    try:
        fut.set_result(fn(x))
    except BaseException as e:  # delivered through the future
        fut.set_exception(e)
    return fut


# --------------------------------------------------------------------------- the one pool
_default: WorkerPool | None = None
_default_lock = threading.Lock()


def install_default_pool(pool: WorkerPool) -> None:
    """Make ``pool`` the process's one pool (the app's :class:`viewer.services.Backend`
    does, so every part that is not handed a pool explicitly still uses it)."""
    global _default
    with _default_lock:
        _default = pool


def uninstall_default_pool(pool: WorkerPool) -> None:
    global _default
    with _default_lock:
        if _default is pool:
            _default = None


def default_pool() -> WorkerPool:
    """The process's one pool: the installed one, else one made on first use (headless
    commands, benches and tests that have no app)."""
    global _default
    with _default_lock:
        if _default is None or _default.closed:
            _default = WorkerPool(4)
        return _default
