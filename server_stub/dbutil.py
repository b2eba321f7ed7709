"""A small SQLite helper for the server modules that keep their own tables in the
catalogue database (users and rights, audit, diagnosis records, storage tiers, version
records).

Same conventions as :mod:`server_stub.catalogue`: WAL, ``foreign_keys=ON``,
``synchronous=FULL``, a busy timeout so that a command-line tool and the server can
write the same file, one connection per thread, and one process-wide lock plus
``BEGIN IMMEDIATE`` per write transaction. Each module creates its tables with
``CREATE TABLE IF NOT EXISTS`` (they are additions to the catalogue schema, not changes
to it).
"""
from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator


class Db:
    """Thread-safe access to one SQLite file (one connection per thread)."""

    def __init__(self, path: str | Path, ddl: Iterable[str] = ()) -> None:
        self.path = str(path)
        self._local = threading.local()
        self._lock = threading.RLock()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        if ddl:
            with self.transaction():
                for stmt in ddl:
                    self.execute(stmt)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA busy_timeout = 30000")
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def execute(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Cursor:
        return self._conn().execute(sql, tuple(params))

    def all(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        return self.execute(sql, params).fetchall()

    def one(self, sql: str, params: Iterable[Any] = ()) -> tuple | None:
        return self.execute(sql, params).fetchone()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction (nested use joins the outer one)."""
        with self._lock:
            conn = self._conn()
            if conn.in_transaction:
                yield
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")

    def table_exists(self, name: str) -> bool:
        return self.one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                        [name]) is not None

    def close(self) -> None:
        with self._conns_lock:
            for c in self._conns:
                try:
                    c.close()
                except sqlite3.Error:
                    pass
            self._conns.clear()
        self._local = threading.local()
