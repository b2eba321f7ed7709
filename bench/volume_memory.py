"""Peak memory of a whole volume in the viewer's code path (issue 15): ``medview render
--view vr --folder DIR`` on synthetic CT series of two sizes, each in its own process,
against the raw volume bytes (slices × size² × 2 bytes).

    .venv/bin/python bench/volume_memory.py [--sizes 64,300] [--size 512] [--view vr]

Prints, per series: raw bytes, peak resident memory of the render process, the ratio,
and the marginal cost (extra peak bytes per extra raw byte between the two series).
Targets: peak ≤ 1.5 × raw at the larger series, marginal ≤ 1.5 bytes per raw byte.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_rss_of(cmd: list[str]) -> int:
    """Peak resident bytes of a child process (Linux: wait4's ru_maxrss in kB)."""
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss * 1024


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64,300")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--view", default="vr")
    args = ap.parse_args()
    from server.sample import make_sample_ct

    rows = []
    with tempfile.TemporaryDirectory(prefix="volmem-") as tmp:
        for n in (int(x) for x in args.sizes.split(",")):
            folder = Path(tmp) / f"ct{n}"
            make_sample_ct(folder, slices=n, size=args.size, seed=1)
            out = Path(tmp) / f"out{n}.png"
            cmd = [sys.executable, "-m", "viewer.cli", "render", "--folder", str(folder),
                   "--view", args.view, "--out", str(out)]
            peak = peak_rss_of(cmd)
            raw = n * args.size * args.size * 2
            rows.append((n, raw, peak))
    print(f"{'slices':>7} {'raw MB':>8} {'peak RSS MB':>12} {'peak/raw':>9}")
    for n, raw, peak in rows:
        print(f"{n:>7} {raw / 1e6:8.1f} {peak / 1e6:12.1f} {peak / raw:9.2f}")
    if len(rows) >= 2:
        (n0, r0, p0), (n1, r1, p1) = rows[0], rows[-1]
        print(f"marginal: {(p1 - p0) / (r1 - r0):.2f} bytes of peak per extra raw byte "
              f"({n0} -> {n1} slices)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
