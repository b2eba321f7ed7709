"""Cluster benchmark (issue 16): concurrent sessions streaming whole series through
nginx to 1, 2 and 3 replicas (scripts/cluster.sh: SeaweedFS, shared catalogue, nginx),
and the cost of an S3 object store against the local disk for one server.

    .venv/bin/python bench/cluster.py                 # sessions 10,50; replicas 1,2,3
    .venv/bin/python bench/cluster.py --sessions 50,200 --replicas 1,2,3 --streams 2
    .venv/bin/python bench/cluster.py --quick          # 10 sessions, replicas 1,2
    .venv/bin/python bench/cluster.py --replicas 0     # disk vs S3 only

Per (replicas, sessions): every session logs in through nginx and streams the whole
series ``--streams`` times (a fresh session each time: nothing cached on its side);
meanwhile one prober thread per 10 sessions sends small requests — the packets of one
image at its lowest layer and a quarter of its size (``layers=1&reduce=2``, stateless
JPP framing) and the series' image list — and times them. Reported: MB/s through nginx,
p50/p99 of the small requests, errors and 503s (admission control).

Disk vs S3: one ``medview-server serve`` on a disk store and one on an S3 store (read
cache off, and on), each started fresh: a cold whole-series stream, a warm one, and the
median of small requests.

Nothing is asserted; results go to stdout and ``bench/out/cluster.json``. On 2 shared
cores the figures are small; what matters is the trend with replicas and that nothing
fails.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

USER, PASSWORD = "medview", "bench-password"
REDUCE = 2          # of the small requests (at most numres - 1 of the series)


def free_base(n: int) -> int:
    for _ in range(200):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        if p + n >= 55000:
            continue
        try:
            for q in range(p, p + n):
                t = socket.socket()
                t.bind(("127.0.0.1", q))
                t.close()
            return p
        except OSError:
            continue
    raise RuntimeError("no free ports")


def login(url: str) -> str:
    r = requests.post(f"{url}/api/login", json={"username": USER, "password": PASSWORD}, timeout=60)
    r.raise_for_status()
    return r.json()["session"]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def stream_series(url: str, uid: str, sid: str) -> int:
    """One whole-series stream (mv framing, the session's model empty): bytes read."""
    n = 0
    with requests.get(f"{url}/jpip", params={"target": uid, "order": "quality"},
                      headers={"Authorization": f"Bearer {sid}"}, stream=True,
                      timeout=(30, 600)) as r:
        if r.status_code != 200:
            raise HTTPStatus(r.status_code)
        for chunk in r.iter_content(65536):
            n += len(chunk)
    return n


class HTTPStatus(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def small_request(http: requests.Session, url: str, uid: str, sid: str, k: int, n_images: int
                  ) -> float:
    h = {"Authorization": f"Bearer {sid}"}
    t0 = time.perf_counter()
    if k % 2 == 0:
        r = http.get(f"{url}/jpip", params={"target": uid, "comps": str(k % n_images),
                                            "layers": "1", "reduce": str(REDUCE), "framing": "jpp"},
                     headers=h, timeout=60)
    else:
        r = http.get(f"{url}/api/series/{uid}/images", headers=h, timeout=60)
    _ = r.content
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise HTTPStatus(r.status_code)
    return dt


def load_run(url: str, uid: str, n_images: int, sessions: int, streams: int) -> dict:
    """``sessions`` concurrent clients streaming the series ``streams`` times each, and
    probes timing small requests meanwhile."""
    errors: list[str] = []
    n503 = [0]
    total = [0]
    lat: list[float] = []
    lock = threading.Lock()
    done = threading.Event()

    def client() -> None:
        for _ in range(streams):
            try:
                sid = login(url)
                n = stream_series(url, uid, sid)
                with lock:
                    total[0] += n
            except HTTPStatus as e:
                with lock:
                    (n503.__setitem__(0, n503[0] + 1) if e.status == 503
                     else errors.append(str(e)))
            except Exception as e:  # noqa: BLE001 - counted
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")

    def prober() -> None:
        http = requests.Session()
        try:
            sid = login(url)
        except Exception as e:  # noqa: BLE001
            errors.append(f"probe login: {e}")
            return
        k = 0
        while not done.is_set():
            try:
                dt = small_request(http, url, uid, sid, k, n_images)
                with lock:
                    lat.append(dt)
            except HTTPStatus as e:
                with lock:
                    (n503.__setitem__(0, n503[0] + 1) if e.status == 503
                     else errors.append(f"small: {e}"))
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(f"small: {type(e).__name__}: {e}")
            k += 1

    threads = [threading.Thread(target=client) for _ in range(sessions)]
    probes = [threading.Thread(target=prober) for _ in range(max(1, sessions // 10))]
    t0 = time.perf_counter()
    for t in probes + threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done.set()
    for t in probes:
        t.join()
    return {"sessions": sessions, "streams": sessions * streams, "seconds": round(wall, 2),
            "MB": round(total[0] / 1e6, 1), "MB_per_s": round(total[0] / 1e6 / wall, 2),
            "small_requests": len(lat),
            "small_p50_ms": round(1000 * pct(lat, 0.5), 1) if lat else None,
            "small_p99_ms": round(1000 * pct(lat, 0.99), 1) if lat else None,
            "errors": len(errors), "error_samples": errors[:5], "http_503": n503[0]}


# --------------------------------------------------------------------------- the cluster
def cluster_env(d: Path, port: int, replicas: int) -> dict:
    return {**os.environ, "MEDVIEW_CLUSTER_DIR": str(d), "MEDVIEW_CLUSTER_PORT": str(port),
            "MEDVIEW_REPLICAS": str(replicas), "MEDVIEW_CLUSTER_USER": USER,
            "MEDVIEW_CLUSTER_PASSWORD": PASSWORD, "MEDVIEW_CLUSTER_POSTGRES": "0"}


def sh(action: str, env: dict) -> None:
    r = subprocess.run(["bash", "scripts/cluster.sh", action], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cluster.sh {action} failed:\n{r.stderr}")


def stow(url: str, files: list[Path]) -> None:
    sid = login(url)
    boundary = "medview-bench"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + f.read_bytes() + b"\r\n" for f in files) + f"--{boundary}--\r\n".encode()
    r = requests.post(f"{url}/dicomweb/studies", data=body, timeout=3600,
                      headers={"Authorization": f"Bearer {sid}", "Accept": "application/dicom+json",
                               "Content-Type": f'multipart/related; type="application/dicom"; '
                                               f'boundary={boundary}'})
    if r.status_code != 200:
        raise RuntimeError(f"STOW-RS: HTTP {r.status_code}: {r.text[:2000]}")


def series_of(url: str) -> tuple[str, int]:
    sid = login(url)
    h = {"Authorization": f"Bearer {sid}"}
    s = requests.get(f"{url}/dicomweb/series", headers=h, timeout=60).json()[0]
    uid = s["0020000E"]["Value"][0]
    imgs = requests.get(f"{url}/api/series/{uid}/images", headers=h, timeout=60).json()
    global REDUCE
    REDUCE = min(2, min(im["numres"] for im in imgs["images"]) - 1)
    return uid, len(imgs["images"])


# --------------------------------------------------------------------------- disk vs S3
def serve(store: Path, port: int, env: dict) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--store", str(store),
                          "--port", str(port), "--log-level", "warning"], env=env, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/api/health", timeout=2).ok:
                return p
        except requests.RequestException:
            pass
        time.sleep(0.1)
    p.kill()
    raise RuntimeError("server did not start")


def add_user(store: Path, env: dict) -> None:
    subprocess.run([sys.executable, "-m", "server.cli", "user", "add", USER, "--store",
                    str(store), "--password-stdin"], input=PASSWORD + "\n", text=True,
                   env=env, cwd=ROOT, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "server.cli", "user", "grant", USER, "--store",
                    str(store)], env=env, cwd=ROOT, check=True, capture_output=True)


def store_costs(files: list[Path], work: Path, s3) -> dict:
    out = {}
    env = {**os.environ, **s3.env()}
    disk, remote = work / "disk-store", work / "s3-store"
    subprocess.run([sys.executable, "-m", "server.cli", "ingest", *map(str, files),
                    "--store", str(disk), "--quiet"], env=env, cwd=ROOT, check=True)
    subprocess.run([sys.executable, "-m", "server.cli", "ingest", *map(str, files),
                    "--store", str(remote), "--objects", "s3://medview-bench/store", "--quiet"],
                   env=env, cwd=ROOT, check=True)
    for st in (disk, remote):
        add_user(st, env)
    for name, store, cache in (("disk", disk, None), ("s3, no local cache", remote, "0"),
                               ("s3, local read cache", remote, str(1 << 30))):
        e = dict(env)
        if cache is not None:
            e["MEDVIEW_READ_CACHE_BYTES"] = cache
        port = free_base(1)
        proc = serve(store, port, e)
        url = f"http://127.0.0.1:{port}"
        try:
            uid, n = series_of(url)
            http = requests.Session()
            sid = login(url)
            cold_small = []
            for k in range(0, 2 * n, 2):              # every image's first small request
                cold_small.append(small_request(http, url, uid, sid, k, n))
            sids = [login(url) for _ in range(6)]   # (a log-in costs a password hash)
            t0 = time.perf_counter()
            nbytes = stream_series(url, uid, sids[0])
            cold = time.perf_counter() - t0
            warms = []
            for sid_w in sids[1:]:                    # the median of five
                t0 = time.perf_counter()
                stream_series(url, uid, sid_w)
                warms.append(time.perf_counter() - t0)
            warm = statistics.median(warms)
            warm_small = [small_request(http, url, uid, sid, k, n) for k in range(0, 2 * n, 2)]
            out[name] = {"small_cold_p50_ms": round(1000 * statistics.median(cold_small), 1),
                         "small_warm_p50_ms": round(1000 * statistics.median(warm_small), 1),
                         "stream_cold_s": round(cold, 3), "stream_warm_s": round(warm, 3),
                         "stream_MB": round(nbytes / 1e6, 2)}
        finally:
            proc.terminate()
            proc.wait(60)
        print(f"  {name:<22} {out[name]}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", default="10,50", help="comma-separated session counts")
    ap.add_argument("--replicas", default="1,2,3")
    ap.add_argument("--streams", type=int, default=1, help="whole-series streams per session")
    ap.add_argument("--slices", type=int, default=24)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="10 sessions, replicas 1,2")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "cluster.json")
    ap.add_argument("--skip-store-costs", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.sessions, args.replicas = "10", "1,2"
    sessions = [int(x) for x in args.sessions.split(",")]
    replicas = [int(x) for x in args.replicas.split(",") if int(x) > 0]   # 0: none

    import seaweed
    from server.sample import make_sample_ct

    results: dict = {"load_before": os.getloadavg(), "cpus": os.cpu_count(),
                     "series": {"slices": args.slices, "size": args.size}, "cluster": []}
    with tempfile.TemporaryDirectory(prefix="medview-bench-cluster-") as tmp:
        work = Path(tmp)
        files = [Path(f) for f in make_sample_ct(work / "dicom", slices=args.slices,
                                                 size=args.size, seed=5)]
        port = free_base(1 + max(replicas, default=0))
        stored = False
        for n in replicas:
            env = cluster_env(work / "cluster", port, n)
            try:
                sh("up", env)
                url = f"http://127.0.0.1:{port}"
                if not stored:
                    stow(url, files)
                    stored = True
                uid, n_images = series_of(url)
                for s in sessions:
                    r = load_run(url, uid, n_images, s, args.streams)
                    r["replicas"] = n
                    results["cluster"].append(r)
                    print(f"replicas {n} sessions {s:>3}: {r['MB_per_s']:>6} MB/s, small p50 "
                          f"{r['small_p50_ms']} ms p99 {r['small_p99_ms']} ms, errors "
                          f"{r['errors']}, 503s {r['http_503']} ({r['seconds']} s)", flush=True)
                    for e in r["error_samples"]:
                        print(f"    error: {e}", flush=True)
            except Exception:
                for f in sorted((work / "cluster").glob("*.log")):
                    print(f"--- {f.name}\n{f.read_text()[-4000:]}", file=sys.stderr)
                raise
            finally:
                sh("down", env)
        if not args.skip_store_costs:
            print("disk vs S3 (one server):", flush=True)
            s3 = seaweed.start(work / "seaweed-costs")
            try:
                results["store_costs"] = store_costs(files, work, s3)
            finally:
                s3.stop()
    results["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
