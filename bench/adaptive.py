#!/usr/bin/env python
"""Issue 17 benchmark (H5, V8): the adaptive progressive plan and prediction, replayed.

    .venv/bin/python bench/adaptive.py [--seed 17] [--json bench/out/adaptive.json]
    .venv/bin/python bench/adaptive.py --real [--seconds 60] [--work DIR] [--plans fixed,both]

Replays three recorded scroll traces, generated deterministically from ``--seed``
(slow reading, fast skimming, jumping), over links of 1, 10 and 100 Mbit/s, in four
configurations:

* ``fixed``    the plan without adaptation: the preview of the whole series first
               (nearest the reader first, in requests of about 0.5 s of the measured
               link), every layer for the shown slice, its two neighbours and the
               background fill of the whole series; the plan follows the reader once
               scrolling settles (200 ms, as the main window);
* ``adapt``    the shown slice and its neighbours stop at the version the site policy
               names for the link (V3 = 1 layer under 5 Mbit/s, V2 = 2 layers under
               50 Mbit/s, else V1 = lossless); while the reader is active the background
               fill brings the whole series at the best version the link brings it at in
               2 s, else the smallest version within what the link brings in 0.5 s
               around the reader, and only after a 1 s pause (``client.series_loader.
               background_fill``); on a link too slow for the whole preview within 2 s,
               the preview too reaches only that far while the reader is active
               (``preview_window_for``); everything goes on after ``IDLE_S`` without
               scrolling;
* ``predict``  prefetch ahead in the scroll direction, depth growing with scroll speed
               (bounded by the memory budget), cancelled when the reader turns away; a
               move of more than 8 slices is a jump, not scrolling;
* ``both``     adaptation and prediction.

Two ways to run it:

* default: a discrete-time simulation (5 ms steps) of the link (a token bucket at the
  link rate plus a round trip of ``--rtt-ms`` per request) through the loader's own plan
  functions (:func:`client.series_loader.plan_stages`, ``supersedes``,
  ``background_fill``, ``follow_scroll``); bytes per image are those of the synthetic
  512x512 CT of the sample store (preview 2.4 kB, V3 1:49.4, V2 1:20, 1:8, lossless 1:2.6; 4
  resolutions). About 20 s; what it measures is the plan.
* ``--real``: real transfers in real time. The synthetic 300-slice 512² CT is ingested
  (once, into ``--work``), the embedded server runs in one child process and
  bench/transfer.py's throttling proxies (token bucket per direction, one-way latency
  ``--rtt-ms``/2) in another; per run a fresh session, the viewer's
  :class:`~client.series_loader.SeriesLoader` with the viewer's pool caps, and the policy
  controller's wiring (the measured link reported by ``ContextReporter``, the automatic
  choice refreshed on every accepted report). See :class:`RealRun`. About 20 min for
  fixed and both at 60 s per trace.

Measured per run: *time until the shown slice is sharp* at every stop of the reader (a
slice shown for at least 300 ms): from its arrival until it holds the display resolution
at the layers of the link's version (the same criterion for every configuration; with
``--real`` also until it is decoded on screen, "shown"); a stop the slice is left before
it is sharp counts as "never" (shown as ``inf``); p50 and p95. *Wasted bytes*: bytes
fetched (cancelled partial increments included; ``--real``: what the proxy relayed)
minus, per image, the bytes it held while it was on screen.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.series_loader import (BACKGROUND, FOCUS, IDLE_S, PAUSE_S, PREVIEW, PlanState,  # noqa: E402
                           background_fill, follow_scroll, plan_stages, preview_chunk_for,
                           preview_window_for, supersedes)


N = 300                                     # slices (1 mm chest CT)
NUMRES, NLAYERS = 4, 4
RAW = 512 * 512 * 2
LAYER_BYTES = [RAW / 49.4, RAW / 20.0, RAW / 8.0, RAW / 2.6]    # cumulative, full res
PREVIEW_BYTES = 2134 + 303        # measured: layer 1 of the 64² LL band (2134 B) + headers
SETTLE_S = 0.200                            # the window moves the plan after this
STOP_S = 0.300                              # a dwell this long is a stop
DT = 0.005


def link_layers(bps: float) -> int | None:
    """The version resources/policy.toml names for the link (read study)."""
    if bps < 5e6:
        return 1
    if bps < 50e6:
        return 2
    return None


# --------------------------------------------------------------------------- traces
def trace_slow(rng: random.Random, dur: float = 60.0) -> list[tuple[float, int]]:
    t, s, out = 0.0, 120, [(0.0, 120)]
    while t < dur:
        t += rng.uniform(1.5, 4.0)
        s = min(max(s + (1 if rng.random() > 0.1 else -1), 0), N - 1)
        out.append((t, s))
    return out


def trace_skim(rng: random.Random, dur: float = 60.0) -> list[tuple[float, int]]:
    t, s, d, out = 0.0, 20, 1, [(0.0, 20)]
    while t < dur:
        speed = rng.uniform(10, 20)                  # slices per second
        for _ in range(int(rng.uniform(1.0, 3.0) * speed)):
            t += 1.0 / speed
            if not 0 <= s + d < N:
                d = -d
            s += d
            out.append((t, s))
        t += rng.uniform(0.8, 2.5)                    # a look
        if rng.random() < 0.3:
            d = -d
        s2 = min(max(s + d, 0), N - 1)
        out.append((t, s2))
        s = s2
    return out


def trace_jump(rng: random.Random, dur: float = 60.0) -> list[tuple[float, int]]:
    t, out = 0.0, [(0.0, 150)]
    while t < dur:
        t += rng.uniform(1.0, 4.0)
        s = rng.randrange(N)
        out.append((t, s))
        for _ in range(rng.randrange(0, 4)):
            t += rng.uniform(0.2, 0.6)
            s = min(max(s + rng.choice((-1, 1)), 0), N - 1)
            out.append((t, s))
    return out


TRACES = {"slow reading": trace_slow, "fast skimming": trace_skim, "jumping": trace_jump}


# --------------------------------------------------------------------------- simulation
@dataclass
class Running:
    stage: object
    items: list                     # [(image, layers after, res after, bytes)]
    start: float
    done_bytes: float = 0.0
    k: int = 0
    partial: float = 0.0


@dataclass
class Sim:
    bps: float
    adaptive: bool
    predict: bool
    rtt: float
    trace: list
    levels: list = field(default_factory=lambda: [(0, -1)] * N)
    fetched: float = 0.0
    shown_bytes: list = field(default_factory=lambda: [0.0] * N)
    preview_done: bool = False
    previewed: set = field(default_factory=set)
    settled: dict = field(default_factory=dict)
    by_kind: dict = field(default_factory=dict)

    def held(self, i: int) -> float:
        q, r = self.levels[i]
        if r < 0:
            return 0.0
        if r < NUMRES - 1:
            return PREVIEW_BYTES
        return LAYER_BYTES[q - 1] + 250

    def state(self, now: float) -> PlanState:
        quiet = now - self.last_move
        return PlanState(
            numres=[NUMRES] * N, nlayers=[NLAYERS] * N, levels=self.levels, focus=self.focus,
            reduce=0, preview_done=self.preview_done, previewed=self.previewed,
            preview_chunk=preview_chunk_for(self.bps, PREVIEW_BYTES),
            preview_window=(preview_window_for(self.bps, PREVIEW_BYTES, N, self.bg[1])
                            if self.adaptive else None),
            settled=self.settled,
            fill_layers=link_layers(self.bps) if self.adaptive else None,
            scrolling=self.adaptive and self.moved and quiet < PAUSE_S,
            spec_layers=self.bg[0], fill_window=self.bg[1],
            idle=quiet >= IDLE_S, predict=self.predict, shown=self.shown,
            direction=self.direction, speed=self.speed if quiet < 1.0 else 0.0,
            max_ahead=64)

    def items(self, stage) -> list:
        """The increments a stage brings, in quality order (what is held is not sent)."""
        comps = stage.comps if stage.comps is not None else range(N)
        out = []
        if stage.kind == PREVIEW:
            return [(i, 1, 0, PREVIEW_BYTES) for i in comps if self.levels[i][1] < 0]
        top = stage.layers or NLAYERS
        have = {i: self.held(i) for i in comps}
        lv = {i: self.levels[i] for i in comps}
        for layer in range(1, top + 1):
            for i in comps:
                q, r = lv[i]
                if r >= NUMRES - 1 and q >= layer:
                    continue
                new = LAYER_BYTES[layer - 1] + 250
                out.append((i, layer, NUMRES - 1, max(new - have[i], 0.0)))
                have[i] = new
                lv[i] = (layer, NUMRES - 1)
        return out

    def run(self) -> dict:
        versions = [(None, N * (LAYER_BYTES[3] + 250)), (2, N * (LAYER_BYTES[1] + 250)),
                    (1, N * (LAYER_BYTES[0] + 250))]
        self.bg = (background_fill(self.bps, versions, N, 2, link_layers(self.bps))
                   if self.adaptive else (None, None))
        self.focus = self.shown = self.trace[0][1]
        self.direction, self.speed, self.last_move, self.moved = 0, 0.0, 0.0, False
        settle_at = None
        running: Running | None = None
        events = list(self.trace)
        k = 0
        t = 0.0
        end = self.trace[-1][0] + 2.0
        arrivals = []                  # [shown_at, image, left_at, sharp_at]
        want = link_layers(self.bps) or NLAYERS

        def start(now):
            nonlocal running
            stages = plan_stages(self.state(now))
            if stages:
                st = stages[0]
                running = Running(st, self.items(st), now)
            else:
                running = None

        def replan(now):
            nonlocal running
            if running is not None:
                stages = plan_stages(self.state(now))
                if supersedes(stages[0] if stages else None, running.stage):
                    self.fetched += running.partial        # a cancelled partial increment
                    self.by_kind[running.stage.kind] = self.by_kind.get(running.stage.kind, 0) + running.partial
                    running = None
            if running is None:
                start(now)

        start(0.0)
        arrivals.append([0.0, self.shown, None, None])
        while t < end:
            t += DT
            changed = False
            while k < len(events) and events[k][0] <= t:
                _, s = events[k]
                if s != self.shown:
                    self.speed, jump = follow_scroll(self.speed, t - self.last_move,
                                                     abs(s - self.shown))
                    self.direction = 0 if jump else (1 if s > self.shown else -1)
                    self.last_move, self.moved = t, True
                    arrivals[-1][2] = t
                    arrivals.append([t, s, None, None])
                    self.shown = s
                    settle_at = t + SETTLE_S
                    changed = self.predict
                k += 1
            if settle_at is not None and t >= settle_at:
                settle_at = None
                if self.focus != self.shown:
                    self.focus = self.shown
                    changed = True
            if self.adaptive and abs(t - self.last_move - IDLE_S) < DT / 2:
                changed = True                  # the reader rests: the fill goes on
            if self.adaptive and abs(t - self.last_move - PAUSE_S) < DT / 2:
                changed = True                  # the reader pauses: the window fill starts
            if changed:
                replan(t)
            # the link
            if running is not None and t >= running.start + self.rtt:
                budget = self.bps / 8 * DT
                while budget > 0 and running is not None:
                    if running.k >= len(running.items):
                        self.finish(running)
                        running = None
                        start(t)
                        break
                    i, q, r, nb = running.items[running.k]
                    need = nb - running.partial
                    if need <= budget:
                        budget -= need
                        self.fetched += nb
                        self.by_kind[running.stage.kind] = self.by_kind.get(running.stage.kind, 0) + nb
                        running.partial = 0.0
                        running.k += 1
                        self.levels[i] = (q, r)
                    else:
                        running.partial += budget
                        budget = 0
            elif running is None:
                start(t)
            # what the reader sees
            s = self.shown
            self.shown_bytes[s] = max(self.shown_bytes[s], self.held(s))
            a = arrivals[-1]
            if a[3] is None and self.levels[s][1] >= NUMRES - 1 and self.levels[s][0] >= want:
                a[3] = t
        arrivals[-1][2] = end
        times = []
        for shown_at, _i, left, sharp in arrivals:
            if left - shown_at < STOP_S:
                continue
            times.append(sharp - shown_at if sharp is not None else math.inf)
        waste = self.fetched - sum(self.shown_bytes)
        return {"stops": len(times), "p50": pct(times, 50), "p95": pct(times, 95),
                "never": sum(1 for x in times if x == math.inf),
                "fetched_MB": self.fetched / 1e6, "wasted_MB": waste / 1e6}

    def finish(self, running: Running) -> None:
        st = running.stage
        if st.kind == PREVIEW:
            self.previewed.update(st.comps if st.comps is not None else range(N))
            self.preview_done = len(self.previewed) == N
        elif st.layers is None and st.kind != BACKGROUND or st.kind == FOCUS and st.layers is None:
            for i in st.comps:
                self.settled[i] = 0


# --------------------------------------------------------------------------- real transfers
def prepare_store(work: Path) -> dict:
    """The synthetic 300-slice 512² CT of bench/transfer.py, ingested once into ``work``
    (reused by later runs), its study marked read (status 2: the automatic choice follows
    the link; an unread study is always V1)."""
    from transfer import prepare_data

    meta = work / "adaptive-store.json"
    if meta.is_file():
        return json.loads(meta.read_text())
    d = prepare_data(work, N)
    out = {"store_dir": d["store_dir"], "series_uid": d["series_uid"], "study_uid": d["study_uid"]}
    meta.write_text(json.dumps(out))
    return out


def link_version(bps: float) -> str:
    """The version name resources/policy.toml's automatic choice gives the link."""
    q = link_layers(bps)
    return "V3" if q == 1 else "V2" if q == 2 else "V1"


class RealRun:
    """One trace over one throttled link against the real server, through the viewer's
    own client pieces: a fresh :class:`client.session.Session` (no cache), the
    :class:`client.series_loader.SeriesLoader` with the viewer's pool caps, and the
    policy controller's wiring (a :class:`client.link.ContextReporter` that reports the
    measured link; each accepted report refreshes the series' automatic choice, which
    re-plans the fill). The trace moves the display at once (``set_focus(i,
    fetch=False)``) and the plan after ``SETTLE_S`` without a move, as the main window.
    Sharp = the shown slice holds (``data``) / shows decoded (``shown``) the display
    resolution at the link version's layers. Fetched = bytes the proxy relayed to the
    client (HTTP and framing included); wasted = fetched minus, per image, the bytes it
    held while on screen."""

    def __init__(self, side, link: int, url: str, series: str, bps: float, trace: list,
                 adaptive: bool, predict: bool) -> None:
        self.side, self.link, self.url, self.series = side, link, url, series
        self.bps, self.trace, self.adaptive, self.predict = bps, trace, adaptive, predict

    def run(self) -> dict:
        import time

        from client.link import ContextReporter
        from client.policy import PolicyClient
        from client.pool import WorkerPool
        from client.series_loader import LoaderListener, SeriesLoader, SeriesRegistry
        from client.session import Session
        from viewer.services import POOL_CAPS

        c0 = self.side.counts(self.link)
        session = Session(self.url)
        pc = PolicyClient(session)
        pool = WorkerPool(4, POOL_CAPS)
        shown = self.trace[0][1]
        by_kind: dict[str, int] = {}

        class Bytes(LoaderListener):
            """Bytes received, by the kind of stage that brought them."""
            held = 0

            def on_series_status(self, _loader, st) -> None:
                if st.stage is not None and st.held > self.held:
                    by_kind[st.stage] = by_kind.get(st.stage, 0) + st.held - self.held
                self.held = max(self.held, st.held)

        loader = SeriesLoader(SeriesRegistry(session, None), self.series, pool, Bytes(),
                              focus=shown, viewport=(512, 512), adaptive=self.adaptive,
                              predict=self.predict)

        def on_report(_ctx) -> None:             # as viewer.policy_panel.PolicyController
            sd = loader.sd
            if sd is not None and sd.versions and not loader.closed:
                sd.auto = pc.versions(self.series)["auto"]
                sd._notify("auto", sd.auto)
        reporter = ContextReporter(pc, session.link, on_report=on_report)
        reporter.maybe_report()
        t0 = time.monotonic()
        loader.start()
        arrivals = [[0.0, shown, None, None, None]]   # shown at, image, left, data, decoded
        held: dict[int, int] = {}
        k, settle_at, want = 1, None, None
        end = self.trace[-1][0] + 2.0
        while True:
            time.sleep(DT)
            t = time.monotonic() - t0
            if t >= end:
                break
            while k < len(self.trace) and self.trace[k][0] <= t:
                s = self.trace[k][1]
                k += 1
                if s != shown:
                    arrivals[-1][2] = t
                    arrivals.append([t, s, None, None, None])
                    shown = s
                    loader.set_focus(s, fetch=False)
                    settle_at = t + SETTLE_S
            if settle_at is not None and t >= settle_at:
                settle_at = None
                loader.set_focus(shown)
            sd = loader.sd
            if sd is None:
                continue
            if want is None:
                v = next((v for v in sd.versions or [] if v["name"] == link_version(self.bps)), None)
                want = (sd.images[0]["nlayers"] if v is None or v.get("lossless")
                        else int(v["layers"]))
            held[shown] = max(held.get(shown, 0), sd.held_bytes(shown))
            a = arrivals[-1]
            top = sd.images[shown]["numres"] - 1
            if a[3] is None:
                q, r = sd.levels(shown, top)
                if r >= top and q >= want:
                    a[3] = t
            if a[4] is None:
                best = loader.best(shown)
                if best is not None and best.reduce == 0 and best.layers >= want:
                    a[4] = t
        arrivals[-1][2] = end
        c1 = self.side.counts(self.link)
        fetched = c1["down"] - c0["down"]
        sd = loader.sd
        payload = sum(sd.held_bytes(i) for i in range(len(sd))) if sd is not None else 0
        requests = c1["connections"] - c0["connections"]
        measured = session.link.throughput_bps
        auto = (sd.auto or {}).get("version") if sd is not None else None
        reporter.close()
        loader.close()
        pool.shutdown()
        try:
            session.logout()
        except Exception:  # noqa: BLE001 - the measurement is taken
            pass

        def times(col: int) -> list[float]:
            return [(a[col] - a[0]) if a[col] is not None else math.inf
                    for a in arrivals if a[2] - a[0] >= STOP_S]
        data, shown_t = times(3), times(4)
        return {"stops": len(data), "p50": pct(data, 50), "p95": pct(data, 95),
                "never": sum(1 for x in data if x == math.inf),
                "shown_p50": pct(shown_t, 50), "shown_p95": pct(shown_t, 95),
                "fetched_MB": fetched / 1e6, "wasted_MB": (fetched - sum(held.values())) / 1e6,
                "payload_MB": payload / 1e6, "connections": requests,
                "measured_mbps": measured / 1e6 if measured else None, "auto": auto,
                "received_MB_by_stage": {k: v / 1e6 for k, v in sorted(by_kind.items())}}


def run_real(a) -> list[dict]:
    import tempfile

    from client.policy import PolicyClient
    from client.session import Session
    from transfer import ServerSide, log

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="medview-adaptive-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"data in {work}")
    data = prepare_store(work)
    links = [(f"{m:g} Mbit/s", m * 1e6, a.rtt_ms / 2000) for m in a.links]
    side = ServerSide(data["store_dir"], links, lifetime=4 * 3600)
    rows = []
    try:
        PolicyClient(Session(side.server_url)).set_status(data["study_uid"], 2)
        for tname in a.traces:
            trace = TRACES[tname](random.Random(f"{a.seed}/{tname}"), a.seconds)
            for li, (_name, bps, _lat) in enumerate(links):
                for cname in a.plans:
                    adaptive, predict = CONFIGS[cname]
                    log(f"{tname}, {bps / 1e6:g} Mbit/s, {cname}")
                    r = RealRun(side, li, side.proxy_urls[li], data["series_uid"], bps, trace,
                                adaptive, predict).run()
                    rows.append({"trace": tname, "link_mbps": bps / 1e6, "plan": cname, **r})
    finally:
        side.stop()
    return rows


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, math.ceil(p / 100 * len(xs)) - 1))
    return xs[k]


CONFIGS = {"fixed": (False, False), "adapt": (True, False), "predict": (False, True),
           "both": (True, True)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--rtt-ms", type=float, default=30.0)
    ap.add_argument("--json", default=None, help="write the figures here too")
    ap.add_argument("--real", action="store_true",
                    help="real transfers: the viewer's loader against the real server over "
                         "throttled loopback links (bench/transfer.py's proxy), in real time")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each trace")
    ap.add_argument("--plans", default=None,
                    help="comma-separated plans (default: all four; --real: fixed,both)")
    ap.add_argument("--traces", default=",".join(TRACES),
                    help="comma-separated traces (slow reading, fast skimming, jumping)")
    ap.add_argument("--links", default="1,10,100", help="link speeds in Mbit/s")
    ap.add_argument("--work", default=None,
                    help="--real: folder for the synthetic store (kept and reused)")
    a = ap.parse_args(argv)
    a.plans = (a.plans or ("fixed,both" if a.real else ",".join(CONFIGS))).split(",")
    a.traces = [x.strip() for x in a.traces.split(",") if x.strip()]
    a.links = [float(x) for x in a.links.split(",")]
    bad = [x for x in a.plans if x not in CONFIGS] + [x for x in a.traces if x not in TRACES]
    if bad:
        ap.error(f"unknown plan or trace: {', '.join(bad)}")
    rows = []
    if a.real:
        rows = run_real(a)
    else:
        for tname in a.traces:
            trace = TRACES[tname](random.Random(f"{a.seed}/{tname}"), a.seconds)
            for bps in (m * 1e6 for m in a.links):
                for cname in a.plans:
                    adaptive, predict = CONFIGS[cname]
                    r = Sim(bps, adaptive, predict, a.rtt_ms / 1000, trace).run()
                    rows.append({"trace": tname, "link_mbps": bps / 1e6, "plan": cname, **r})

    def fmt(x: float) -> str:
        return "never" if x == math.inf else f"{x:.2f}"
    shown = a.real
    print(f"{'trace':14} {'link':>8} {'plan':8} {'stops':>5} {'p50 s':>6} {'p95 s':>6} "
          f"{'never':>5} " + (f"{'shown p50':>9} {'p95':>6} " if shown else "")
          + f"{'fetched MB':>10} {'wasted MB':>9}")
    for r in rows:
        print(f"{r['trace']:14} {r['link_mbps']:>5g} Mb {r['plan']:8} {r['stops']:>5} "
              f"{fmt(r['p50']):>6} {fmt(r['p95']):>6} {r['never']:>5} "
              + (f"{fmt(r['shown_p50']):>9} {fmt(r['shown_p95']):>6} " if shown else "")
              + f"{r['fetched_MB']:>10.1f} {r['wasted_MB']:>9.1f}")
    if shown:
        print("\nreceived by stage (MB): " + "; ".join(
            f"{r['trace']}/{r['link_mbps']:g}/{r['plan']}: " + ", ".join(
                f"{k} {v:.2f}" for k, v in r["received_MB_by_stage"].items()) for r in rows))
    skim10 = {r["plan"]: r for r in rows if r["trace"] == "fast skimming" and r["link_mbps"] == 10}
    if "both" in skim10:
        ok_p95 = skim10["both"]["p95"] <= 1.0
        print(f"\ntarget: skimming on 10 Mbit/s with adaptation, p95 sharp <= 1 s: "
              f"{fmt(skim10['both']['p95'])} s ({'met' if ok_p95 else 'NOT met'})")
    for tname in a.traces:
        for mbps in a.links:
            sel = {r["plan"]: r for r in rows if r["trace"] == tname and r["link_mbps"] == mbps}
            if "fixed" not in sel or "both" not in sel:
                continue
            bps = mbps * 1e6
            f, b = sel["fixed"]["wasted_MB"], sel["both"]["wasted_MB"]
            ratio = b / f if f > 0 else 0.0
            print(f"wasted bytes, {tname}, {bps / 1e6:g} Mbit/s: {f:.1f} MB fixed -> {b:.1f} MB "
                  f"adaptive ({ratio:.0%}; target <= 50 %: {'met' if ratio <= 0.5 else 'NOT met'})")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
