"""Where a viewer gets slide tiles from: the local store, or the server's packet stream.

Both providers give the same small interface (no Qt):

``info``                      the slide description (as ``GET /api/slides/{slide}``)
``levels``                    :class:`~pathology.pyramid.LevelGeometry` list
``tile(level, t, layers=0)``  RGB pixels of one tile (``layers`` 0 = all: lossless)
``fetch(level, tiles, layers)``  make sure the tiles hold ``layers`` layers (remote: one
                              packet request for all of them; local: nothing to do)
``read_level(level, x, y, w, h)``  a region of a level (white outside)
``associated(name)``          label / macro image

:class:`RemoteSlide` keeps, per tile, the JPIP data-bins received
(:class:`codestream.databins.BinSet`), in memory and — when given a
:class:`client.cache.PacketCache` — on disk, so tiles survive restarts and the server is
told what the client holds (it never sends a packet twice). A tile is decoded from
whatever layers it holds: coarse first, refined when more layers arrive.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Callable

import numpy as np

from codestream import framing
from codestream.databins import BinSet, rebuild_codestream
from codestream.encode import openjpeg_decode

from .pyramid import LevelGeometry, StoredSlide
from .tilesource import BACKGROUND


class ProviderError(RuntimeError):
    """The slide or a tile cannot be had (with the reason)."""


class _Base:
    info: dict
    levels: list[LevelGeometry]

    @property
    def width(self) -> int:
        return self.info["width"]

    @property
    def height(self) -> int:
        return self.info["height"]

    @property
    def mpp(self) -> float | None:
        return self.info.get("mpp")

    @property
    def max_layers(self) -> int:
        return int(self.info.get("layers", 4))

    #: measured transfer rate in bytes per second (None: not measured; local: unbounded)
    rate: float | None = None

    def read_level(self, level: int, x: int, y: int, w: int, h: int, *,
                   layers: int = 0) -> np.ndarray:
        g = self.levels[level]
        tiles = g.tiles_in(x, y, w, h)
        self.fetch(level, tiles, layers)
        out = np.full((h, w, 3), BACKGROUND, np.uint8)
        for t in tiles:
            tx, ty, tw, th = g.tile_rect(t)
            px = self.tile(level, t, layers=layers)
            ax0, ay0 = max(x, tx), max(y, ty)
            ax1, ay1 = min(x + w, tx + tw), min(y + h, ty + th)
            out[ay0 - y:ay1 - y, ax0 - x:ax1 - x] = px[ay0 - ty:ay1 - ty, ax0 - tx:ax1 - tx]
        return out

    def fetch(self, level: int, tiles: list[int], layers: int = 0, *,
              cancelled: Callable[[], bool] = lambda: False) -> int:
        return 0

    def close(self) -> None:
        pass


def _levels(info: dict) -> list[LevelGeometry]:
    return [LevelGeometry(lv["level"], lv["width"], lv["height"], lv["downsample"], lv["tile"])
            for lv in info["levels"]]


class LocalSlide(_Base):
    """A slide read straight from a slide store (bundled mode, headless render, a
    reading station's cache folder)."""

    def __init__(self, stored: StoredSlide, row: dict | None = None) -> None:
        self.stored = stored
        row = row or {}
        self.info = {**{k: row.get(k) for k in ("pk", "slide_uid", "state", "tier", "qc_status",
                                               "qc", "label", "patient_id", "accession")},
                     "slide_uid": stored.uid, "width": stored.width, "height": stored.height,
                     "mpp": stored.mpp, "tile_size": stored.tile_size,
                     "layers": stored.manifest["codestream"]["layers"],
                     "state": row.get("state") or stored.manifest.get("state", "high"),
                     "levels": [{"level": g.level, "width": g.width, "height": g.height,
                                 "downsample": g.downsample, "cols": g.cols, "rows": g.rows,
                                 "tile": g.tile} for g in stored.levels],
                     "associated": {k: {"width": v["width"], "height": v["height"]}
                                    for k, v in stored.manifest.get("associated", {}).items()}}
        self.levels = stored.levels

    @classmethod
    def from_store(cls, store, ref) -> "LocalSlide":
        row, st = store.open(ref)
        return cls(st, row)

    @classmethod
    def from_folder(cls, path) -> "LocalSlide":
        return cls(StoredSlide.open(path))

    def tile(self, level: int, t: int, *, layers: int = 0) -> np.ndarray:
        return self.stored.decode_tile(level, t, layers=layers)

    def held_layers(self, level: int, t: int) -> int:
        return self.max_layers

    def associated(self, name: str) -> np.ndarray:
        return self.stored.associated(name)


class RemoteSlide(_Base):
    """A slide on an image server, tiles through ``/jpip/slides/{slide}``."""

    def __init__(self, session, ref: str | int, cache=None) -> None:
        self.session = session
        self.info = session.get_json(f"/api/slides/{ref}")
        self.uid = self.info["slide_uid"]
        self.levels = _levels(self.info)
        self.cache = cache
        self.ns = session.base_url
        self._bins: dict[tuple[int, int], BinSet] = {}
        self._lock = threading.RLock()
        self.bytes_received = 0
        self.requests = 0
        self.last_announce: dict | None = None
        self.rate: float | None = None          # bytes/s, exponential average of requests

    def key(self, level: int, t: int) -> str:
        return f"{self.uid}/{level}/{t}"

    def _binset(self, level: int, t: int) -> BinSet:
        with self._lock:
            bs = self._bins.get((level, t))
            if bs is None:
                bs = self.cache.load(self.ns, self.key(level, t)) if self.cache else BinSet()
                self._bins[(level, t)] = bs
            return bs

    def held_layers(self, level: int, t: int) -> int:
        """Quality layers held by every precinct of the tile (0: nothing decodable)."""
        with self._lock:
            q, r = self._binset(level, t).levels()
            return q if r >= 0 and r == self._binset(level, t).index.numres - 1 else 0

    def fetch(self, level: int, tiles: list[int], layers: int = 0, *,
              region: tuple[int, int, int, int] | None = None,
              cancelled: Callable[[], bool] = lambda: False) -> int:
        """One packet request for whatever ``tiles`` (or ``region`` of the level) still
        lack up to ``layers`` layers (0 = all); returns the bytes received."""
        want = layers or self.max_layers
        need = [t for t in tiles if self.held_layers(level, t) < want]
        if not need and region is None:
            return 0
        params = {"level": level, "layers": want, "order": "quality"}
        if region is not None:
            x, y, w, h = region
            params.update(roff=f"{x},{y}", rsiz=f"{w},{h}")
        if need:
            params["comps"] = ",".join(str(t) for t in need)
        model = {}
        for t in need:
            bs = self._binset(level, t)
            if bs.index is None:
                continue
            lengths = bs.index.packet_lengths_by_bin()
            model[self.key(level, t)] = {"h": 1, "b": {
                str(b): n for b in bs.precincts if b in lengths
                and (n := bs.layers_in_bin(b, lengths[b])) > 0}}
        resp = self.session.request("POST", f"/jpip/slides/{self.uid}", params=params,
                                    json={"model": model}, stream=True,
                                    timeout=(self.session.timeout, 120))
        self.requests += 1
        reader = framing.PacketStreamReader()
        got = 0
        t0 = time.monotonic()
        dirty: dict[int, dict] = {}
        try:
            for chunk in resp.iter_content(chunk_size=32768):
                if cancelled():
                    break
                for rtype, payload in reader.feed(chunk):
                    if rtype == framing.CONTROL:
                        msg = payload if isinstance(payload, dict) else json.loads(payload)
                        if msg.get("type") == "announce":
                            self.last_announce = msg
                        elif msg.get("type") == "error":
                            raise ProviderError(msg.get("error", "server error"))
                        continue
                    for m in payload:
                        got += self._apply(level, m, dirty)
                    self._flush(level, dirty)
        finally:
            resp.close()
            self._flush(level, dirty)
        self.bytes_received += got
        dt = time.monotonic() - t0
        if got > 32768 and dt > 0:               # small answers say more about latency
            r = got / dt
            self.rate = r if self.rate is None else 0.7 * self.rate + 0.3 * r
        return got

    def _apply(self, level: int, msg, dirty: dict) -> int:
        t = msg.csn
        g = self.levels[level]
        if t >= g.count:
            raise ProviderError(f"server sent tile {t}; level {level} has {g.count}")
        with self._lock:
            n, key, data = self._binset(level, t).absorb(msg)
        if key is not None:
            dirty.setdefault(t, {})[key] = data
        return n

    def _flush(self, level: int, dirty: dict) -> None:
        if self.cache is not None:
            for t, bins in dirty.items():
                self.cache.put(self.ns, self.key(level, t), bins)
        dirty.clear()

    def tile(self, level: int, t: int, *, layers: int = 0) -> np.ndarray:
        """Decode a tile from what it holds (fetching it first if it holds nothing)."""
        if self.held_layers(level, t) == 0:
            self.fetch(level, [t], layers)
        with self._lock:
            bs = self._binset(level, t)
            snap = BinSet(bs.main_header, bs.tile_header, dict(bs.precincts), bs.index)
        if snap.index is None:
            raise ProviderError(f"tile {t} of level {level} has not arrived")
        q, _r = snap.levels()
        use = q if not layers else min(q, layers)
        cs = rebuild_codestream(snap, max_layers=use)
        return openjpeg_decode(cs, layers=use)

    def associated(self, name: str) -> np.ndarray:
        import io

        from PIL import Image

        r = self.session.request("GET", f"/api/slides/{self.uid}/associated/{name}")
        return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
