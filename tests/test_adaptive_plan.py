"""The adaptive progressive plan and prediction (H5, V8): the fill stops at the version
the policy names for the measured link and goes on when the link is faster or the reader
rests; the slices ahead of the reader are prefetched, deeper the faster they scroll,
within the memory budget, and given up when the reader turns away."""
from __future__ import annotations

import threading

import pytest

from client.policy import PolicyClient
from client.session import Session
from policyutil import read_study_server
from client.series_loader import (BACKGROUND, FOCUS, JUMP_STEPS, NEAR, LoaderListener,
                                  PlanState, SeriesLoader, SeriesRegistry, Stage,
                                  background_fill, fill_window_for, follow_scroll, plan_stages,
                                  supersedes)
from waits import WAIT_S, Clock, wait_for


def state(n=40, levels=None, **kw) -> PlanState:
    return PlanState(numres=[3] * n, nlayers=[4] * n,
                     levels=levels if levels is not None else [(1, 0)] * n,
                     preview_done=True, **kw)


def test_fill_stops_at_the_links_version_and_goes_on_when_idle():
    s = state(focus=10, fill_layers=2, chunk=8)
    stages = plan_stages(s)
    assert stages[0] == Stage(FOCUS, (10,), 2, 0)          # what the reader looks at first
    assert {st.layers for st in stages} == {2}             # nothing beyond the link's version
    assert sorted(i for st in stages for i in st.comps) == list(range(40))
    # everything at V2: the fill stops
    s.levels = [(2, 2)] * 40
    assert plan_stages(s) == []
    # the reader rests: the shown slice first, then the rest, to every layer
    s.idle = True
    stages = plan_stages(s)
    assert stages[0] == Stage(FOCUS, (10,), None, 0) and {st.layers for st in stages} == {None}
    # the link became fast (the policy names the lossless version): the same
    s.idle, s.fill_layers = False, None
    assert plan_stages(s)[0] == Stage(FOCUS, (10,), None, 0)


def test_background_fill_while_active_is_small_near_and_waits_for_a_pause():
    # a fast link (the lossless version for the shown slice): the rest of the series
    # comes at the smallest version while the reader is active
    s = state(focus=10, spec_layers=1, neighbours=1, levels=[(0, 0)] * 40)
    stages = plan_stages(s)
    assert stages[0] == Stage(FOCUS, (10,), None, 0)
    assert stages[1] == Stage(NEAR, (9, 11), None, 0)
    bg = [st for st in stages if st.kind == BACKGROUND]
    assert {st.layers for st in bg} == {1}
    assert sorted(i for st in bg for i in st.comps) == [i for i in range(40) if i not in (9, 10, 11)]
    # a window: only the slices within reach of the reader
    s.fill_window = 3
    bg = [st for st in plan_stages(s) if st.kind == BACKGROUND]
    assert sorted(i for st in bg for i in st.comps) == [7, 8, 12, 13]
    # scrolling: nothing beyond the neighbourhood until the reader pauses
    s.scrolling = True
    assert [st.kind for st in plan_stages(s)] == [FOCUS, NEAR]
    assert s.holds_back
    # resting: everything, every layer, the whole series
    s.idle = True
    bg = [st for st in plan_stages(s) if st.kind == BACKGROUND]
    assert {st.layers for st in bg} == {None} and sum(len(st.comps) for st in bg) == 37
    assert not s.holds_back
    # the link's version caps the fill too when it is smaller than the smallest layers
    s2 = state(focus=0, fill_layers=1, spec_layers=2, levels=[(0, 0)] * 10, n=10)
    assert {st.layers for st in plan_stages(s2)} == {1}


def test_fill_window_is_what_the_link_brings_in_the_horizon():
    # 1 Mbit/s, 10.8 kB a slice, 1 s: 11 slices -> 5 on each side
    assert fill_window_for(1e6, 10_800, 300, horizon_s=1.0) == 5
    assert fill_window_for(1e6, 10_800, 300, neighbours=8, horizon_s=1.0) == 8
    assert fill_window_for(100e6, 10_800, 300, horizon_s=1.0) is None    # the whole series
    assert fill_window_for(None, 10_800, 300) is None                      # not measured yet


def test_background_version_follows_the_measured_link():
    mb = 1e6
    versions = [(None, 60 * mb), (2, 8 * mb), (1, 3.2 * mb)]     # a 300-slice CT
    # 1 Gbit/s: the whole series losslessly in 0.5 s: no limit (as before)
    assert background_fill(1e9, versions, 300) == (None, None)
    # 100 Mbit/s: lossless would take 4.8 s, V2 0.64 s: the whole series at V2
    assert background_fill(100e6, versions, 300) == (2, None)
    # 10 Mbit/s, V2 for the link: neither fits in 2 s: the smallest, within 0.5 s of link
    assert background_fill(10e6, versions, 300, link_layers=2) == (1, 29)
    assert background_fill(10e6, versions, 300, link_layers=2, horizon_s=1.0) == (1, 58)
    # 1 Mbit/s: the neighbours (2 slices each side; 5 within 1 s)
    assert background_fill(1e6, versions, 300, link_layers=1) == (1, 2)
    assert background_fill(1e6, versions, 300, link_layers=1, horizon_s=1.0) == (1, 5)
    # never better than the link's version; unknown link: no limit
    assert background_fill(1e9, versions, 300, link_layers=2) == (2, None)
    assert background_fill(None, versions, 300) == (None, None)


def test_a_jump_is_not_scrolling():
    speed, jump = follow_scroll(0.0, 0.1, 1)
    assert not jump and speed == 5.0                     # 10 slices/s, halfway from 0
    speed, jump = follow_scroll(speed, 2.0, JUMP_STEPS + 1)
    assert jump and speed == 0.0
    # after a jump the plan predicts no direction: the neighbours on both sides
    stages = plan_stages(state(focus=5, shown=30, predict=True, direction=0, neighbours=1))
    assert stages[:3] == [Stage(FOCUS, (5,), None, 0), Stage(FOCUS, (30,), None, 0),
                          Stage(NEAR, (29, 31), None, 0)]


def test_prediction_ahead_grows_with_speed_within_the_budget():
    slow = plan_stages(state(focus=10, shown=10, predict=True, direction=1, speed=1.0))
    near = [st for st in slow if st.kind == NEAR]
    assert near[0].comps == (11, 12) and near[0].direction == 1
    ahead = [i for st in near if st.direction == 1 for i in st.comps]
    assert ahead == [11, 12, 13]                          # 2 + ceil(1 * 0.6)
    assert near[-1] == Stage(NEAR, (9,), None, 0)         # the one behind, after
    fast = plan_stages(state(focus=10, shown=10, predict=True, direction=1, speed=20.0))
    ahead = [i for st in fast if st.kind == NEAR and st.direction == 1 for i in st.comps]
    assert ahead == list(range(11, 25))                   # 2 + ceil(20 * 0.6) = 14
    bounded = plan_stages(state(focus=10, shown=10, predict=True, direction=1, speed=20.0,
                                max_ahead=5))
    ahead = [i for st in bounded if st.kind == NEAR and st.direction == 1 for i in st.comps]
    assert ahead == [11, 12, 13, 14, 15]                   # the memory budget
    # scrolling backwards: ahead is downwards; the shown slice comes before all of it
    levels = [(1, 0)] * 40
    down = plan_stages(state(levels=levels, focus=30, shown=20, predict=True, direction=-1,
                             speed=5.0))
    assert down[0] == Stage(FOCUS, (30,), None, 0) and down[1] == Stage(FOCUS, (20,), None, 0)
    assert down[2].comps == (18, 19) and down[2].direction == -1
    # nothing repeats, everything is covered once
    covered = [i for st in down for i in st.comps]
    assert sorted(covered) == list(range(40))


def test_prediction_is_given_up_when_the_reader_turns_away():
    running = Stage(NEAR, (11, 12), 2, 0, direction=1)
    assert supersedes(Stage(NEAR, (8, 9), 2, 0, direction=-1), running)
    assert not supersedes(Stage(NEAR, (13, 14), 2, 0, direction=1), running)
    # the reader reaches a slice the prediction is bringing: it goes on
    assert not supersedes(Stage(FOCUS, (12,), 2, 0), running)
    # ...but not if it brings less than the shown slice needs, or another slice
    assert supersedes(Stage(FOCUS, (12,), None, 0), running)
    assert supersedes(Stage(FOCUS, (20,), 2, 0), running)
    # the link was measured slow (or the reader is active again): a stage bringing more
    # layers than the plan now wants gives way to the capped one
    assert supersedes(Stage(NEAR, (11, 12), 1, 0), Stage(NEAR, (11, 12), None, 0))
    assert supersedes(Stage(BACKGROUND, (1, 2), 1, 0), Stage(BACKGROUND, (3, 4), 2, 0))
    assert not supersedes(Stage(BACKGROUND, (1, 2), 2, 0), Stage(BACKGROUND, (3, 4), 1, 0))
    assert not supersedes(Stage(BACKGROUND, (1, 2), None, 0), Stage(BACKGROUND, (3, 4), 1, 0))


# ---------------------------------------------------------------- the loader, served
class Idle(LoaderListener):
    def __init__(self) -> None:
        self.idle = threading.Event()

    def on_state(self, loader, st):
        (self.idle.set if st == "idle" else self.idle.clear)()


@pytest.fixture(scope="module")
def asrv(ct_store, tmp_path_factory):
    srv = read_study_server(ct_store, tmp_path_factory.mktemp("adaptive") / "store")
    yield srv
    srv.stop()


@pytest.fixture()
def pool():
    from client.pool import WorkerPool
    from viewer.services import POOL_CAPS

    p = WorkerPool(4, POOL_CAPS)
    yield p
    p.shutdown()


def _slow_loader(asrv, pool, clock):
    s = Session(asrv.url)
    PolicyClient(s).set_context(link_bps=2e6, memory_mb=8192, cpus=4)   # as measured
    rec = Idle()
    loader = SeriesLoader(SeriesRegistry(s, None), asrv.series, pool, rec, focus=3,
                          viewport=(256, 256), idle_s=1e6, clock=clock)
    loader.start()
    assert rec.idle.wait(WAIT_S)
    sd = loader.sd
    assert sd.auto["version"] == "V3" and loader.fill_layers() == 1
    # the fill stopped at V3 (one layer), every image at the display resolution
    assert all(sd.levels(i) == (1, 2) for i in range(len(sd)))
    return s, loader, rec


def test_loader_fill_resumes_when_the_reader_rests(asrv, pool):
    clock = Clock()
    s, loader, rec = _slow_loader(asrv, pool, clock)
    loader.set_focus(5)
    rec.idle.clear()
    clock.advance(2e6)                                 # no scrolling for longer than idle_s
    loader.set_prefetch(True)                          # any re-plan (the idle timer's too)
    wait_for(lambda: all(loader.sd.levels(i) == (4, 2) for i in range(len(loader.sd))),
             what="the fill to go on to every layer")
    loader.close()
    s.logout()


def test_loader_fill_resumes_when_the_link_is_faster(asrv, pool):
    clock = Clock()
    s, loader, rec = _slow_loader(asrv, pool, clock)
    pc = PolicyClient(s)
    pc.set_context(link_bps=2e8)                       # the reporter measured a fast link
    sd = loader.sd
    sd.auto = pc.versions(sd.uid)["auto"]
    assert sd.auto["version"] == "V1"
    sd._notify("auto", sd.auto)                        # as the policy controller does
    wait_for(lambda: all(sd.levels(i) == (4, 2) for i in range(len(sd))),
             what="the fill to go on to every layer")
    # loopback brings the whole series losslessly within FILL_WHOLE_S: no limit
    assert loader.background_fill() == (None, None)
    loader.close()
    s.logout()


def test_loader_predicts_in_the_scroll_direction(asrv, pool):
    clock = Clock()
    s = Session(asrv.url)
    rec = Idle()
    loader = SeriesLoader(SeriesRegistry(s, None), asrv.series, pool, rec, focus=0,
                          viewport=(256, 256), clock=clock, prefetch=False, idle_s=1e6)
    loader.start()
    assert rec.idle.wait(WAIT_S)                       # preview, slice 0 and its neighbours
    sd = loader.sd
    n = len(sd)
    assert [i for i in range(n) if sd.levels(i)[1] == 2] == [0, 1, 2]
    stages = []
    rec.on_stage = lambda _l, stage, st, _m: stages.append((stage, st))
    rec.idle.clear()
    for i in range(1, 5):                              # 10 slices per second, the display only
        clock.advance(0.1)
        loader.set_focus(i, fetch=False)
    assert rec.idle.wait(WAIT_S)
    ahead = [i for st, outcome in stages if st.kind == NEAR and st.direction == 1
             and outcome == "complete" for i in st.comps]
    # first 2 + ceil(5 * 0.6) ahead of slice 1, then deeper as the speed grows
    assert ahead[:2] == [3, 4] and {5, 6, 7, 8} <= set(ahead)
    assert all(sd.levels(i)[1] == 2 for i in ahead)
    assert all(sd.levels(i)[1] < 2 for i in range(max(ahead) + 1, n))   # no background
    assert loader.focus == 0                           # the plan's centre did not move
    loader.close()
    s.logout()


def test_loader_idle_timer_resumes_the_fill_by_itself(asrv, pool):
    s = Session(asrv.url)
    PolicyClient(s).set_context(link_bps=2e6, memory_mb=8192, cpus=4)
    rec = Idle()
    loader = SeriesLoader(SeriesRegistry(s, None), asrv.series, pool, rec, focus=3,
                          viewport=(256, 256), idle_s=0.5)
    loader.start()
    # the fill stops at V3, then the reader rests: the timer re-plans, every layer comes
    wait_for(lambda: all(loader.sd.levels(i) == (4, 2) for i in range(len(loader.sd)))
             if loader.sd is not None else False, what="the fill to go on after the rest")
    assert loader.fill_layers() == 1            # still the link's version: the rest did it
    loader.close()
    s.logout()


def test_loader_background_fill_follows_its_measured_link(asrv, pool):
    clock = Clock()
    s, loader, rec = _slow_loader(asrv, pool, clock)
    sd = loader.sd
    v3 = next(v for v in sd.versions if v["name"] == "V3")
    per = v3["bytes"] / len(sd) / 4 ** loader.reduce
    from client.link import LinkMeter
    s.link = LinkMeter(min_bytes=1)             # not measured yet: no limit
    assert loader.background_fill() == (None, None)
    s.link.add(1.0, 10 << 20)                   # fast: the whole series at V3 (the link's)
    assert loader.background_fill() == (1, None)
    s.link = LinkMeter(min_bytes=1)             # as if measured on a slow link:
    s.link.add(1.0, int(per * 3))               # three slices a second: a window of 2
    assert loader.background_fill() == (1, 2)   # at least the neighbours
    sd.select(version="V2")                     # a version asked for: no adaptation
    assert loader.background_fill() == (None, None)
    loader.close()
    s.logout()
