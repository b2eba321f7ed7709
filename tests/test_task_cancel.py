"""A viewer Task that runs in the worker pool is cancelled by the pool too
(``WorkerPool.cancel_where``), queued or running, and always ends (finished or failed)."""
from __future__ import annotations

import threading
from concurrent.futures import CancelledError

from client.pool import INTERACTION, PREFETCH, WorkerPool
from viewer.workers import Task


def test_cancel_where_stops_a_running_task_and_drops_a_queued_one(qtbot):
    pool = WorkerPool(workers=1, caps={INTERACTION: 1, PREFETCH: 1})
    try:
        started = threading.Event()
        seen = []

        def long_job(ctx):
            started.set()
            while not ctx.cancelled:          # polls its context, as tasks do
                threading.Event().wait(0.01)
            seen.append("stopped")
            return "stopped"

        running = Task(long_job, name="running", pool=pool, priority=PREFETCH)
        queued = Task(lambda ctx: seen.append("ran") or "ran", name="queued", pool=pool,
                      priority=PREFETCH)
        with qtbot.waitSignal(running.finished, timeout=20000) as fin, \
                qtbot.waitSignal(queued.failed, timeout=20000) as fail:
            running.start()
            assert started.wait(20)
            queued.start()
            n = pool.cancel_where(lambda job: isinstance(job.tag, Task))
            assert n == 2
        assert fin.args == ["stopped"]
        assert isinstance(fail.args[0], CancelledError)
        assert seen == ["stopped"]                       # the queued one never ran
        assert running.cancelled and queued.cancelled
        qtbot.waitUntil(lambda: running.done and queued.done, timeout=20000)
        assert running not in Task._live and queued not in Task._live
    finally:
        pool.shutdown()


def test_task_cancel_before_it_starts(qtbot):
    pool = WorkerPool(workers=1)
    gate = threading.Event()
    try:
        blocker = Task(lambda ctx: gate.wait(20), name="blocker", pool=pool).start()
        t = Task(lambda ctx: "ran", name="later", pool=pool)
        with qtbot.waitSignal(t.failed, timeout=20000):
            t.start()
            t.cancel()
        gate.set()
        qtbot.waitUntil(lambda: blocker.done, timeout=20000)
        assert t.result is None
    finally:
        gate.set()
        pool.shutdown()
