"""One memory budget for decoded series images, slide tiles and volumes: least recently
used first across all of them, never what is pinned (on screen, overview, open volume),
and an evicted tile's load is cancelled."""
from __future__ import annotations

import numpy as np

from client.series_loader import DecodedStore
from imaging.memory import MemoryBudget
from imaging.model import DecodedImage
from imaging.viewport import CachedTile, TileCache


def _img(index: int, kb: int) -> DecodedImage:
    px = np.zeros((kb, 512), np.int16)          # kb × 1 KiB
    return DecodedImage(index=index, pixels=px, layers=1, max_layers=1)


def _tile(kb: int) -> CachedTile:
    return CachedTile(np.zeros((kb, 1024), np.uint8), 1, False)


def test_least_recently_used_across_holders_never_the_pinned(tmp_path):
    mem = MemoryBudget(100 << 10)
    images, tiles = DecodedStore(mem), TileCache(mem)
    cancelled = []
    tiles.on_evict = cancelled.append
    images.offer(_img(0, 30), numres=1, target_res=0, keep={0})     # on screen
    images.offer(_img(1, 30), numres=1, target_res=0, keep={0})
    tiles.put((0, 0), _tile(30))
    assert mem.size == 90 << 10
    tiles.pin([(0, 0)])
    tiles.put((0, 1), _tile(30))               # over: the oldest unpinned goes (image 1)
    assert images.get(1) is None and images.get(0) is not None
    assert (0, 0) in tiles and (0, 1) in tiles
    assert mem.size <= mem.budget
    # a volume opens: 60 kB pinned; the tiles not on screen make room, image 0 stays pinned
    class Volume:
        def drop(self, key):
            raise AssertionError("an open volume is never evicted")
    vol = Volume()
    hid = mem.register(vol)
    mem.pin(hid, ["volume"])
    mem.charge(hid, "volume", 40 << 10)
    assert (0, 1) not in tiles and cancelled == [(0, 1)]      # its load was cancelled
    assert (0, 0) in tiles and images.get(0) is not None
    assert mem.size <= mem.budget
    # the window closes: the volume leaves the budget
    mem.unregister(hid)
    assert mem.size == (30 << 10) * 2
    images.close()
    tiles.close()
    assert mem.size == 0


def test_a_private_budget_when_none_is_shared():
    a, b = TileCache(10 << 10), TileCache(10 << 10)
    assert a.memory is not b.memory
    a.put("x", _tile(8))
    b.put("y", _tile(8))
    assert "x" in a and "y" in b                # neither evicts the other's
    a.put("z", _tile(8))
    assert "x" not in a and "z" in a
