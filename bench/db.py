#!/usr/bin/env python
"""SQLite vs PostgreSQL: the per-request cost of the database on one server.

    .venv/bin/python bench/db.py [--requests N] [--slices N] [--clients C]

Writes a small synthetic CT series, ingests it into two stores — one on the embedded
SQLite file, one on PostgreSQL (a throwaway cluster on a unix socket, as the tests start
it) — and, for each, starts ``medview-server serve`` in a child process and times
requests from one client over a kept-alive connection:

* ``jpip``: a tiny packet request (one image, lowest resolution, one layer; after the
  first, the session's cache model leaves nothing new to send): the server's fixed
  per-request work — session, grant (rights and diagnosis status look-ups), catalogue
  look-up of the series, audit row (group commit);
* ``qido-studies``: ``/dicomweb/studies?PatientName=*PHANTOM*`` (joins, counts);
* ``qido-header``: ``/dicomweb/instances?Manufacturer=medview*`` (a key matched in the
  stored DICOM JSON header: SQLite ``json_each``, PostgreSQL ``jsonb_array_elements``);
* then the same jpip request from ``--clients`` threads at once (throughput).

Prints p50 / p90 / mean in milliseconds per request and requests per second; writes
``bench/out/db.json``. No pass/fail. Timings depend on the machine's load (printed).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_store(root: Path, files, database: str | None) -> str:
    from server.auth import Authority
    from server.ingest import ingest_paths
    from server.rights import Rule
    from server.store import Store

    with Store(root, database=database) as st:
        report = ingest_paths(files, st)
        assert len(report.imported) == len(files), report.summary()
        (series,) = st.catalogue.query_series()
        auth = Authority(st.database)
        auth.add_user("bench", "bench-password")
        auth.set_rule(Rule("bench"))
        auth.close()
        return series["SeriesInstanceUID"]


def serve(root: Path, database: str | None) -> tuple[subprocess.Popen, str]:
    import requests

    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--store", str(root),
           "--port", str(port), "--log-level", "warning"]
    if database:
        cmd += ["--database", database]
    env = dict(os.environ)
    env.pop("MEDVIEW_DATABASE", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if requests.get(f"{url}/api/health", timeout=5).status_code < 500:
                return proc, url
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server did not start: {' '.join(cmd)}")
        time.sleep(0.1)


def timed(session, method: str, url: str, n: int, **kw) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = session.request(method, url, timeout=60, **kw)
        r.content
        out.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200:
            raise SystemExit(f"{url}: HTTP {r.status_code} {r.text[:200]}")
    return out


def stats(ms: list[float]) -> dict:
    s = sorted(ms)
    return {"n": len(s), "p50_ms": round(s[len(s) // 2], 3),
            "p90_ms": round(s[int(len(s) * 0.9)], 3), "mean_ms": round(statistics.fmean(s), 3)}


def bench_engine(url: str, uid: str, n: int, clients: int) -> dict:
    import requests

    http = requests.Session()
    sid = http.post(f"{url}/api/login", json={"username": "bench",
                                             "password": "bench-password"}).json()["session"]
    http.headers["Authorization"] = f"Bearer {sid}"
    jpip = f"{url}/jpip?target={uid}&comps=0&reduce=1&layers=1"
    cases = {"jpip": ("GET", jpip),
             "qido-studies": ("GET", f"{url}/dicomweb/studies?PatientName=*PHANTOM*"),
             "qido-header": ("GET", f"{url}/dicomweb/instances?Manufacturer=medview*")}
    out = {}
    for name, (method, u) in cases.items():
        timed(http, method, u, max(5, n // 10))                     # warm up
        out[name] = stats(timed(http, method, u, n))
    # throughput: C clients, each its own session and connection
    sessions = []
    for _ in range(clients):
        s = requests.Session()
        s.headers["Authorization"] = "Bearer " + s.post(
            f"{url}/api/login", json={"username": "bench", "password": "bench-password"}
        ).json()["session"]
        timed(s, "GET", jpip, 3)
        sessions.append(s)
    per = max(1, n // clients)
    lat: list[float] = []
    lock = threading.Lock()

    def run(s):
        ms = timed(s, "GET", jpip, per)
        with lock:
            lat.extend(ms)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    out[f"jpip x{clients} clients"] = {**stats(lat), "req_per_s": round(len(lat) / wall, 1)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "db.json")
    args = ap.parse_args()

    from pgcluster import PgCluster
    from server.sample import make_sample_ct

    load0 = os.getloadavg()[0]
    cluster = PgCluster().start()
    results: dict = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            files = make_sample_ct(tmp / "dicom", slices=args.slices, size=128, seed=11)
            for engine, database in (("sqlite", None), ("postgresql", cluster.fresh_url())):
                root = tmp / f"store-{engine}"
                uid = make_store(root, files, database)
                proc, url = serve(root, database)
                try:
                    results[engine] = bench_engine(url, uid, args.requests, args.clients)
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
    finally:
        cluster.stop()
    load1 = os.getloadavg()[0]

    print(f"\nper request, one server, one client (ms; load average {load0:.1f} -> {load1:.1f})")
    names = list(results["sqlite"])
    print(f"{'request':22} {'engine':11} {'p50':>8} {'p90':>8} {'mean':>8} {'req/s':>8}")
    for name in names:
        for engine in results:
            r = results[engine][name]
            rps = r.get("req_per_s", round(1000 / r["mean_ms"], 1))
            print(f"{name:22} {engine:11} {r['p50_ms']:8.2f} {r['p90_ms']:8.2f} "
                  f"{r['mean_ms']:8.2f} {rps:8.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"load": [load0, load1], "results": results,
                                    "requests": args.requests, "clients": args.clients},
                                   indent=2))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
