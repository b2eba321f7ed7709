"""The series preview nearest the reader first, in requests the link brings in a bounded
time (issue 17): the next request starts around where the reader is when the previous one
ends; nothing is asked twice; the whole series' preview eventually arrives (on a slow link
while the reader is active only the window around the reader, the rest when they rest)."""
from __future__ import annotations

import threading

import pytest

from client.link import LinkMeter
from client.policy import PolicyClient
from client.series_loader import (BACKGROUND, FOCUS, NEAR, PREVIEW, LoaderListener, PlanState,
                                  SeriesLoader, SeriesRegistry, plan_stages, preview_chunk_for,
                                  preview_window_for)
from client.session import Session
from policyutil import read_study_server
from waits import WAIT_S, Clock, wait_for


def state(n=20, **kw) -> PlanState:
    return PlanState(numres=[3] * n, nlayers=[4] * n, levels=[(0, -1)] * n, **kw)


def previews(s: PlanState) -> list[tuple[int, ...]]:
    return [st.comps for st in plan_stages(s) if st.kind == PREVIEW]


def test_preview_chunks_follow_the_reader():
    s = state(focus=10, shown=10, preview_chunk=4, neighbours=1)
    stages = plan_stages(s)
    kinds = [st.kind for st in stages]
    # the whole preview first (nearest to the reader first), then the shown slice
    assert kinds[:6] == [PREVIEW] * 5 + [FOCUS]
    assert all(st.layers == 1 and st.reduce == 2 for st in stages[:5])
    assert [st.comps for st in stages[:5]] == [(8, 9, 10, 11), (6, 7, 12, 13), (4, 5, 14, 15),
                                               (2, 3, 16, 17), (0, 1, 18, 19)]
    # one request when the chunk holds the whole series (a fast link)
    s.preview_chunk = None
    assert previews(s) == [None]
    s.preview_chunk = 64
    assert previews(s) == [None]


def test_a_jump_reorders_the_remaining_chunks_and_nothing_is_asked_twice():
    s = state(focus=10, shown=10, preview_chunk=4)
    first = previews(s)[0]
    for i in first:                              # the first request ended...
        s.levels[i] = (1, 0)
    s.previewed.update(first)
    s.shown = 2                                  # ...and the reader is now on slice 2
    rest = previews(s)
    assert rest[0] == (0, 1, 2, 3) and rest[1] == (4, 5, 6, 7)
    assert sorted(i for c in [first, *rest] for i in c) == list(range(20))
    # an image a completed request covered but that holds nothing (beyond the rights)
    # is not asked for again
    s.previewed.update(rest[0])
    assert all(i not in c for c in previews(s) for i in rest[0])
    # without prediction the shown slice still leads the preview (the display moved)
    s.predict = False
    assert previews(s)[0] == (4, 5, 6, 7)


def test_on_a_slow_link_the_active_readers_window_comes_after_the_shown_slice():
    s = state(n=40, focus=20, shown=20, preview_chunk=3, preview_window=4, neighbours=1,
              spec_layers=1, fill_window=4)
    stages = plan_stages(s)
    kinds = [st.kind for st in stages]
    assert kinds[:2] == [FOCUS, NEAR]
    pv = [st for st in stages if st.kind == PREVIEW]
    assert kinds.index(PREVIEW) < kinds.index(BACKGROUND)
    # not the shown slice nor its neighbours: their stages bring their preview
    assert [st.comps for st in pv] == [(17, 18, 22), (16, 23, 24)]
    assert s.holds_back                          # the rest of the preview waits
    # the reader rests: the whole series' preview, first
    s.idle = True
    stages = plan_stages(s)
    assert [st.kind for st in stages[:14]] == [PREVIEW] * 14
    assert sorted(i for st in stages[:14] for i in st.comps) == list(range(40))


def test_preview_chunk_and_window_follow_the_measured_link():
    # 2437 bytes an image (a 512² CT at 64²): half a second of link
    assert preview_chunk_for(1e6, 2437) == 25
    assert preview_chunk_for(10e6, 2437) == 256
    assert preview_chunk_for(100e6, 2437) == 2564          # the whole series in one request
    assert preview_chunk_for(1e3, 2437) == 1
    # not measured yet: 32 images, twice as many each request after
    assert [preview_chunk_for(None, 2437, k) for k in range(3)] == [32, 64, 128]
    # 300 slices: 6 s of a 1 Mbit/s link: as far as the fill reaches while active
    assert preview_window_for(1e6, 2437, 300, fill_window=5) == 5
    assert preview_window_for(1e6, 2437, 300, fill_window=0) == 2       # the neighbours
    assert preview_window_for(10e6, 2437, 300, fill_window=58) is None   # 0.6 s: all first
    assert preview_window_for(None, 2437, 300, fill_window=5) is None


# ---------------------------------------------------------------- the loader, served
class Recorder(LoaderListener):
    """Records the stages; holds the first preview request at its start until released
    (so that the test moves the reader while it runs)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list = []
        self.held: dict[int, int] = {}
        self.at_first = threading.Event()
        self.release = threading.Event()
        self.idle = threading.Event()
        self.hold = True

    def on_stage(self, loader, stage, st, _msg):
        if stage.kind == PREVIEW and st == "started" and self.hold:
            self.hold = False
            self.at_first.set()
            assert self.release.wait(WAIT_S)
        if stage.kind == PREVIEW and st == "complete":
            sd = loader.sd
            comps = stage.comps if stage.comps is not None else range(len(sd))
            with self.lock:
                for i in comps:
                    self.held[i] = sd.held_bytes(i)
        with self.lock:
            self.events.append((stage.kind, stage.comps, st))

    def on_state(self, loader, st):
        (self.idle.set if st == "idle" else self.idle.clear)()


@pytest.fixture()
def pool():
    from client.pool import WorkerPool
    from viewer.services import POOL_CAPS

    p = WorkerPool(4, POOL_CAPS)
    yield p
    p.shutdown()


def _whole_preview(url: str, uid: str) -> dict[int, int]:
    """Bytes of each image's preview, fetched in one request by a fresh session."""
    from client.series import SeriesData

    s = Session(url)
    sd = SeriesData(s, None, uid)
    lowest = max(im["numres"] for im in sd.images) - 1
    sd.transfer(layers=1, reduce=lowest).run()
    out = {i: sd.held_bytes(i) for i in range(len(sd))}
    s.logout()
    return out


def test_loader_preview_follows_a_jump_and_fetches_each_image_once(server, ct_series_uid, pool):
    s = Session(server.url)
    rec = Recorder()
    loader = SeriesLoader(SeriesRegistry(s, None), ct_series_uid, pool, rec, focus=6,
                          viewport=(128, 128), adaptive=False, prefetch=False, preview_chunk=3)
    loader.start()
    assert rec.at_first.wait(WAIT_S)             # the first request, around slice 6
    loader.set_focus(1, fetch=False)             # the reader jumps while it runs
    rec.release.set()
    assert rec.idle.wait(WAIT_S)
    with rec.lock:
        events = list(rec.events)
    done = [c for k, c, st in events if k == PREVIEW and st == "complete"]
    n = len(loader.sd)
    assert n == 12
    # the first request around slice 6; the next ones around slice 1, nearest first
    assert done == [(5, 6, 7), (0, 1, 2), (3, 4, 8), (9, 10, 11)]
    assert not [e for e in events if e[0] == PREVIEW and e[2] != "complete"
                and e[2] != "started"]           # none cancelled, none failed
    # the preview came before anything else, each image asked for once, the whole series
    assert [k for k, _c, st in events if st == "complete"][:4] == [PREVIEW] * 4
    assert sorted(i for c in done for i in c) == list(range(n))
    # and each image holds exactly what one request for the whole preview brings
    assert rec.held == _whole_preview(server.url, ct_series_uid)
    loader.close()
    s.logout()


@pytest.fixture(scope="module")
def asrv(ct_store, tmp_path_factory):
    srv = read_study_server(ct_store, tmp_path_factory.mktemp("preview") / "store")
    yield srv
    srv.stop()


def test_loader_slow_link_previews_the_window_then_the_whole_series(asrv, pool):
    clock = Clock()
    s = Session(asrv.url)
    PolicyClient(s).set_context(link_bps=2e6, memory_mb=8192, cpus=4)   # as measured
    s.link = LinkMeter(min_bytes=1)
    s.link.add(100.0, 100_000)                   # measured: 8 kbit/s
    rec = Recorder()
    rec.hold = False
    loader = SeriesLoader(SeriesRegistry(s, None), asrv.series, pool, rec, focus=5,
                          viewport=(256, 256), idle_s=1e6, clock=clock, predict=False,
                          neighbours=1)
    loader.start()
    assert rec.idle.wait(WAIT_S)
    sd = loader.sd
    n = len(sd)
    with rec.lock:
        events = list(rec.events)
    # the reader is active: the shown slice, its neighbours, their preview; nothing else
    assert [i for i in range(n) if sd.levels(i)[1] >= 0] == [4, 5, 6]
    assert [k for k, _c, st in events if st == "complete"][0] == FOCUS
    assert loader.plan() == []
    # the reader rests: the rest of the series' preview first, nearest first, one image
    # a request (8 kbit/s), then the fill
    with rec.lock:
        start = len(rec.events)
    rec.idle.clear()
    clock.advance(2e6)
    loader.set_prefetch(True)                    # any re-plan (the idle timer's too)
    rest = [i for i in range(n) if i not in (4, 5, 6)]

    def completed():
        with rec.lock:
            return [e for e in rec.events[start:] if e[2] == "complete"]
    wait_for(lambda: sorted(i for k, c, _st in completed() if k == PREVIEW for i in c) == rest,
             what="the whole series' preview")
    events = completed()
    after = [c for k, c, _st in events if k == PREVIEW]
    assert after[:2] == [(3,), (7,)]
    assert [k for k, _c, _st in events[:len(after)]] == [PREVIEW] * len(after)
    assert all(sd.levels(i)[1] >= 0 for i in range(n))
    loader.close()
    s.logout()
