"""A small cluster on this machine (scripts/cluster.sh): SeaweedFS, two `medview-server
serve` replicas sharing the store's catalogue and bucket, nginx in front
(deploy/nginx.conf). Ingest through one replica, read through the other; a background job
runs once while both are up; kill -9 of the replica that streams: the client reconnects
through nginx, declares its cache and finishes bit-exact with nothing sent twice."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import requests

from client import Callbacks, SeriesData, Session, TransferError
from codestream.encode import decode_full
from conftest import PG_RUN
from server.dbutil import Db
from waits import WAIT_S, wait_for

ROOT = Path(__file__).resolve().parents[1]
USER, PASSWORD = "medview", "cluster-test-password"


def _free_base(n: int) -> int:
    """A port p with p..p+n-1 free on loopback, below the kernel's ephemeral range: the
    ports SeaweedFS takes come from that range, and its gRPC ports (each + 10000) land in
    42768-65000, so a base from 20000-32000 never collides with them."""
    import random

    rng = random.Random()
    for _ in range(500):
        p = rng.randrange(20000, 32000 - n)
        ok = True
        for q in range(p, p + n):
            t = socket.socket()
            try:
                t.bind(("127.0.0.1", q))
            except OSError:
                ok = False
            finally:
                t.close()
        if ok:
            return p
    raise RuntimeError("no free loopback ports for the cluster")


class Cluster:
    def __init__(self, d: Path, port: int, env: dict) -> None:
        self.dir, self.port, self.env = d, port, env
        self.url = f"http://127.0.0.1:{port}"
        # the catalogue the replicas share: the cluster's own PostgreSQL (on the port
        # cluster.sh gives it) in the PostgreSQL pass of the tests, else the SQLite file
        self.database = (f"postgresql://medview@127.0.0.1:{port + 50}/medview" if PG_RUN
                         else str(d / "store" / "catalogue.sqlite"))
        self._db: Db | None = None

    def db(self) -> Db:
        """The shared catalogue, opened once (a quick look right after the first data of a
        stream, not the set-up of a connection pool), closed with the cluster."""
        if self._db is None:
            self._db = Db(self.database)
        return self._db

    def replica_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.port + i}"

    def pid(self, i: int) -> int:
        return int((self.dir / "pids" / f"replica{i}.pid").read_text())

    def health(self, i: int) -> dict:
        return requests.get(f"{self.replica_url(i)}/api/health", timeout=10).json()

    def sh(self, action: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "scripts/cluster.sh", action], env=self.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=WAIT_S * 2)

    def logs(self) -> str:
        out = []
        for f in sorted(self.dir.glob("*.log")) + [self.dir / "nginx" / "error.log"]:
            if f.exists():
                out.append(f"--- {f.name}\n{f.read_text()[-3000:]}")
        return "\n".join(out)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    subprocess.run(["bash", "scripts/apt-ensure.sh", "nginx-light", "curl"], cwd=ROOT, check=True)
    if PG_RUN:
        # the cluster's PostgreSQL runs as the postgres user when the tests run as root:
        # its directory must be reachable (pytest's base temp directory is private)
        d = Path(tempfile.mkdtemp(prefix="medview-cluster-"))
        os.chmod(d, 0o711)
    else:
        d = tmp_path_factory.mktemp("cluster")
    port = _free_base(51)                       # nginx, the replicas, ..., PostgreSQL (+50)
    env = {k: v for k, v in os.environ.items() if k != "MEDVIEW_DATABASE"}
    env.update({"MEDVIEW_CLUSTER_DIR": str(d), "MEDVIEW_CLUSTER_PORT": str(port),
                "MEDVIEW_REPLICAS": "2", "MEDVIEW_CLUSTER_POSTGRES": "1" if PG_RUN else "0",
                "MEDVIEW_CLUSTER_USER": USER, "MEDVIEW_CLUSTER_PASSWORD": PASSWORD,
                "MEDVIEW_JOB_FIRST_DELAY_S": "1", "MEDVIEW_SEAWEED_DATA": "throwaway",
                "MEDVIEW_CLUSTER_WAIT_S": str(int(WAIT_S))})
    c = Cluster(d, port, env)
    r = c.sh("up")
    try:
        assert r.returncode == 0, r.stderr + c.logs()
        assert c.sh("status").returncode == 0
        yield c
    finally:
        if c._db is not None:
            c._db.close()
        down = c.sh("down")
        assert down.returncode == 0, down.stderr
    for i in (1, 2):
        assert not (d / "pids" / f"replica{i}.pid").exists()
    if PG_RUN:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def series(cluster, tmp_path_factory):
    """A CT series stored through replica 1 (DICOMweb STOW-RS), and its codestreams as
    stored (read from the store: the bucket)."""
    from server.sample import make_sample_ct

    files = make_sample_ct(tmp_path_factory.mktemp("ct"), slices=16, size=512, seed=11)
    sid = requests.post(f"{cluster.url}/api/login",
                        json={"username": USER, "password": PASSWORD}).json()["session"]
    boundary = "medview-cluster-test"
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                    + Path(f).read_bytes() + b"\r\n" for f in files) + f"--{boundary}--\r\n".encode()
    r = requests.post(f"{cluster.replica_url(1)}/dicomweb/studies", data=body, timeout=WAIT_S,
                      headers={"Authorization": f"Bearer {sid}", "Accept": "application/dicom+json",
                               "Content-Type": f'multipart/related; type="application/dicom"; '
                                               f'boundary={boundary}'})
    assert r.status_code == 200, r.text
    from server.store import Store
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    import seaweed
    os.environ.update(AWS_ACCESS_KEY_ID=seaweed.ACCESS_KEY, AWS_SECRET_ACCESS_KEY=seaweed.SECRET_KEY)
    try:
        with Store(cluster.dir / "store", database=cluster.database if PG_RUN else None) as st:
            assert st.objects.remote
            (s,) = st.catalogue.query_series()
            uid = s["SeriesInstanceUID"]
            rows = st.catalogue.series_images(uid)
            px = {r["index"]: decode_full(st.read_verified(r["codestream_relpath"],
                                                           r["codestream_sha256"]),
                                          r["offset"], True) for r in rows}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert len(px) == 16
    assert not list((cluster.dir / "store").rglob("*.j2k"))       # in the bucket
    return {"uid": uid, "pixels": px, "sid": sid}


def test_a_background_job_runs_once(cluster):
    """Both replicas schedule the migration job; one runs it, the other decides not to."""
    def decided():
        # both decided their turn, and the one that took it has finished its run (on a
        # busy machine the run may still be going when the other has already decided)
        h = [cluster.health(i)["jobs"]["migration"] for i in (1, 2)]
        return h if all(x["decided"] >= 1 for x in h) and sum(x["runs"] for x in h) else None
    h = wait_for(decided, what="both replicas deciding the migration's first turn and "
                               "one of them finishing it")
    assert sorted(x["runs"] for x in h) == [0, 1], h
    (runs,) = cluster.db().one("SELECT runs FROM job_run WHERE name = 'migration'")
    assert runs == 1


def test_ingest_through_one_replica_read_through_the_other(cluster, series):
    s = Session(cluster.replica_url(2), USER, PASSWORD)
    sd = SeriesData(s, None, series["uid"])
    t = sd.transfer()
    t.run()
    for c, px in series["pixels"].items():
        np.testing.assert_array_equal(sd.decode(c).pixels, px)
    # the session made through nginx works on either replica directly
    for i in (1, 2):
        r = requests.get(f"{cluster.replica_url(i)}/api/me",
                         headers={"Authorization": f"Bearer {series['sid']}"})
        assert r.status_code == 200 and r.json()["user"] == USER


def test_kill_9_of_the_streaming_replica(cluster, series):
    """The client stalls after its first data, the replica streaming to it is killed;
    the transfer breaks off, the client asks again through nginx (the other replica),
    declares what it holds, and ends bit-exact with no byte sent twice.

    Loopback's kernel buffers can hold megabytes: if the killed replica had already
    handed its whole stream to them, the transfer ends normally; then the replica is
    started again (``cluster.sh up``) and the test tries again (at most three times)."""
    import urllib3.connection

    opts = urllib3.connection.HTTPConnection.default_socket_options
    for _attempt in range(3):
        s = Session(cluster.url, USER, PASSWORD)
        sd = SeriesData(s, None, series["uid"])
        first_data, killed = threading.Event(), threading.Event()

        def progress(p, first_data=first_data, killed=killed) -> None:
            if p.received:               # data, not the announcement (received 0)
                first_data.set()
                killed.wait(WAIT_S)

        # a small receive window, so that most of the series is still on the server's
        # side when the client stalls
        urllib3.connection.HTTPConnection.default_socket_options = opts + [
            (socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)]
        s.http.close()
        errors: list[BaseException] = []
        t1 = sd.transfer(callbacks=Callbacks(on_progress=progress))

        def run(t1=t1, errors=errors) -> None:
            try:
                t1.run()
            except BaseException as e:  # noqa: BLE001 - looked at below
                errors.append(e)

        th = threading.Thread(target=run)
        # asked before the stream starts: between its first data and the kill, only one
        # quick look at the sessions table (the longer the wait, the more of the stream
        # the kernel's buffers already hold when the replica dies)
        by_replica = {cluster.health(i)["replica"]: i for i in (1, 2)}
        cluster.db()
        th.start()
        try:
            assert first_data.wait(WAIT_S)
            # the replica that streams owns the session's cache model (sessions table)
            victim = by_replica[_owner_of(cluster, s.id)]
            os.kill(cluster.pid(victim), signal.SIGKILL)
            wait_for(lambda: not _alive(cluster.pid(victim)), what="the killed replica gone")
        finally:
            killed.set()
            th.join(WAIT_S)
            urllib3.connection.HTTPConnection.default_socket_options = opts
        print(f"kill attempt {_attempt + 1}: {'mid-stream' if errors else 'stream had ended'}")
        if errors:
            break
        up = cluster.sh("up")                  # the stream had ended: again
        assert up.returncode == 0, up.stderr
    else:
        pytest.fail("the replica finished every stream before it was killed (3 tries)")
    assert isinstance(errors[0], TransferError), errors
    assert 0 < t1.received < t1.requested
    # the client asks again through nginx: the surviving replica, with a declaration
    assert sd.declare_needed
    t2 = sd.transfer()
    t2.run()
    assert t2.end["reason"] == "complete"
    assert t2.end["bytes_sent"] == t2.received          # nothing it already had
    assert _owner_of(cluster, s.id) == cluster.health(3 - victim)["replica"]
    for c, px in series["pixels"].items():
        np.testing.assert_array_equal(sd.decode(c).pixels, px)


def _owner_of(cluster: Cluster, sid: str) -> str | None:
    import hashlib
    row = cluster.db().one("SELECT model_owner FROM sessions WHERE id_sha256 = ?",
                           (hashlib.sha256(sid.encode()).hexdigest(),))
    return row[0] if row else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not yet reaped by its parent shell) is gone for our purpose
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False

