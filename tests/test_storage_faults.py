"""Storage faults (issue 10, section 5; issue 15, audit off the request path): a full
disk never stops reading, the audit writer never makes a request wait for the disk and
loses nothing on a clean shutdown.

Each scenario runs with the fault hook (:mod:`server.faults`, always) and, where this
process may ``mount`` (root, CI containers with the capability), on a real small tmpfs
filled to the last byte."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

# a full disk under the store's SQLite file: with MEDVIEW_TEST_DATABASE=postgresql the
# tables are not on the store's disk (PostgreSQL's own "disk full" is dbutil's StorageFull)
pytestmark = pytest.mark.skipif(bool(os.environ.get("MEDVIEW_DATABASE")),
                                reason="the SQLite file on the store's disk")
import requests

from server import faults, store as store_mod
from server.auth import _DDL, AuditWriter
from server.dbutil import Db, StorageFull
from server.embedded import EmbeddedServer
from tests.policyutil import copy_store


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """Three 64x64 CT slices: small enough for a 4 MB file system."""
    from server.ingest import ingest_paths
    from server.sample import make_sample_ct
    from server.store import Store

    root = tmp_path_factory.mktemp("small")
    files = make_sample_ct(root / "dicom", slices=3, size=64, seed=5)
    with Store(root / "store") as st:
        assert len(ingest_paths(files, st).imported) == 3
    EmbeddedServer(str(root / "store")).start().stop()     # served once: every table made
    return root / "store"


@pytest.fixture(autouse=True)
def _no_fault_left():
    yield
    faults.set_disk_full(None)


class Disk:
    """A place for a store whose disk can be filled and freed: a real tmpfs of a few MB
    (``tmpfs``) or any folder with the fault hook (``hook``)."""

    def __init__(self, kind: str, base: Path) -> None:
        self.kind, self.dir = kind, base / "mnt"
        self.dir.mkdir()
        self.mounted = False
        if kind == "tmpfs":
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(self.dir)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
            self.mounted = True

    def fill(self) -> None:
        if self.kind == "hook":
            faults.set_disk_full(True)
            return
        with open(self.dir / "filler", "ab", buffering=0) as f:
            for size in (1 << 16, 512, 1):
                try:
                    while True:
                        f.write(b"\0" * size)
                except OSError:
                    pass
        assert os.statvfs(self.dir).f_bavail == 0

    def free(self) -> None:
        if self.kind == "hook":
            faults.set_disk_full(None)
        else:
            (self.dir / "filler").unlink()

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.dir)], check=False)


@pytest.fixture(params=["hook", "tmpfs"])
def disk(request, tmp_path):
    d = Disk(request.param, tmp_path)
    yield d
    d.close()


def local(url: str) -> dict:
    r = requests.post(f"{url}/api/login", json={"username": "local"}, timeout=30)
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['session']}"}


def reads(url: str, h: dict) -> list[int]:
    """Every kind of read: QIDO, metadata, series layout, packets."""
    studies = requests.get(f"{url}/dicomweb/studies?format=json", headers=h, timeout=30)
    series = requests.get(f"{url}/dicomweb/series?format=json", headers=h, timeout=30)
    uid = series.json()[0]["SeriesInstanceUID"]
    images = requests.get(f"{url}/api/series/{uid}/images", headers=h, timeout=30)
    jpip = requests.get(f"{url}/jpip", params={"target": uid, "layers": 1}, headers=h,
                        timeout=30)
    assert jpip.status_code != 200 or len(jpip.content) > 100
    return [r.status_code for r in (studies, series, images, jpip)]


def write_status(url: str, h: dict) -> requests.Response:
    study = requests.get(f"{url}/dicomweb/studies?format=json", headers=h,
                         timeout=30).json()[0]["StudyInstanceUID"]
    return requests.put(f"{url}/api/studies/{study}/status", json={"status": 2}, headers=h,
                        timeout=30)


def audit_count(store: Path, where: str = "1") -> int:
    c = sqlite3.connect(store / "catalogue.sqlite")
    try:
        return c.execute(f"SELECT count(*) FROM audit WHERE {where}").fetchone()[0]
    finally:
        c.close()


def test_server_starts_read_only_on_a_full_disk(disk, small_store):
    """Today: `database or disk is full` / `disk I/O error`, and no server at all."""
    store = copy_store(small_store, disk.dir / "store")
    disk.fill()
    srv = EmbeddedServer(str(store)).start()
    try:
        h = local(srv.url)
        assert reads(srv.url, h) == [200] * 4
        r = write_status(srv.url, h)
        assert r.status_code == 507 and "disk is full" in r.json()["error"]
        health = requests.get(f"{srv.url}/api/health", timeout=30).json()
        assert health["status"] == "degraded" and health["read_only"]
        assert health["audit"]["pending"] >= 5 and health["audit"]["dropped"] == 0
    finally:
        srv.stop()
    disk.free()


def wait_healthy(url: str) -> dict:
    deadline = time.monotonic() + 120
    health = requests.get(f"{url}/api/health", timeout=30).json()
    while health["status"] != "ok" and time.monotonic() < deadline:
        time.sleep(0.05)
        health = requests.get(f"{url}/api/health", timeout=30).json()
    return health


def test_a_read_only_server_becomes_read_write_when_space_returns(disk, small_store,
                                                                  monkeypatch):
    monkeypatch.setattr(store_mod, "MIN_FREE_BYTES", 64 << 10)
    store = copy_store(small_store, disk.dir / "store")
    before = audit_count(store)
    disk.fill()
    srv = EmbeddedServer(str(store)).start()
    try:
        h = local(srv.url)
        assert reads(srv.url, h) == [200] * 4
        assert write_status(srv.url, h).status_code == 507
        assert requests.get(f"{srv.url}/api/health", timeout=30).json()["read_only"]
        disk.free()
        health = wait_healthy(srv.url)
        assert health["status"] == "ok" and not health["read_only"]
        assert write_status(srv.url, h).status_code == 200
        assert reads(srv.url, h) == [200] * 4
    finally:
        srv.stop()
    # login, 4 reads, QIDO + 507, QIDO + status, 4 reads: the read-only ones too
    assert audit_count(store) - before == 1 + 4 + 2 + 2 + 4


def test_reads_go_on_when_the_disk_fills_and_the_audit_catches_up(disk, small_store,
                                                                   monkeypatch):
    """Today every request, reads included, answers 500 once the disk is full, because
    each one writes its audit row first."""
    monkeypatch.setattr(store_mod, "MIN_FREE_BYTES", 64 << 10)
    store = copy_store(small_store, disk.dir / "store")
    srv = EmbeddedServer(str(store)).start()
    try:
        h = local(srv.url)
        assert reads(srv.url, h) == [200] * 4
        disk.fill()
        codes = [c for _ in range(5) for c in reads(srv.url, h)]
        assert codes == [200] * 20
        r = write_status(srv.url, h)
        assert r.status_code == 507 and "disk is full" in r.json()["error"]
        deadline = time.monotonic() + 60             # once the writer has tried
        health = requests.get(f"{srv.url}/api/health", timeout=30).json()
        while health["status"] == "ok" and time.monotonic() < deadline:
            time.sleep(0.02)
            health = requests.get(f"{srv.url}/api/health", timeout=30).json()
        assert health["status"] == "degraded" and not health["read_only"]
        assert health["audit"]["pending"] >= 20 and health["audit"]["failing"]
        disk.free()                                       # space again: the rows go in
        health = wait_healthy(srv.url)
        assert health["status"] == "ok" and health["audit"]["pending"] == 0
        assert write_status(srv.url, h).status_code == 200
    finally:
        srv.stop()
    # login, 4 reads, 5 x 4 reads while full, 2 x (QIDO + status write): the 507 too
    assert audit_count(store, "user = 'local'") == 1 + 4 + 20 + 2 + 2
    assert audit_count(store, "http_status = 507") == 1


def test_requests_never_wait_for_the_audit_and_shutdown_writes_every_row(small_store,
                                                                          tmp_path):
    """Today each request commits its own audit row: a busy database (here another
    process holding the write lock) holds every request up to the 30 s busy timeout."""
    store = copy_store(small_store, tmp_path / "store")
    srv = EmbeddedServer(str(store)).start()
    other = sqlite3.connect(store / "catalogue.sqlite", isolation_level=None)
    try:
        h = local(srv.url)
        other.execute("BEGIN IMMEDIATE")                   # the write lock, held
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(
                lambda _: requests.get(f"{srv.url}/dicomweb/studies", headers=h,
                                       timeout=10).status_code, range(40)))
        assert codes == [200] * 40
        assert srv.app.state.server.auth.health()["pending"] >= 40
        other.execute("COMMIT")
        with ThreadPoolExecutor(8) as pool:                # more, then stop at once
            codes = list(pool.map(
                lambda _: requests.get(f"{srv.url}/dicomweb/series", headers=h,
                                       timeout=30).status_code, range(300)))
        assert codes == [200] * 300
    finally:
        if other.in_transaction:
            other.execute("ROLLBACK")
        other.close()
        srv.stop()
    assert audit_count(store, "action = 'browse'") == 340


def test_audit_writer_crash_bound_buffer_and_gap(tmp_path):
    """The writer's contract: at most ``batch`` rows on their way while the database
    works; up to ``buffer`` held while writes fail; beyond that counted, never silent."""
    db = Db(tmp_path / "a.sqlite", _DDL)
    w = AuditWriter(db, batch=4, buffer=10, retry_s=(0.01, 0.05))

    def row(i: int) -> tuple:
        return (1000.0 + i, f"u{i}", None, "127.0.0.1", "browse", None, "ok", 200, None)

    db._lock.acquire()                     # the writer's transaction waits for this lock
    try:
        for i in range(4):
            w.put(row(i))
        fifth = threading.Thread(target=w.put, args=(row(4),))
        fifth.start()
        fifth.join(0.5)
        assert fifth.is_alive()            # the crash bound: a fifth row waits for room
        assert w.stats()["pending"] == 4
    finally:
        db._lock.release()
    fifth.join(30)
    assert w.flush() and w.stats()["written"] == 5
    faults.set_disk_full(True)
    for i in range(5, 25):                 # the disk is full: held, then counted
        w.put(row(i))
    deadline = time.monotonic() + 30
    while w.stats()["failing"] is None and time.monotonic() < deadline:
        time.sleep(0.01)
    st = w.stats()
    assert st["failing"] and "StorageFull" in st["failing"]
    assert st["pending"] == 10 and st["dropped"] == 10
    assert not w.flush(timeout=0.2)
    faults.set_disk_full(None)
    assert w.flush()
    w.close()
    rows = db.all("SELECT user, action, detail FROM audit ORDER BY id")
    assert [r[0] for r in rows if r[1] == "browse"] == [f"u{i}" for i in range(15)]
    (gap,) = [r for r in rows if r[1] == "audit-gap"]
    assert '"dropped":10' in gap[2].replace(" ", "")
    db.close()


def test_store_writes_refused_clearly_when_read_only(small_store, tmp_path):
    from server.store import Store

    store = copy_store(small_store, tmp_path / "store")
    faults.set_disk_full(True)
    st = Store(store)
    try:
        assert st.open_for_serving() is not None
        assert st.catalogue.counts()["instances"] == 3       # reads work
        with pytest.raises(StorageFull, match="read-only"):
            st.atomic_write(f"j2k/{uuid.uuid4().hex}.bin", b"x")
        with pytest.raises(StorageFull):
            with st.catalogue.db.transaction():
                st.catalogue.db.execute("DELETE FROM instance")
        assert st.catalogue.counts()["instances"] == 3
    finally:
        st.close()
    faults.set_disk_full(None)
    with Store(store) as st2:                                  # space again: read-write
        assert st2.open_for_serving() is None
