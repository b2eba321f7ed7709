#!/usr/bin/env python
"""Issue 2 benchmark: progressive JPIP transfer vs plain transfers, packet overhead,
preview cost and decode throughput, measured side by side in one run.

    .venv/bin/python bench/transfer.py [--quick] [--slices N] [--reps R]

What it does (see bench/README.md for the meaning of every number):

1. Writes a synthetic 512x512 CT series (``server.sample.make_sample_ct``) and
   ingests it into a temporary store.
2. Starts the embedded server in one child process and one throttling TCP proxy per
   simulated link in another (token bucket per direction, fixed one-way latency), so
   that the server, the link simulation and the measured client never wait for one
   another's GIL. The proxy process reports the bytes it relays.
3. Per link, through its proxy: the progressive quality-first session sequence
   (preview at the lowest resolution, ~1:20 at full resolution, lossless) with the
   client library; then the plain transfer of the stored lossless codestreams
   (WADO-RS frames) and of the original DICOM files, one request after the other.
4. Decodes what the client received and checks it is lossless; then measures the
   client's decode path against ``opj_decompress`` on the same codestreams.

Prints tables; writes every number to ``bench/out/transfer.json``. No pass/fail: the
targets of issue 2 are printed next to the measured values.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# (name, bits per second, one-way latency in seconds)
LINKS = (("10 Mbit/s", 10e6, 0.005), ("100 Mbit/s", 100e6, 0.001))
TARGETS = {"overhead": 1.03, "preview_pct": 2.0, "decode_ratio": 0.8, "link_floor": 1.3}
OPJ = shutil.which("opj_decompress") or "/usr/bin/opj_decompress"
PROXY_LIFETIME_S = 900.0          # the proxies and the server child stop by themselves


# =========================================================================== link model
class TokenBucket:
    """Token bucket shared by every connection going one way over one link."""

    def __init__(self, rate_Bps: float, burst: int) -> None:
        self.rate = rate_Bps
        self.burst = burst
        self.tokens = float(burst)
        self.t = time.monotonic()
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
            self.t = now
            self.tokens -= n                      # go into debt, then wait it off
            wait = -self.tokens / self.rate if self.tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


class ThrottledProxy:
    """TCP proxy on 127.0.0.1 simulating a full-duplex link: each direction is limited
    by its own token bucket (``rate_bps``), and every chunk is delivered no earlier than
    ``latency`` seconds after it was read (one-way delay). Counts the bytes relayed in
    each direction. Stops itself after ``lifetime`` seconds."""

    SLOT = 0.002           # seconds of line time per token-bucket grant (and bucket depth)

    def __init__(self, target: tuple[str, int], rate_bps: float, latency: float,
                 lifetime: float = PROXY_LIFETIME_S) -> None:
        self.target = target
        self.latency = latency
        # Small grants and a bucket only one grant deep: an idle link cannot save up
        # more than ~2 ms of line time, so request round trips are not hidden by bursts.
        self.piece = int(min(16384, max(1500, rate_bps / 8.0 * self.SLOT)))
        self.buckets = {d: TokenBucket(rate_bps / 8.0, self.piece) for d in ("up", "down")}
        self.counts = {"up": 0, "down": 0, "connections": 0}
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._stopped = threading.Event()
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen(16)
        self.port = self._lsock.getsockname()[1]
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ThrottledProxy":
        self._timer.start()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._timer.cancel()
        try:
            self._lsock.close()
        except OSError:
            pass
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self.counts)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                c, _ = self._lsock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.target, timeout=10)
                u.settimeout(None)
            except OSError:
                c.close()
                continue
            for s in (c, u):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks += [c, u]
                self.counts["connections"] += 1
            for src, dst, d in ((c, u, "up"), (u, c, "down")):
                threading.Thread(target=self._pipe, args=(src, dst, d), daemon=True,
                                 name=f"proxy-{d}").start()

    def _pipe(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        q: queue.Queue = queue.Queue(maxsize=32)     # bounded: backpressure to the sender

        def reader() -> None:
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    q.put((time.monotonic(), data))
            except OSError:
                pass
            q.put(None)

        threading.Thread(target=reader, daemon=True, name=f"proxy-rd-{direction}").start()
        bucket = self.buckets[direction]
        try:
            while True:
                item = q.get()
                if item is None:
                    break
                t_read, data = item
                delay = t_read + self.latency - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                for i in range(0, len(data), self.piece):
                    piece = data[i:i + self.piece]
                    bucket.take(len(piece))
                    with self._lock:                 # counted before the peer can see it
                        self.counts[direction] += len(piece)
                    dst.sendall(piece)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass


def _serve_commands(conn, lifetime: float, handle) -> None:
    """Answer ``handle(cmd)`` until ("stop",), the parent's exit, or ``lifetime``."""
    deadline = time.monotonic() + lifetime
    try:
        while time.monotonic() < deadline:
            if not conn.poll(1.0):
                continue
            cmd = conn.recv()
            if cmd[0] == "stop":
                break
            conn.send(handle(cmd))
    except (EOFError, OSError):
        pass                      # the parent went away


def server_child(conn, store_dir: str, lifetime: float) -> None:
    """Child process 1: the embedded server."""
    sys.path.insert(0, str(ROOT))
    from server.embedded import EmbeddedServer

    srv = EmbeddedServer(store_dir).start()
    conn.send({"host": srv.host, "port": srv.port, "url": srv.url})
    try:
        _serve_commands(conn, lifetime, lambda cmd: None)
    finally:
        srv.stop()


def proxy_child(conn, target: tuple[str, int], links, lifetime: float) -> None:
    """Child process 2: one throttling proxy per link (own process, so that neither the
    server's nor the client's Python code holds up the link simulation)."""
    proxies = [ThrottledProxy(target, bps, lat, lifetime).start() for _name, bps, lat in links]
    conn.send({"proxies": [p.url for p in proxies]})
    try:
        _serve_commands(conn, lifetime, lambda cmd: proxies[cmd[1]].snapshot())
    finally:
        for p in proxies:
            p.stop()


class ServerSide:
    """The server and the link proxies, each in its own child process; the measured
    client runs in this (parent) process."""

    def __init__(self, store_dir: str, links, lifetime: float = PROXY_LIFETIME_S) -> None:
        ctx = mp.get_context("spawn")
        self._procs = []
        info = self._spawn(ctx, server_child, store_dir, lifetime)
        self.server_url = info["url"]
        info = self._spawn(ctx, proxy_child, (info["host"], info["port"]), links, lifetime)
        self.proxy_urls = info["proxies"]
        self._lock = threading.Lock()

    def _spawn(self, ctx, fn, *args) -> dict:
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=fn, args=(child, *args), name=f"bench-{fn.__name__}",
                           daemon=True)
        proc.start()
        self._procs.append((proc, conn))
        if not conn.poll(60):
            self.stop()
            raise RuntimeError(f"{fn.__name__} did not start")
        return conn.recv()

    def counts(self, link: int) -> dict:
        with self._lock:
            conn = self._procs[1][1]
            conn.send(("counts", link))
            return conn.recv()

    def stop(self) -> None:
        for proc, conn in reversed(self._procs):
            try:
                conn.send(("stop",))
            except (OSError, BrokenPipeError):
                pass
            proc.join(15)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        self._procs = []


class Meter:
    """Bytes (server→client, client→server) and wall time between two points."""

    def __init__(self, side: ServerSide, link: int) -> None:
        self.side, self.link = side, link
        self.c0 = side.counts(link)
        self.cpu0 = time.process_time()
        self.t0 = time.monotonic()

    def read(self) -> dict:
        t = time.monotonic() - self.t0
        cpu = time.process_time() - self.cpu0          # this (client) process, all threads
        c = self.side.counts(self.link)
        return {"down": c["down"] - self.c0["down"], "up": c["up"] - self.c0["up"],
                "seconds": t, "client_cpu_seconds": cpu}


# =========================================================================== data
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prepare_data(work: Path, slices: int) -> dict:
    from codestream.index import PacketIndex
    from server.ingest import ingest_paths
    from server.sample import make_sample_ct
    from server.store import Store

    t = time.monotonic()
    paths = make_sample_ct(work / "dicom", slices=slices, size=512, seed=0)
    t_gen = time.monotonic() - t
    store_dir = work / "store"
    store = Store(store_dir)
    t = time.monotonic()
    report = ingest_paths(paths, store, workers=2)
    t_ingest = time.monotonic() - t
    if report.skipped or len(report.imported) != slices:
        raise RuntimeError(f"ingest failed: {report.summary()}")
    series_uid = report.imported[0].series_instance_uid
    study_uid = report.imported[0].study_instance_uid
    rows = store.catalogue.series_images(series_uid)
    images = []
    for r in rows:
        inst = store.catalogue.find_instance(r["SOPInstanceUID"])
        cs_path = store.abspath(r["codestream_relpath"])
        orig_path = store.abspath(inst["original_relpath"])
        ix = PacketIndex.from_json(store.abspath(r["index_relpath"]).read_bytes())
        images.append({"sop": r["SOPInstanceUID"], "frame": r["frame"],
                       # bytes the JPP data-bins carry: the stored file minus SOT, SOD, EOC
                       "databin_bytes": (ix.main_header_end + ix.tile_header[1]
                                         - ix.tile_header[0] + int(ix.packets[:, 5].sum())),
                       "codestream": str(cs_path), "codestream_size": cs_path.stat().st_size,
                       "original": str(orig_path), "original_size": orig_path.stat().st_size,
                       "rows": r["Rows"], "cols": r["Columns"], "offset": r["offset"],
                       "signed": bool(r["signed"]), "bits_stored": r["bits_stored"],
                       "numres": r["numres"], "nlayers": r["nlayers"]})
    store.close()
    return {"store_dir": str(store_dir), "series_uid": series_uid, "study_uid": study_uid,
            "images": images, "seconds_generate": t_gen, "seconds_ingest": t_ingest}


def dicom_pixels(path: str):
    import pydicom

    return pydicom.dcmread(path).pixel_array


def plain_single_layer_sizes(data: dict, work: Path) -> list[int]:
    """Size of a default glymur encode (one lossless layer, no precincts, no PLT, same
    numres) of the same stored samples: what a non-progressive server would store."""
    import glymur

    from codestream.encode import prepare_samples

    d = work / "plain"
    d.mkdir(exist_ok=True)

    def one(i_im):
        i, im = i_im
        px = dicom_pixels(im["original"])
        samples, offset = prepare_samples(px, signed=im["signed"], bits_stored=im["bits_stored"])
        assert offset == im["offset"], (offset, im["offset"])
        p = d / f"{i:04d}.j2k"
        glymur.Jp2k(str(p), data=samples, numres=im["numres"])
        n = p.stat().st_size
        p.unlink()
        return n

    with ThreadPoolExecutor(2) as ex:
        return list(ex.map(one, enumerate(data["images"])))


# =========================================================================== transfers
def stage_params(data: dict) -> list[tuple[str, dict, int, int]]:
    """(name, transfer kwargs, layers, res) reached by every image after the stage."""
    im = data["images"][0]
    numres, nl = im["numres"], im["nlayers"]
    low = 512 >> (numres - 1)
    return [
        (f"preview (1 layer, {low}x{low})", {"layers": 1, "reduce": numres - 1}, 1, 0),
        ("~1:20 (2 layers, 512x512)", {"layers": 2, "reduce": 0}, 2, numres - 1),
        (f"lossless ({nl} layers)", {}, nl, numres - 1),
    ]


def run_progressive(side: ServerSide, link: int, data: dict):
    import client

    url = side.proxy_urls[link]
    sess = client.Session(url)                       # login: not counted
    seq = Meter(side, link)
    m = Meter(side, link)
    sd = client.SeriesData(sess, None, data["series_uid"])
    meta = m.read()
    n = len(sd)
    stages = []
    for name, kw, want_l, want_r in stage_params(data):
        reached: set[int] = set()
        t_all = [None]
        t_first_render = [None]
        m = Meter(side, link)

        def on_image(p, reached=reached, t_all=t_all, want_l=want_l, want_r=want_r):
            if p.layers >= want_l and p.res >= want_r:
                reached.add(p.csn)
                if len(reached) == n and t_all[0] is None:
                    t_all[0] = time.monotonic()

        def on_recommend(msg, t_first_render=t_first_render):
            if msg.get("action") == "render" and t_first_render[0] is None:
                t_first_render[0] = time.monotonic()

        tr = sd.transfer(order="quality", callbacks=client.Callbacks(
            on_image=on_image, on_recommend=on_recommend), **kw)
        end = tr.run()
        w = m.read()
        t_end = time.monotonic()
        # every image must now be visible at the stage's level
        levels = [sd.levels(c) for c in range(n)]
        ok = all(q >= want_l and r >= want_r for q, r in levels)
        if t_all[0] is None and ok:          # reached through data held before
            t_all[0] = t_end
        stages.append({
            "stage": name, "params": kw, "layers": want_l, "res": want_r,
            "wire_down": w["down"], "wire_up": w["up"], "seconds": w["seconds"],
            "client_cpu_seconds": w["client_cpu_seconds"],
            "seconds_all_visible_in_stage": (t_all[0] - m.t0) if t_all[0] else None,
            "seconds_first_render_in_stage": ((t_first_render[0] - m.t0)
                                              if t_first_render[0] else None),
            "cum_seconds_all_visible": (t_all[0] - seq.t0) if t_all[0] else None,
            "cum_seconds": t_end - seq.t0,
            "payload_new_bytes": tr.received, "announced_bytes": tr.requested,
            "server_bytes_sent": end.get("bytes_sent"), "all_visible": ok,
        })
    total = seq.read()
    return sess, sd, {"metadata": meta, "stages": stages, "sequence": total}


def run_pipelined(side: ServerSide, link: int, data: dict):
    """The same session as :func:`run_progressive` on a fresh login, with every stage's
    request sent while the previous one streams (``client.run_in_order``); per-stage
    times from the callbacks, bytes of the whole sequence."""
    import client

    url = side.proxy_urls[link]
    sess = client.Session(url)
    m = Meter(side, link)
    sd = client.SeriesData(sess, None, data["series_uid"])
    t_meta = time.monotonic() - m.t0
    n = len(sd)
    params = stage_params(data)
    t_all: list[float | None] = [None] * len(params)
    reached: list[set] = [set() for _ in params]
    transfers = []
    for i, (_name, kw, want_l, want_r) in enumerate(params):
        def on_image(p, i=i, want_l=want_l, want_r=want_r):
            if p.layers >= want_l and p.res >= want_r:
                reached[i].add(p.csn)
                if len(reached[i]) == n and t_all[i] is None:
                    t_all[i] = time.monotonic()
        transfers.append(sd.transfer(order="quality",
                                     callbacks=client.Callbacks(on_image=on_image), **kw))
    ends = client.run_in_order(transfers)
    t_end = time.monotonic()
    w = m.read()
    ok = all(sd.levels(c) == (params[-1][2], params[-1][3]) for c in range(n))
    return sess, sd, {
        "seconds_metadata": t_meta,
        "cum_seconds_all_visible": [(t - m.t0) if t else None for t in t_all],
        "seconds": t_end - m.t0, "wire_down": w["down"], "wire_up": w["up"],
        "client_cpu_seconds": w["client_cpu_seconds"], "all_lossless": ok,
        "payload_new_bytes": sum(t.received for t in transfers),
        "reasons": [e.get("reason") for e in ends]}


def run_plain(side: ServerSide, link: int, data: dict, sess_id: str, kind: str) -> dict:
    """Sequential GETs of every frame codestream (kind='j2k') or DICOM file ('dicom')."""
    import requests

    url = side.proxy_urls[link]
    http = requests.Session()
    hdr = {"Authorization": f"Bearer {sess_id}"}
    study, series = data["study_uid"], data["series_uid"]
    base = f"{url}/dicomweb/studies/{study}/series/{series}/instances"
    http.get(f"{url}/api/health", timeout=30).raise_for_status()   # open the connection
    m = Meter(side, link)
    r = http.get(base, params={"format": "json"}, headers=hdr, timeout=30)
    r.raise_for_status()
    listed = {x["SOPInstanceUID"] for x in r.json()}
    listing = m.read()
    m2 = Meter(side, link)
    body = 0
    for im in data["images"]:
        assert im["sop"] in listed
        u = f"{base}/{im['sop']}"
        if kind == "j2k":
            u += f"/frames/{im['frame']}"
        # the stored codestream as kept (not a PS3.18 frame): the project's own media type
        resp = http.get(u, headers={**hdr, "Accept": "application/x-medview-codestream"}
                        if kind == "j2k" else hdr, timeout=60)
        resp.raise_for_status()
        want = im["codestream_size"] if kind == "j2k" else im["original_size"]
        if len(resp.content) != want:
            raise RuntimeError(f"{u}: got {len(resp.content)} bytes, expected {want}")
        body += len(resp.content)
    files = m2.read()
    http.close()
    return {"listing": listing, "files": files, "body_bytes": body,
            "wire_down": listing["down"] + files["down"],
            "wire_up": listing["up"] + files["up"],
            "seconds": listing["seconds"] + files["seconds"],
            "client_cpu_seconds": listing["client_cpu_seconds"] + files["client_cpu_seconds"]}


def decode_stages(sd, data: dict) -> dict:
    """Decode every image at each stage's parameters from what the client holds (all
    packets); check the lossless decode against the DICOM pixels."""
    import numpy as np

    out = {}
    for name, kw, want_l, want_r in stage_params(data):
        red = data["images"][0]["numres"] - 1 - want_r
        t = time.monotonic()
        decs = [sd.decode(c, reduce=red, layers=want_l) for c in range(len(sd))]
        out[name] = {"seconds": time.monotonic() - t, "shape": list(decs[0].pixels.shape)}
        if want_l == data["images"][0]["nlayers"]:
            bad = [c for c, d in enumerate(decs)
                   if not np.array_equal(d.pixels, dicom_pixels(data["images"][c]["original"]))]
            out[name]["lossless_mismatches"] = bad
        elif want_r == data["images"][0]["numres"] - 1:
            psnr = []
            for c in range(0, len(decs), max(1, len(decs) // 8)):
                ref = dicom_pixels(data["images"][c]["original"]).astype(float)
                mse = float(np.mean((decs[c].pixels.astype(float) - ref) ** 2))
                peak = (1 << data["images"][c]["bits_stored"]) - 1
                psnr.append(10 * np.log10(peak * peak / mse) if mse else float("inf"))
            out[name]["psnr_db_median_of_sample"] = float(np.median(psnr))
    return out


# =========================================================================== decoding
def decode_benchmark(data: dict, work: Path, reps: int, budget: float = 100.0) -> dict:
    import glymur

    from client.decode import decode
    try:                                   # glymur + temp file, no rebuild
        from codestream.encode import openjpeg_decode as decode_codestream
    except ImportError:                    # older layout
        from client.decode import decode_codestream
    from codestream.databins import BinSet, split_databins
    from codestream.index import PacketIndex

    shm = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else work
    d = Path(tempfile.mkdtemp(prefix="bench-dec-", dir=shm))
    indir = d / "in"
    indir.mkdir()
    bins, raw = [], []
    for i, im in enumerate(data["images"]):
        cs = Path(im["codestream"]).read_bytes()
        (indir / f"{i:04d}.j2k").write_bytes(cs)
        db = split_databins(cs, PacketIndex.parse(cs))
        bs = BinSet(db.main_header, db.tile_header,
                    {b: b"".join(layers) for b, layers in db.precincts.items()})
        bs.index.packet_lengths_by_bin()          # a warm client has its index already
        bins.append(bs)
        raw.append(cs)
    im0 = data["images"][0]
    n = len(bins)
    has_threads = "-threads" in subprocess.run([OPJ, "-h"], capture_output=True,
                                               text=True).stdout
    thr = ["-threads", "2"] if has_threads else []

    def client_path(reduce: int, k: int | None = None) -> float:
        t = time.perf_counter()
        for bs in bins[:k]:
            decode(bs, offset=im0["offset"], signed=im0["signed"],
                   bits_stored=im0["bits_stored"], reduce=reduce)
        return time.perf_counter() - t

    pool = ThreadPoolExecutor(2)

    def client_2_workers(reduce: int, k: int | None = None) -> float:
        """The same decode path on two worker threads, as the viewer's pool runs it."""
        t = time.perf_counter()
        list(pool.map(lambda bs: decode(bs, offset=im0["offset"], signed=im0["signed"],
                                        bits_stored=im0["bits_stored"], reduce=reduce),
                      bins[:k]))
        return time.perf_counter() - t

    def glymur_direct(reduce: int, k: int | None = None) -> float:
        t = time.perf_counter()
        for cs in raw[:k]:
            decode_codestream(cs, reduce=reduce)
        return time.perf_counter() - t

    def clean_outputs() -> None:
        for p in indir.iterdir():
            if p.suffix != ".j2k":
                p.unlink()

    def opj_batch(reduce: int, k: int | None = None) -> float:    # always all files
        cmd = [OPJ, "-ImgDir", str(indir), "-OutFor", "RAW", "-quiet", *thr]
        if reduce:
            cmd += ["-r", str(reduce)]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        el = time.perf_counter() - t
        made = sum(1 for p in indir.iterdir() if p.suffix == ".raw")
        clean_outputs()
        if made != n:
            raise RuntimeError(f"opj_decompress -ImgDir wrote {made} of {n} images")
        return el

    def opj_per_file(reduce: int, k: int | None = None) -> float:
        out = d / "out.raw"
        t = time.perf_counter()
        for i in range(n if k is None else k):
            cmd = [OPJ, "-i", str(indir / f"{i:04d}.j2k"), "-o", str(out), "-quiet", *thr]
            if reduce:
                cmd += ["-r", str(reduce)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        el = time.perf_counter() - t
        out.unlink()
        return el

    client_path(0)                     # lets the client set OpenJPEG's thread count
    try:
        glymur_threads = glymur.get_option("lib.num_threads")
    except Exception:  # noqa: BLE001
        glymur_threads = None
    methods = {"client": client_path, "client_2_workers": client_2_workers,
               "glymur_direct": glymur_direct,
               "opj_batch": opj_batch, "opj_per_file": opj_per_file}
    results = {}
    for reduce in (0, 2):              # warm-up: libraries loaded, page cache, tmpfs
        for f in methods.values():
            f(reduce, min(n, 8))
    times = {(r, k): [] for r in (0, 2) for k in methods}
    names = list(methods)
    t_start = time.monotonic()
    done = 0
    for rep in range(reps):            # interleaved; the order rotates every repetition
        if rep and time.monotonic() - t_start > budget:
            log(f"decode benchmark: time budget of {budget:.0f} s used after {rep} repetitions")
            break
        for reduce in (0, 2):
            for k in names[rep % len(names):] + names[:rep % len(names)]:
                times[(reduce, k)].append(methods[k](reduce))
        done += 1
    for reduce in (0, 2):
        row = {}
        for k in methods:
            med = statistics.median(times[(reduce, k)])
            row[k] = {"images_per_s": n / med, "seconds_median": med,
                      "seconds_all": times[(reduce, k)]}
        c = row["client"]["images_per_s"]
        row["ratio_client_vs_opj_batch"] = c / row["opj_batch"]["images_per_s"]
        row["ratio_client_vs_opj_per_file"] = c / row["opj_per_file"]["images_per_s"]
        row["ratio_glymur_direct_vs_opj_batch"] = (row["glymur_direct"]["images_per_s"]
                                                   / row["opj_batch"]["images_per_s"])
        results[f"reduce={reduce}"] = row
    pool.shutdown()
    shutil.rmtree(d, ignore_errors=True)
    return {"images": n, "reps": done, "opj_threads": 2 if has_threads else 1,
            "glymur_threads": glymur_threads,
            "opj": OPJ, "results": results}


# =========================================================================== reporting
def mb(n: float) -> str:
    return f"{n / 1e6:.3f}"


def table(headers: list[str], rows: list[list], title: str) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [title, "-" * len(title)]
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def link_floor(nbytes: float, bits_per_s: float) -> float:
    """Seconds a perfect transfer of ``nbytes`` takes on the link (bytes / rate)."""
    return nbytes * 8.0 / bits_per_s


def met(value: float, target: float, le: bool) -> str:
    ok = value <= target if le else value >= target
    return "met" if ok else "MISSED"


def report(res: dict) -> str:
    out = []
    d = res["data"]
    n = d["slices"]
    raw_files = d["raw_dicom_bytes"]
    stored = d["stored_codestream_bytes"]
    plain1 = d["plain_single_layer_bytes"]
    out.append(f"Series: {n} slices 512x512, {d['bits_stored']}-bit stored in 16 "
               f"(make_sample_ct seed 0); raw DICOM {mb(raw_files)} MB, pixel data "
               f"{mb(d['pixel_bytes'])} MB, stored layered J2K {mb(stored)} MB "
               f"({d['pixel_bytes'] / stored:.2f}:1), single-layer J2K {mb(plain1)} MB.")
    out.append("Links: " + "; ".join(f"{name}, one-way latency {lat * 1e3:g} ms"
                                     for name, _b, lat in LINKS)
               + ". Bytes = what the proxy relays server->client (HTTP headers and "
                 "framing included).")
    load = res["host"]["loadavg_start"][0]
    if load > 0.5:
        out.append(f"WARNING: load average {load:.2f} before the run ({res['host']['cpus']} CPUs): "
                   "other processes compete for the CPU, timings are noisy.")
    out.append("")

    L = res["links"]
    base = L[0]
    j2k_bytes = base["plain_j2k"]["wire_down"]
    dcm_bytes = base["plain_dicom"]["wire_down"]
    hdr = ["stage", "bytes (MB)", "% raw DICOM", "x plain J2K"]
    for lk in L:
        hdr += [f"t {lk['name']} (s)", "x link floor", "x J2K", "x DICOM"]
    rows = []

    def add(label, nbytes, times):
        r = [label, mb(nbytes), f"{100 * nbytes / dcm_bytes:.2f}", f"{nbytes / j2k_bytes:.3f}"]
        for lk, t in zip(L, times):
            r += [f"{t:.2f}", f"{t / link_floor(nbytes, lk['bits_per_s']):.2f}",
                  f"{t / lk['plain_j2k']['seconds']:.3f}",
                  f"{t / lk['plain_dicom']['seconds']:.3f}"]
        rows.append(r)

    cum = base["progressive"]["metadata"]["down"]
    add("0 series metadata (JSON)", cum, [lk["progressive"]["metadata"]["seconds"] for lk in L])
    for i, st in enumerate(base["progressive"]["stages"]):
        cum += st["wire_down"]
        times = [lk["progressive"]["stages"][i]["cum_seconds_all_visible"]
                 or lk["progressive"]["stages"][i]["cum_seconds"] for lk in L]
        add(f"{i + 1} {st['stage']}", cum, times)
    if "pipelined" in base["progressive"]:
        for i, st in enumerate(base["progressive"]["stages"]):
            times = [lk["progressive"]["pipelined"]["cum_seconds_all_visible"][i]
                     or lk["progressive"]["pipelined"]["seconds"] for lk in L]
            add(f"{i + 1}p same, stages pipelined", base["progressive"]["pipelined"]["wire_down"]
                if i == len(base["progressive"]["stages"]) - 1 else
                base["progressive"]["metadata"]["down"]
                + sum(x["wire_down"] for x in base["progressive"]["stages"][:i + 1]), times)
    add("plain lossless J2K (listing + frames)", j2k_bytes, [lk["plain_j2k"]["seconds"] for lk in L])
    add("plain raw DICOM (listing + files)", dcm_bytes, [lk["plain_dicom"]["seconds"] for lk in L])
    out.append(table(hdr, rows, "Progressive (cumulative, one quality-first session) vs plain "
                                "transfers; times until every slice is visible at the stage"))
    diffs = [lk["name"] for lk in L[1:]
             if abs(lk["progressive"]["sequence"]["down"] - base["progressive"]["sequence"]["down"]) > 64]
    out.append(f"(bytes from the {base['name']} run"
               + (f"; differ on {', '.join(diffs)}: see JSON)" if diffs else
                  "; the other link relayed the same bytes within 64 B)"))
    cpu = []
    for lk in L:
        pc = (lk["progressive"]["metadata"]["client_cpu_seconds"]
              + sum(s["client_cpu_seconds"] for s in lk["progressive"]["stages"]))
        cpu.append(f"{lk['name']}: progressive {pc:.2f} s, plain J2K "
                   f"{lk['plain_j2k']['client_cpu_seconds']:.2f} s, plain DICOM "
                   f"{lk['plain_dicom']['client_cpu_seconds']:.2f} s")
    out.append("Client CPU time (receiving only, no decoding): " + "; ".join(cpu) + ".")
    floors = []
    for lk in L:
        whole = lk["progressive"]["sequence"]
        t_ll = (lk["progressive"]["stages"][-1]["cum_seconds_all_visible"]
                or lk["progressive"]["stages"][-1]["cum_seconds"])
        x = t_ll / link_floor(whole["down"], lk["bits_per_s"])
        floors.append(f"{lk['name']}: {t_ll:.2f} s for {mb(whole['down'])} MB = {x:.2f}x "
                      f"(<= {TARGETS['link_floor']}: {met(x, TARGETS['link_floor'], True)}), "
                      f"plain J2K {lk['plain_j2k']['seconds'] / link_floor(lk['plain_j2k']['wire_down'], lk['bits_per_s']):.2f}x")
        pp = lk["progressive"].get("pipelined")
        if pp:
            t_pp = pp["cum_seconds_all_visible"][-1] or pp["seconds"]
            x = t_pp / link_floor(pp["wire_down"], lk["bits_per_s"])
            floors.append(f"pipelined {t_pp:.2f} s for {mb(pp['wire_down'])} MB = {x:.2f}x "
                          f"(<= {TARGETS['link_floor']}: {met(x, TARGETS['link_floor'], True)}; "
                          f"{'all lossless' if pp['all_lossless'] else 'NOT ALL LOSSLESS'}, "
                          f"{pp['wire_down'] - whole['down']:+d} B vs stage by stage, "
                          f"client CPU {pp['client_cpu_seconds']:.2f} s)")
    out.append("Lossless series vs the link floor (bytes on the wire / link rate): "
               + "; ".join(floors) + ".")
    ds = res.get("decode_stages", {})
    if ds:
        out.append("Decode of every slice at each stage after it arrived (client decode "
                   "path, sequential, not overlapped with the transfer): "
                   + "; ".join(f"{k.split(' (')[0]} {v['seconds']:.2f} s" for k, v in ds.items())
                   + ". Lossless decode identical to the DICOM pixels: "
                   + ("yes" if all(not v.get("lossless_mismatches", []) for v in ds.values())
                      else "NO (see JSON)") + "; ~1:20 PSNR "
                   + "; ".join(f"{v['psnr_db_median_of_sample']:.1f} dB" for v in ds.values()
                               if "psnr_db_median_of_sample" in v) + ".")
    out.append("")

    # overhead
    p = base["progressive"]
    jpp_wire = sum(s["wire_down"] for s in p["stages"])
    jpp_payload = sum(s["payload_new_bytes"] for s in p["stages"])
    frames_wire = base["plain_j2k"]["files"]["down"]
    bins = d["databin_bytes"]
    ov = jpp_wire / stored
    rows = [
        ["progressive lossless wire (3 responses) / stored J2K files", f"{ov:.4f}",
         f"<= {TARGETS['overhead']}: {met(ov, TARGETS['overhead'], True)}"],
        ["  same incl. series metadata request", f"{(jpp_wire + p['metadata']['down']) / stored:.4f}", ""],
        ["progressive lossless wire / plain J2K frames wire", f"{jpp_wire / frames_wire:.4f}", ""],
        ["new data-bin bytes received (client) / data-bin bytes stored", f"{jpp_payload / bins:.4f}",
         "1.0000 = nothing resent, nothing missing"],
        *([["  same, stages pipelined", f"{p['pipelined']['payload_new_bytes'] / bins:.4f}",
            f"wire {p['pipelined']['wire_down'] - p['sequence']['down']:+d} B vs stage by stage"]]
          if "pipelined" in p else []),
        ["progressive lossless wire / single-layer default J2K", f"{jpp_wire / plain1:.4f}", ""],
        ["stored layered J2K / single-layer default J2K", f"{stored / plain1:.4f}",
         "cost of layers + precincts + PLT"],
        ["plain J2K frames wire / stored J2K files", f"{frames_wire / stored:.4f}", "HTTP cost"],
    ]
    out.append(table(["packet overhead", "ratio", "target / note"], rows,
                     f"Packet overhead ({mb(jpp_wire)} MB progressive lossless on the wire)"))
    out.append("")

    # preview
    pv = p["stages"][0]["wire_down"]
    pct = 100 * pv / raw_files
    rows = [["first whole-series preview / raw DICOM files", f"{mb(pv)} MB", f"{pct:.3f} %",
             f"<= {TARGETS['preview_pct']} %: {met(pct, TARGETS['preview_pct'], True)}"],
            ["  same incl. series metadata request", f"{mb(pv + p['metadata']['down'])} MB",
             f"{100 * (pv + p['metadata']['down']) / raw_files:.3f} %", ""]]
    out.append(table(["preview", "bytes", "% of raw", "target"], rows,
                     "First whole-series preview (1 layer at the lowest resolution)"))
    out.append("")

    # decode
    dec = res.get("decode")
    if dec:
        rows = []
        for k, r in dec["results"].items():
            ratio = r["ratio_client_vs_opj_batch"]
            rows.append([k, f"{r['client']['images_per_s']:.1f}",
                         f"{r['client_2_workers']['images_per_s']:.1f}",
                         f"{r['glymur_direct']['images_per_s']:.1f}",
                         f"{r['opj_batch']['images_per_s']:.1f}",
                         f"{r['opj_per_file']['images_per_s']:.1f}",
                         f"{ratio:.3f}", f"{r['ratio_client_vs_opj_per_file']:.3f}",
                         f">= {TARGETS['decode_ratio']}: {met(ratio, TARGETS['decode_ratio'], False)}"])
        out.append(table(["mode", "client img/s", "client 2 workers", "glymur direct", "opj -ImgDir", "opj per file",
                          "client/opj -ImgDir", "client/opj per file", "target (vs -ImgDir)"],
                         rows, f"Decode throughput, {dec['images']} lossless 512x512 codestreams, "
                               f"2 threads, median of {dec['reps']} interleaved runs"))
    return "\n".join(out)


# =========================================================================== main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=100, help="slices in the series (default 100)")
    ap.add_argument("--quick", action="store_true", help="24 slices, fewer repetitions")
    ap.add_argument("--reps", type=int, default=None, help="decode repetitions (default 3)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "transfer.json"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--no-decode-bench", action="store_true",
                    help="skip the decode throughput table (transfers only)")
    args = ap.parse_args(argv)
    slices = 24 if args.quick and args.slices == 100 else args.slices
    reps = args.reps or 3

    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="medview-bench-"))
    res: dict = {"argv": sys.argv[1:], "host": {"python": platform.python_version(),
                                                "cpus": os.cpu_count(),
                                                "machine": platform.machine(),
                                                "loadavg_start": os.getloadavg()}}
    side = None
    try:
        log(f"generating and ingesting {slices} slices in {work}")
        data = prepare_data(work, slices)
        log(f"generated in {data['seconds_generate']:.1f} s, ingested in "
            f"{data['seconds_ingest']:.1f} s; encoding the single-layer reference")
        plain1 = plain_single_layer_sizes(data, work)
        ims = data["images"]
        res["data"] = {
            "slices": len(ims), "rows": ims[0]["rows"], "cols": ims[0]["cols"],
            "bits_stored": ims[0]["bits_stored"], "numres": ims[0]["numres"],
            "nlayers": ims[0]["nlayers"],
            "raw_dicom_bytes": sum(i["original_size"] for i in ims),
            "pixel_bytes": sum(i["rows"] * i["cols"] * 2 for i in ims),
            "stored_codestream_bytes": sum(i["codestream_size"] for i in ims),
            "databin_bytes": sum(i["databin_bytes"] for i in ims),
            "plain_single_layer_bytes": sum(plain1),
            "seconds_generate": data["seconds_generate"], "seconds_ingest": data["seconds_ingest"],
        }
        side = ServerSide(data["store_dir"], LINKS)
        res["links"] = []
        last_sd = None
        for li, (name, bps, lat) in enumerate(LINKS):
            log(f"link {name}: progressive")
            sess, sd, prog = run_progressive(side, li, data)
            log(f"link {name}: progressive, stages pipelined")
            psess, psd, piped = run_pipelined(side, li, data)
            prog["pipelined"] = piped
            log(f"link {name}: plain J2K")
            pj = run_plain(side, li, data, sess.id, "j2k")
            log(f"link {name}: plain DICOM")
            pd = run_plain(side, li, data, sess.id, "dicom")
            res["links"].append({"name": name, "bits_per_s": bps, "latency_s": lat,
                                 "progressive": prog, "plain_j2k": pj, "plain_dicom": pd,
                                 "proxy_totals": side.counts(li)})
            sess.logout()
            if last_sd is not None:
                last_sd[0].logout()
            last_sd = (psess, psd)           # the pipelined session's packets are checked
        log("decoding every stage from the client's packets")
        res["decode_stages"] = decode_stages(last_sd[1], data)
        last_sd[0].logout()
        side.stop()
        side = None
        if not args.no_decode_bench:
            log(f"decode throughput ({reps} reps)")
            res["decode"] = decode_benchmark(data, work, reps)
    finally:
        if side is not None:
            side.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    res["seconds_total"] = time.monotonic() - t_start
    res["host"]["loadavg_end"] = os.getloadavg()
    text = report(res)
    print(text)
    print(f"\ntotal run time {res['seconds_total']:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"numbers written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
