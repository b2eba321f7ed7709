"""The versions of every series, computed from its packet indexes and recorded.

:class:`VersionTable` answers "what are V1, V2, V3 of this series" (see
:meth:`server.policy.SitePolicy.series_versions`) for the server and the command-line
tools. It memoises the answer per series (keyed by the policy's fingerprint and the
series' images, so an edited policy or a new image is taken into account) and records
it in the table ``series_version`` of the catalogue database: the layer count of each
version, the ratio the site asked for and the ratio actually reached on this series.
``medview-server versions`` prints that table.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from codestream.index import PacketIndex

from .dbutil import Db, StorageFull
from .policy import SeriesVersions, SitePolicy, image_facts

_DDL = [
    "CREATE TABLE IF NOT EXISTS series_version ("
    " series_uid TEXT NOT NULL, version TEXT NOT NULL, layers INTEGER,"
    " target_ratio REAL NOT NULL, actual_ratio REAL NOT NULL, bytes INTEGER NOT NULL,"
    " raw_bytes INTEGER NOT NULL, quality INTEGER, purpose TEXT, policy TEXT NOT NULL,"
    " computed_at REAL NOT NULL, PRIMARY KEY (series_uid, version))",
]
_COLS = ("series_uid", "version", "layers", "target_ratio", "actual_ratio", "bytes",
         "raw_bytes", "quality", "purpose", "policy", "computed_at")


class VersionTable:
    """Versions per series, memoised and recorded."""

    def __init__(self, store, policy: Callable[[], SitePolicy],
                 index_of: Callable[[dict], PacketIndex] | None = None, facts=None) -> None:
        self.store = store
        self.facts = facts          # a SeriesFacts: the memo is checked by generation
        self.policy = policy
        self.db = Db(store.database, component="versions", migrations={1: _DDL})
        self._index_of = index_of or self._read_index
        self._memo: dict[str, tuple[tuple, SeriesVersions]] = {}
        self._lock = threading.Lock()

    def _read_index(self, row: dict) -> PacketIndex:
        return PacketIndex.from_json(self.store.read_verified(row["index_relpath"], row["index_sha256"]))

    def get(self, series_uid: str, rows: list[dict] | None = None) -> SeriesVersions | None:
        """The versions of a series (None if it has no images)."""
        pol = self.policy()
        gen = self.facts.generation(series_uid) if self.facts is not None and rows is None \
            else None
        if gen is not None:         # one row read, whatever the series' length
            key: tuple = (pol.fingerprint, "generation", gen)
            with self._lock:
                hit = self._memo.get(series_uid)
                if hit is not None and hit[0] == key:
                    return hit[1]
            rows = self.facts.images(series_uid)
            if not rows:
                return None
        else:
            rows = rows if rows is not None else self.store.catalogue.series_images(series_uid)
            if not rows:
                return None
            key = (pol.fingerprint, tuple(r["index_sha256"] for r in rows))
            with self._lock:
                hit = self._memo.get(series_uid)
                if hit is not None and hit[0] == key:
                    return hit[1]
        info = (self.facts.series_row(series_uid) if self.facts is not None
                else self.store.catalogue.get_series(series_uid)) or {}
        facts = [image_facts(self._index_of(r), r.get("BitsAllocated")) for r in rows]
        sv = pol.series_versions(series_uid, info, facts)
        try:
            self._record(sv, pol.fingerprint)
        except StorageFull:              # a derived record: a full disk never stops a read
            pass
        with self._lock:
            self._memo[series_uid] = (key, sv)
        return sv

    def _record(self, sv: SeriesVersions, fingerprint: str) -> None:
        now = time.time()
        with self.db.transaction():
            self.db.execute("DELETE FROM series_version WHERE series_uid = ?", (sv.series_uid,))
            for v in sv.versions:
                self.db.execute(
                    f"INSERT INTO series_version ({', '.join(_COLS)}) VALUES "
                    f"({', '.join('?' * len(_COLS))})",
                    (sv.series_uid, v.name, v.layers, v.target_ratio, v.actual_ratio, v.bytes,
                     sv.raw_bytes, v.quality, v.purpose, fingerprint, now))

    def recorded(self, series_uid: str | None = None) -> list[dict]:
        sql = f"SELECT {', '.join(_COLS)} FROM series_version"
        params: list = []
        if series_uid:
            sql += " WHERE series_uid = ?"
            params.append(series_uid)
        return [dict(zip(_COLS, r)) for r in self.db.all(sql + " ORDER BY series_uid, version", params)]

    def close(self) -> None:
        self.db.close()
