"""The progressive plan and the series loader, without Qt."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from client.series_loader import (BACKGROUND, FOCUS, NEAR, PREVIEW, REGION, DecodedStore,
                           LoaderListener, PlanState, SeriesLoader, SeriesRegistry, Stage,
                           plan_stages, reduce_for_fit, supersedes)
from imaging.model import DecodedImage

from netsim import slow_packet_streams
from waits import WAIT_S, wait_for


def state(n=12, levels=None, **kw) -> PlanState:
    return PlanState(numres=[3] * n, nlayers=[4] * n,
                     levels=levels if levels is not None else [(0, -1)] * n, **kw)


def test_plan_for_an_empty_series_is_preview_focus_near_background():
    stages = plan_stages(state(focus=5, reduce=1, chunk=4))
    kinds = [s.kind for s in stages]
    assert kinds == [PREVIEW, FOCUS, NEAR, BACKGROUND, BACKGROUND]
    preview = stages[0]
    assert preview.comps is None and preview.layers == 1 and preview.reduce == 2   # lowest res
    assert stages[1].comps == (5,) and stages[1].layers is None and stages[1].reduce == 1
    assert stages[2].comps == (3, 4, 6, 7)
    # background: nearest to the shown image first, every image exactly once
    assert stages[3].comps == (1, 2, 8, 9)
    covered = sorted(i for s in stages[1:] for i in s.comps)
    assert covered == list(range(12))


def test_plan_skips_what_is_held_and_follows_focus():
    levels = [(1, 0)] * 12
    levels[5] = (4, 1)                      # the shown image is complete at reduce 1
    s = state(levels=levels, focus=5, reduce=1, preview_done=True)
    assert [st.kind for st in plan_stages(s)][:2] == [NEAR, BACKGROUND]
    s.focus = 9
    first = plan_stages(s)[0]
    assert first.kind == FOCUS and first.comps == (9,)
    # more resolution needed (zoom in): the complete image is wanted again
    s.focus, s.reduce = 5, 0
    assert plan_stages(s)[0] == Stage(FOCUS, (5,), None, 0)


def test_plan_region_paused_and_no_prefetch():
    s = state(preview_done=True, focus=0, region=(3, (10, 10, 20, 20)))
    assert plan_stages(s)[0] == Stage(REGION, (3,), None, 0, (10, 10, 20, 20))
    s.prefetch = False
    assert BACKGROUND not in {st.kind for st in plan_stages(s)}
    s.allow_focus, s.region = False, None
    assert plan_stages(s) == []
    # a transfer that completed settles its images even if levels could not reach target
    s = state(levels=[(1, 0)] * 4, n=4, preview_done=True, settled={0: 1, 1: 1, 2: 1, 3: 1}, reduce=1)
    assert plan_stages(s) == []


def test_supersedes_latest_request_wins():
    bg = Stage(BACKGROUND, (8, 9), None, 0)
    focus3 = Stage(FOCUS, (3,), None, 0)
    assert supersedes(focus3, bg)
    assert supersedes(Stage(FOCUS, (4,), None, 0), focus3)
    assert not supersedes(Stage(BACKGROUND, (1, 2), None, 0), bg)      # just re-ordered
    assert supersedes(Stage(BACKGROUND, (1, 2), None, 0), Stage(BACKGROUND, (1, 2), None, 1))
    assert not supersedes(focus3, Stage(PREVIEW, None, 1, 2))           # preview finishes
    assert not supersedes(focus3, Stage(REGION, (1,), None, 0, (0, 0, 4, 4)))
    assert not supersedes(None, bg)


def test_reduce_for_fit_never_beyond_the_viewport():
    assert reduce_for_fit(4000, 4000, 2000, 2000, 7) == 1     # V4: stops at 2000²
    assert reduce_for_fit(512, 512, 700, 600, 4) == 0
    assert reduce_for_fit(512, 512, 200, 200, 4) == 1
    assert reduce_for_fit(512, 512, 100, 100, 4) == 2
    assert reduce_for_fit(512, 512, 10, 10, 4) == 3           # capped at the lowest level


def test_decoded_store_never_replaces_a_better_result():
    store = DecodedStore(budget=10 << 20)
    full = DecodedImage(0, np.zeros((256, 256), np.uint16), 4, 4, reduce=0)
    low = DecodedImage(0, np.zeros((64, 64), np.uint16), 1, 4, reduce=2)
    assert store.offer(full, numres=3, target_res=2)
    assert not store.offer(low, numres=3, target_res=2)
    assert store.get(0) is full
    # what the viewport can use decides: at target res 1, a lossless half-res image beats
    # a first-layer full-res one
    store = DecodedStore()
    coarse = DecodedImage(1, np.zeros((256, 256), np.uint16), 1, 4, reduce=0)
    half = DecodedImage(1, np.zeros((128, 128), np.uint16), 4, 4, reduce=1)
    store.offer(coarse, 3, 1)
    assert store.offer(half, 3, 1) and store.get(1) is half


def test_decoded_store_budget_keeps_the_shown_image():
    store = DecodedStore(budget=3 * 128 * 128 * 2)
    for i in range(6):
        store.offer(DecodedImage(i, np.zeros((128, 128), np.uint16), 4, 4), 1, 0, keep={0})
    assert len(store) <= 3 and store.get(0) is not None and store.get(5) is not None


class Recorder(LoaderListener):
    def __init__(self):
        self.events = []
        self.decoded = []
        self.idle = threading.Event()
        self.lock = threading.Lock()

    def on_stage(self, loader, stage, st, msg):
        with self.lock:
            self.events.append((stage.kind, stage.comps, st))

    def on_decoded(self, loader, image):
        with self.lock:
            self.decoded.append(image)

    def on_state(self, loader, st):
        if st == "idle":
            self.idle.set()
        else:
            self.idle.clear()


@pytest.fixture()
def pool():
    from client.pool import WorkerPool
    from viewer.services import POOL_CAPS

    p = WorkerPool(8, POOL_CAPS)
    yield p
    p.shutdown()


def _wait(cond):
    wait_for(cond)


def test_loader_runs_the_plan_and_respects_the_viewport(server, ct_series_uid, pool):
    from client.session import Session

    session = Session(server.url)
    rec = Recorder()
    loader = SeriesLoader(SeriesRegistry(session, None), ct_series_uid, pool, rec,
                          focus=6, viewport=(128, 128))
    loader.start()
    assert rec.idle.wait(WAIT_S)
    kinds = [k for k, _c, st in rec.events if st == "complete"]
    assert kinds[:3] == [PREVIEW, FOCUS, NEAR] and BACKGROUND in kinds
    sd = loader.sd
    assert loader.reduce == 1
    # V4: never a resolution beyond the 128² viewport (resolution index 1 of 3)
    assert all(sd.levels(i) == (4, 1) for i in range(len(sd)))
    assert all(d.reduce >= 1 for d in rec.decoded)
    assert sum(sd.held_bytes(i) for i in range(len(sd))) < sum(im["total_bytes"] for im in sd.images) / 2
    # the shown image went from the preview to complete, never back
    shown = [(d.reduce, d.layers) for d in rec.decoded if d.index == 6]
    assert shown[0] == (2, 1) and shown[-1] == (1, 4)
    st = loader.image_status(6)
    assert st.held_bytes == sd.held_bytes(6) and st.requested_bytes == st.held_bytes
    assert st.level == st.max_level
    loader.close()
    session.logout()


def test_loader_focus_change_cancels_background(server, ct_series_uid, pool, monkeypatch):
    from client.session import Session

    slow_packet_streams(monkeypatch)
    session = Session(server.url)
    rec = Recorder()
    # the plan as it is without adaptation (on this ~8 Mbit/s link the adaptive fill
    # would wait for the reader to pause, and stop short of the lossless layers)
    loader = SeriesLoader(SeriesRegistry(session, None), ct_series_uid, pool, rec,
                          focus=0, viewport=(512, 512), chunk=12, adaptive=False)
    loader.start()
    _wait(lambda: (loader.running_stage() or Stage(PREVIEW, None, 1, 0)).kind == BACKGROUND)
    loader.set_focus(9)                      # the user scrolled away: latest request wins
    assert rec.idle.wait(WAIT_S)
    with rec.lock:
        events = list(rec.events)
    cancelled = [(k, c) for k, c, st in events if st == "cancelled"]
    assert cancelled and cancelled[0][0] == BACKGROUND
    after = events[events.index((BACKGROUND, cancelled[0][1], "cancelled")) + 1:]
    assert after[0][:2] == (FOCUS, (9,))
    assert all(loader.sd.levels(i) == (4, 2) for i in range(12))
    loader.close()
    session.logout()
