"""Worker pool: priority classes, caps, cancellation."""
from __future__ import annotations

import threading
import time

import pytest

from client.pool import BACKGROUND, INTERACTION, PREFETCH, VISIBLE, CancelToken, WorkerPool
from gates import Gated
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


def test_background_class_has_its_own_cap():
    pool = WorkerPool(workers=3, caps={INTERACTION: 3, VISIBLE: 2, PREFETCH: 2, BACKGROUND: 1})
    try:
        bg = Gated()
        jobs = [pool.submit(bg, BACKGROUND) for _ in range(3)]
        assert bg.first.wait(WAIT_S)
        # two workers are free, yet no second background job takes one
        assert pool.submit(lambda tok: "ok", INTERACTION).future.result(WAIT_S) == "ok"
        assert pool.running(BACKGROUND) == 1
        bg.gate.set()
        assert all(j.future.result(WAIT_S) for j in jobs)
        assert bg.peak == 1
    finally:
        pool.shutdown()


def test_a_job_waiting_on_sub_jobs_cannot_starve_a_pool_of_one():
    pool = WorkerPool(workers=1)
    try:
        def outer(tok):
            # sub-jobs of the same pool, whose only worker runs this very job; one level
            # nested again
            return pool.map(lambda n: sum(pool.map(lambda k: k * n, range(4), INTERACTION)),
                            range(6), INTERACTION)

        job = pool.submit(outer, INTERACTION)
        assert job.future.result(WAIT_S) == [6 * n for n in range(6)]
        # a job queued behind a busy worker is run by the caller that needs it
        gate = threading.Event()
        blocker = pool.submit(lambda tok: gate.wait(WAIT_S), INTERACTION)
        later = pool.submit(lambda tok: threading.current_thread().name, PREFETCH)
        assert pool.run_now(later)
        assert later.future.result(0) == threading.current_thread().name
        assert not pool.run_now(later)               # once only
        gate.set()
        blocker.future.result(WAIT_S)
    finally:
        pool.shutdown()


def test_map_spreads_over_free_workers_and_raises_the_first_error():
    pool = WorkerPool(workers=2, name="maptest")
    try:
        names = set()
        barrier = threading.Barrier(2, timeout=WAIT_S)

        def one(n):
            names.add(threading.current_thread().name)
            if n < 2:
                barrier.wait()          # two items run at the same time, or this breaks
            return n

        assert pool.map(one, range(6), VISIBLE, parallel=2) == list(range(6))
        assert any(n.startswith("maptest-") for n in names)
        assert threading.current_thread().name in names     # the caller worked too

        def bad(n):
            if n == 3:
                raise ValueError("three")
            return n

        with pytest.raises(ValueError, match="three"):
            pool.map(bad, range(5), VISIBLE)
    finally:
        pool.shutdown()


def test_closing_a_batch_early_cancels_what_has_not_started():
    pool = WorkerPool(workers=1)
    try:
        gate = threading.Event()
        blocker = pool.submit(lambda tok: gate.wait(WAIT_S), INTERACTION)   # the worker
        ran = []
        gen = pool.imap_unordered(lambda n: ran.append(n) or n, range(5), VISIBLE, parallel=3)
        first = next(gen)                    # run by this thread
        assert first.result(0) in range(5)
        gen.close()
        gate.set()
        blocker.future.result(WAIT_S)
        pool.submit(lambda tok: None, PREFETCH).future.result(WAIT_S)   # after the rest
        assert len(ran) == 1
    finally:
        pool.shutdown()


def test_shared_token_cancels_a_job_and_its_sub_jobs():
    pool = WorkerPool(workers=2)
    try:
        token = CancelToken()
        started = threading.Event()

        def until_cancelled(tok):
            started.set()
            while not tok.cancelled:
                threading.Event().wait(0.01)
            return "stopped"

        a = pool.submit(until_cancelled, VISIBLE, tag="load", token=token)
        assert started.wait(WAIT_S)
        b = pool.submit(lambda tok: "ran", BACKGROUND, tag="other", token=token)
        pool.cancel_where(lambda j: j.tag == "load")
        assert token.cancelled and a.future.result(WAIT_S) == "stopped"
        assert b.token.cancelled
    finally:
        pool.shutdown()
