#!/usr/bin/env python
"""The decode costs behind ``client.frames.RATES`` (the full-quality route choice).

    .venv/bin/python bench/full_load_rates.py [--slices N] [--reps R]

On the synthetic sample CT (``server.sample.make_sample_ct``, 512², 12 bits; the
transport's layered J2K codestream, ``codestream.encode.encode_frame``, and the HTJ2K
RPCL copy the server's converter makes), the CPU seconds of one decode on one thread
(``time.process_time``, OpenJPEG on the calling thread: on a shared machine CPU time is
what does not change with the other work; the loader's wall time is this spread over
the cores):

* J2K at full resolution with 1..L quality layers (the full stage decodes every image at
  each layer recommendation, then all layers), fitted as ``per_pixel * pixels +
  per_byte * bytes decoded`` (least squares);
* J2K at the previews' reduction (1/4 of each side) with one layer;
* HTJ2K (OpenJPH) at full resolution.

Prints the constants in the units RATES uses.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def cpu(fn, reps: int) -> float:
    """Median process CPU seconds of ``fn``."""
    out = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        out.append(time.process_time() - t0)
    return float(np.median(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=12)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)

    import pydicom

    from codestream import codecs
    from codestream.encode import encode_frame, openjpeg_decode
    from server import sample

    with tempfile.TemporaryDirectory(prefix="medview-rates-") as tmp:
        files = sample.make_sample_ct(Path(tmp), slices=args.slices, size=512, seed=3)
        frames = [pydicom.dcmread(f).pixel_array for f in files]
    ht = codecs.get(codecs.HTJ2K_LOSSLESS_RPCL)
    enc = [encode_frame(f, signed=False, bits_stored=12) for f in frames]
    hts = [ht.encode(f, bits_stored=12) for f in frames]
    for f, h in zip(frames, hts):
        assert np.array_equal(ht.decode(h, bits_stored=12), f)
    px = frames[0].size
    nl = enc[0].index.nlayers
    # warm up both libraries (first call loads them)
    openjpeg_decode(enc[0].codestream, threads=0)
    ht.decode(hts[0], bits_stored=12)

    rows = []                        # (pixels, bytes, seconds) per decode
    for q in range(1, nl + 1):
        nbytes = float(np.mean([e.index.bytes_at(q, e.index.numres - 1) for e in enc]))
        s = cpu(lambda: [openjpeg_decode(e.codestream, layers=q, threads=0) for e in enc],
                args.reps) / len(enc)
        rows.append((px, nbytes, s))
        print(f"J2K full resolution, {q} layer(s): {nbytes / 1e3:7.1f} kB  {s * 1e3:6.2f} ms CPU")
    a = np.array([[p, b] for p, b, _ in rows])
    y = np.array([s for *_, s in rows])
    (per_px, per_byte), *_ = np.linalg.lstsq(a, y, rcond=None)
    red = cpu(lambda: [openjpeg_decode(e.codestream, layers=1, reduce=2, threads=0) for e in enc],
              args.reps) / len(enc)
    h = cpu(lambda: [ht.decode(d, bits_stored=12) for d in hts], args.reps) / len(hts)
    ratio = sum(map(len, hts)) / sum(len(e.codestream) for e in enc)
    print(f"J2K 1/4 resolution, 1 layer: {red * 1e3:6.2f} ms CPU")
    print(f"HTJ2K full resolution: {h * 1e3:6.2f} ms CPU; bytes {ratio:.3f} x the J2K")
    print("RATES (CPU seconds on one core):")
    print(f"  j2k_cpu_s_per_px   {per_px:.3e}")
    print(f"  j2k_cpu_s_per_byte {per_byte:.3e}")
    print(f"  j2k_preview_cpu_s_per_px {red / (px / 16):.3e}")
    print(f"  htj2k_cpu_s_per_px {h / px:.3e}")
    print(f"  htj2k_size_ratio   {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
