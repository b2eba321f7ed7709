"""Server speed, side by side in one run (issue 15).

Prints:

* **idle**: tiny ``/jpip`` (1 image, 1 layer, 64² images) and QIDO (study query) median
  and p99, for a 20-image and a 2,000-image series in the same store, and their ratio;
* **load**: N concurrent sessions (default 50 and 200), each streaming a whole series
  over and over (its cache model declared empty each time), against ``medview-server
  serve --workers W`` for each W of ``--workers`` (default 1 and 2) in turn, while this
  process measures small requests (login, QIDO, tiny /jpip) on fresh connections:
  p50 / p99 / max, errors, wrong answers and 503s (with Retry-After); what the
  streaming sessions saw (streams completed, each checked against a reference stream:
  wrong or lost; 503s with Retry-After; errors); the cores each party kept busy; and
  each worker process's admission counters;
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
    .venv/bin/python bench/server.py --skip idle,ingest --workers 1,2,2:8  # 2:8: --max-streams 8

Nothing is asserted: the figures are printed (and written to ``bench/out/server.json``).
The server runs as a user runs it (``medview-server serve --allow-local`` on loopback,
the store's SQLite WAL database unless ``--database``), a fresh one per load cell; the
streaming sessions run in a child process (threads, one per session), so the measuring
client is not held up by them more than by the machine itself. Timings depend on the machine's load, which the
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
def server_command() -> list[str]:
    """``medview-server`` as installed beside this interpreter (as a user runs it), else
    the same entry point through ``-m``."""
    exe = Path(sys.executable).parent / "medview-server"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "server.cli"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``medview-server serve --workers N --allow-local`` on loopback, as a user starts it
    (the store's default SQLite WAL database unless ``database`` names another); stopped
    with SIGTERM (uvicorn's graceful shutdown), its process group killed if it hangs."""

    def __init__(self, store_dir: Path, workers: int, log_path: Path,
                 database: str | None = None, max_streams: int | None = None) -> None:
        self.workers = workers
        self.host, self.port = "127.0.0.1", free_port()
        cmd = [*server_command(), "serve", "--store", str(store_dir), "--host", self.host,
               "--port", str(self.port), "--workers", str(workers), "--allow-local",
               "--log-level", "warning"]
        if database:
            cmd += ["--database", database]
        if max_streams:
            cmd += ["--max-streams", str(max_streams)]
        env = dict(os.environ)
        env.pop("MEDVIEW_DATABASE", None)
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start: {' '.join(cmd)}\n"
                                   + log_path.read_text(errors="replace")[-2000:])
            try:
                c = http.client.HTTPConnection(self.host, self.port, timeout=5)
                c.request("GET", "/api/health")
                if c.getresponse().status == 200:
                    c.close()
                    break
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.1)

    def replicas(self) -> dict[str, dict]:
        """``/api/health`` of each worker process (a fresh connection each time, the kernel
        hands it to either), for its admission counters."""
        seen: dict[str, dict] = {}
        for _ in range(60 * self.workers):
            try:
                c = http.client.HTTPConnection(self.host, self.port, timeout=30)
                c.request("GET", "/api/health", headers={"Connection": "close"})
                h = json.loads(c.getresponse().read())
                c.close()
            except (OSError, http.client.HTTPException, ValueError):
                continue
            seen[h["replica"]] = h.get("admission") or {}
            if len(seen) >= self.workers:
                break
        return seen

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        self._log.close()


class Client:
    """One keep-alive connection, one session (the password-less ``local`` user)."""

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)
        self.sid = None

    def call(self, method: str, path: str, body: bytes | None = None,
             headers: dict | None = None, sink: bool = False,
             retry: bool = True) -> tuple[int, bytes, dict]:
        """``retry``: once more on a new connection when the request fails (a keep-alive
        connection the server closed meanwhile)."""
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
                if attempt or not retry:
                    raise
        raise AssertionError("unreachable")

    def login(self, retry: bool = True) -> int:
        st, data, _ = self.call("POST", "/api/login", json.dumps({"username": "local"}).encode(),
                                retry=retry)
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
#: a whole-series stream as a viewer asks for it when it holds nothing of the series:
#: POST /jpip with its (empty) cache model declared, so every stream sends everything
EMPTY_MODEL = json.dumps({"model": {}}).encode()


def stream_path(series: str) -> str:
    return "/jpip?" + urlencode({"target": series, "framing": "mv"})


def read_stream(resp) -> dict:
    """Read a framed packet response to its end: the announcement, the end record, the
    DATA bytes and their SHA-256 (raises on a malformed or broken body)."""
    import hashlib

    from codestream.framing import CONTROL, RecordReader

    rr = RecordReader()
    h = hashlib.sha256()
    out = {"announce": None, "end": None, "data": 0}
    while True:
        chunk = resp.read(1 << 16)
        if not chunk:
            break
        for rtype, payload in rr.feed(chunk):
            if rtype == CONTROL:
                if payload.get("type") == "announce":
                    out["announce"] = payload
                elif payload.get("type") == "end":
                    out["end"] = payload
            else:
                out["data"] += len(payload)
                h.update(payload)
    out["pending"] = rr.pending
    out["sha256"] = h.hexdigest()
    return out


def stream_problem(got: dict, ref: dict | None) -> str | None:
    """Why an accepted (200) stream is not the whole series, or None."""
    a, e = got["announce"], got["end"]
    if a is None or e is None or got["pending"]:
        return "lost"                                  # cut short
    if e.get("reason") != "complete" or e.get("bytes_sent") != e.get("bytes_announced"):
        return "lost"
    if any(im["layers"] != im["nlayers"] or im["res"] != im["numres"] - 1
           for im in a.get("images", ())):
        return "wrong"                                 # not the whole of every image
    if ref is not None and (got["sha256"] != ref["sha256"] or got["data"] != ref["data"]):
        return "wrong"
    return None


def reference_stream(host: str, port: int, series: str, images: int) -> dict:
    """One whole-series stream on an idle server: what every stream under load must equal."""
    c = Client(host, port)
    if c.login() != 200:
        raise RuntimeError("login failed")
    h = {"Authorization": f"Bearer {c.sid}", "Content-Type": "application/json"}
    c.conn.request("POST", stream_path(series), body=EMPTY_MODEL, headers=h)
    r = c.conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"reference stream: HTTP {r.status}")
    got = read_stream(r)
    c.conn.close()
    problem = stream_problem(got, None)
    if problem:
        raise RuntimeError(f"reference stream {problem}: {got['end']}")
    if len(got["announce"]["images"]) != images:
        raise RuntimeError(f"reference stream: {len(got['announce']['images'])} images of "
                           f"{images}")
    return {"sha256": got["sha256"], "data": got["data"], "bytes": got["announce"]["bytes"]}


def streamer_child(conn, host: str, port: int, series: str, sessions: int,
                   ref: dict) -> None:
    """Child process: ``sessions`` threads, each logged in and streaming the whole series
    over and over (its model declared empty each time) until told to stop; every
    accepted stream is read to its end and compared with the reference (``ref``)."""
    sys.path.insert(0, str(ROOT))
    stop = threading.Event()
    lock = threading.Lock()
    counts = {"streams": 0, "bytes": 0, "503": 0, "503_no_retry_after": 0, "errors": 0,
              "wrong": 0, "lost": 0, "logins": 0, "login_503": 0, "retry_after": [],
              "error_kinds": {}}

    def count(key: str, detail: str | None = None) -> None:
        with lock:
            counts[key] += 1
            if detail:
                counts["error_kinds"][detail] = counts["error_kinds"].get(detail, 0) + 1

    def run() -> None:
        c = Client(host, port, timeout=120)
        while not stop.is_set():
            try:
                st = c.login()
            except Exception as e:  # noqa: BLE001
                count("errors", f"login {type(e).__name__}")
                stop.wait(0.5)
                continue
            if st == 200:
                count("logins")
                break
            count("login_503" if st == 503 else "errors", None if st == 503 else f"login {st}")
            stop.wait(0.5)
        h = {"Authorization": f"Bearer {c.sid}", "Content-Type": "application/json"}
        path = stream_path(series)
        while not stop.is_set():
            r = None
            for attempt in (0, 1):        # a keep-alive connection closed meanwhile: anew
                try:
                    c.conn.request("POST", path, body=EMPTY_MODEL, headers=h)
                    r = c.conn.getresponse()
                    break
                except (http.client.HTTPException, OSError) as e:
                    c.conn.close()
                    c.conn = http.client.HTTPConnection(host, port, timeout=120)
                    if attempt:
                        count("errors", f"stream {type(e).__name__}")
            if r is None:
                continue
            if r.status == 200:
                try:
                    got = read_stream(r)
                except Exception as e:  # noqa: BLE001 - the body broke off: lost
                    c.conn.close()
                    count("lost", f"body {type(e).__name__}")
                    continue
                problem = stream_problem(got, ref)
                if problem:
                    count(problem, f"{problem} {got.get('end')}")
                else:
                    with lock:
                        counts["streams"] += 1
                        counts["bytes"] += got["data"]
                continue
            r.read()
            if r.status != 503:
                count("errors", f"stream HTTP {r.status}")
                continue
            ra = r.getheader("Retry-After")
            with lock:
                counts["503"] += 1
                if ra:
                    counts["retry_after"].append(ra)
                else:
                    counts["503_no_retry_after"] += 1
            try:
                wait = float(ra or 1)
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
    counts["threads_left"] = sum(t.is_alive() for t in threads)
    counts["retry_after"] = sorted(set(x for x in counts["retry_after"] if x))[:5]
    conn.send(counts)


def small_request(host, port, kind: str, s: dict, sid: str) -> tuple[float, int, str | None]:
    """One small request on a fresh connection (the kernel hands it to any worker
    process): (seconds, status, problem with a 200 answer or a 503's missing
    Retry-After)."""
    from codestream.framing import CONTROL, RecordReader

    c = http.client.HTTPConnection(host, port, timeout=60)
    t = time.perf_counter()
    try:
        if kind == "login":
            c.request("POST", "/api/login", body=json.dumps({"username": "local"}).encode(),
                      headers={"Content-Type": "application/json"})
        else:
            c.request("GET", qido(s["study"]) if kind == "qido" else tiny_jpip(s["series"]),
                      headers={"Authorization": f"Bearer {sid}"})
        r = c.getresponse()
        body = r.read()
        dt = time.perf_counter() - t
    except (http.client.HTTPException, OSError) as e:
        c.close()
        return time.perf_counter() - t, -1, type(e).__name__
    c.close()
    problem = None
    if r.status == 503:
        problem = None if r.getheader("Retry-After") else "503 without Retry-After"
    elif r.status == 200:
        try:
            if kind == "login":
                ok = bool(json.loads(body).get("session"))
            elif kind == "qido":
                ok = [x.get("0020000D", {}).get("Value") for x in json.loads(body)] \
                    == [[s["study"]]]
            else:
                ends = [p for t_, p in RecordReader().feed(body)
                        if t_ == CONTROL and p.get("type") == "end"]
                ok = len(ends) == 1 and ends[0].get("reason") == "complete"
        except ValueError:
            ok = False
        problem = None if ok else "wrong"
    return dt, r.status, problem


def cpu_seconds(pid: int, children: bool = False) -> float:
    """CPU seconds (user + system) of a process so far, and with ``children`` of its
    child processes too (the worker processes of ``serve --workers N``), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")

    def one(p: int) -> tuple[float, int]:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0, -1
        return (int(f[11]) + int(f[12])) / tick, int(f[1])

    total = one(pid)[0]
    if children:
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                t, ppid = one(int(d.name))
                if ppid == pid:
                    total += t
    return total


def under_load(host, port, info: dict[int, dict], sessions: int, seconds: float,
               stream_size: int, server_pid: int | None = None) -> dict:
    small = min(info)
    s = info[small]
    ref = reference_stream(host, port, info[stream_size]["series"], stream_size)
    probe = Client(host, port)       # one session for the probes (a login per probe would
    while probe.login() != 200:      # measure logins)
        time.sleep(0.2)
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    proc = ctx.Process(target=streamer_child,
                       args=(b, host, port, info[stream_size]["series"], sessions, ref),
                       daemon=True)
    proc.start()
    a.recv()
    kinds = {"login": [], "qido": [], "jpip": []}
    status = {"503": 0, "errors": 0, "wrong": 0, "503_no_retry_after": 0, "kinds": {}}
    time.sleep(min(5.0, seconds / 4))              # let the streams get going
    cpu0 = {"server": cpu_seconds(server_pid, True) if server_pid else 0.0,
            "streamers": cpu_seconds(proc.pid), "prober": cpu_seconds(os.getpid())}
    t0 = time.monotonic()
    t_end = t0 + seconds
    while time.monotonic() < t_end:
        for kind in kinds:
            dt, st, problem = small_request(host, port, kind, s, probe.sid)
            if st == 200 and problem is None:
                kinds[kind].append(dt)
            elif st == 503:
                status["503"] += 1
                if problem:
                    status["503_no_retry_after"] += 1
            else:
                key = "wrong" if st == 200 else "errors"
                status[key] += 1
                what = f"{kind} {problem or st}"
                status["kinds"][what] = status["kinds"].get(what, 0) + 1
    wall = time.monotonic() - t0
    cpu = {"server": cpu_seconds(server_pid, True) if server_pid else 0.0,
           "streamers": cpu_seconds(proc.pid), "prober": cpu_seconds(os.getpid())}
    cores_used = {k: (cpu[k] - cpu0[k]) / wall for k in cpu}
    a.send("stop")
    streams = a.recv() if a.poll(90) else {}
    proc.join(30)
    if proc.is_alive():
        proc.kill()
    out = {k: {"n": len(v), "p50_ms": 1e3 * pct(v, 50), "p99_ms": 1e3 * pct(v, 99),
               "max_ms": 1e3 * max(v) if v else float("nan")}
           for k, v in kinds.items()}
    return {"small": out, "small_status": status, "streams": streams, "seconds": seconds,
            "stream_bytes": ref["data"], "cores_used": cores_used,
            "loadavg_end": os.getloadavg()[0]}


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
def wm(r: dict) -> str:
    """workers, and ``:M`` when --max-streams M was given"""
    return f"{r['workers']}" + (f":{r['max_streams']}" if r.get("max_streams") else "")


def load_table(load: dict) -> list[str]:
    """One row per (sessions, worker processes): the small requests' p50 / p99 / max per
    kind, their 503s and errors; the streams completed and verified, their 503s (with
    Retry-After), errors, wrong and lost; then each worker process's admission counters."""
    lines = ["\nUnder load: N sessions each streaming the whole "
             f"{next(iter(load.values()))['stream_size']}-image series over and over "
             "(model declared empty: every stream sends everything), small requests on "
             "fresh connections meanwhile (ms)",
             f"{'sess':>4} {'wrk':>5} | {'login p50/p99/max':>19} | {'qido p50/p99/max':>19} | "
             f"{'jpip p50/p99/max':>19} | {'small 503/err/wrong':>19} | "
             f"{'streams ok':>10} {'MB/s':>6} {'503 (RA)':>10} {'err':>4} {'wrong':>5} "
             f"{'lost':>4}"]
    for key, r in load.items():
        sm, st, s = r["small"], r["small_status"], r["streams"]

        def three(k):
            v = sm[k]
            return f"{v['p50_ms']:5.0f}/{v['p99_ms']:5.0f}/{v['max_ms']:5.0f}"
        ra = s.get("503", 0) - s.get("503_no_retry_after", 0)
        mbs = s.get("bytes", 0) / 1e6 / r["seconds"]
        lines.append(
            f"{r['sessions']:>4} {wm(r):>5} | {three('login'):>19} | {three('qido'):>19} | "
            f"{three('jpip'):>19} | {st['503']:>7}/{st['errors']:>4}/{st['wrong']:>5}  | "
            f"{s.get('streams', '?'):>10} {mbs:6.2f} {s.get('503', '?'):>5} ({ra:>3}) "
            f"{s.get('errors', '?'):>4} {s.get('wrong', '?'):>5} {s.get('lost', '?'):>4}")
    lines.append("  per row: n small requests "
                 + "; ".join(f"{r['sessions']}/{wm(r)}: "
                             + "/".join(str(r['small'][k]['n']) for k in ('login', 'qido', 'jpip'))
                             for r in load.values()))
    for r in load.values():
        s, st = r["streams"], r["small_status"]
        extra = []
        if s.get("logins") is not None:
            extra.append(f"logins {s['logins']} (503 {s.get('login_503')})")
        if s.get("retry_after"):
            extra.append(f"Retry-After seen {s['retry_after']}")
        if s.get("error_kinds"):
            extra.append(f"stream problems {s['error_kinds']}")
        if st.get("kinds"):
            extra.append(f"small problems {st['kinds']}")
        if st.get("503_no_retry_after") or s.get("503_no_retry_after"):
            extra.append(f"503 WITHOUT Retry-After: small {st.get('503_no_retry_after')}, "
                         f"streams {s.get('503_no_retry_after')}")
        adm = []
        for rep in r.get("replicas", {}).values():
            g, m = rep.get("streams", {}), rep.get("small", {})
            adm.append(f"streams limit {g.get('limit')} admitted {g.get('admitted')} refused "
                       f"{g.get('refused')}, small limit {m.get('limit')} admitted "
                       f"{m.get('admitted')} refused {m.get('refused')}")
        cu = r.get("cores_used") or {}
        if cu:
            extra.insert(0, "cores busy: server {server:.2f}, streaming client {streamers:.2f}, "
                            "prober {prober:.2f}".format(**cu)
                         + f"; load average at the end {r.get('loadavg_end', 0):.1f}")
        lines.append(f"  {r['sessions']} sessions, {wm(r)} worker(s): "
                     + "; ".join(extra))
        for i, x in enumerate(adm):
            lines.append(f"      process {i + 1}: {x}")
    return lines


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
    if res.get("load"):
        lines += load_table(res["load"])
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
    ap.add_argument("--workers", default="1,2",
                    help="comma-separated worker processes of the server under load "
                         "(medview-server serve --workers N), each level side by side; "
                         "N:M also gives --max-streams M (the machine's streams at once, "
                         "shared by the processes); default 1,2")
    ap.add_argument("--database", default=None,
                    help="the store's database for the server (postgresql://...; default "
                         "the store's SQLite WAL file)")
    ap.add_argument("--seconds", type=float, default=None, help="per load level")
    ap.add_argument("--n", type=int, default=None, help="idle samples per request kind")
    ap.add_argument("--ingest-slices", type=int, default=None)
    ap.add_argument("--ingest-size", type=int, default=512)
    ap.add_argument("--skip", default="", help="idle,load,ingest")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "server.json"))
    a = ap.parse_args(argv)
    big = 200 if a.quick else 2000
    sessions = [int(x) for x in (a.sessions or ("10,40" if a.quick else "50,200")).split(",")]
    workers = [tuple(int(y) for y in x.split(":")) + (None,) for x in a.workers.split(",")]
    seconds = a.seconds or (10.0 if a.quick else 20.0)
    n = a.n or (100 if a.quick else 300)
    slices = a.ingest_slices or (12 if a.quick else 32)
    skip = set(filter(None, a.skip.split(",")))
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-server-"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"load_before": os.getloadavg(), "cores": os.cpu_count()}
    try:
        if not {"idle", "load"} <= skip:
            sizes = (20,) if "idle" in skip else (20, big)
            store_dir, info = make_store(work, sizes, 64)
            info = {k: v for k, v in info.items() if k in sizes}
            if "idle" not in skip:
                log("idle")
                srv = ServeProcess(store_dir, 1, work / "serve.log", a.database)
                try:
                    res["idle"] = idle(srv.host, srv.port, info, n)
                finally:
                    srv.stop()
            if "load" not in skip:
                res["load"] = {}
                # each level against 1, 2 ... worker processes one after the other, a
                # fresh server each time (nothing left over of the level before)
                for s in sessions:
                    for w, m, *_ in workers:
                        log(f"{s} streaming sessions, serve --workers {w}"
                            + (f" --max-streams {m}" if m else ""))
                        srv = ServeProcess(store_dir, w, work / "serve.log", a.database, m)
                        try:
                            r = under_load(srv.host, srv.port, info, s, seconds, 20,
                                           srv.proc.pid)
                            r["replicas"] = srv.replicas()
                        finally:
                            srv.stop()
                        r.update(stream_size=20, sessions=s, workers=w, max_streams=m)
                        res["load"][f"{s}x{w}" + (f"m{m}" if m else "")] = r
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
