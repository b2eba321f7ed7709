"""SQLite write transactions of several processes (``serve --workers N``, a command-line
tool beside the server) queue on the file's writer lock (a ``flock`` the kernel hands to
the next waiter as soon as it is free) instead of SQLite's busy handler, which polls with
sleeps of up to 100 ms."""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from server.dbutil import Db
from waits import WAIT_S, wait_for

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import sys
sys.path.insert(0, sys.argv[2])
from server.dbutil import Db
db = Db(sys.argv[1])
db._conn().execute("PRAGMA busy_timeout = 0")   # SQLite's busy handler: refuse at once
print("writing", flush=True)
with db.transaction():
    db.execute("INSERT INTO t (who) VALUES ('child')")
print("written", flush=True)
"""


def _blocked_on_flock(pid: int) -> bool:
    """Whether process ``pid`` waits for a flock (``/proc/locks``: a waiter's line has
    ``->`` before its type)."""
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if len(f) > 4 and f[1] == "->" and f[2] == "FLOCK" and f[5] == str(pid):
            return True
    return False


def test_a_writer_of_another_process_waits_for_the_lock_not_the_busy_handler(tmp_path):
    path = tmp_path / "cat.sqlite"
    db = Db(path, ["CREATE TABLE IF NOT EXISTS t (who TEXT)"])
    holding, release, done = threading.Event(), threading.Event(), threading.Event()

    def writer() -> None:
        with db.transaction():
            db.execute("INSERT INTO t (who) VALUES ('parent')")
            holding.set()
            release.wait(WAIT_S)
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    child = None
    try:
        assert holding.wait(WAIT_S)
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(ROOT)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "writing"
        # the child queues on the lock while the parent's transaction is open (without
        # the lock its BEGIN IMMEDIATE fails at once: "database is locked")
        wait_for(lambda: child.poll() is not None or _blocked_on_flock(child.pid),
                 what="the child waiting for the writer lock")
        assert child.poll() is None, child.stderr.read()
        release.set()
        out, err = child.communicate(timeout=WAIT_S)
        assert child.returncode == 0, err
        assert out.strip() == "written"
    finally:
        release.set()
        t.join(WAIT_S)
        if child is not None and child.poll() is None:
            child.kill()
    assert done.is_set()
    assert sorted(r[0] for r in db.execute("SELECT who FROM t")) == ["child", "parent"]
    db.close()


def _waits_in_writer_lock(t: threading.Thread) -> bool:
    frame = sys._current_frames().get(t.ident)
    while frame is not None:
        if frame.f_code.co_name == "__enter__" and frame.f_code.co_filename.endswith(
                "dbutil.py"):
            return True
        frame = frame.f_back
    return False


def test_writers_of_two_db_objects_in_one_process_queue(tmp_path):
    """Two :class:`Db` of one file in one process (modules keep their own) share the
    writer lock: the second waits for the first's commit instead of failing."""
    path = tmp_path / "cat.sqlite"
    a = Db(path, ["CREATE TABLE IF NOT EXISTS t (who TEXT)"])
    b = Db(path)
    holding, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def first() -> None:
        with a.transaction():
            a.execute("INSERT INTO t (who) VALUES ('a')")
            holding.set()
            release.wait(WAIT_S)

    def second() -> None:
        b._conn().execute("PRAGMA busy_timeout = 0")
        try:
            with b.transaction():
                b.execute("INSERT INTO t (who) VALUES ('b')")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t1 = threading.Thread(target=first)
    t1.start()
    assert holding.wait(WAIT_S)
    t2 = threading.Thread(target=second)
    t2.start()
    # b waits for the lock (without it, its BEGIN IMMEDIATE fails at once)
    wait_for(lambda: errors or _waits_in_writer_lock(t2), what="b waiting for the lock")
    assert not errors, errors
    assert [r[0] for r in b.execute("SELECT who FROM t")] == []
    release.set()
    t1.join(WAIT_S)
    t2.join(WAIT_S)
    assert not errors, errors
    assert sorted(r[0] for r in a.execute("SELECT who FROM t")) == ["a", "b"]
    a.close()
    b.close()
