"""A worker pool with priority classes (Cornerstone's request pool, in threads).

Classes, most urgent first: INTERACTION (what the user looks at), VISIBLE (thumbnails,
other panes), PREFETCH. Each class has its own concurrency cap so background work never
takes every worker. Queued jobs can be cancelled or filtered out; a running job gets a
cancel token it is expected to poll between steps.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
from concurrent.futures import Future
from typing import Callable

log = logging.getLogger("medview.pool")

INTERACTION, VISIBLE, PREFETCH = 0, 1, 2


class CancelToken:
    def __init__(self) -> None:
        self._ev = threading.Event()

    def cancel(self) -> None:
        self._ev.set()

    @property
    def cancelled(self) -> bool:
        return self._ev.is_set()


class Job:
    def __init__(self, fn: Callable, priority: int, tag=None) -> None:
        self.fn = fn
        self.priority = priority
        self.tag = tag
        self.token = CancelToken()
        self.future: Future = Future()

    def cancel(self) -> None:
        self.token.cancel()
        self.future.cancel()


class WorkerPool:
    def __init__(self, workers: int = 4, caps: dict[int, int] | None = None) -> None:
        self.caps = caps or {INTERACTION: workers, VISIBLE: max(1, workers - 1),
                             PREFETCH: max(1, workers // 2)}
        self._heap: list = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._running = {INTERACTION: 0, VISIBLE: 0, PREFETCH: 0}
        self._stop = False
        self._active: set[Job] = set()
        self._threads = [threading.Thread(target=self._loop, name=f"medview-worker-{i}",
                                          daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[[CancelToken], object], priority: int = VISIBLE, tag=None) -> Job:
        """Queue ``fn(token)``; returns the Job (``job.future`` has the result)."""
        job = Job(fn, priority, tag)
        with self._cv:
            heapq.heappush(self._heap, (priority, next(self._seq), job))
            self._cv.notify()
        return job

    def cancel_where(self, pred: Callable[[Job], bool]) -> int:
        """Cancel queued and running jobs matching pred; returns how many."""
        n = 0
        with self._cv:
            for _, _, job in self._heap:
                if pred(job) and not job.token.cancelled:
                    job.cancel()
                    n += 1
            for job in list(self._active):
                if pred(job) and not job.token.cancelled:
                    job.token.cancel()
                    n += 1
        return n



    def _next(self) -> Job | None:
        # highest priority job whose class is under its cap
        skipped = []
        job = None
        while self._heap:
            item = heapq.heappop(self._heap)
            j = item[2]
            if j.future.cancelled():
                continue
            if self._running[j.priority] < self.caps.get(j.priority, 1):
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
                self._running[job.priority] += 1
                self._active.add(job)
            try:
                if job.future.set_running_or_notify_cancel():
                    try:
                        job.future.set_result(job.fn(job.token))
                    except BaseException as e:  # delivered through the future
                        job.future.set_exception(e)
            finally:
                with self._cv:
                    self._running[job.priority] -= 1
                    self._active.discard(job)
                    self._cv.notify_all()

    def shutdown(self, wait: bool = True) -> None:
        with self._cv:
            self._stop = True
            for _, _, job in self._heap:
                job.cancel()
            self._heap.clear()
            self._cv.notify_all()
        if wait:
            for t in self._threads:
                t.join(timeout=5)
