"""One worker pool for the whole viewer (issue 12): an MPR window loading a server series
(transfer, decodes, reslices) and a slide window generating super-resolved tiles run all
their work in the pool they are given, and no thread of their own exists."""
from __future__ import annotations

import os
import re
import threading

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from client.pool import INTERACTION, WorkerPool  # noqa: E402
from imaging.slide_sample import make_ihc_slide  # noqa: E402
from imaging.tilesource import ArraySource  # noqa: E402

from pathology_util import new_store  # noqa: E402
from waits import WAIT_MS  # noqa: E402

STRAY = re.compile(r"^(sr-worker|medview-mpr|medview-volume|medview-reslice)")


def test_mpr_and_slides_run_in_the_one_pool(qtbot, server, ct_series_uid, tmp_path):
    from client.session import Session
    from client.slides import LocalSlide
    from viewer.mprlayout import describe_series, open_series
    from viewer.slideview import open_slide_window

    pool = WorkerPool(4, name="onepool")
    seen: set[str] = set()
    workers: set[str] = set()

    def look(*_args) -> None:
        seen.update(t.name for t in threading.enumerate())

    session = Session(server.url)
    st = new_store(tmp_path / "slides")
    try:
        img, _assoc = make_ihc_slide(512, 384, seed=3)
        low = st.ingest(ArraySource(img, mpp=2.0), patient_id="P1", accession="A1",
                        tile_size=256, label="low", run_qc=False)
        # a progressive MPR load with reslices in the background (not sync)
        win = open_series(session, ct_series_uid, series=describe_series(session, ct_series_uid),
                          show=False, vr=False, show_errors=False, pool=pool)
        qtbot.addWidget(win)
        assert win.runner.pool is pool and win.mpr.scheduler.pool is pool
        win.resize(600, 500)
        win.show()
        win.runner.event.connect(look)
        win.mpr.views["axial"].rendered.connect(look)
        state = win.mpr.state
        render = state.render

        def traced(*a, **kw):             # the reslices: on the pool's threads
            workers.add(threading.current_thread().name)
            return render(*a, **kw)
        state.render = traced
        events = win.load_events
        qtbot.waitUntil(lambda: bool(events) and events[-1].final, timeout=WAIT_MS)
        win.mpr.state.set_center(win.mpr.state.center + 1.0)      # reslice again
        qtbot.waitUntil(lambda: bool(workers), timeout=WAIT_MS)

        # a slide in super-resolution mode, its tiles and SR jobs in the same pool
        pane = open_slide_window(LocalSlide.from_store(st, low["pk"]), pool=pool)
        qtbot.addWidget(pane)
        pane.resize(500, 400)
        pane.show()
        v = pane.view
        assert v.loader.pool is pool and v._sr_queue.pool is pool
        v.apply_mode("low")
        v.zoom_to(8.0, (250, 200), animate=False)
        assert v.sr_active()
        vis = v.sr_tiles_visible()
        assert vis
        qtbot.waitUntil(lambda: (look() or True) and all(("sr",) + k in v.cache for k in vis),
                        timeout=WAIT_MS)
        look()
        assert {name for name in seen if STRAY.match(name)} == set()
        assert workers and all(n.startswith("onepool-") for n in workers), workers
        pane.close()
        win.close()
        # closing cancelled everything of theirs: the pool is idle again
        assert pool.submit(lambda tok: "idle", INTERACTION).future.result(60) == "idle"
    finally:
        session.logout()
        st.close()
        pool.shutdown()


class _WaitingLoader:
    """A loader (the runner's contract: ``run``, ``cancel``, ``token``) that yields one
    event, then waits until it is cancelled."""

    def __init__(self) -> None:
        from client.pool import CancelToken

        self.token = CancelToken()
        self.ended = threading.Event()

    def cancel(self) -> None:
        self.token.cancel()

    def run(self):
        yield "first"
        while not self.token.cancelled:
            threading.Event().wait(0.01)
        self.ended.set()


def test_turning_away_cancels_the_load_through_the_pool(qtbot):
    from viewer.mprlayout import LoadRunner

    pool = WorkerPool(1, name="onepool")
    try:
        # running: the pool's cancel reaches the loader through the shared token
        loader = _WaitingLoader()
        runner = LoadRunner(loader, pool=pool)
        with qtbot.waitSignal(runner.event, timeout=WAIT_MS):
            runner.start()
        assert runner.is_running()
        assert pool.cancel_where(lambda j: j.tag is loader) == 1
        assert loader.ended.wait(WAIT_MS / 1000) and runner.wait(WAIT_MS / 1000)
        assert not runner.is_running()
        # queued behind a busy worker: cancelled, it never starts
        gate = threading.Event()
        blocker = pool.submit(lambda tok: gate.wait(WAIT_MS / 1000), INTERACTION)
        queued = _WaitingLoader()
        later = LoadRunner(queued, pool=pool)
        later.start()
        later.cancel(wait=0)
        assert queued.token.cancelled and later._job.future.cancelled()
        gate.set()
        blocker.future.result(WAIT_MS / 1000)
        assert pool.submit(lambda tok: "idle", INTERACTION).future.result(60) == "idle"
        assert not queued.ended.is_set()
    finally:
        pool.shutdown()


@pytest.mark.parametrize("route", ["j2k", "htj2k"])
def test_a_volume_load_inside_a_pool_of_one_does_not_starve(server, ct_series_uid, route):
    """The loader's job holds the only worker; its transfer and its decodes (or its HTJ2K
    fetches) are sub-jobs of the same pool: the loader runs them itself."""
    from client.series import SeriesData
    from client.session import Session
    from client.volume_loader import VolumeLoader, load_all

    pool = WorkerPool(1, name="onepool")
    session = Session(server.url)
    try:
        loader = VolumeLoader(SeriesData(session, None, ct_series_uid), pool=pool,
                              decode_threads=2, full_route=route)
        events = []
        job = pool.submit(lambda tok: load_all(loader, events.append), INTERACTION, tag=loader,
                          token=loader.token)
        volume = job.future.result(WAIT_MS / 1000)
        assert events and events[-1].final
        assert len(volume.own_slots()) == volume.shape[0]
        assert ("HTJ2K copies" in events[-1].update.label) == (route == "htj2k")
    finally:
        session.logout()
        pool.shutdown()


def test_the_backend_pool_is_the_process_default_while_it_lives():
    from client.pool import BACKGROUND, default_pool
    from viewer.services import Backend

    backend = Backend()
    try:
        assert default_pool() is backend.pool
        assert backend.pool.caps[BACKGROUND] == 1
    finally:
        backend.close()
    assert default_pool() is not backend.pool and not default_pool().closed
