"""A series fetched as a slab pyramid: thick slabs first, thinner as details arrive (P10).

:class:`SlabSeries` is a :class:`~client.series.SeriesData` whose images are the bands of
the server's slab pyramid (``GET /api/series/{uid}/slabs``) and whose packet requests go to
``/jpip/slabs/{uid}``; caching, cancelling and progress work as for any series.
:meth:`SlabSeries.reconstruct` decodes the bands a level needs (at any resolution and
number of quality layers held) and undoes the slice-axis transform of
:mod:`codestream.slabs`: at level 0, full resolution and all layers, the thin slices are
bit-exact. No Qt.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from codestream import slabs as transform

from .cache import PacketCache
from .series import SeriesData
from .session import Session

__all__ = ["SlabSeries", "SlabLevel"]


class _SlabRoute:
    """The session, with packet requests sent to the slab target of one series."""

    def __init__(self, session: Session, series_uid: str) -> None:
        self._session = session
        self._path = f"/jpip/slabs/{series_uid}"

    def __getattr__(self, name):
        return getattr(self._session, name)

    def packet_stream(self, params: dict, model: dict | None = None):
        s = self._session
        params = {k: v for k, v in params.items() if v is not None}
        if model is not None:
            return s.request("POST", self._path, params=params, json={"model": model},
                             stream=True, timeout=(s.timeout, 120))
        return s.request("GET", self._path, params=params, stream=True, timeout=(s.timeout, 120))


@dataclass
class SlabLevel:
    """Slabs of one level, reconstructed: ``slabs[i]`` covers thin slices
    ``spans[i] = (start, stop)`` (indices into :attr:`SlabSeries.order`)."""

    level: int
    slabs: np.ndarray                  # (count, h, w) int32 stored values
    spans: list[tuple[int, int]]
    reduce: int
    layers: int


class SlabSeries(SeriesData):
    """The slab pyramid of a series (see the module docstring)."""

    def __init__(self, session: Session, cache: PacketCache | None, series_uid: str,
                 meta: dict | None = None) -> None:
        meta = meta or session.get_json(f"/api/series/{series_uid}/slabs")
        super().__init__(_SlabRoute(session, series_uid), cache, series_uid, meta)
        self.pyramid: dict = meta["pyramid"]
        self.depth: int = int(self.pyramid["levels"])          # pyramid levels (L)
        self.count: int = int(self.pyramid["count"])
        self.order: list[int] = list(self.pyramid["order"])   # series image index per thin slice

    def band_comps(self, kind: str, level: int) -> list[int]:
        """Components holding the ``kind`` ("low"/"high") band of ``level``, in slab order."""
        return [im["index"] for im in self.images if im["band"] == kind and im["level"] == level]

    def comps_for_level(self, level: int) -> list[int]:
        """Components needed for the slabs of ``level``: the lows and the details of the
        levels above it."""
        if not 0 <= level <= self.depth:
            raise ValueError(f"level must be 0..{self.depth}")
        comps = self.band_comps("low", self.depth)
        for k in range(self.depth, level, -1):
            comps += self.band_comps("high", k)
        return comps

    def spans(self, level: int) -> list[tuple[int, int]]:
        count = transform.counts(self.count, self.depth)[0][level]
        return [transform.slab_span(self.count, level, i) for i in range(count)]

    def reconstruct(self, level: int, *, reduce: int = 0, layers: int = 0) -> SlabLevel:
        """Slabs of ``level`` from what is held, decoded at ``reduce`` (never finer than
        held) with ``layers`` quality layers (0 = all held)."""
        lows = self.band_comps("low", self.depth)
        decoded = {}
        red = reduce
        for c in self.comps_for_level(level):
            # one common resolution: the coarsest any needed band holds
            _, r = self.levels(c)
            if r < 0:
                raise ValueError(f"band image {c} has nothing decodable yet")
            red = max(red, self.images[c]["numres"] - 1 - r)
        for c in self.comps_for_level(level):
            d = self.decode(c, reduce=red, layers=layers)
            decoded[c] = d.pixels.astype(np.int32)
        pyr = transform.SlabPyramid(
            self.count, self.depth, np.stack([decoded[c] for c in lows]),
            [np.stack([decoded[c] for c in self.band_comps("high", k)])
             if k > level else np.zeros((0,) + decoded[lows[0]].shape, np.int32)
             for k in range(1, self.depth + 1)])
        out = transform.inverse(pyr, level)
        return SlabLevel(level, out, self.spans(level), red, layers)
