"""Worker pool: priority classes, caps, cancellation."""
from __future__ import annotations

import threading
import time

import pytest

from client.pool import INTERACTION, PREFETCH, VISIBLE, WorkerPool
from waits import WAIT_S


def test_priority_order_and_cancel_queued():
    pool = WorkerPool(workers=1)
    gate = threading.Event()
    order = []
    started = threading.Event()
    pool.submit(lambda tok: (started.set(), gate.wait(WAIT_S)), INTERACTION)   # the worker
    assert started.wait(WAIT_S)
    jobs = [pool.submit(lambda tok, n=n: order.append(n), p, tag=n)
            for n, p in (("pre", PREFETCH), ("vis", VISIBLE), ("now", INTERACTION),
                         ("stale", INTERACTION))]
    assert pool.cancel_where(lambda j: j.tag == "stale") == 1
    gate.set()
    for j in jobs[:3]:
        j.future.result(WAIT_S)
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
    assert started.wait(WAIT_S)
    pool.cancel_where(lambda j: j.tag == "long")
    assert job.future.result(WAIT_S) == "stopped"

    def boom(tok):
        raise ValueError("bad")

    with pytest.raises(ValueError):
        pool.submit(boom).future.result(WAIT_S)
    pool.shutdown()


def test_prefetch_cap_leaves_room_for_interaction():
    pool = WorkerPool(workers=2, caps={INTERACTION: 2, VISIBLE: 1, PREFETCH: 1})
    gate = threading.Event()
    running = []
    first = threading.Event()
    for _ in range(3):
        pool.submit(lambda tok: (running.append(1), first.set(), gate.wait(WAIT_S)), PREFETCH)
    assert first.wait(WAIT_S)
    done = pool.submit(lambda tok: "ok", INTERACTION)
    assert done.future.result(WAIT_S) == "ok"     # a free worker was kept for it
    assert len(running) == 1                      # and no second prefetch took it: capped
    gate.set()
    pool.shutdown()
