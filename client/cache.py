"""Persistent packet cache on disk.

Holds the JPIP data-bins each image has received (main header, tile header, and the
received prefix of every precinct data-bin), compressed, exactly as they came. It is a
SQLite database (WAL) so that a crash never leaves half-written entries; every entry
carries a CRC-32 that is checked on read. A damaged entry is dropped (and then fetched
again from the server); a damaged database file is moved aside and a new one started.
Size is bounded: least recently used images are evicted first.

Namespaces separate servers: the same SOP Instance UID on two servers may have been
encoded differently.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import zlib
from pathlib import Path

from codestream.databins import BinSet
from codestream.jpp import MAIN_HEADER, PRECINCT, TILE_HEADER

log = logging.getLogger("medview.cache")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bins (
    ns TEXT NOT NULL, image TEXT NOT NULL, cls INTEGER NOT NULL, bin INTEGER NOT NULL,
    data BLOB NOT NULL, crc INTEGER NOT NULL, size INTEGER NOT NULL, used REAL NOT NULL,
    PRIMARY KEY (ns, image, cls, bin))
"""


class PacketCache:
    def __init__(self, path: str | Path, max_bytes: int = 2 << 30) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self.dropped = 0          # damaged entries dropped since start
        self._con = self._open()

    # ------------------------------------------------------------------ setup
    def _open(self) -> sqlite3.Connection:
        try:
            con = self._connect()
            con.execute("SELECT count(*) FROM bins").fetchone()
            return con
        except sqlite3.DatabaseError as e:
            aside = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
            log.warning("packet cache %s is damaged (%s); moved to %s, starting empty",
                        self.path, e, aside)
            for suffix in ("", "-wal", "-shm"):
                p = Path(str(self.path) + suffix)
                if p.exists():
                    os.replace(p, str(aside) + suffix)
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30, check_same_thread=False,
                              isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute(_SCHEMA)
        return con

    def close(self) -> None:
        with self._lock:
            self._con.close()

    # ------------------------------------------------------------------ read
    def load(self, ns: str, image: str) -> BinSet:
        """The bins held for one image; damaged entries are dropped, never raised."""
        bs = BinSet()
        with self._lock:
            try:
                rows = self._con.execute(
                    "SELECT cls, bin, data, crc FROM bins WHERE ns = ? AND image = ?",
                    (ns, image)).fetchall()
            except sqlite3.DatabaseError as e:
                log.warning("packet cache read failed (%s); treating as empty", e)
                return bs
            bad = [(c, b) for c, b, d, crc in rows if zlib.crc32(d) != crc]
            if bad:
                self.dropped += len(bad)
                log.warning("packet cache: %d damaged entr%s for %s dropped", len(bad),
                            "y" if len(bad) == 1 else "ies", image)
                self._con.executemany(
                    "DELETE FROM bins WHERE ns = ? AND image = ? AND cls = ? AND bin = ?",
                    [(ns, image, c, b) for c, b in bad])
            for c, b, d, crc in rows:
                if (c, b) in bad:
                    continue
                if c == MAIN_HEADER:
                    bs.main_header = bytes(d)
                elif c == TILE_HEADER:
                    bs.tile_header = bytes(d)
                elif c == PRECINCT:
                    bs.precincts[b] = bytes(d)
            if rows:
                self._con.execute("UPDATE bins SET used = ? WHERE ns = ? AND image = ?",
                                  (time.time(), ns, image))
        if (bs.main_header is None) != (bs.tile_header is None) or (
                bs.main_header is None and bs.precincts):
            # packets without their headers cannot be used: start this image afresh
            self.forget(ns, image)
            return BinSet()
        try:
            bs.index  # parse headers now: damaged headers mean start afresh
        except ValueError as e:
            log.warning("packet cache: headers of %s unusable (%s); dropped", image, e)
            self.forget(ns, image)
            return BinSet()
        return bs

    def images(self, ns: str) -> list[str]:
        with self._lock:
            return [r[0] for r in self._con.execute(
                "SELECT DISTINCT image FROM bins WHERE ns = ?", (ns,))]

    # ------------------------------------------------------------------ write
    def put(self, ns: str, image: str, bins: dict[tuple[int, int], bytes]) -> None:
        """Store whole data-bin contents (class, bin id) -> bytes, in one transaction."""
        if not bins:
            return
        now = time.time()
        rows = [(ns, image, c, b, d, zlib.crc32(d), len(d), now) for (c, b), d in bins.items()]
        with self._lock:
            try:
                self._con.execute("BEGIN IMMEDIATE")
                self._con.executemany(
                    "INSERT INTO bins(ns, image, cls, bin, data, crc, size, used) "
                    "VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(ns, image, cls, bin) DO UPDATE SET "
                    "data = excluded.data, crc = excluded.crc, size = excluded.size, "
                    "used = excluded.used", rows)
                self._con.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                try:
                    self._con.execute("ROLLBACK")
                except sqlite3.DatabaseError:
                    pass
                log.warning("packet cache write failed (%s); continuing without caching", e)

    def forget(self, ns: str, image: str) -> None:
        with self._lock:
            self._con.execute("DELETE FROM bins WHERE ns = ? AND image = ?", (ns, image))

    def clear(self) -> None:
        with self._lock:
            self._con.execute("DELETE FROM bins")
            self._con.execute("VACUUM")

    # ------------------------------------------------------------------ size
    def usage(self) -> tuple[int, int]:
        """(bytes held, images held)."""
        with self._lock:
            n, s = self._con.execute(
                "SELECT count(DISTINCT ns || '|' || image), coalesce(sum(size), 0) FROM bins").fetchone()
        return int(s), int(n)

    def evict(self, keep: set[tuple[str, str]] = frozenset()) -> int:
        """Drop least recently used images until under max_bytes; returns bytes freed.
        Images in ``keep`` (on screen, being fetched) are never evicted."""
        freed = 0
        with self._lock:
            total, _ = self.usage()
            if total <= self.max_bytes:
                return 0
            rows = self._con.execute(
                "SELECT ns, image, sum(size), max(used) FROM bins GROUP BY ns, image "
                "ORDER BY max(used)").fetchall()
            for ns, image, size, _ in rows:
                if total - freed <= self.max_bytes:
                    break
                if (ns, image) in keep:
                    continue
                self.forget(ns, image)
                freed += size
        return freed
