"""One memory budget for what the client holds decoded: series images, volumes and slide
tiles (napari's and Cornerstone3D's cache pattern: one budget, least recently used first).

Holders (:class:`client.series_loader.DecodedStore`, :class:`imaging.viewport.TileCache`,
the volume loaders) charge what they keep to one :class:`MemoryBudget`. When the total is
over the budget the least recently used entry of *any* holder is evicted — never one a
holder pins (what is on screen, a slide's overview level, an open volume) — by calling
the holder's ``drop(key)``, which forgets the entry and cancels its load if one still
runs. The app makes one budget (Preferences); a holder made without one gets a private
budget (tests, headless commands).

Locking: the budget decides under its own lock and calls ``drop`` after releasing it, so
a holder must not hold its own lock while it calls :meth:`MemoryBudget.charge` or
:meth:`MemoryBudget.pin`.
"""
from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from typing import Hashable, Iterable, Protocol

DEFAULT_BUDGET = 1 << 30


class Holder(Protocol):
    def drop(self, key: Hashable) -> None:
        """Forget ``key`` (evicted by the budget) and cancel its load if it still runs."""


class MemoryBudget:
    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        self.budget = int(budget)
        self._lru: OrderedDict[tuple[int, Hashable], int] = OrderedDict()
        self._pinned: dict[int, set] = {}
        self._holders: dict[int, Holder] = {}
        self._ids = itertools.count(1)
        self._size = 0
        self._lock = threading.Lock()
        self.evicted = 0

    @classmethod
    def of(cls, budget: "int | MemoryBudget | None") -> "MemoryBudget":
        """``budget`` itself, or a private budget of that many bytes."""
        if isinstance(budget, MemoryBudget):
            return budget
        return cls(DEFAULT_BUDGET if budget is None else budget)

    # ------------------------------------------------------------------ holders
    def register(self, holder: Holder) -> int:
        with self._lock:
            hid = next(self._ids)
            self._holders[hid] = holder
            self._pinned[hid] = set()
            return hid

    def unregister(self, hid: int) -> None:
        """The holder is gone: forget everything it charged (nothing is dropped)."""
        with self._lock:
            for k in [k for k in self._lru if k[0] == hid]:
                self._size -= self._lru.pop(k)
            self._holders.pop(hid, None)
            self._pinned.pop(hid, None)

    # ------------------------------------------------------------------ entries
    def charge(self, hid: int, key: Hashable, nbytes: int) -> None:
        """``key`` of holder ``hid`` now takes ``nbytes`` (replacing what it took), and is
        the most recently used; evicts others while over the budget."""
        with self._lock:
            old = self._lru.pop((hid, key), 0)
            self._lru[(hid, key)] = int(nbytes)
            self._size += int(nbytes) - old
            victims = self._victims(protect=(hid, key))
        self._drop(victims)

    def touch(self, hid: int, key: Hashable) -> None:
        with self._lock:
            if (hid, key) in self._lru:
                self._lru.move_to_end((hid, key))

    def release(self, hid: int, key: Hashable) -> None:
        """The holder dropped ``key`` itself."""
        with self._lock:
            self._size -= self._lru.pop((hid, key), 0)

    def pin(self, hid: int, keys: Iterable[Hashable]) -> None:
        """Replace the holder's pinned keys (never evicted); evicts if the unpinned ones
        no longer fit."""
        with self._lock:
            self._pinned[hid] = set(keys)
            victims = self._victims()
        self._drop(victims)

    def _victims(self, protect=None) -> list[tuple[int, Hashable]]:
        out = []
        if self._size <= self.budget:
            return out
        for k in list(self._lru):
            if self._size <= self.budget:
                break
            if k == protect or k[1] in self._pinned.get(k[0], ()):
                continue
            self._size -= self._lru.pop(k)
            self.evicted += 1
            out.append(k)
        return out

    def _drop(self, victims) -> None:
        for hid, key in victims:
            holder = self._holders.get(hid)
            if holder is not None:
                holder.drop(key)

    # ------------------------------------------------------------------ reading
    @property
    def size(self) -> int:
        return self._size

    def held_by(self, hid: int) -> int:
        with self._lock:
            return sum(n for (h, _), n in self._lru.items() if h == hid)
