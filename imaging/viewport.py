"""Slide viewport logic (no Qt): which tiles, at which level, and what to prefetch.

:class:`Viewport` holds the view as ``centre`` (level-0 pixels) and ``scale`` (screen
pixels per level-0 pixel) on a ``size`` (screen pixels). It answers:

* :meth:`level_for_scale` — the pyramid level to draw: the most reduced level that still
  has at least one level pixel per screen pixel (as OpenSeadragon does);
* :meth:`sr_scale` — in low-resolution + super-resolution mode, zoomed past level 0,
  the generator scale to use (2 from 1.5×, 4 from 3×), else None;
* :meth:`visible_tiles` — the tiles of a level that intersect the view;
* :meth:`prefetch_tiles` — the ring of tiles ahead of the view in the direction of
  panning (velocity), or all around it when still.

:class:`TileCache` is the one memory budget for decoded tiles (pattern 7): least recently
used entries go first, never the pinned ones (on screen, and the overview levels), and a
result never replaces a better one (more layers) for the same key.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from imaging.memory import MemoryBudget

import numpy as np

from imaging.pyramid import LevelGeometry

MIN_SCALE_MARGIN = 0.5      # zoom out to half the fitted size at most
FIT_MARGIN = 0.95


@dataclass
class Viewport:
    width: int                      # slide level-0 size
    height: int
    levels: list[LevelGeometry]
    size: tuple[int, int] = (800, 600)          # screen pixels
    centre: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    velocity: tuple[float, float] = (0.0, 0.0)  # level-0 px per second (panning)
    max_scale: float = 8.0

    def fit(self) -> None:
        """Whole slide in view."""
        self.centre = (self.width / 2, self.height / 2)
        self.scale = FIT_MARGIN * min(self.size[0] / self.width, self.size[1] / self.height)

    def min_scale(self) -> float:
        return MIN_SCALE_MARGIN * min(self.size[0] / self.width, self.size[1] / self.height)

    def clamp(self) -> None:
        self.scale = min(self.max_scale, max(self.min_scale(), self.scale))
        cx = min(max(self.centre[0], 0.0), float(self.width))
        cy = min(max(self.centre[1], 0.0), float(self.height))
        self.centre = (cx, cy)

    # ------------------------------------------------------------------ mapping
    def rect(self) -> tuple[float, float, float, float]:
        """Visible area in level-0 pixels (x, y, w, h)."""
        w, h = self.size[0] / self.scale, self.size[1] / self.scale
        return self.centre[0] - w / 2, self.centre[1] - h / 2, w, h

    def to_screen(self, x: float, y: float) -> tuple[float, float]:
        rx, ry, _, _ = self.rect()
        return (x - rx) * self.scale, (y - ry) * self.scale

    def to_slide(self, sx: float, sy: float) -> tuple[float, float]:
        rx, ry, _, _ = self.rect()
        return rx + sx / self.scale, ry + sy / self.scale

    def zoom_at(self, factor: float, sx: float, sy: float) -> None:
        """Zoom by ``factor`` keeping the slide point under (sx, sy) in place."""
        px, py = self.to_slide(sx, sy)
        self.scale = min(self.max_scale, max(self.min_scale(), self.scale * factor))
        rx, ry = px - sx / self.scale, py - sy / self.scale
        self.centre = (rx + self.size[0] / 2 / self.scale, ry + self.size[1] / 2 / self.scale)
        self.clamp()

    def pan_screen(self, dx: float, dy: float) -> None:
        self.centre = (self.centre[0] - dx / self.scale, self.centre[1] - dy / self.scale)
        self.clamp()

    # ------------------------------------------------------------------ levels
    def level_for_scale(self, scale: float | None = None) -> int:
        s = self.scale if scale is None else scale
        best = 0
        for g in self.levels:
            if g.downsample * s <= 1.0 + 1e-6:
                best = g.level
        return best

    def sr_scale(self, scale: float | None = None) -> int | None:
        """×4 from 3 screen pixels per source pixel, ×2 from 1.5 (``scale``: screen
        pixels per pixel of the source level; default the level-0 scale)."""
        s = self.scale if scale is None else scale
        if s >= 3.0:
            return 4
        if s >= 1.5:
            return 2
        return None

    def visible_tiles(self, level: int, margin: float = 0.0) -> list[int]:
        g = self.levels[level]
        x, y, w, h = self.rect()
        d = g.downsample
        m = margin * max(w, h)
        return g.tiles_in(int(math.floor((x - m) / d)), int(math.floor((y - m) / d)),
                          int(math.ceil((w + 2 * m) / d)) + 1, int(math.ceil((h + 2 * m) / d)) + 1)

    def prefetch_tiles(self, level: int) -> list[int]:
        """Tiles one view ahead in the panning direction (all around when still), not
        visible now; nearest first."""
        g = self.levels[level]
        x, y, w, h = self.rect()
        vx, vy = self.velocity
        speed = math.hypot(vx, vy)
        visible = set(self.visible_tiles(level))
        d = g.downsample
        if speed < 1e-3 * max(w, h):
            cand = self.visible_tiles(level, margin=0.5)
        else:
            ux, uy = vx / speed, vy / speed
            ax, ay = x + ux * w, y + uy * h
            cand = g.tiles_in(int(ax / d), int(ay / d), int(w / d) + 1, int(h / d) + 1)
        cx, cy = self.centre

        def dist(t):
            tx, ty, tw, th = g.tile_rect(t)
            return math.hypot((tx + tw / 2) * d - cx, (ty + th / 2) * d - cy)

        return sorted((t for t in cand if t not in visible), key=dist)


# --------------------------------------------------------------------------- cache
@dataclass
class CachedTile:
    pixels: np.ndarray
    layers: int                     # quality layers decoded (0 = unknown / all)
    complete: bool                  # lossless: nothing better will come
    generated: bool = False         # super-resolved: must be drawn marked
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = int(self.pixels.nbytes)


def _rank(t: CachedTile) -> tuple[int, int]:
    return (1 if t.complete else 0, t.layers or 0)


class TileCache:
    """Decoded tiles under the one memory budget (:class:`imaging.memory.MemoryBudget`,
    shared with series images and volumes, or a private one of ``budget`` bytes); pinned
    keys (on screen, the overview) are never evicted."""

    def __init__(self, budget: "int | MemoryBudget" = 512 << 20) -> None:
        self.memory = MemoryBudget.of(budget)
        self._hid = self.memory.register(self)
        self._d: OrderedDict = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.evicted = 0
        self.on_evict = None            # callable(key): cancel a load still running

    @property
    def budget(self) -> int:
        return self.memory.budget

    def get(self, key) -> CachedTile | None:
        with self._lock:
            v = self._d.get(key)
        if v is not None:
            self.memory.touch(self._hid, key)
        return v

    def put(self, key, tile: CachedTile) -> bool:
        """Store ``tile`` unless a better one is held; returns True if stored."""
        with self._lock:
            old = self._d.get(key)
            if old is not None and _rank(old) >= _rank(tile):
                keep = False
            else:
                keep = True
                if old is not None:
                    self._size -= old.nbytes
                self._d[key] = tile
                self._size += tile.nbytes
        if not keep:
            self.memory.touch(self._hid, key)
            return False
        self.memory.charge(self._hid, key, tile.nbytes)
        return True

    def pin(self, keys) -> None:
        """Replace the pinned set (what is on screen + the overview)."""
        self.memory.pin(self._hid, keys)

    def drop(self, key) -> None:
        """Evicted by the budget: forget the tile, cancel its load if one still runs."""
        with self._lock:
            t = self._d.pop(key, None)
            if t is None:
                return
            self._size -= t.nbytes
            self.evicted += 1
        if self.on_evict:
            self.on_evict(key)

    def clear(self) -> None:
        """Forget every tile (e.g. the user's rights changed: what is shown is redone
        within them)."""
        with self._lock:
            keys = list(self._d)
            self._d.clear()
            self._size = 0
        for k in keys:
            self.memory.release(self._hid, k)

    def close(self) -> None:
        """The pane is gone: its tiles leave the budget."""
        self.clear()
        self.memory.unregister(self._hid)

    @property
    def size(self) -> int:
        return self._size

    def __contains__(self, key) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)
