"""Where a viewer gets slide tiles from: the local store, or the server's packet stream.

Both providers give the same small interface (no Qt):

``info``                      the slide description (as ``GET /api/slides/{slide}``)
``levels``                    :class:`~imaging.pyramid.LevelGeometry` list
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

Rights (SPEC P7): :class:`RemoteSlide` reads the user's rights on the slide from its
description (``rights``, ``unlimited``, ``versions``) and never asks beyond them, with the
series client's :class:`client.rights.Limits` (:meth:`~client.rights.Limits.for_level`,
:meth:`~client.rights.Limits.clamp`): layers are capped at ``max_layers``
(:attr:`RemoteSlide.max_layers` is what "all layers" means for this user), levels finer
than ``finest_level`` are not asked (:class:`~client.rights.RightsLimited`, raised before
any request; the viewer shows the finest allowed level enlarged), and under a region
right every request names a region inside an allowed one (tiles outside every allowed
region are never asked; the parts of a tile outside them are :data:`NOT_PERMITTED`
grey). If the server still refuses a request (the rights changed during the session),
the limits in its 403 are learnt, the listeners hear ``("limited", body)`` and the
request is made once more within them. Label, macro and thumbnail need unlimited
rights: :meth:`RemoteSlide.associated_permitted` says so beforehand and
:meth:`RemoteSlide.associated` raises :class:`NotPermitted` (a plain reason), never a
bare HTTP error. :class:`LocalSlide` has no limits (same attributes, nothing limited).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable

import numpy as np

from client.rights import Limits, RightsLimited, intersect, is_rights_body, level_rect
from client.session import ServerError
from codestream import framing
from codestream.databins import BinSet, rebuild_codestream
from codestream.encode import openjpeg_decode

from imaging.pyramid import LevelGeometry, StoredSlide
from imaging.tilesource import BACKGROUND

log = logging.getLogger("medview.slides")


#: the colour of the parts of a slide the user's rights do not allow (region rights)
NOT_PERMITTED = (200, 200, 200)

#: why label, macro and thumbnail need unlimited rights (plain words)
WHOLE_IMAGE_REASON = ("label, macro and thumbnail are whole images of the slide (the label "
                      "carries the patient's identity) and need unlimited access to it")


class ProviderError(RuntimeError):
    """The slide or a tile cannot be had (with the reason)."""


class NotPermitted(ProviderError):
    """The user's rights do not allow this associated image (``body``: the 403, if the
    server was asked)."""

    def __init__(self, name: str, reason: str, body: dict | None = None) -> None:
        super().__init__(f"{name} image not permitted: {reason}")
        self.name, self.reason, self.body = name, reason, body or {}


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

    # rights (a local slide has none; see RemoteSlide)
    finest_level: int = 0
    rights: dict
    unlimited: bool = True

    @property
    def stored_layers(self) -> int:
        return int(self.info.get("layers", 4))

    @property
    def limited(self) -> dict | None:
        """The rights block when the user's rights limit this slide, else None."""
        return None

    def allowed_regions(self, level: int) -> list[tuple[int, int, int, int]] | None:
        """The parts of ``level`` the rights allow (level pixels); None: all of it."""
        return None

    def associated_permitted(self, name: str) -> bool:
        return True

    def beyond(self, level: int, region=None, layers: int = 0) -> str | None:
        """Why reading ``region`` of ``level`` with ``layers`` would go beyond the rights
        (plain words), or None."""
        return None

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
        self.rights = {}

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
    """A slide on an image server, tiles through ``/jpip/slides/{slide}``, within the
    user's rights on it (see the module docstring)."""

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
        self.rights: dict = dict(self.info.get("rights") or {})
        self.limits = Limits.from_body(self.rights)
        self.unlimited = bool(self.info.get("unlimited", not self.rights))
        self.versions: list[dict] | None = self.info.get("versions")
        #: hear ``("limited", body)`` when a 403 taught new rights (any thread)
        self.listeners: list[Callable[[str, dict], None]] = []
        self.refused: list[dict] = []           # the 403 bodies met (rights changed)
        self.denied_associated: dict[str, str] = {}

    # ------------------------------------------------------------------ rights
    @property
    def max_layers(self) -> int:
        """Quality layers a tile may be had with: all stored, or fewer by the rights."""
        cap = self.limits.max_layers
        return self.stored_layers if cap is None else max(0, min(self.stored_layers, cap))

    @property
    def finest_level(self) -> int:            # type: ignore[override]
        return self.limits.finest(len(self.levels))

    @property
    def limited(self) -> dict | None:
        lim = self.limits
        if (lim.limited or lim.versions is not None or not self.unlimited
                or self.max_layers < self.stored_layers):
            return dict(self.rights)
        return None

    def learn_rights(self, body: dict) -> None:
        """Adopt the limits a 403 answer names and tell the listeners."""
        self.refused.append(body)
        self.rights = {k: v for k, v in body.items()
                       if k not in ("error", "status", "denied", "level", "allowed_regions_at_level")}
        self.limits = Limits.from_body(self.rights)
        self.unlimited = False
        self._notify("limited", body)

    def _notify(self, kind: str, msg: dict) -> None:
        for fn in list(self.listeners):
            try:
                fn(kind, msg)
            except Exception:           # a listener bug must not break a transfer
                log.exception("slide listener failed")

    def level_limits(self, level: int) -> Limits:
        """The limits in the terms of ``level`` (raises RightsLimited if none of it may
        be fetched)."""
        lim = self.limits
        if lim.versions is not None and not lim.versions:
            raise RightsLimited("no version of this slide may be sent now", lim, "version")
        if lim.versions is not None and not self.versions:
            raise RightsLimited("your rights limit the versions you may get, and this server "
                                "has no versions for slides", lim, "version")
        if self.max_layers <= 0:
            raise RightsLimited("no quality layer of this slide may be loaded now", lim, "layers")
        return lim.for_level(level, self.levels[level].downsample, len(self.levels))

    def reduce_at(self, level: int) -> int:
        """The reduction a tile of ``level`` must be asked at (only on the top level, when
        the resolution right goes beyond the pyramid)."""
        left = (self.limits.max_reduce_min or 0) - level
        return left if left > 0 and level >= self.finest_level else 0

    def allowed_regions(self, level: int) -> list[tuple[int, int, int, int]] | None:
        if self.limits.regions is None:
            return None
        g = self.levels[level]
        return [c for r in self.limits.regions
                if (c := intersect(level_rect(r, g.downsample), (0, 0, g.width, g.height)))]

    def permitted_parts(self, level: int, t: int) -> list[tuple[int, int, int, int]] | None:
        """The parts of tile ``t`` the rights allow, in tile pixels (None: all of it)."""
        regs = self.allowed_regions(level)
        if regs is None:
            return None
        tx, ty, tw, th = self.levels[level].tile_rect(t)
        parts = []
        for r in regs:
            c = intersect(r, (tx, ty, tw, th))
            if c is not None:
                parts.append((c[0] - tx, c[1] - ty, c[2], c[3]))
        if parts == [(0, 0, tw, th)]:
            return None
        return parts

    def associated_permitted(self, name: str) -> bool:
        return self.unlimited and name not in self.denied_associated

    def beyond(self, level: int, region=None, layers: int = 0) -> str | None:
        try:
            self.level_limits(level)
        except RightsLimited as e:
            return e.message
        if layers and layers > self.max_layers:
            return (f"{layers} quality layers asked, your rights allow {self.max_layers} of "
                    f"{self.stored_layers} on this slide")
        regs = self.allowed_regions(level)
        if regs is not None:
            g = self.levels[level]
            allowed = "; ".join(",".join(map(str, r)) for r in regs) or "none"
            if region is None:
                return (f"the whole of level {level} asked, your rights allow only part of this "
                        f"slide (x,y,w,h at level {level}: {allowed})")
            want = intersect(tuple(region), (0, 0, g.width, g.height))
            if want is None or not any(intersect(want, r) == want for r in regs):
                return (f"region {','.join(map(str, region))} of level {level} is not inside "
                        f"the part of the slide your rights allow (x,y,w,h at level {level}: "
                        f"{allowed})")
        return None

    # ------------------------------------------------------------------ data
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
        """Quality layers held by every precinct of the tile that may be had — at the
        resolution the rights allow, in the parts they allow (0: nothing decodable)."""
        parts = self.permitted_parts(level, t)
        if parts == []:
            return self.stored_layers            # nothing of it may come: nothing to wait for
        with self._lock:
            bs = self._binset(level, t)
            ix = bs.index
            if ix is None:
                return 0
            top = ix.numres - 1 - min(self.reduce_at(level), ix.numres - 1)
            held = ix.nlayers
            for part in parts or [None]:
                q, r = bs.levels(max_res=top, region=part)
                if r != top:
                    return 0
                held = min(held, q)
            return held

    def fetch(self, level: int, tiles: list[int], layers: int = 0, *,
              region: tuple[int, int, int, int] | None = None,
              cancelled: Callable[[], bool] = lambda: False) -> int:
        """One packet request for whatever ``tiles`` (or ``region`` of the level) still
        lack up to ``layers`` layers (0 = all the rights allow); returns the bytes
        received. Within the rights: raises :class:`~client.rights.RightsLimited` before
        asking when nothing of it may be had; a 403 (the rights changed) is learnt and
        the request made once more within them."""
        try:
            return self._fetch(level, tiles, layers, region, cancelled)
        except ServerError as e:
            if isinstance(e, RightsLimited) or e.status != 403 or not is_rights_body(e.body):
                raise
            before = self.limits
            self.learn_rights(e.body)
            if self.limits == before:
                raise
            return self._fetch(level, tiles, layers, region, cancelled)

    def _fetch(self, level, tiles, layers, region, cancelled) -> int:
        lim = self.level_limits(level)
        want = min(layers or self.max_layers, self.max_layers)
        if lim.regions is None:
            return self._request(level, lim, tiles, want, region, cancelled)
        # a region right: one request per allowed region the tiles (or the region) touch,
        # each naming a region inside it; tiles outside every allowed region are not asked
        g = self.levels[level]
        if region is not None:
            areas = [intersect(region, r) for r in self.allowed_regions(level)]
        elif tiles:
            rects = [g.tile_rect(t) for t in tiles]
            x0, y0 = min(r[0] for r in rects), min(r[1] for r in rects)
            x1 = max(r[0] + r[2] for r in rects)
            y1 = max(r[1] + r[3] for r in rects)
            areas = [intersect((x0, y0, x1 - x0, y1 - y0), r) for r in self.allowed_regions(level)]
        else:
            return 0
        got = 0
        for area in areas:
            if area is None or cancelled():
                continue
            inside = set(g.tiles_in(*area))
            ts = [t for t in tiles if t in inside]
            if tiles and not ts:
                continue
            got += self._request(level, lim, ts, want, area, cancelled)
        return got

    def _request(self, level, lim: Limits, tiles, want, region, cancelled) -> int:
        need = [t for t in tiles if self.held_layers(level, t) < want]
        if not need and (region is None or tiles):
            return 0
        params = {"level": level, "layers": want, "order": "quality"}
        red = self.reduce_at(level)
        if red:
            params["reduce"] = red
        if region is not None:
            x, y, w, h = region
            params.update(roff=f"{x},{y}", rsiz=f"{w},{h}")
        if need:
            params["comps"] = ",".join(str(t) for t in need)
        params = lim.clamp(params, [{"nlayers": self.stored_layers,
                                     "numres": (lim.max_reduce_min or 0) + 1}])
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
        """Decode a tile from what it holds (fetching it first if it holds nothing), with
        no more layers than the rights allow; the parts the rights do not allow are
        :data:`NOT_PERMITTED` grey."""
        self.level_limits(level)
        parts = self.permitted_parts(level, t)
        _x, _y, tw, th = self.levels[level].tile_rect(t)
        if parts == []:
            return np.full((th, tw, 3), NOT_PERMITTED, np.uint8)
        if self.held_layers(level, t) == 0:
            self.fetch(level, [t], layers)
        with self._lock:
            bs = self._binset(level, t)
            snap = BinSet(bs.main_header, bs.tile_header, dict(bs.precincts), bs.index)
        if snap.index is None:
            raise ProviderError(f"tile {t} of level {level} has not arrived")
        red = min(self.reduce_at(level), snap.index.numres - 1)
        q = self.held_layers(level, t)
        use = min(q if not layers else min(q, layers), self.max_layers)
        if use <= 0:
            raise ProviderError(f"tile {t} of level {level} has not arrived")
        cs = rebuild_codestream(snap, max_layers=use,
                                max_res=snap.index.numres - 1 - red if red else None)
        px = openjpeg_decode(cs, layers=use, reduce=red)
        if red:                       # the coarsest view the rights allow, enlarged to size
            f = 1 << red
            px = np.repeat(np.repeat(px, f, axis=0), f, axis=1)[:th, :tw]
        if parts is not None:
            keep = np.zeros(px.shape[:2], bool)
            for x, y, w, h in parts:
                keep[y:y + h, x:x + w] = True
            px = np.where(keep[:, :, None], px, np.array(NOT_PERMITTED, np.uint8))
        return np.ascontiguousarray(px)

    def associated(self, name: str) -> np.ndarray:
        """The label / macro / thumbnail image; :class:`NotPermitted` when the rights do
        not allow it (asked of the server only when they might)."""
        import io

        from PIL import Image

        if not self.unlimited:
            raise NotPermitted(name, f"{WHOLE_IMAGE_REASON}, and your access to this slide "
                                     "is limited")
        if name in self.denied_associated:
            raise NotPermitted(name, self.denied_associated[name])
        try:
            r = self.session.request("GET", f"/api/slides/{self.uid}/associated/{name}")
        except ServerError as e:
            if e.status != 403:
                raise
            denied = (e.body or {}).get("denied") or []
            if "action" in denied:
                reason = "your account may not download whole images of this slide"
            else:
                reason = f"{WHOLE_IMAGE_REASON}, and your access to this slide is limited"
            self.denied_associated[name] = reason
            raise NotPermitted(name, reason, e.body) from None
        return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
