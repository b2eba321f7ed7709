#!/usr/bin/env python
"""Issue 14 benchmark: the codec backends against the layered J2K transport, and the batch
converter against the bare encoder.

    .venv/bin/python bench/codecs.py [--quick] [--slices N] [--min-time S]

1. Data: the synthetic 512x512 sample CT (``server.sample.make_sample_ct``, unsigned
   12-bit) and real images from pydicom-data: a signed CT (693_UNCR, 512x512), an MR
   (MR2_UNCR, 1024x1024), a CR (RG3_UNCR, 1760x1760), an RGB ultrasound (US1_UNCR,
   640x480) and an 8-bit image (vlut_04, 512x512).
2. Per image set and backend (codestream/codecs.py): encode images/s, decode images/s at
   full resolution and at reduce=2 (a quarter of each side; "native" when the codec has
   resolution levels, else a full decode then subsampling), lossless bytes against the
   layered J2K transport codestream the server stores for the same image
   (``codestream.encode.encode_frame``), and the transport's own decode (glymur/OpenJPEG,
   the client's path) for comparison. Every lossless round trip is checked bit-exact.
3. A lossless volume end to end (``--volume N``, default 100 x 512²): fetch and decode
   every slice, 4 threads, (a) the whole layered J2K codestream decoded by glymur (the
   client's engine; after a preview only the remaining layers would travel, the decode
   stays the same) against (b) the HTJ2K RPCL copy decoded by OpenJPH, from a static
   HTTP server over unthrottled loopback and over bench/transfer.py's simulated
   100 and 10 Mbit/s links; both checked bit-exact.
4. The converter (``medview-server convert FOLDER --out DIR --workers N``, run through
   the CLI's entry point; policy codec: JPEG-LS for the CT) on a sample CT folder of
   ``--converter-slices`` files (default 200; each run's worker start-up included), with
   1 and 2 worker processes, against the bare encoder on the same frames in one process
   (and in 2). The converter also reads and writes DICOM (and its report) and proves
   every output by decoding it again; CPU per image is split into encode, proof decode
   and the rest.

Prints tables; writes the numbers to ``bench/out/codecs.json``. Timings are the median
of repeated runs, each at least ``--min-time`` seconds long; the load average is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

REAL = (("693_UNCR.dcm", "CT 512² int16 (14 bits)"),
        ("MR2_UNCR.dcm", "MR 1024² uint16 (12 bits)"),
        ("RG3_UNCR.dcm", "CR 1760² uint16 (10 bits)"),
        ("US1_UNCR.dcm", "US 640x480 RGB 8-bit"),
        ("vlut_04.dcm", "OT 512² uint8"))


def rate(fn, n_items: int, min_time: float, reps: int = 3) -> float:
    """Items per second: median of ``reps`` runs, each repeating ``fn`` for >= min_time."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        k = 0
        while True:
            fn()
            k += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        out.append(k * n_items / dt)
    return statistics.median(out)


def load_sets(tmp: Path, slices: int):
    import pydicom

    from server import sample

    ct_dir = tmp / "ct"
    files = sample.make_sample_ct(ct_dir, slices=slices, size=512, seed=0)
    frames = [pydicom.dcmread(f).pixel_array for f in files]
    sets = [{"name": f"sample CT {slices}x512² (12 bits)", "frames": frames,
             "signed": False, "bits": 12, "files": files}]
    for name, label in REAL:
        p = sample.find_test_file(name)
        if p is None:
            print(f"  ({name} not installed: skipped)")
            continue
        ds = pydicom.dcmread(p)
        sets.append({"name": label, "frames": [ds.pixel_array],
                     "signed": bool(ds.PixelRepresentation), "bits": int(ds.BitsStored)})
    return sets


def bench_set(s: dict, min_time: float) -> dict:
    from codestream import codecs
    from codestream.encode import decode_full, encode_frame

    frames, signed, bits = s["frames"], s["signed"], s["bits"]
    n = len(frames)
    raw = sum(f.nbytes for f in frames)
    res = {"set": s["name"], "images": n, "raw_bytes": raw, "backends": {}}
    colour = frames[0].ndim == 3
    # the transport: layered, precinct-indexed J2K (what the server stores and streams)
    if not colour:
        enc = [encode_frame(f, signed=signed, bits_stored=bits) for f in frames]
        j2k_bytes = sum(len(e.codestream) for e in enc)
        t_dec = rate(lambda: [decode_full(e.codestream, e.offset, signed, bits_stored=bits)
                              for e in enc], n, min_time)
        t_red = rate(lambda: [decode_full(e.codestream, e.offset, signed, reduce=2,
                                          bits_stored=bits) for e in enc], n, min_time)
        res["transport"] = {"bytes": j2k_bytes, "ratio": raw / j2k_bytes,
                            "decode_per_s": t_dec, "decode_reduce2_per_s": t_red}
    else:
        j2k_bytes = None
        res["transport"] = None          # the transport takes colour as RGB 8-bit too,
        # but the ingest converts palettes etc.; the table compares grayscale only
    for c in codecs.all_codecs():
        if not c.lossless or c.transfer_syntax == codecs.HTJ2K_LOSSLESS:
            continue
        why = c.supports(frames[0], signed=signed, bits_stored=bits)
        if why or not c.available:
            res["backends"][c.label] = {"skipped": why or c.missing}
            continue
        data = [c.encode(f, signed=signed, bits_stored=bits) for f in frames]
        for f, d in zip(frames, data):
            assert np.array_equal(c.decode(d, signed=signed, bits_stored=bits), f), c.label
        nbytes = sum(len(d) for d in data)
        res["backends"][c.label] = {
            "transfer_syntax": c.transfer_syntax, "library": c.version,
            "bytes": nbytes, "ratio": raw / nbytes,
            "vs_transport": (nbytes / j2k_bytes) if j2k_bytes else None,
            "encode_per_s": rate(lambda: [c.encode(f, signed=signed, bits_stored=bits)
                                          for f in frames], n, min_time),
            "decode_per_s": rate(lambda: [c.decode(d, signed=signed, bits_stored=bits)
                                          for d in data], n, min_time),
            "decode_reduce2_per_s": rate(lambda: [c.decode(d, 2, signed=signed,
                                                           bits_stored=bits)
                                                  for d in data], n, min_time),
            "reduce": "native" if c.native_reduce else "full decode + subsample",
        }
    return res


_BARE: dict = {}          # what forked bare-encoder workers encode (inherited, not sent)


def _bare_share(k: int, n: int) -> int:
    """Worker ``k`` of ``n``: encode its share of the frames (the bare encoder, no DICOM)."""
    c, frames = _BARE["codec"], _BARE["frames"]
    for f in frames[k::n]:
        c.encode(f, bits_stored=12)
    return len(frames[k::n])


def _bare_processes(n: int) -> float:
    """Seconds for ``n`` fresh processes (fork) to encode every frame, a share each: the
    bare encoder as parallel as the converter's ``n`` workers, start-up included."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    t0 = time.perf_counter()
    with ProcessPoolExecutor(n, mp_context=mp.get_context("fork")) as pool:
        done = sum(pool.map(_bare_share, range(n), [n] * n))
    assert done == len(_BARE["frames"])
    return time.perf_counter() - t0


def _cpu_s() -> float:
    """CPU seconds of this process and its reaped children (worker processes)."""
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _cli_convert(src: Path, dst: Path, workers: int) -> None:
    """``medview-server convert SRC --out DST --workers N`` as its user runs it: the CLI's
    own entry point (argument parsing, policy, the folder's plan, progress lines, the
    report files), in this process; its output is kept, not shown."""
    import contextlib
    import io

    from server.cli import main as cli_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(["convert", str(src), "--out", str(dst), "--workers", str(workers)])
    assert rc == 0 and " 0 failed" in out.getvalue(), out.getvalue() + err.getvalue()[-2000:]


def bench_converter(files: list[Path], tmp: Path, min_time: float, rounds: int = 3) -> dict:
    """Converter vs bare encoder, measured in alternation (bare in 1 process, bare in N
    processes, converter with 1 worker, with N workers, ...) so that a change of machine
    load hits them alike; medians of ``rounds``. The converter runs as the CLI runs it
    (:func:`_cli_convert` on the folder): it reads each DICOM file, encodes, proves the
    output by decoding it again and comparing bit for bit, writes it (atomically,
    fsynced) and the report; the bare encoder only encodes frames already in memory.
    CPU seconds per image (this process and its reaped workers) split the converter's
    cost into the encode, the proof's decode and the rest."""
    import pydicom

    from codestream import codecs

    frames = [pydicom.dcmread(f).pixel_array for f in files]
    src = Path(files[0]).parent
    assert sorted(src.iterdir()) == sorted(map(Path, files)), "the sample CT's folder"
    c = codecs.by_name("jpegls")
    _BARE.update(codec=c, frames=frames)
    encoded = [c.encode(f, bits_stored=12) for f in frames]
    n = len(files)
    ncpu = os.cpu_count() or 1
    ws = sorted({1, 2, ncpu})
    got: dict[str, list[float]] = {"bare": [], **{f"bare{w}": [] for w in ws if w > 1},
                                   **{str(w): [] for w in ws}}
    cpu: dict[str, list[float]] = {"bare": [], "decode": [], **{f"conv{w}": [] for w in ws}}
    for r in range(rounds):
        got["bare"].append(rate(lambda: [c.encode(f, bits_stored=12) for f in frames], n,
                                min_time, reps=1))
        for w in ws:
            if w > 1:
                got[f"bare{w}"].append(n / _bare_processes(w))
        # CPU seconds per image: what the shared machine's load does not change much,
        # unlike the wall-clock rates
        t0 = time.process_time()
        for f in frames:
            c.encode(f, bits_stored=12)
        cpu["bare"].append((time.process_time() - t0) / n)
        t0 = time.process_time()
        for e in encoded:
            c.decode(e, bits_stored=12)
        cpu["decode"].append((time.process_time() - t0) / n)
        for w in ws:
            dst = tmp / f"conv{w}-{r}"
            c0 = _cpu_s()
            t0 = time.perf_counter()
            _cli_convert(src, dst, w)
            dt = time.perf_counter() - t0
            cpu[f"conv{w}"].append((_cpu_s() - c0) / n)
            got[str(w)].append(n / dt)
            shutil.rmtree(dst)
    bare = statistics.median(got["bare"])
    ms = {k: 1000 * statistics.median(v) for k, v in cpu.items()}
    out = {"images": n, "codec": c.label, "cores": ncpu, "workers": ws,
           "bare_encode_per_s": bare, "runs": got, "cpu_runs": cpu,
           "bare_cpu_ms": ms["bare"], "decode_cpu_ms": ms["decode"],
           "converter_cpu_ms": ms["conv1"]}
    for w in ws:
        out[f"converter_{w}w_cpu_ms"] = ms[f"conv{w}"]
    top = max(ws)
    # all cores busy with converter workers (CPU per image as measured with them, start-up
    # included) against one bare encoder: the most the converter can reach here
    out["bound_vs_bare"] = min(top, ncpu) * ms["bare"] / ms[f"conv{top}"]
    for w in ws:
        v = statistics.median(got[str(w)])
        out[f"converter_{w}w_per_s"] = v
        out[f"converter_{w}w_vs_bare"] = v / bare
        if w > 1:
            bn = statistics.median(got[f"bare{w}"])
            out[f"bare_{w}p_per_s"] = bn
            out[f"converter_{w}w_vs_bare_{w}p"] = v / bn
    return out


# --------------------------------------------------------------------------- viewer
def bench_viewer_volume(tmp: Path, slices: int, rounds: int = 3,
                        links_wanted: tuple[str, ...] = ("loopback", "100 Mbit/s", "10 Mbit/s"),
                        ) -> dict:
    """The viewer's own route against the real server (in its own process, with HTJ2K
    final copies in the store): what viewer/mprlayout.py does — ``VolumeLoader(series,
    pool=pool)`` with a pool made as viewer/services.Backend makes the app's one, its
    generator run as a job of that pool — a whole-volume load with the interleaved plan
    (previews, then full quality), the full stage (a) through the rest of the layered J2K
    and (b) through the HTJ2K copies (WADO-RS), and (c) as ``auto`` chooses from the link
    it measures; over unthrottled loopback and bench/transfer.py's 100 and 10 Mbit/s
    links. The routes run interleaved (J2K, HTJ2K, auto, J2K, ...), ``rounds`` times;
    medians, with the load average at each run. Every volume is checked equal."""
    sys.path.append(str(ROOT / "bench"))    # after the project: bench/server.py is a script
    from transfer import ServerSide

    from client.pool import INTERACTION, WorkerPool
    from client.series import SeriesData
    from client.session import Session
    from client.volume_loader import VolumeLoader
    from server import sample
    from server.ingest import ingest_paths
    from server.policy_copies import convert_store
    from server.store import Store
    from viewer.services import POOL_CAPS, POOL_WORKERS

    files = sample.make_sample_ct(tmp / "vv", slices=slices, size=512, seed=2)
    root = tmp / "vvstore"
    root.mkdir()
    (root / "policy.toml").write_text("[codec]\nsize_threshold = 256\n")   # 512² -> HTJ2K
    with Store(root) as st:
        rep = ingest_paths(files, st, workers=2)
        assert len(rep.imported) == slices, rep.summary()
        conv = convert_store(st, workers=2)
        assert conv.ok, conv.summary()
        (series,) = st.catalogue.query_series()
        uid = series["SeriesInstanceUID"]
    links = (("100 Mbit/s", 100e6, 0.001), ("10 Mbit/s", 10e6, 0.005))
    side = ServerSide(str(root), links)
    pool = WorkerPool(POOL_WORKERS, dict(POOL_CAPS))
    out: dict = {"slices": slices, "rounds": rounds, "pool_workers": POOL_WORKERS, "links": {}}

    def one_load(url: str, route: str):
        session = Session(url)
        try:
            sd = SeriesData(session, None, uid)
            loader = VolumeLoader(sd, full_route=route, pool=pool)

            def job(_token):                  # as the viewer runs it: a job of the pool
                stamps = [time.perf_counter()]
                events = []
                for ev in loader.run():
                    events.append(ev)
                    stamps.append(time.perf_counter())
                return events, stamps
            events, stamps = pool.submit(job, INTERACTION).future.result()
        finally:
            session.logout()
        assert events and events[-1].final
        # the full-quality stage: from the previews' last event to the end
        previews = [s for e, s in zip(events, stamps[1:]) if e.stage is not loader.plan[-1]]
        return loader, stamps[-1] - stamps[0], stamps[-1] - (previews[-1] if previews else stamps[0])

    try:
        urls = [("loopback", side.server_url)] + [(n, u) for (n, _b, _l), u in zip(links, side.proxy_urls)]
        for name, url in urls:
            if name not in links_wanted:
                continue
            runs: dict[str, list[dict]] = {"j2k": [], "htj2k": [], "auto": []}
            ref = None
            for _r in range(rounds):
                for route in ("j2k", "htj2k", "auto"):
                    load = os.getloadavg()[0]
                    loader, dt, full_s = one_load(url, route)
                    if ref is None:
                        ref = loader.volume.data.copy()
                    else:
                        assert np.array_equal(loader.volume.data, ref), f"{route} differs"
                    run = {"seconds": dt, "full_stage_seconds": full_s, "bytes": loader.received,
                           "load": load}
                    if route == "auto":
                        c = loader.full_choice
                        run["chose"] = c.route if c else "j2k"
                        run["measured_mbit_s"] = (c.link_bytes_s * 8 / 1e6
                                                  if c and c.link_bytes_s else None)
                        # the model's estimates of the full stage (from the choice on)
                        run["estimated_s"] = ({"j2k": c.j2k_seconds, "htj2k": c.htj2k_seconds}
                                              if c else None)
                    runs[route].append(run)
                    del loader
            row = {"runs": runs}
            for route, rs in runs.items():
                row[route] = {"seconds": statistics.median(r["seconds"] for r in rs),
                              "full_stage_seconds": statistics.median(r["full_stage_seconds"] for r in rs),
                              "load": statistics.median(r["load"] for r in rs)}
                if route == "auto":
                    row[route]["chose"] = "/".join(sorted({r["chose"] for r in rs}))
                    row[route]["measured_mbit_s"] = statistics.median(
                        r["measured_mbit_s"] or 0 for r in rs)
                    est = [r["estimated_s"] for r in rs if r.get("estimated_s")]
                    row[route]["estimated_s"] = ({k: statistics.median(e[k] for e in est)
                                                  for k in ("j2k", "htj2k")} if est else None)
            row["full_stage_speedup"] = (row["j2k"]["full_stage_seconds"]
                                         / row["htj2k"]["full_stage_seconds"])
            row["whole_load_speedup"] = row["j2k"]["seconds"] / row["htj2k"]["seconds"]
            out["links"][name] = row
    finally:
        side.stop()
        pool.shutdown()
    return out


# --------------------------------------------------------------------------- volume
def _static_server_child(conn, root: str, links) -> None:
    """Child process: a static HTTP/1.1 file server on loopback for ``root`` and one
    throttling proxy (bench/transfer.py's link model) per link in front of it."""
    import functools
    import http.server
    import threading

    sys.path.append(str(ROOT / "bench"))    # after the project: bench/server.py is a script
    from transfer import ThrottledProxy

    class Handler(http.server.SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(Handler, directory=root))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    proxies = [ThrottledProxy(("127.0.0.1", port), bps, lat, 3600).start()
               for _n, bps, lat in links]
    conn.send({"direct": f"http://127.0.0.1:{port}", "links": [p.url for p in proxies]})
    conn.recv()                       # "stop"
    for p in proxies:
        p.stop()
    httpd.shutdown()


def bench_volume(tmp: Path, slices: int, threads: int = 4) -> dict:
    """A lossless volume end to end (transfer + decode, bit-exact): the whole layered J2K
    codestreams (decoded by glymur, the client's engine) against the HTJ2K RPCL copies
    (OpenJPH), over unthrottled loopback and simulated 100 and 10 Mbit/s links."""
    import multiprocessing as mp
    from concurrent.futures import ThreadPoolExecutor

    import pydicom
    import requests

    from codestream import codecs
    from codestream.encode import decode_full, encode_frame
    from server import sample

    files = sample.make_sample_ct(tmp / "vol", slices=slices, size=512, seed=1)
    frames = [pydicom.dcmread(f).pixel_array for f in files]
    web = tmp / "web"
    (web / "j2k").mkdir(parents=True)
    (web / "htj2k").mkdir()
    ht = codecs.get(codecs.HTJ2K_LOSSLESS_RPCL)
    offsets = []
    size = {"j2k": 0, "htj2k": 0}
    for i, f in enumerate(frames):
        e = encode_frame(f, signed=False, bits_stored=12)
        offsets.append(e.offset)
        (web / "j2k" / f"{i}.j2k").write_bytes(e.codestream)
        h = ht.encode(f, bits_stored=12)
        (web / "htj2k" / f"{i}.j2c").write_bytes(h)
        size["j2k"] += len(e.codestream)
        size["htj2k"] += len(h)
    links = (("100 Mbit/s", 100e6, 0.001), ("10 Mbit/s", 10e6, 0.005))
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_static_server_child, args=(child, str(web), links), daemon=True)
    proc.start()
    urls = parent.recv()
    out = {"slices": slices, "bytes": size, "threads": threads, "links": {}}
    try:
        for name, base in [("loopback", urls["direct"])] + [
                (n, u) for (n, _b, _l), u in zip(links, urls["links"])]:
            row = {}
            for kind in ("j2k", "htj2k"):
                local = __import__("threading").local()

                def one(i):
                    if not hasattr(local, "s"):
                        local.s = requests.Session()
                    ext = "j2k" if kind == "j2k" else "j2c"
                    r = local.s.get(f"{base}/{kind}/{i}.{ext}", timeout=600)
                    r.raise_for_status()
                    if kind == "j2k":
                        return decode_full(r.content, offsets[i], False, bits_stored=12)
                    return ht.decode(r.content)
                t0 = time.perf_counter()
                with ThreadPoolExecutor(threads) as pool:
                    vol = list(pool.map(one, range(slices)))
                dt = time.perf_counter() - t0
                exact = all(np.array_equal(a.astype(np.int32), b.astype(np.int32))
                            for a, b in zip(vol, frames))
                row[kind] = {"seconds": dt, "bit_exact": exact}
            row["htj2k_speedup"] = row["j2k"]["seconds"] / row["htj2k"]["seconds"]
            out["links"][name] = row
    finally:
        parent.send("stop")
        proc.join(20)
        if proc.is_alive():
            proc.kill()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=32)
    ap.add_argument("--converter-slices", type=int, default=200, metavar="N",
                    help="files of the converter comparison (default 200: a batch conversion runs "
                         "over folders, so the workers' start-up is spread as in real use)")
    ap.add_argument("--quick", action="store_true", help="8 slices, short timings")
    ap.add_argument("--min-time", type=float, default=0.5)
    ap.add_argument("--converter-only", action="store_true",
                    help="only the converter against the bare encoder")
    ap.add_argument("--volume", type=int, default=100, metavar="N",
                    help="slices of the end-to-end volume comparison (0 = skip; default 100)")
    ap.add_argument("--viewer-volume", type=int, default=0, metavar="N",
                    help="slices of the viewer-route comparison (viewer/volume_loader.py "
                         "against the real server with HTJ2K copies; 0 = skip)")
    ap.add_argument("--viewer-only", action="store_true",
                    help="only the viewer-route comparison (--viewer-volume, default 48)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds of the viewer-route comparison (default 3)")
    ap.add_argument("--links", default="loopback,100 Mbit/s,10 Mbit/s",
                    help="links of the viewer-route comparison, comma-separated")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "codecs.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.slices, args.min_time, args.converter_slices = 8, 0.2, 32
    load0 = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="medview-bench-codecs-"))
    if args.viewer_only:
        try:
            n = args.viewer_volume or 48
            print(f"== the viewer's whole-volume load ({n} x 512², previews then full quality)")
            vv = bench_viewer_volume(tmp, n, args.rounds, tuple(args.links.split(",")))
            print(f"whole load (full-quality stage) in seconds, medians of {args.rounds} "
                  "interleaved rounds")
            print(f"{'link':<12} {'J2K layers':>16} {'HTJ2K copies':>16} {'auto':>16}  auto chose")
            for name, row in vv["links"].items():
                a = row["auto"]
                cell = lambda r: f"{r['seconds']:6.2f} ({r['full_stage_seconds']:5.2f})"  # noqa: E731
                print(f"{name:<12} {cell(row['j2k']):>16} {cell(row['htj2k']):>16} {cell(a):>16}  "
                      f"{a['chose']} (measured {a['measured_mbit_s'] or 0:.0f} Mbit/s)")
                if a.get("estimated_s"):
                    e = a["estimated_s"]
                    print(f"{'':<12} auto's estimate from the choice on: J2K {e['j2k']:.2f} s, "
                          f"HTJ2K {e['htj2k']:.2f} s (medians)")
                print(f"{'':<12} HTJ2K sooner: {row['full_stage_speedup']:.1f}x the full-quality "
                      f"stage (the remaining J2K layers), {row['whole_load_speedup']:.1f}x the "
                      f"whole load; load average {row['j2k']['load']:.1f} (median at the runs)")
            load1 = os.getloadavg()[0]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_name("codecs_viewer.json").write_text(json.dumps(
                {"viewer_volume": vv, "loadavg": [load0, load1]}, indent=1))
            print(f"load average {load0:.1f} before, {load1:.1f} after")
            return 0
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    try:
        sets = load_sets(tmp, args.slices) if not args.converter_only else []
        results = []
        for s in ([] if args.converter_only else sets):
            print(f"\n== {s['name']}: {len(s['frames'])} images")
            r = bench_set(s, args.min_time)
            results.append(r)
            t = r["transport"]
            print(f"{'codec':<22} {'bytes/J2K':>9} {'ratio':>6} {'enc/s':>8} {'dec/s':>8} "
                  f"{'dec r2/s':>9}  reduce")
            if t:
                print(f"{'J2K transport (glymur)':<22} {1.0:>9.3f} {t['ratio']:>6.2f} {'':>8} "
                      f"{t['decode_per_s']:>8.1f} {t['decode_reduce2_per_s']:>9.1f}  native")
            for label, b in r["backends"].items():
                if "skipped" in b:
                    print(f"{label:<22} skipped: {b['skipped']}")
                    continue
                vs = f"{b['vs_transport']:.3f}" if b["vs_transport"] else "-"
                print(f"{label:<22} {vs:>9} {b['ratio']:>6.2f} {b['encode_per_s']:>8.1f} "
                      f"{b['decode_per_s']:>8.1f} {b['decode_reduce2_per_s']:>9.1f}  {b['reduce']}")
        from server import sample
        conv_files = sample.make_sample_ct(tmp / "converter-ct", slices=args.converter_slices,
                                           size=512, seed=0)
        print(f"\n== converter vs bare encoder (sample CT, {len(conv_files)} files of 512², JPEG-LS, "
              "policy)")
        conv = bench_converter(conv_files, tmp, args.min_time)
        print(f"bare encoder, 1 process (as the CLI's user would run it)  "
              f"{conv['bare_encode_per_s']:8.1f} images/s")
        for w in conv["workers"]:
            if w > 1:
                print(f"bare encoder, {w} processes (same parallelism)           "
                      f"{conv[f'bare_{w}p_per_s']:8.1f} images/s")
        for w in conv["workers"]:
            line = (f"converter, {w} worker{'s' if w > 1 else ' '} (verified, written)         "
                    f"{conv[f'converter_{w}w_per_s']:8.1f} images/s  = "
                    f"{conv[f'converter_{w}w_vs_bare']:.2f}x the 1-process bare encoder")
            if w > 1:
                line += (f", {conv[f'converter_{w}w_vs_bare_{w}p']:.2f}x the {w}-process "
                         "bare encoder")
            print(line + " (target >= 0.8x)" if w == max(conv["workers"]) else line)
        top = max(conv["workers"])
        rest1 = conv["converter_cpu_ms"] - conv["bare_cpu_ms"] - conv["decode_cpu_ms"]
        print(f"CPU per image: bare encoder {conv['bare_cpu_ms']:.2f} ms; converter "
              f"{conv['converter_cpu_ms']:.2f} ms in one process = encode "
              f"{conv['bare_cpu_ms']:.2f} + proof decode {conv['decode_cpu_ms']:.2f} + the rest "
              f"{rest1:.2f} (read, header, encapsulate, compare, hash, write + fsync, report)"
              + (f", {conv[f'converter_{top}w_cpu_ms']:.2f} ms with {top} workers (their "
                 "start-up included)" if top > 1 else ""))
        print(f"the proof decodes every output again, so the converter's CPU per image is at "
              f"least {conv['bare_cpu_ms'] + conv['decode_cpu_ms']:.2f} ms: {top} workers on "
              f"{conv['cores']} free cores reach at most {conv['bound_vs_bare']:.2f}x the "
              f"1-process bare encoder (measured CPU), at most "
              f"{conv['cores'] * conv['bare_cpu_ms'] / (conv['bare_cpu_ms'] + conv['decode_cpu_ms']):.2f}x "
              "if the rest cost nothing")
        vol = None
        if args.volume and not args.converter_only:
            n = 16 if args.quick else args.volume
            print(f"\n== lossless volume end to end ({n} x 512², transfer + decode, 4 threads)")
            vol = bench_volume(tmp, n)
            b = vol["bytes"]
            print(f"bytes: J2K transport {b['j2k']}, HTJ2K copies {b['htj2k']} "
                  f"({b['htj2k'] / b['j2k']:.3f})")
            for name, row in vol["links"].items():
                print(f"{name:<11} J2K {row['j2k']['seconds']:6.2f} s   HTJ2K "
                      f"{row['htj2k']['seconds']:6.2f} s   HTJ2K {row['htj2k_speedup']:.2f}x "
                      f"sooner  (bit-exact: {row['j2k']['bit_exact']}, {row['htj2k']['bit_exact']})")
        load1 = os.getloadavg()[0]
        if max(load0, load1) > 0.5:
            print(f"\nwarning: load average {load0:.1f} before, {load1:.1f} after: "
                  "timings are disturbed by other work")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"sets": results, "converter": conv, "volume": vol,
                                        "load": [load0, load1], "cpus": os.cpu_count()},
                                       indent=1))
        print(f"\nwritten: {args.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
