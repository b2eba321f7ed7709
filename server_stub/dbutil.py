"""The one SQLite access layer of the server: the catalogue (:mod:`server_stub.catalogue`)
and the modules that keep their own tables in the catalogue database (users and rights,
audit, diagnosis records, storage tiers, version records, the slide catalogue).

WAL, ``foreign_keys=ON``, ``synchronous=FULL``, a busy timeout so that a command-line
tool and the server can write the same file, one connection per thread (connections of
threads that have ended are closed when the next thread connects), and one lock plus
``BEGIN IMMEDIATE`` per write transaction. Each module creates its tables with
``CREATE TABLE IF NOT EXISTS`` (they are additions to the catalogue schema, not changes
to it).

PostgreSQL in place of SQLite: the dialect-specific parts are here and marked — the
connection set-up (:meth:`Db._connect`), ``BEGIN IMMEDIATE``, the table-exists probe and
the ``?`` parameter style (:meth:`Db.execute` is the one place SQL reaches the driver).

A full disk: a write that fails for lack of space raises :class:`StorageFull` (HTTP 507).
A database file put in read-only mode (:func:`set_read_only`, when the server starts on
a full disk) is opened read-only, creates no tables, and every write transaction raises
:class:`StorageFull` at once; reads go on. Leaving read-only mode (space again) makes
each thread reopen its connection read-write at its next use.
"""
from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator


class DbClosedError(RuntimeError):
    """The database was closed (e.g. the server is shutting down)."""


class StorageFull(Exception):
    """A write failed, or was refused, because the store's disk is full (HTTP 507)."""

    status = 507


_DISK_WORDS = ("database or disk is full", "disk i/o error", "attempt to write a readonly")
_read_only: dict[str, str] = {}            # resolved path -> why
_mode_changes: dict[str, int] = {}         # resolved path -> times its mode changed


def is_disk_full(exc: BaseException) -> bool:
    """Whether an SQLite or OS error means "no space left" (or an I/O error on write)."""
    import errno

    if isinstance(exc, StorageFull):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.OperationalError) and any(
        w in str(exc).lower() for w in _DISK_WORDS)


def set_read_only(path: str | Path, reason: str | None) -> None:
    """Open ``path`` read-only from now on (``reason`` None: read-write again, for Dbs
    opened later)."""
    key = str(Path(path).resolve())
    if reason is None:
        if _read_only.pop(key, None) is None:
            return
    else:
        _read_only[key] = reason
    _mode_changes[key] = _mode_changes.get(key, 0) + 1


def read_only_reason(path: str | Path) -> str | None:
    return _read_only.get(str(Path(path).resolve()))


class Db:
    """Thread-safe access to one SQLite file (one connection per thread)."""

    def __init__(self, path: str | Path, ddl: Iterable[str] = (), *,
                 closed_error: type[Exception] = DbClosedError) -> None:
        self.path = str(path)
        self._local = threading.local()
        self._lock = threading.RLock()
        self._conns: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        self._closed_error = closed_error
        self._key = str(Path(self.path).resolve())
        if ddl and not self.read_only:
            with self.transaction():
                for stmt in ddl:
                    self.execute(stmt)

    @staticmethod
    def _connect_read_only(path: str) -> sqlite3.Connection:
        """Read-only, on a full disk: ``mode=ro`` needs the ``-shm`` file (which a full
        disk may not let SQLite create); ``immutable`` needs none but does not see the
        write-ahead log, so it is used only when the log is empty (every commit is in
        the main file: the state after a clean shutdown)."""
        uri = Path(path).resolve().as_uri()
        try:
            conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=30.0,
                                   isolation_level=None, check_same_thread=False)
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError:
            wal = Path(f"{path}-wal")
            if wal.exists() and wal.stat().st_size > 0:
                raise
        conn = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, isolation_level=None,
                               check_same_thread=False)
        return conn

    @staticmethod
    def _connect(path: str) -> sqlite3.Connection:
        """Open a connection for the calling thread (SQLite-specific set-up)."""
        if read_only_reason(path):
            return Db._connect_read_only(path)
        conn = sqlite3.connect(path, timeout=30.0, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA busy_timeout = 30000")
        return conn

    @property
    def read_only(self) -> str | None:
        """Why this database is read-only (a full disk), or None."""
        return _read_only.get(self._key)

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise self._closed_error(f"database {self.path} is closed")
        conn = getattr(self._local, "conn", None)
        mode = _mode_changes.get(self._key, 0)
        if conn is not None and getattr(self._local, "mode", 0) != mode \
                and not conn.in_transaction:
            with self._conns_lock:           # read-only mode began or ended: reopen
                self._conns = [(t, c) for t, c in self._conns if c is not conn]
            _close_quietly(conn)
            conn = None
        if conn is None:
            conn = self._connect(self.path)
            self._local.conn = conn
            self._local.mode = mode
            with self._conns_lock:
                # close the connections of threads that have ended (e.g. an ingest's pool)
                alive = []
                for thread, c in self._conns:
                    if thread.is_alive():
                        alive.append((thread, c))
                    else:
                        _close_quietly(c)
                alive.append((threading.current_thread(), conn))
                self._conns = alive
        return conn

    @property
    def closed(self) -> bool:
        return self._closed

    def execute(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        """The one place where SQL with ``?`` placeholders reaches the driver."""
        return self._conn().execute(sql, tuple(params))

    def all(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        return self.execute(sql, params).fetchall()

    def one(self, sql: str, params: Iterable[Any] = ()) -> tuple | None:
        return self.execute(sql, params).fetchone()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction (nested use joins the outer one)."""
        if self.read_only:
            # reads inside a "transaction" (e.g. a schema check) work; a write fails
            try:
                yield
            except sqlite3.OperationalError as e:
                if is_disk_full(e):
                    raise StorageFull(f"the store's disk is full; the server is read-only "
                                      f"({self.read_only})") from e
                raise
            return
        from . import faults

        with self._lock:
            conn = self._conn()
            if conn.in_transaction:
                yield
                return
            try:
                faults.check_disk("db")
                # IMMEDIATE takes the write lock now (SQLite); PostgreSQL: plain BEGIN
                conn.execute("BEGIN IMMEDIATE")
            except (sqlite3.OperationalError, OSError) as e:
                if is_disk_full(e):
                    raise StorageFull(f"the store's disk is full: {e}") from e
                raise
            try:
                yield
                conn.execute("COMMIT")
            except BaseException as e:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(e, (sqlite3.OperationalError, OSError)) and is_disk_full(e):
                    raise StorageFull(f"the store's disk is full: {e}") from e
                raise

    def table_exists(self, name: str) -> bool:
        """Dialect-specific (PostgreSQL: information_schema.tables)."""
        return self.one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                        [name]) is not None

    def close(self) -> None:
        """Close every connection opened by any thread; later use raises."""
        self._closed = True
        with self._conns_lock:
            for _thread, c in self._conns:
                _close_quietly(c)
            self._conns.clear()
        self._local = threading.local()


def _close_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error:
        pass
