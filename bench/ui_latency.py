"""Event-loop latency of the desktop app while it loads a whole series.

    .venv/bin/python bench/ui_latency.py [--slices 64] [--size 512] [--no-scroll]

Builds once (in ``bench/out/``) a store with a synthetic CT series (64 slices of 512²
by default), starts the embedded server, opens the main window offscreen with an empty
packet cache and a viewport large enough to need full resolution, opens the series and,
until every slice is loaded, measures how late a 5 ms ``QTimer`` fires (the time the UI
thread could not react). Meanwhile a simulated user scrolls through the series 10 times
a second (``--no-scroll`` to sit still). Prints p50 / p95 / p99 / max; the target is
p99 < 50 ms (exit code 0 when met, 1 otherwise).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TICK_MS = 5
TARGET_P99_MS = 50.0


def build_store(slices: int, size: int) -> Path:
    """The benchmark store (created on first use, then reused)."""
    from server.ingest import ingest_paths
    from server.sample import make_sample_ct
    from server.store import Store

    store = ROOT / "bench" / "out" / f"store-{slices}x{size}"
    if (store / "catalogue.sqlite").exists():
        with Store(store) as st:
            if st.catalogue.counts()["instances"] == slices:
                return store
    print(f"building the benchmark store ({slices} slices of {size}²; once)…", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        files = make_sample_ct(Path(tmp) / "dicom", slices=slices, size=size, seed=7)
        with Store(store) as st:
            report = ingest_paths(files, st)
    if len(report.imported) + len(report.duplicates) != slices:
        raise SystemExit(f"could not build the store: {report.summary()}")
    return store


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100.0 * (len(s) - 1))))
    return s[k]


def run(slices: int, size: int, scroll: bool, timeout: float) -> int:
    from PySide6.QtCore import QSettings, Qt, QTimer
    from PySide6.QtWidgets import QApplication

    from server.embedded import EmbeddedServer
    from server.store import Store
    from viewer.app import tune_runtime
    from viewer.mainwindow import AppConfig, MainWindow

    tune_runtime()                       # as `medview` does
    store = build_store(slices, size)
    with Store(store) as st:
        uid = st.catalogue.query_series()[0]["SeriesInstanceUID"]
    server = EmbeddedServer(str(store)).start()
    app = QApplication.instance() or QApplication([])
    tmp = tempfile.TemporaryDirectory()
    settings = QSettings(str(Path(tmp.name) / "bench.ini"), QSettings.Format.IniFormat)
    window = MainWindow(AppConfig(cache_path=None), settings)     # nothing cached
    window.resize(1500, 1100)
    window.show()

    def spin_until(cond, limit: float) -> bool:
        t0 = time.monotonic()
        while not cond():
            if time.monotonic() - t0 > limit:
                return False
            app.processEvents()
            time.sleep(0.002)
        return True

    window.connect_to(server.url)
    if not spin_until(lambda: window.backend.connected, 30):
        raise SystemExit("could not connect to the embedded server")
    spin_until(lambda: False, 0.5)     # let the browser and thumbnails settle

    late: list[float] = []
    shown = [0]
    window.imageDisplayed.connect(lambda _img: shown.__setitem__(0, shown[0] + 1))
    last = [time.perf_counter()]

    def tick() -> None:
        now = time.perf_counter()
        late.append(max(0.0, (now - last[0]) * 1000.0 - TICK_MS))
        last[0] = now

    timer = QTimer()
    timer.setTimerType(Qt.TimerType.PreciseTimer)
    timer.timeout.connect(tick)
    scroller = QTimer()
    scroller.setInterval(100)
    direction = [1]

    def scroll_step() -> None:
        stack = window.stack
        target = stack.target_index() or 0
        if not 0 <= target + direction[0] < stack.slice_count():
            direction[0] = -direction[0]
        stack.step_slice(direction[0])

    scroller.timeout.connect(scroll_step)

    def done() -> bool:
        loader = window.loader
        return (loader is not None and loader.state == "idle"
                and all(s.done for s in loader.statuses()) and loader.count == slices)

    t0 = time.perf_counter()
    last[0] = t0
    timer.start(TICK_MS)
    window.open_series(uid)
    if scroll:
        scroller.start()
    ok = spin_until(done, timeout)
    elapsed = time.perf_counter() - t0
    timer.stop()
    scroller.stop()
    status = window.loader.series_status() if window.loader else None
    reduce = window.loader.reduce if window.loader else None
    window.close()
    server.stop()
    tmp.cleanup()

    p50, p95, p99 = (percentile(late, p) for p in (50, 95, 99))
    worst = max(late, default=0.0)
    held = status.held if status else 0
    print()
    print(f"UI event-loop latency while loading {slices} × {size}² "
          f"({held / 1e6:.1f} MB at reduce {reduce}) in {elapsed:.1f} s"
          f"{' with scrolling' if scroll else ''}{'' if ok else ' (TIMED OUT)'}")
    print(f"  {'ticks':>6} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}   "
          f"(ms late against a {TICK_MS} ms timer)")
    print(f"  {len(late):>6} {p50:>7.1f} {p95:>7.1f} {p99:>7.1f} {worst:>7.1f}")
    print(f"  images displayed: {shown[0]}, transfer rate {held / max(elapsed, 1e-9) / 1e6:.1f} MB/s")
    verdict = ok and p99 < TARGET_P99_MS
    print(f"target p99 < {TARGET_P99_MS:.0f} ms: {'PASS' if verdict else 'FAIL'}")
    return 0 if verdict else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=64)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--no-scroll", action="store_true", help="do not simulate scrolling")
    p.add_argument("--timeout", type=float, default=180.0, help="give up after this many s")
    args = p.parse_args(argv)
    return run(args.slices, args.size, not args.no_scroll, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
