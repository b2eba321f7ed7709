"""Persistent packet cache on disk.

Holds the JPIP data-bins each image has received (main header, tile header, and the
received prefix of every precinct data-bin), exactly as they came. It is a SQLite
database (WAL) so that a crash never leaves half-written entries.

Every entry carries a CRC-32 over its key (server namespace, image, data-bin class, bin
id) and its data, checked on read against the key asked for: damaged data, and valid
data that ended up under another key (another image, another bin), is dropped and then
fetched again from the server, never served.

The cache is an optimisation and never stops a transfer: any SQLite error (a damaged
file, "database disk image is malformed", an unreadable page, a failed write) is handled
like a damaged database: the file is moved aside (``NAME.damaged-TIME``), a fresh one is
opened and the operation answers as an empty cache would. Not damage, and the file is
kept: a database locked by another process, and a use after :meth:`close` (a transfer
ending late); that read or write is skipped. If no fresh file can be
opened (read-only or full disk), the cache carries on in memory for this run.

A cache file written before the checksum covered the key (``user_version`` < 2) is
emptied on opening: its entries cannot be checked (they are fetched again once).

Size is bounded: least recently used images are evicted first.

A transfer writes through :meth:`PacketCache.put_later`: the writes run in order on the
cache's own writer thread (a bounded queue: the receiving thread waits only when
``WRITE_QUEUE`` writes are pending, nothing is dropped), so reading the network never
waits for SQLite; a transfer drains the queue before it returns, and every read of the
cache (and :meth:`close`) first waits for the queued writes.

Namespaces separate servers: the same SOP Instance UID on two servers may have been
encoded differently.
"""
from __future__ import annotations

import logging
import collections
import os
import sqlite3
import threading
import time
import zlib
from pathlib import Path
from typing import Callable, TypeVar

from codestream.databins import BinSet
from codestream.jpp import MAIN_HEADER, PRECINCT, TILE_HEADER

log = logging.getLogger("medview.cache")

T = TypeVar("T")

# version 2: the checksum covers the key as well as the data (version 1: data only)
_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bins (
    ns TEXT NOT NULL, image TEXT NOT NULL, cls INTEGER NOT NULL, bin INTEGER NOT NULL,
    data BLOB NOT NULL, crc INTEGER NOT NULL, size INTEGER NOT NULL, used REAL NOT NULL,
    PRIMARY KEY (ns, image, cls, bin))
"""

_BUSY = {5, 6}      # SQLITE_BUSY, SQLITE_LOCKED: another process holds the file


def entry_checksum(ns: str, image: str, cls: int, bin_id: int, data: bytes) -> int:
    """CRC-32 of the key and the data: data moved to another key does not match."""
    key = f"{ns}\x00{image}\x00{cls}\x00{bin_id}\x00".encode("utf-8", "surrogateescape")
    return zlib.crc32(data, zlib.crc32(key))


def _text(b: bytes) -> str:
    # a damaged TEXT value must not raise while reading: it decodes to something that
    # matches no key and no checksum
    return b.decode("utf-8", "surrogateescape")


class PacketCache:
    #: writes queued by :meth:`put_later` at most; beyond, the caller waits
    WRITE_QUEUE = 64
    #: the writer thread ends after this long without work (a new write starts another)
    WRITER_IDLE_S = 5.0

    def __init__(self, path: str | Path, max_bytes: int = 2 << 30) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self.dropped = 0          # damaged entries dropped since start
        self.recovered = 0        # times the database was found damaged and replaced
        self.in_memory = False    # no usable file: caching for this run only
        self._closed = False
        self._queue: collections.deque = collections.deque()   # (ns, image, bins), in order
        self._queue_cv = threading.Condition()
        self._writer: threading.Thread | None = None
        self._con = self._open()

    # ------------------------------------------------------------------ setup
    def _open(self) -> sqlite3.Connection:
        try:
            con = self._connect(self.path)
            con.execute("SELECT count(*) FROM bins").fetchone()
            return con
        except sqlite3.Error as e:
            if _busy(e):
                log.warning("packet cache %s is locked by another process (%s); "
                            "caching in memory for this run", self.path, e)
                return self._memory()
            return self._replace(e)

    def _connect(self, path: Path | str) -> sqlite3.Connection:
        con = sqlite3.connect(path, timeout=30, check_same_thread=False,
                              isolation_level=None)
        try:
            con.text_factory = _text
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute(_SCHEMA)
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version != _VERSION:
                # entries of another format cannot be checked: start this file afresh
                con.execute("DELETE FROM bins")
                con.execute(f"PRAGMA user_version = {_VERSION}")
        except BaseException:
            con.close()
            raise
        return con

    def _memory(self) -> sqlite3.Connection:
        self.in_memory = True
        return self._connect(":memory:")

    def _replace(self, err: Exception) -> sqlite3.Connection:
        """Move the damaged file aside and open a fresh one (in memory if that fails)."""
        self.recovered += 1
        aside = self.path.with_name(f"{self.path.name}.damaged-{time.time_ns()}")
        log.warning("packet cache %s is damaged (%s); moved to %s, starting empty",
                    self.path, err, aside)
        try:
            for suffix in ("", "-wal", "-shm"):
                p = Path(str(self.path) + suffix)
                if p.exists():
                    os.replace(p, str(aside) + suffix)
            con = self._connect(self.path)
            con.execute("SELECT count(*) FROM bins").fetchone()
            return con
        except (OSError, sqlite3.Error) as e:
            log.warning("packet cache: cannot start a fresh file at %s (%s); "
                        "caching in memory for this run", self.path, e)
            return self._memory()

    def _guard(self, what: str, fn: Callable[[sqlite3.Connection], T], default: T,
               retry: bool = False) -> T:
        """Run ``fn`` on the connection; any SQLite error replaces the database and
        answers ``default`` (what an empty cache would answer), or with ``retry`` runs
        ``fn`` once more on the fresh database (a write is then not lost)."""
        with self._lock:
            if self._closed:          # a late write after close (a transfer ending)
                return default
            try:
                return fn(self._con)
            except (sqlite3.ProgrammingError, sqlite3.InterfaceError) as e:
                # misuse of the connection, not damage of the file: keep the file
                log.warning("packet cache %s: %s skipped (%s)", self.path, what, e)
                return default
            except sqlite3.Error as e:
                try:
                    if self._con.in_transaction:
                        self._con.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if _busy(e):
                    log.warning("packet cache %s: %s skipped (%s)", self.path, what, e)
                    return default
                try:
                    self._con.close()
                except sqlite3.Error:
                    pass
                if self.in_memory:
                    self._con = self._memory()
                else:
                    self._con = self._replace(e)
                if retry:
                    return self._guard(what, fn, default)
                return default

    def close(self) -> None:
        self.drain()
        with self._lock:
            self._closed = True
            try:
                self._con.close()
            except sqlite3.Error as e:
                log.warning("packet cache %s: close failed (%s)", self.path, e)

    # ------------------------------------------------------------------ read
    def load(self, ns: str, image: str) -> BinSet:
        """The bins held for one image; damaged entries are dropped, never raised."""
        self.drain()
        rows = self._guard("read", lambda con: self._load_rows(con, ns, image), [])
        bs = BinSet()
        for c, b, d in rows:
            if c == MAIN_HEADER:
                bs.main_header = d
            elif c == TILE_HEADER:
                bs.tile_header = d
            elif c == PRECINCT:
                bs.precincts[b] = d
        if (bs.main_header is None) != (bs.tile_header is None) or (
                bs.main_header is None and bs.precincts):
            # packets without their headers cannot be used: start this image afresh
            if rows:
                self.forget(ns, image)
            return BinSet()
        try:
            bs.index  # parse headers now: unusable headers mean start afresh
        except ValueError as e:
            log.warning("packet cache: headers of %s unusable (%s); dropped", image, e)
            self.forget(ns, image)
            return BinSet()
        return bs

    def _load_rows(self, con: sqlite3.Connection, ns: str, image: str
                   ) -> list[tuple[int, int, bytes]]:
        rows = con.execute(
            "SELECT rowid, cls, bin, data, crc FROM bins WHERE ns = ? AND image = ?",
            (ns, image)).fetchall()
        good, bad, seen = [], [], set()
        for rowid, c, b, d, crc in rows:
            ok = (type(c) is int and type(b) is int and type(crc) is int
                  and isinstance(d, bytes) and (c, b) not in seen
                  and entry_checksum(ns, image, c, b, d) == crc)
            if ok:
                seen.add((c, b))
                good.append((c, b, bytes(d)))
            else:
                bad.append(rowid)
        if bad:
            self.dropped += len(bad)
            log.warning("packet cache: %d damaged entr%s for %s dropped", len(bad),
                        "y" if len(bad) == 1 else "ies", image)
            con.executemany("DELETE FROM bins WHERE rowid = ?", [(r,) for r in bad])
        if good:
            con.execute("UPDATE bins SET used = ? WHERE ns = ? AND image = ?",
                        (time.time(), ns, image))
        return good

    def images(self, ns: str) -> list[str]:
        self.drain()
        return self._guard("list", lambda con: [r[0] for r in con.execute(
            "SELECT DISTINCT image FROM bins WHERE ns = ?", (ns,))], [])

    # ------------------------------------------------------------------ write
    def put(self, ns: str, image: str, bins: dict[tuple[int, int], bytes]) -> None:
        """Store whole data-bin contents (class, bin id) -> bytes, in one transaction."""
        if not bins:
            return
        now = time.time()
        rows = [(ns, image, c, b, d, entry_checksum(ns, image, c, b, d), len(d), now)
                for (c, b), d in bins.items()]

        def write(con: sqlite3.Connection) -> None:
            con.execute("BEGIN IMMEDIATE")
            con.executemany(
                "INSERT INTO bins(ns, image, cls, bin, data, crc, size, used) "
                "VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(ns, image, cls, bin) DO UPDATE SET "
                "data = excluded.data, crc = excluded.crc, size = excluded.size, "
                "used = excluded.used", rows)
            con.execute("COMMIT")

        self._guard("write", write, None, retry=True)

    def put_later(self, ns: str, image: str, bins: dict[tuple[int, int], bytes]) -> None:
        """:meth:`put` on the writer thread, after the writes queued before it. Waits
        only while ``WRITE_QUEUE`` writes are pending. A failing write is logged and
        skipped (the data stays with the caller; the cache is an optimisation)."""
        if not bins:
            return
        item = (ns, image, dict(bins))
        with self._queue_cv:
            while len(self._queue) >= self.WRITE_QUEUE:
                self._queue_cv.wait()
            self._queue.append(item)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_queued, daemon=True,
                                                name="packet-cache-writer")
                self._writer.start()
            self._queue_cv.notify_all()

    def _write_queued(self) -> None:
        cv = self._queue_cv
        while True:
            with cv:
                if not self._queue and not cv.wait_for(lambda: self._queue,
                                                       self.WRITER_IDLE_S):
                    self._writer = None
                    return
                ns, image, bins = self._queue[0]      # stays queued until written
            try:
                self.put(ns, image, bins)
            except Exception:  # noqa: BLE001 - never lose the writer (and later writes)
                log.exception("packet cache %s: a queued write failed", self.path)
            with cv:
                self._queue.popleft()
                cv.notify_all()

    def drain(self) -> None:
        """Wait until every write queued by :meth:`put_later` is done."""
        if threading.current_thread() is self._writer:
            return
        with self._queue_cv:
            self._queue_cv.wait_for(lambda: not self._queue)

    def forget(self, ns: str, image: str) -> None:
        self.drain()
        self._forget(ns, image)

    def _forget(self, ns: str, image: str) -> None:
        self._guard("forget", lambda con: con.execute(
            "DELETE FROM bins WHERE ns = ? AND image = ?", (ns, image)) and None, None)

    def clear(self) -> None:
        self.drain()

        def run(con: sqlite3.Connection) -> None:
            con.execute("DELETE FROM bins")
            con.execute("VACUUM")
        self._guard("clear", run, None)

    # ------------------------------------------------------------------ size
    def usage(self) -> tuple[int, int]:
        """(bytes held, images held)."""
        self.drain()
        return self._usage()

    def _usage(self) -> tuple[int, int]:
        def run(con: sqlite3.Connection) -> tuple[int, int]:
            n, s = con.execute("SELECT count(DISTINCT ns || '|' || image), "
                               "coalesce(sum(size), 0) FROM bins").fetchone()
            return int(s), int(n)
        return self._guard("usage", run, (0, 0))

    def evict(self, keep: set[tuple[str, str]] = frozenset()) -> int:
        """Drop least recently used images until under max_bytes; returns bytes freed.
        Images in ``keep`` (on screen, being fetched) are never evicted."""
        self.drain()              # (never under the lock: the writer needs it)
        with self._lock:
            total, _ = self._usage()
            if total <= self.max_bytes:
                return 0
            rows = self._guard("evict", lambda con: con.execute(
                "SELECT ns, image, sum(size), max(used) FROM bins GROUP BY ns, image "
                "ORDER BY max(used)").fetchall(), [])
            freed = 0
            for ns, image, size, _ in rows:
                if total - freed <= self.max_bytes:
                    break
                if (ns, image) in keep:
                    continue
                self._forget(ns, image)
                freed += size if type(size) is int else 0
        return freed


def _busy(e: Exception) -> bool:
    return ((getattr(e, "sqlite_errorcode", None) or 0) & 0xFF) in _BUSY or (
        isinstance(e, sqlite3.OperationalError) and "locked" in str(e))
