"""Super-resolution benchmark: the shipped generator against bicubic on held-out real
histology, and its speed on the CPU.

    .venv/bin/python bench/sr.py [--repeat 5] [--out bench/out/sr.json]

Quality: the held-out tiles of :mod:`imaging.srdata`, never used in training, from
two real slides: ``ihc`` (four 128×128 tiles of scikit-image's IHC image, columns
384-511) and ``he`` (twelve tissue-rich 128×128 tiles of the bottom rows of the
CMU-1-Small-Region Aperio H&E slide). Each tile is reduced by s×s block mean (8-bit) and
brought back ×s by (a) bicubic (Keys a = -0.5, the generator's own base) and (b) the
generator; PSNR (dB) and SSIM (Gaussian window, σ = 1.5, mean over RGB) against the
original, ignoring an s-pixel border. Target: generator ≥ bicubic + 1 dB at ×4. Also
reported: the generator's self-ensemble (mean over the 8 flips/rotations of the input).

Speed: tiles per second — a 512×512 output tile (the pyramid's tile) and a 256×256 one
(the viewer's SR tile), each from a (tile/s)² input plus the 8-pixel context margin on
every side — with numpy/BLAS and, when installed, ONNX Runtime (:mod:`imaging.sr_ort`,
the same layers and weights) on 2 threads (the machine has 2 cores) and on 1 thread,
median (and best) of ``--repeat`` runs after a warm-up, the backends' runs alternating
(on a shared machine both see the same load; the load average is printed). ``--speed-only --scales 4`` for the speed
alone.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quality(scale: int, which: str) -> dict:
    import numpy as np

    from imaging import sr, srdata

    g = sr.load_generator(scale)
    rows = []
    for i, hr in enumerate(srdata.heldout_tiles(which=which)):
        lr = (sr.area_downscale(hr, scale) + 0.5).astype(np.uint8)
        bic = (np.clip(sr.bicubic_upscale(lr.astype(np.float32) / 255, scale), 0, 1) * 255
               + 0.5).astype(np.uint8)
        out = g.upscale(lr)
        ens = g.upscale(lr, ensemble=True)
        rows.append({"tile": i,
                     "psnr_ensemble": srdata.psnr(hr, ens, scale),
                     "ssim_ensemble": srdata.ssim(hr, ens, scale),
                     "psnr_bicubic": srdata.psnr(hr, bic, scale),
                     "psnr_generator": srdata.psnr(hr, out, scale),
                     "ssim_bicubic": srdata.ssim(hr, bic, scale),
                     "ssim_generator": srdata.ssim(hr, out, scale)})
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "tile"}
    mean["psnr_gain_db"] = mean["psnr_generator"] - mean["psnr_bicubic"]
    mean["ssim_gain"] = mean["ssim_generator"] - mean["ssim_bicubic"]
    mean["psnr_gain_ensemble_db"] = mean["psnr_ensemble"] - mean["psnr_bicubic"]
    mean["tiles_beating_bicubic"] = sum(r["psnr_generator"] > r["psnr_bicubic"] for r in rows)
    return {"scale": scale, "set": which, "tiles": rows, "mean": mean, "weights_bytes":
            sr.weights_path(scale).stat().st_size, "meta": g.meta}


def speed(scale: int, threads: int, repeat: int, out: int = 512,
          backends: tuple[str, ...] = ("numpy",)) -> list[dict]:
    """Tiles per second of each backend, in a child process so that the BLAS (or ONNX
    Runtime) thread count applies; the backends' runs alternate, so that on a shared
    machine they see the same load."""
    code = f"""
import time, json, numpy as np
from imaging import sr
gs = [sr.load_generator({scale}, backend=b) for b in {list(backends)!r}]
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
    p.add_argument("--scales", default="2,4")
    a = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from imaging import srdata
    from imaging.sr_ort import available

    backends = ["numpy"] + (["onnxruntime"] if available() else [])
    report = {"loadavg_before": os.getloadavg()}
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    for s in (int(v) for v in a.scales.split(",")):
        sp = [d for o in (512, 256) for t in (2, 1)
              for d in speed(s, t, a.repeat, o, tuple(backends))]
        if a.speed_only:
            report[f"x{s}"] = {"speed": sp}
            for d in sp:
                print(f"x{s} {d['output']}x{d['output']} output tiles, {d['backend']}, "
                      f"{d['threads']} thread(s): {d['tiles_per_s']:.2f} tiles/s "
                      f"({d['median_s'] * 1000:.0f} ms per tile; best "
                      f"{d['best_tiles_per_s']:.2f} tiles/s)")
            continue
        qs = {w: quality(s, w) for w in srdata.SETS}
        report[f"x{s}"] = {"quality": qs, "speed": sp}
        print(f"x{s} (weights {qs['ihc']['weights_bytes'] / 1e3:.0f} kB)")
        print(f"  {'held-out set':<14}{'tiles':>6}{'bicubic dB':>12}{'generator dB':>14}"
              f"{'gain dB':>9}{'ensemble gain':>15}{'SSIM bic':>10}{'SSIM gen':>10}{'wins':>6}")
        for w, q in qs.items():
            m = q["mean"]
            print(f"  {w:<14}{len(q['tiles']):>6}{m['psnr_bicubic']:>12.2f}"
                  f"{m['psnr_generator']:>14.2f}{m['psnr_gain_db']:>+9.2f}"
                  f"{m['psnr_gain_ensemble_db']:>+15.2f}{m['ssim_bicubic']:>10.4f}"
                  f"{m['ssim_generator']:>10.4f}{m['tiles_beating_bicubic']:>4}/{len(q['tiles'])}")
        rows = [r for q in qs.values() for r in q["tiles"]]
        pooled = {k: sum(r[k] for r in rows) / len(rows) for k in
                  ("psnr_bicubic", "psnr_generator", "psnr_ensemble", "ssim_bicubic",
                   "ssim_generator")}
        wins = sum(r["psnr_generator"] > r["psnr_bicubic"] for r in rows)
        report[f"x{s}"]["pooled"] = dict(pooled, tiles=len(rows), wins=wins)
        print(f"  {'all (pooled)':<14}{len(rows):>6}{pooled['psnr_bicubic']:>12.2f}"
              f"{pooled['psnr_generator']:>14.2f}"
              f"{pooled['psnr_generator'] - pooled['psnr_bicubic']:>+9.2f}"
              f"{pooled['psnr_ensemble'] - pooled['psnr_bicubic']:>+15.2f}"
              f"{pooled['ssim_bicubic']:>10.4f}{pooled['ssim_generator']:>10.4f}"
              f"{wins:>4}/{len(rows)}")
        for d in sp:
            print(f"  {d['output']}x{d['output']} output tiles, {d['backend']}, "
                  f"{d['threads']} thread(s): "
                  f"{d['tiles_per_s']:.2f} tiles/s ({d['median_s'] * 1000:.0f} ms per tile)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2, default=float))
    print(f"written {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
