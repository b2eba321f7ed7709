"""Server speed, side by side in one run (issue 15).

Prints:

* **idle**: tiny ``/jpip`` (1 image, 1 layer, 64² images) and QIDO (study query) median
  and p99, for a 20-image and a 2,000-image series in the same store, and their ratio;
* **load**: N concurrent sessions (default 50 and 200), each streaming a whole series
  over and over, while this process measures small requests (login, QIDO, tiny /jpip):
  p50 / p99, errors and 503s, and what the streaming sessions saw (streams done, 503s);
* **ingest**: images/s of ``ingest_paths`` (one worker per core) against bare
  ``opj_compress -ImgDir`` with the same settings on the same frames, as one process (as
  a user runs it) and as one process per core on a share of the frames each: verified
  before the commit (``verify=True``; its default workers, and worker processes); stored with the lossless layer pending
  (``verify=False``: lossy layers served at once); and until :func:`server.verify.
  verify_pending` has verified every lossless layer (the whole cost).

Usage::

    .venv/bin/python bench/server.py                  # everything (a few minutes)
    .venv/bin/python bench/server.py --quick          # 200-image series, 10/40 sessions
    .venv/bin/python bench/server.py --work /tmp/srvbench   # keep and reuse the stores
    .venv/bin/python bench/server.py --skip load,ingest

Nothing is asserted: the figures are printed (and written to ``bench/out/server.json``).
The server runs in a child process (``EmbeddedServer``); the streaming sessions run in a
second child process (threads, one per session), so the measuring client is not held up
by them more than by the machine itself. Timings depend on the machine's load, which the
script prints.
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OPJ_COMPRESS = shutil.which("opj_compress") or "/usr/bin/opj_compress"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = min(len(v) - 1, max(0, int(round(p / 100.0 * (len(v) - 1)))))
    return v[k]


# =========================================================================== data
def make_store(work: Path, sizes: tuple[int, ...], px: int) -> tuple[Path, dict[int, dict]]:
    """One store with one series per size (seeds differ); reused when already there."""
    from server.ingest import ingest_paths
    from server.sample import make_sample_ct
    from server.store import Store
    from server.verify import verify_pending

    store_dir = work / "store"
    info_path = work / "series.json"
    if info_path.exists():
        info = {int(k): v for k, v in json.loads(info_path.read_text()).items()}
        if all(n in info for n in sizes):
            return store_dir, info
    info = {}
    with Store(store_dir) as store:
        for seed, n in enumerate(sizes, start=40):
            src = work / f"dicom-{n}"
            log(f"writing {n} synthetic {px}² slices")
            files = make_sample_ct(src, slices=n, size=px, seed=seed)
            t = time.perf_counter()
            rep = ingest_paths(files, store, verify=False)
            verify_pending(store)          # every layer served, as after a verified ingest
            log(f"ingested and verified {len(rep.imported)} in "
                f"{time.perf_counter() - t:.1f} s")
            uid = files and __import__("pydicom").dcmread(files[0], stop_before_pixels=True)
            info[n] = {"series": str(uid.SeriesInstanceUID), "study": str(uid.StudyInstanceUID)}
            shutil.rmtree(src, ignore_errors=True)
    info_path.write_text(json.dumps(info))
    return store_dir, info


# =========================================================================== server
def server_child(conn, store_dir: str) -> None:
    sys.path.insert(0, str(ROOT))
    from server.embedded import EmbeddedServer

    srv = EmbeddedServer(store_dir).start()
    conn.send({"host": srv.host, "port": srv.port})
    try:
        conn.recv()
    except (EOFError, OSError):
        pass
    srv.stop()


class Client:
    """One keep-alive connection, one session (the password-less ``local`` user)."""

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)
        self.sid = None

    def call(self, method: str, path: str, body: bytes | None = None,
             headers: dict | None = None, sink: bool = False) -> tuple[int, bytes, dict]:
        h = dict(headers or {})
        if self.sid:
            h["Authorization"] = f"Bearer {self.sid}"
        if body is not None:
            h["Content-Type"] = "application/json"
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=body, headers=h)
                r = self.conn.getresponse()
                if sink:
                    n = 0
                    while True:
                        chunk = r.read(1 << 16)
                        if not chunk:
                            break
                        n += len(chunk)
                    data = n.to_bytes(8, "little")
                else:
                    data = r.read()
                return r.status, data, dict(r.getheaders())
            except (http.client.HTTPException, ConnectionError, OSError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port,
                                                       timeout=self.timeout)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def login(self) -> int:
        st, data, _ = self.call("POST", "/api/login", json.dumps({"username": "local"}).encode())
        if st == 200:
            self.sid = json.loads(data)["session"]
        return st


def tiny_jpip(series: str) -> str:
    return "/jpip?" + urlencode({"target": series, "comps": "0", "layers": "1",
                                 "framing": "mv"})


def qido(study: str) -> str:
    return "/dicomweb/studies?" + urlencode({"StudyInstanceUID": study})


def timed(c: Client, method: str, path: str, body=None) -> tuple[float, int]:
    t = time.perf_counter()
    st, _, _ = c.call(method, path, body, sink=True)
    return time.perf_counter() - t, st


def idle(host, port, info: dict[int, dict], n: int) -> dict:
    """Median / p99 per series size and kind; the sizes alternate request by request, so
    a change of the machine's load affects them alike (the ratio is what counts)."""
    c = Client(host, port)
    c.login()
    paths = {(size, name): path for size, s in info.items()
             for name, path in (("jpip", tiny_jpip(s["series"])), ("qido", qido(s["study"])))}
    for path in paths.values():
        for _ in range(5):
            timed(c, "GET", path)
    times: dict = {k: [] for k in paths}
    for _ in range(n):
        for k, path in paths.items():
            dt, st = timed(c, "GET", path)
            if st != 200:
                raise RuntimeError(f"{path}: HTTP {st}")
            times[k].append(dt)
    out: dict = {}
    for (size, name), ts in times.items():
        out.setdefault(size, {})[name] = {"median_ms": 1e3 * statistics.median(ts),
                                          "p99_ms": 1e3 * pct(ts, 99)}
    return out


# =========================================================================== load
def streamer_child(conn, host: str, port: int, series: str, sessions: int) -> None:
    """Child process: ``sessions`` threads, each logged in and streaming the whole series
    over and over until told to stop; reports counts."""
    stop = threading.Event()
    lock = threading.Lock()
    counts = {"streams": 0, "bytes": 0, "503": 0, "errors": 0, "logins": 0,
              "login_503": 0, "retry_after": []}

    def run() -> None:
        c = Client(host, port, timeout=120)
        while not stop.is_set():
            st = c.login()
            if st == 200:
                with lock:
                    counts["logins"] += 1
                break
            with lock:
                counts["login_503" if st == 503 else "errors"] += 1
            stop.wait(0.5)
        path = "/jpip?" + urlencode({"target": series, "framing": "mv"})
        while not stop.is_set():
            try:
                st, data, h = c.call("GET", path, sink=True)
            except Exception:  # noqa: BLE001
                with lock:
                    counts["errors"] += 1
                continue
            with lock:
                if st == 200:
                    counts["streams"] += 1
                    counts["bytes"] += int.from_bytes(data, "little")
                elif st == 503:
                    counts["503"] += 1
                    counts["retry_after"].append(h.get("retry-after") or h.get("Retry-After"))
                else:
                    counts["errors"] += 1
            if st == 503:
                try:
                    wait = float(h.get("retry-after") or h.get("Retry-After") or 1)
                except ValueError:
                    wait = 1.0
                stop.wait(min(wait, 5.0))

    threads = [threading.Thread(target=run, daemon=True) for _ in range(sessions)]
    for t in threads:
        t.start()
    conn.send("started")
    conn.recv()
    stop.set()
    for t in threads:
        t.join(30)
    counts["retry_after"] = sorted(set(x for x in counts["retry_after"] if x))[:5]
    conn.send(counts)


def under_load(host, port, info: dict[int, dict], sessions: int, seconds: float,
               stream_size: int) -> dict:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    proc = ctx.Process(target=streamer_child,
                       args=(b, host, port, info[stream_size]["series"], sessions), daemon=True)
    proc.start()
    a.recv()
    small = min(info)
    s = info[small]
    kinds = {"login": [], "qido": [], "jpip": []}
    status = {"503": 0, "errors": 0}
    time.sleep(min(5.0, seconds / 4))              # let the streams get going
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        for kind in kinds:
            c = Client(host, port)
            t = time.perf_counter()
            try:
                if kind == "login":
                    st = c.login()
                else:
                    c.sid = probe_sid(host, port)
                    t = time.perf_counter()
                    st = c.call("GET", qido(s["study"]) if kind == "qido"
                                else tiny_jpip(s["series"]), sink=True)[0]
            except Exception:  # noqa: BLE001
                st = -1
            dt = time.perf_counter() - t
            c.conn.close()
            if st == 200:
                kinds[kind].append(dt)
            elif st == 503:
                status["503"] += 1
            else:
                status["errors"] += 1
    a.send("stop")
    streams = a.recv() if a.poll(60) else {}
    proc.join(30)
    if proc.is_alive():
        proc.kill()
    out = {k: {"n": len(v), "p50_ms": 1e3 * pct(v, 50), "p99_ms": 1e3 * pct(v, 99)}
           for k, v in kinds.items()}
    return {"small": out, "small_status": status, "streams": streams, "seconds": seconds}


_probe: dict = {}


def probe_sid(host, port) -> str:
    """One session for the probes (a login per probe would measure logins)."""
    if "sid" not in _probe:
        c = Client(host, port)
        while c.login() != 200:
            time.sleep(0.2)
        _probe["sid"] = c.sid
    return _probe["sid"]


# =========================================================================== ingest
def ingest_bench(work: Path, slices: int, px: int, rounds: int = 3) -> dict:
    import pydicom

    from codestream.encode import LAYER_RATIOS, numres_for
    from server.ingest import ingest_paths
    from server.sample import make_sample_ct
    from server.store import Store
    from server.verify import lossless_health, verify_pending

    src = work / "ingest-dicom"
    shutil.rmtree(src, ignore_errors=True)
    files = make_sample_ct(src, slices=slices, size=px, seed=7)
    # the same frames for opj_compress: 16-bit PGM (the sample's stored values are
    # unsigned 12-bit, so ingest encodes them unshifted: the same samples)
    pgm = work / "ingest-pgm"
    shutil.rmtree(pgm, ignore_errors=True)
    pgm.mkdir()
    for i, f in enumerate(files):
        a = pydicom.dcmread(f).pixel_array.astype(">u2")
        with open(pgm / f"{i:04d}.pgm", "wb") as fh:
            fh.write(f"P5\n{a.shape[1]} {a.shape[0]}\n65535\n"
                     .encode())
            fh.write(a.tobytes())
    numres = numres_for(px, px)
    # (opj_compress -ImgDir writes its outputs beside the inputs)
    args = ["-OutFor", "j2k", "-r", ",".join(str(r) for r in LAYER_RATIOS), "-n", str(numres),
            "-c", ",".join(["[128,128]"] * numres), "-b", "64,64", "-p", "LRCP", "-PLT"]
    cmd = [OPJ_COMPRESS, "-ImgDir", str(pgm), *args]
    # the same frames in one folder per core, for as many opj_compress processes at once
    ncpu = os.cpu_count() or 1
    halves = [work / f"ingest-pgm-{k}" for k in range(ncpu)]
    for k, d in enumerate(halves):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        for f in sorted(pgm.glob("*.pgm"))[k::ncpu]:
            shutil.copy(f, d / f.name)
    res: dict = {"images": slices, "size": px, "rounds": rounds, "cores": ncpu}

    cpu: dict[str, list[float]] = {"opj": [], "inline": [], "inline_processes": [],
                                   "verified": []}

    def cpu_s() -> float:
        """CPU seconds of this process and its reaped children (worker processes and
        opj_compress): what the machine's load does not inflate much"""
        a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

    def opj() -> float:
        for p in pgm.glob("*.j2k"):
            p.unlink()
        c = cpu_s()
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        el = time.perf_counter() - t
        cpu["opj"].append(cpu_s() - c)
        made = sum(1 for _ in pgm.glob("*.j2k"))
        if made != slices:
            raise RuntimeError(f"opj_compress wrote {made} of {slices}")
        return el

    def opj_n() -> float:
        for d in halves:
            for p in d.glob("*.j2k"):
                p.unlink()
        t = time.perf_counter()
        procs = [subprocess.Popen([OPJ_COMPRESS, "-ImgDir", str(d), *args],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for d in halves]
        if any(p.wait() for p in procs):
            raise RuntimeError("opj_compress failed")
        return time.perf_counter() - t

    def ingest(verify, processes=None, key=None) -> tuple[float, float]:
        """(seconds until stored, seconds until every lossless layer is verified)"""
        sd = work / "ingest-store"
        shutil.rmtree(sd, ignore_errors=True)
        with Store(sd) as store:
            c = cpu_s()
            t = time.perf_counter()
            rep = ingest_paths(files, store, verify=verify, processes=processes)
            stored = time.perf_counter() - t
            v = verify_pending(store, processes=processes)
            done = time.perf_counter() - t
            cpu[key or ("inline" if verify else "verified")].append(cpu_s() - c)
            left = lossless_health(store.catalogue)
        if len(rep.imported) != slices:
            raise RuntimeError(f"ingest imported {len(rep.imported)} of {slices}: "
                               f"{rep.summary()}")
        if left["pending"] or left["failed"] or (not verify and len(v.verified) != slices):
            raise RuntimeError(f"verification: {v.summary()}, left {left}")
        return stored, done

    # interleaved rounds (the machine's load changes): medians, and the median of the
    # per-round ratios
    runs: dict[str, list[float]] = {"opj": [], "opj_n": [], "inline": [],
                                    "inline_processes": [], "stored": [], "verified": []}
    for _ in range(rounds):
        runs["opj"].append(opj())
        runs["opj_n"].append(opj_n())
        runs["inline"].append(ingest(True)[0])
        runs["inline_processes"].append(ingest(True, True, "inline_processes")[0])
        stored, verified = ingest(False)
        runs["stored"].append(stored)
        runs["verified"].append(verified)
    for k, v in cpu.items():
        res[f"cpu_ms_per_image_{k}"] = 1000 * statistics.median(v) / slices
    res["opj_compress_images_per_s"] = slices / statistics.median(runs["opj"])
    res["opj_compress_n_images_per_s"] = slices / statistics.median(runs["opj_n"])
    from server.ingest import PROCESS_MIN_CORES
    res["default_workers"] = "processes" if ncpu >= PROCESS_MIN_CORES else "threads"
    for k in ("inline", "inline_processes", "stored", "verified"):
        res[f"ingest_{k}_images_per_s"] = slices / statistics.median(runs[k])
        res[f"ratio_{k}"] = statistics.median(o / v for o, v in zip(runs["opj"], runs[k]))
        res[f"ratio_{k}_vs_n"] = statistics.median(
            o / v for o, v in zip(runs["opj_n"], runs[k]))
    res["seconds"] = runs
    from codestream.encode import encode_frame
    a0 = pydicom.dcmread(files[0]).pixel_array
    res["same_codestream_as_ingest"] = (
        encode_frame(a0, signed=False, bits_stored=12).codestream
        == (pgm / "0000.j2k").read_bytes())
    shutil.rmtree(work / "ingest-store", ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(pgm, ignore_errors=True)
    for d in halves:
        shutil.rmtree(d, ignore_errors=True)
    return res


# =========================================================================== report
def report(res: dict) -> str:
    lines = [f"load average before {res['load_before']}, after {res.get('load_after')}"]
    if "idle" in res:
        sizes = sorted(res["idle"], key=int)
        lines.append("\nIdle, one client, keep-alive (ms)")
        lines.append(f"{'series':>8} | {'jpip med':>9} {'jpip p99':>9} | "
                     f"{'qido med':>9} {'qido p99':>9}")
        for s in sizes:
            r = res["idle"][s]
            lines.append(f"{s:>8} | {r['jpip']['median_ms']:9.2f} {r['jpip']['p99_ms']:9.2f} | "
                         f"{r['qido']['median_ms']:9.2f} {r['qido']['p99_ms']:9.2f}")
        if len(sizes) >= 2:
            a, b = res["idle"][sizes[0]], res["idle"][sizes[-1]]
            lines.append(f"ratio {sizes[-1]}/{sizes[0]}: jpip "
                         f"{b['jpip']['median_ms'] / a['jpip']['median_ms']:.2f}, qido "
                         f"{b['qido']['median_ms'] / a['qido']['median_ms']:.2f} (target <= 1.2)")
    for n, r in res.get("load", {}).items():
        lines.append(f"\n{n} sessions streaming the {r['stream_size']}-image series "
                     f"for {r['seconds']:.0f} s")
        for k, v in r["small"].items():
            lines.append(f"  {k:6} n={v['n']:4d}  p50 {v['p50_ms']:8.1f} ms  "
                         f"p99 {v['p99_ms']:8.1f} ms")
        lines.append(f"  small requests: 503 {r['small_status']['503']}, "
                     f"errors {r['small_status']['errors']}")
        s = r["streams"]
        lines.append(f"  streams: done {s.get('streams')}, 503 {s.get('503')}, "
                     f"errors {s.get('errors')}, logins {s.get('logins')} "
                     f"(login 503 {s.get('login_503')}), Retry-After seen "
                     f"{s.get('retry_after')}")
    if "ingest" in res:
        r = res["ingest"]
        o = r["opj_compress_images_per_s"]
        lines.append(f"\nIngest, {r['images']} × {r['size']}² CT")
        on = r["opj_compress_n_images_per_s"]
        lines.append(f"  bare opj_compress -ImgDir, 1 process:  {o:7.1f} img/s (byte-identical "
                     f"codestream: {r.get('same_codestream_as_ingest')})")
        lines.append(f"  bare opj_compress, {r['cores']} processes:   {on:7.1f} img/s")
        what = {"inline": f"ingest, verified before commit ({r['default_workers']})",
                "inline_processes": "same, worker processes",
                "stored": "ingest, stored (lossy layers served)",
                "verified": "ingest + verifier, all verified"}
        for k, label in what.items():
            v = r[f"ingest_{k}_images_per_s"]
            lines.append(f"  {label:<38} {v:7.1f} img/s  {r[f'ratio_{k}']:.2f}× opj_compress "
                         f"(1 process), {r[f'ratio_{k}_vs_n']:.2f}× ({r['cores']} processes)")
        lines.append(f"  (ingest: {r['cores']} {r['default_workers']} unless said; medians of "
                     f"{r['rounds']} interleaved rounds)")
        oc = r["cpu_ms_per_image_opj"]
        lines.append(f"  CPU per image: opj_compress {oc:.1f} ms; ingest verified before the "
                     f"commit {r['cpu_ms_per_image_inline']:.1f} ms ("
                     f"{r['cpu_ms_per_image_inline_processes']:.1f} ms in worker processes), "
                     "deferred + verifier "
                     f"{r['cpu_ms_per_image_verified']:.1f} ms: on {r['cores']} free cores at "
                     f"most {r['cores'] * oc / r['cpu_ms_per_image_inline']:.2f}× / "
                     f"{r['cores'] * oc / r['cpu_ms_per_image_verified']:.2f}× one opj_compress")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", help="working directory (kept; the stores are reused)")
    ap.add_argument("--sessions", default=None, help="comma-separated, default 50,200")
    ap.add_argument("--seconds", type=float, default=None, help="per load level")
    ap.add_argument("--n", type=int, default=None, help="idle samples per request kind")
    ap.add_argument("--ingest-slices", type=int, default=None)
    ap.add_argument("--ingest-size", type=int, default=512)
    ap.add_argument("--skip", default="", help="idle,load,ingest")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "server.json"))
    a = ap.parse_args(argv)
    big = 200 if a.quick else 2000
    sessions = [int(x) for x in (a.sessions or ("10,40" if a.quick else "50,200")).split(",")]
    seconds = a.seconds or (10.0 if a.quick else 20.0)
    n = a.n or (100 if a.quick else 300)
    slices = a.ingest_slices or (12 if a.quick else 32)
    skip = set(filter(None, a.skip.split(",")))
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-server-"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"load_before": os.getloadavg()}
    try:
        if not {"idle", "load"} <= skip:
            store_dir, info = make_store(work, (20, big), 64)
            info = {k: v for k, v in info.items() if k in (20, big)}
            ctx = mp.get_context("spawn")
            a_, b_ = ctx.Pipe()
            proc = ctx.Process(target=server_child, args=(b_, str(store_dir)), daemon=True)
            proc.start()
            if not a_.poll(120):
                raise RuntimeError("server did not start")
            addr = a_.recv()
            host, port = addr["host"], addr["port"]
            try:
                if "idle" not in skip:
                    log("idle")
                    res["idle"] = idle(host, port, info, n)
                if "load" not in skip:
                    res["load"] = {}
                    for s in sessions:
                        log(f"{s} streaming sessions")
                        r = under_load(host, port, info, s, seconds, 20)
                        r["stream_size"] = 20
                        res["load"][s] = r
            finally:
                a_.send("stop")
                proc.join(30)
                if proc.is_alive():
                    proc.kill()
        if "ingest" not in skip:
            log("ingest")
            res["ingest"] = ingest_bench(work, slices, a.ingest_size)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    res["load_after"] = os.getloadavg()
    text = report(res)
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
