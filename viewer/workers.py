"""The Qt bridge: work off the UI thread, results back on it through queued signals.

- :class:`Task` runs one blocking function (log in, query the catalogue, import files,
  create the sample study, read the cache size...) on a worker thread and reports
  ``finished`` / ``failed`` / ``progress`` / ``message`` as signals.
- :class:`LoaderBridge` is a :class:`~client.series_loader.LoaderListener` whose every callback
  (made on a worker thread) becomes a signal; the connections are queued, so the slots
  run on the UI thread, in the order the callbacks were made.
- :class:`ThumbnailBridge` does the same for series thumbnails.

All of them go through one :class:`Dispatcher`: worker threads queue a call, and only a
no-argument "wake" signal crosses threads; the signals that carry Python objects are
emitted on the UI thread, in order, a time-boxed batch at a time (a burst of progress
reports never makes the event loop late).

The UI thread never decodes, reads files or waits on the network: it only connects
these signals to widgets.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable

import shiboken6
from PySide6.QtCore import QCoreApplication, QObject, Qt, QTimer, Signal

from client.pool import VISIBLE, CancelToken, WorkerPool

from client.series_loader import ImageStatus, LoaderListener, SeriesStatus, Stage

log = logging.getLogger("medview.workers")

__all__ = ["Dispatcher", "dispatcher", "TaskContext", "Task", "LoaderBridge",
           "ThumbnailBridge", "QUEUED"]

QUEUED = Qt.ConnectionType.QueuedConnection


class Dispatcher(QObject):
    """Runs calls posted from any thread on the UI thread, in posting order.

    A drain works for at most :attr:`budget_s` and then yields to the event loop, so a
    burst of progress reports never makes the UI late.
    """

    _wake = Signal()

    def __init__(self, parent: QObject | None = None, budget_s: float = 0.008) -> None:
        super().__init__(parent)
        self.budget_s = budget_s
        self._queue: deque = deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._wake.connect(self._drain, QUEUED)

    def post(self, fn: Callable, *args) -> None:
        """Call ``fn(*args)`` on the UI thread soon (callable from any thread)."""
        with self._lock:
            self._queue.append((fn, args))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._wake.emit()
        except RuntimeError:   # the application is gone: nothing will drain
            with self._lock:
                self._scheduled = False

    def _drain(self) -> None:
        deadline = time.perf_counter() + self.budget_s
        while True:
            with self._lock:
                if not self._queue:
                    self._scheduled = False
                    return
                fn, args = self._queue.popleft()
            try:
                fn(*args)
            except RuntimeError:   # a receiver was deleted (window closed)
                pass
            except Exception:  # noqa: BLE001 - a slot bug must not stop the others
                log.exception("UI callback failed")
            except BaseException:
                # (KeyboardInterrupt, a test's failure raised in a slot): the rest of
                # the queue still drains later, never left scheduled-but-asleep for ever
                QTimer.singleShot(0, self._drain)
                raise
            if time.perf_counter() > deadline:
                QTimer.singleShot(0, self._drain)   # still scheduled: more later
                return

    def pending(self) -> int:
        with self._lock:
            return len(self._queue)


_dispatcher: Dispatcher | None = None


def dispatcher() -> Dispatcher:
    """The application's dispatcher (create it on the UI thread, e.g. by making a
    :class:`Task` or a bridge there)."""
    global _dispatcher
    if _dispatcher is None or not shiboken6.isValid(_dispatcher):
        _dispatcher = Dispatcher(QCoreApplication.instance())
    return _dispatcher


class TaskContext:
    """Given to a task function: its cancel token and ways to report progress."""

    def __init__(self, task: "Task") -> None:
        self._task = task
        self.token = task.token

    @property
    def cancelled(self) -> bool:
        """Cancelled through the task, or through its pool job (``WorkerPool.cancel_where``)."""
        return self._task.cancelled

    def progress(self, done: int, total: int) -> None:
        self._task._emit(self._task.progress, int(done), int(total))

    def message(self, text: str) -> None:
        self._task._emit(self._task.message, str(text))


class Task(QObject):
    """Run ``fn(ctx: TaskContext)`` off the UI thread.

    With a ``pool`` the function runs as a pool job of ``priority``; without one it gets
    its own thread (for long jobs such as an import, which must not hold a pool worker).
    The task keeps itself alive until its result has been delivered.
    """

    finished = Signal(object)
    """The function's return value."""
    failed = Signal(object)
    """The exception it raised."""
    progress = Signal(int, int)
    message = Signal(str)

    _live: set["Task"] = set()
    _live_lock = threading.Lock()

    def __init__(self, fn: Callable[[TaskContext], Any], *, name: str = "task",
                 pool: WorkerPool | None = None, priority: int = VISIBLE,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.fn = fn
        self.name = name
        self.pool = pool
        self.priority = priority
        self.token = CancelToken()
        self._job = None                # the pool job, when the task runs in the pool
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        self._dispatch = dispatcher()
        self.finished.connect(self._delivered)
        self.failed.connect(self._delivered)

    def start(self) -> "Task":
        with Task._live_lock:
            Task._live.add(self)
        if self.pool is not None:
            self._job = self.pool.submit(lambda token: self._run(), self.priority, tag=self)
            # cancelled while still queued (by the task or by WorkerPool.cancel_where):
            # the function never runs, and the task still ends, with CancelledError
            self._job.future.add_done_callback(self._job_done)
        else:
            threading.Thread(target=self._run, name=f"medview-{self.name}", daemon=True).start()
        return self

    def cancel(self) -> None:
        """Ask the function to stop (it polls ``ctx.cancelled``); a task still queued in
        the pool never starts."""
        self.token.cancel()
        if self._job is not None:
            self._job.cancel()

    @property
    def cancelled(self) -> bool:
        return self.token.cancelled or (self._job is not None and self._job.token.cancelled)

    def _job_done(self, future) -> None:
        if future.cancelled():
            from concurrent.futures import CancelledError

            self.token.cancel()
            self.error = CancelledError(f"{self.name} cancelled before it started")
            self._emit(self.failed, self.error)

    def _run(self) -> None:
        ctx = TaskContext(self)
        try:
            result = self.fn(ctx)
        except BaseException as e:  # noqa: BLE001 - delivered to the UI as a signal
            if not isinstance(e, Exception):
                raise
            log.debug("task %s failed", self.name, exc_info=True)
            self.error = e
            self._emit(self.failed, e)
        else:
            self.result = result
            self._emit(self.finished, result)

    def _emit(self, signal, *args) -> None:
        self._dispatch.post(signal.emit, *args)

    def _delivered(self, *_args) -> None:
        self.done = True
        with Task._live_lock:
            Task._live.discard(self)


class LoaderBridge(QObject, LoaderListener):
    """A loader listener whose callbacks arrive on the UI thread as signals.

    Every signal carries the loader first, so the window can drop what an old loader
    (a series no longer shown) still reports.
    """

    opened = Signal(object, object, object, object)     # loader, info, images, statuses
    imageStatus = Signal(object, object)                # loader, ImageStatus
    seriesStatus = Signal(object, object)               # loader, SeriesStatus
    stageChanged = Signal(object, object, str, str)     # loader, Stage, state, message
    decoded = Signal(object, object)                    # loader, DecodedImage
    cineLevel = Signal(object, object)                  # loader, (res, layers)
    stateChanged = Signal(object, str)                  # loader, state
    failed = Signal(object, str)                        # loader, message

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._dispatch = dispatcher()

    def _emit(self, signal, *args) -> None:
        self._dispatch.post(signal.emit, *args)

    def on_opened(self, loader, info: dict, images: list[dict], statuses: list[ImageStatus]) -> None:
        self._emit(self.opened, loader, info, images, statuses)

    def on_image_status(self, loader, status: ImageStatus) -> None:
        self._emit(self.imageStatus, loader, status)

    def on_series_status(self, loader, status: SeriesStatus) -> None:
        self._emit(self.seriesStatus, loader, status)

    def on_stage(self, loader, stage: Stage, state: str, message: str) -> None:
        self._emit(self.stageChanged, loader, stage, state, message)

    def on_decoded(self, loader, image) -> None:
        self._emit(self.decoded, loader, image)

    def on_cine_level(self, loader, level) -> None:
        self._emit(self.cineLevel, loader, level)

    def on_state(self, loader, state: str) -> None:
        self._emit(self.stateChanged, loader, state)

    def on_failed(self, loader, message: str) -> None:
        self._emit(self.failed, loader, message)


class ThumbnailBridge(QObject):
    """Series thumbnails fetched in the pool, delivered as ``ready(uid, uint8 array)``."""

    ready = Signal(str, object)
    failed = Signal(str, str)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._tokens: dict[str, CancelToken] = {}
        self._pool: WorkerPool | None = None
        self._dispatch = dispatcher()

    def request(self, pool: WorkerPool, registry, uid: str, size: int = 64) -> None:
        """Fetch the thumbnail of series ``uid`` (once; again after :meth:`cancel_all`)."""
        from client.series_loader import fetch_thumbnail

        if uid in self._tokens:
            return
        self._pool = pool
        token = self._tokens[uid] = CancelToken()

        def job(_job_token) -> None:
            try:
                fetch_thumbnail(registry, uid, token, self._deliver, size)
            except Exception as e:  # noqa: BLE001 - a thumbnail is never worth a crash
                if not token.cancelled:
                    log.info("thumbnail of %s failed: %s", uid, e)
                    self._dispatch.post(self.failed.emit, uid, str(e))

        pool.submit(job, VISIBLE, tag=("thumbnail", uid))

    def _deliver(self, uid: str, array) -> None:
        self._dispatch.post(self.ready.emit, uid, array)

    def cancel_all(self) -> None:
        """Stop every thumbnail fetch (e.g. when the browser lists other series)."""
        for token in self._tokens.values():
            token.cancel()
        self._tokens.clear()
        if self._pool is not None:
            self._pool.cancel_where(
                lambda job: isinstance(job.tag, tuple) and job.tag[:1] == ("thumbnail",))
