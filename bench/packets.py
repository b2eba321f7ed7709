"""Packet planner and streamer speed, this tree against a git revision, in one run.

:func:`server.packets.plan` and :func:`server.packets.stream` run on every ``/jpip``,
slab and slide request. This script times them without HTTP, sockets or a store: a
synthetic CT series (``--slices`` frames of ``--size``² 12-bit pixels, encoded as the
ingest encodes them) is held in memory, and each request kind below is planned and
streamed by the module of this tree and by ``server/packets.py`` of ``--against`` (default
``HEAD``), loaded side by side. Runs alternate between the two, so the machine's load
hits both alike; the best of ``--reps`` runs (process CPU time by default, ``--clock
wall`` for wall time) is printed per request kind, with the ratio.
The two must send the same bytes: every response is compared, and a difference stops
the script.

Request kinds (all ``framing=mv`` unless named):

* ``preview``    every image, ``layers=1``, coarsest resolution;
* ``whole``      every image, every layer, full resolution (quality order);
* ``resolution`` the same in resolution order;
* ``region``     a region of every image, a quarter of its side wide (precincts chosen per resolution);
* ``increment``  ``layers=2`` on a model already holding ``layers=1`` (what a viewer asks next);
* ``jpp``        ``whole`` as a bare JPP-stream (``framing=jpp``).

Usage::

    .venv/bin/python bench/packets.py                    # this tree against HEAD
    .venv/bin/python bench/packets.py --against 50f9cde  # against a commit
    .venv/bin/python bench/packets.py --quick

Nothing is asserted about speed; figures are printed (and written to
``bench/out/packets.json``) with the load average before and after.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from codestream.encode import encode_frame  # noqa: E402
from server import packets as current  # noqa: E402


def load_revision(rev: str):
    """``server/packets.py`` as it was at ``rev``, imported as a sibling module of
    :mod:`server` (so its relative imports resolve to this tree's modules)."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:server/packets.py"],
                          check=True, capture_output=True, text=True).stdout
    tmp = Path(tempfile.mkdtemp(prefix="mv-bench-packets-")) / "packets_before.py"
    tmp.write_text(text)
    spec = importlib.util.spec_from_file_location("server._bench_packets_before", tmp)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def make_frames(n: int, size: int) -> list:
    """Encoded frames of a smooth phantom with noise (12 bits stored, unsigned)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for k in range(n):
        body = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.16 + 0.02 * np.sin(k / 5)) * 1000
        img = body + 200 * np.sin(6 * xx + k / 7) * np.cos(5 * yy) + rng.normal(0, 10, (size, size))
        out.append(encode_frame(np.clip(img + 1024, 0, 4095).astype(np.uint16),
                                signed=False, bits_stored=12))
    return out


def sources_for(mod, frames) -> list:
    return [mod.ImageSource(i, f"1.2.3.{i}/1", f.index, (lambda cs=f.codestream: cs))
            for i, f in enumerate(frames)]


def kinds(frames, size: int) -> dict[str, tuple[dict, dict | None]]:
    """name -> (request fields, fields of a request run first on the same model)."""
    numres = frames[0].index.numres
    n = len(frames)
    base = {"target": "1.2.3", "comps": f"0-{n - 1}"}
    r, w = size // 8, max(16, size // 4)
    return {
        "preview": ({**base, "layers": "1", "reduce": str(numres - 1)}, None),
        "whole": (base, None),
        "resolution": ({**base, "order": "resolution"}, None),
        "region": ({**base, "roff": f"{r},{r}", "rsiz": f"{w},{w}"}, None),
        "increment": ({**base, "layers": "2"}, {**base, "layers": "1"}),
        "jpp": ({**base, "framing": "jpp"}, None),
    }


def run_once(mod, srcs, fields: dict, first: dict | None, clock=time.process_time
             ) -> tuple[float, float, bytes]:
    """(plan seconds, stream seconds, response bytes) of one request on a fresh model."""
    model = mod.CacheModel()
    if first is not None:
        for _ in mod.stream(mod.plan(mod.parse_request(dict(first)), srcs, model), model):
            pass
    t0 = clock()
    p = mod.plan(mod.parse_request(dict(fields)), srcs, model)
    t1 = clock()
    body = b"".join(mod.stream(p, model))
    t2 = clock()
    return t1 - t0, t2 - t1, body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", default="HEAD", help="git revision to compare with")
    ap.add_argument("--slices", type=int, default=48)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="16 slices of 256², 5 reps")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="process CPU time (default: less disturbed by a busy machine) "
                         "or wall time")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "packets.json"))
    a = ap.parse_args()
    if a.quick:
        a.slices, a.size, a.reps = 16, 256, 5
    before = load_revision(a.against)
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", a.against],
                         check=True, capture_output=True, text=True).stdout.strip()
    print(f"encoding {a.slices} frames of {a.size}x{a.size}...", file=sys.stderr)
    frames = make_frames(a.slices, a.size)
    mods = {"before": before, "after": current}
    srcs = {name: sources_for(m, frames) for name, m in mods.items()}
    load0 = os.getloadavg()
    results: dict = {"against": rev, "slices": a.slices, "size": a.size, "reps": a.reps,
                     "load_before": load0, "kinds": {}}
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    results["clock"] = a.clock
    print(f"plan + stream, best of {a.reps}, ms of {a.clock} time "
          f"(before = {rev}, after = this tree)")
    print(f"{'request':<11} {'bytes':>10} {'plan before':>12} {'plan after':>11} "
          f"{'stream before':>14} {'stream after':>13} {'total after/before':>19}")
    for name, (fields, first) in kinds(frames, a.size).items():
        best = {m: [float("inf"), float("inf")] for m in mods}
        bodies = {}
        for _ in range(a.reps):
            for m in mods:               # alternate: the same load for both
                tp, ts, body = run_once(mods[m], srcs[m], fields, first, clock)
                best[m][0] = min(best[m][0], tp)
                best[m][1] = min(best[m][1], ts)
                bodies[m] = body
        if bodies["before"] != bodies["after"]:
            sys.exit(f"{name}: the responses differ ({len(bodies['before'])} bytes before, "
                     f"{len(bodies['after'])} after)")
        b, f = best["before"], best["after"]
        ratio = sum(f) / sum(b)
        print(f"{name:<11} {len(bodies['after']):>10} {b[0] * 1e3:>12.2f} {f[0] * 1e3:>11.2f} "
              f"{b[1] * 1e3:>14.2f} {f[1] * 1e3:>13.2f} {ratio:>19.3f}")
        results["kinds"][name] = {"bytes": len(bodies["after"]),
                                  "plan_ms": [b[0] * 1e3, f[0] * 1e3],
                                  "stream_ms": [b[1] * 1e3, f[1] * 1e3], "ratio": ratio}
    results["load_after"] = os.getloadavg()
    print(f"load average {load0[0]:.2f} before, {results['load_after'][0]:.2f} after "
          f"({os.cpu_count()} cpus); responses identical")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
