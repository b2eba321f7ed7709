"""Worker pool: priority classes, caps, cancellation."""
from __future__ import annotations

import threading
import time

import pytest

from client.pool import INTERACTION, PREFETCH, VISIBLE, WorkerPool


def test_priority_order_and_cancel_queued():
    pool = WorkerPool(workers=1)
    gate = threading.Event()
    order = []
    pool.submit(lambda tok: gate.wait(5), INTERACTION)         # occupies the worker
    time.sleep(0.05)
    jobs = [pool.submit(lambda tok, n=n: order.append(n), p, tag=n)
            for n, p in (("pre", PREFETCH), ("vis", VISIBLE), ("now", INTERACTION),
                         ("stale", INTERACTION))]
    assert pool.cancel_where(lambda j: j.tag == "stale") == 1
    gate.set()
    for j in jobs[:3]:
        j.future.result(5)
    assert order == ["now", "vis", "pre"]
    assert jobs[3].future.cancelled()
    pool.shutdown()


def test_running_job_sees_cancel_token_and_errors_propagate():
    pool = WorkerPool(workers=2)
    started = threading.Event()

    def long(tok):
        started.set()
        while not tok.cancelled:
            time.sleep(0.01)
        return "stopped"

    job = pool.submit(long, VISIBLE, tag="long")
    started.wait(5)
    pool.cancel_where(lambda j: j.tag == "long")
    assert job.future.result(5) == "stopped"

    def boom(tok):
        raise ValueError("bad")

    with pytest.raises(ValueError):
        pool.submit(boom).future.result(5)
    pool.shutdown()


def test_prefetch_cap_leaves_room_for_interaction():
    pool = WorkerPool(workers=2, caps={INTERACTION: 2, VISIBLE: 1, PREFETCH: 1})
    gate = threading.Event()
    running = []
    for _ in range(3):
        pool.submit(lambda tok: (running.append(1), gate.wait(5)), PREFETCH)
    time.sleep(0.1)
    assert len(running) == 1                      # capped
    done = pool.submit(lambda tok: "ok", INTERACTION)
    assert done.future.result(5) == "ok"          # a free worker was kept for it
    gate.set()
    pool.shutdown()
