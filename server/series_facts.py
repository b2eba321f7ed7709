"""Series facts resolved once and kept, so that a request about one image of a series
costs the same whatever the series' length.

What a request needs about a series (its images in series order, the packet sources,
the series row, its versions) is built once per *generation* of the series: a counter in
the catalogue database (``series_generation``, :mod:`server.catalogue`) that
triggers raise inside every transaction that changes what the series serves (an ingest,
a deletion, a quarantine entry, a migration or a recall), whichever process commits it.
Each use reads that one primary-key row and compares; a kept value of an older
generation is built again. The generation is read *before* the value is built, so a
change committed meanwhile makes the next use build again (never a new generation kept
with old facts).

Kept values are shared between requests: callers must not modify them. A database
without the counter (a read-only store of an older release) keeps nothing.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class SeriesFacts:
    """Values per (series, name), kept while the series' generation does not change."""

    def __init__(self, catalogue, max_entries: int = 256, max_items: int = 200_000) -> None:
        self.catalogue = catalogue
        self.max_entries = max_entries
        self.max_items = max_items      # images (list/dict entries) kept over all series
        self._items = 0
        self._memo: OrderedDict[tuple[str, str], tuple[int, Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.builds = 0                 # how many values were built (for tests, bench)

    def generation(self, series_uid: str) -> int | None:
        return self.catalogue.series_generation(series_uid)

    def kept(self, series_uid: str, name: str, build: Callable[[], T]) -> T:
        """``build()``'s value for this series, built at most once per generation."""
        gen = self.generation(series_uid)
        if gen is None:
            return build()
        key = (series_uid, name)
        with self._lock:
            hit = self._memo.get(key)
            if hit is not None and hit[0] == gen:
                self._memo.move_to_end(key)
                return hit[1]
        value = build()
        size = len(value) if isinstance(value, (list, dict, tuple)) else 1
        with self._lock:
            self.builds += 1
            old = self._memo.get(key)
            if old is None or old[0] <= gen:
                if old is not None:
                    self._items -= old[2]
                self._memo[key] = (gen, value, size)
                self._items += size
                self._memo.move_to_end(key)
            while len(self._memo) > 1 and (len(self._memo) > self.max_entries
                                           or self._items > self.max_items):
                _, (_, _, n) = self._memo.popitem(last=False)
                self._items -= n
        return value

    # ------------------------------------------------------------------ the usual facts
    def images(self, series_uid: str) -> list[dict]:
        """:meth:`Catalogue.series_images` (read-only: shared)."""
        return self.kept(series_uid, "images",
                         lambda: self.catalogue.series_images(series_uid))

    def series_row(self, series_uid: str) -> dict | None:
        """:meth:`Catalogue.get_series` (read-only: shared)."""
        return self.kept(series_uid, "series", lambda: self.catalogue.get_series(series_uid))

    def images_of(self, series_uid: str, sop: str, frame: int | None = None) -> list[dict]:
        """The image rows of one instance (one frame when ``frame`` is given): a lookup
        in the kept rows, not a pass over the series."""
        def build() -> dict[str, list[dict]]:
            by: dict[str, list[dict]] = {}
            for r in self.images(series_uid):
                by.setdefault(r["SOPInstanceUID"], []).append(r)
            return by
        rows = self.kept(series_uid, "by_sop", build).get(sop, [])
        return rows if frame is None else [r for r in rows if r["frame"] == frame]
