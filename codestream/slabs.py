"""Thick-to-thin slab pyramid: an integer average/difference transform along the slice axis.

P10 asks that a volume can arrive as thick slabs first and get thinner as more data
comes, without sending the same information twice. This module is the reversible
transform behind it (no Qt, no HTTP, numpy only).

One level is the S-transform (the integer Haar wavelet) applied to neighbouring slices
``a = x[2i]`` and ``b = x[2i+1]``::

    low  = floor((a + b) / 2)           # a slab twice as thick: the average, rounded down
    high = a - b                        # the detail that splits it again

    a = low + floor((high + 1) / 2)     # exact inverse, integers only
    b = a - high

With an odd slice count the last slice has no partner: it passes into the low band
unchanged (no detail). Applying the step again to the lows gives slabs 4, 8, ... slices
thick. A pyramid with ``L`` levels holds the ``L``-level lows (the thickest slabs) and one
band of details per level; it has exactly as many images as the series, and the thin
slices come back bit for bit.

Ranges: lows stay inside the input range; details need one bit more (for stored values of
``b`` bits unsigned, details span ``-(2**b - 1) .. 2**b - 1``). :func:`band_bits` says how
many bits each band needs so that callers can refuse data that would not fit a codec.

Geometry: slab ``i`` of level ``k`` covers thin slices ``[i * 2**k, min((i+1) * 2**k, n))``
(:func:`slab_span`). A slab whose pair had no partner covers fewer slices.

Names used everywhere: *level* ``k`` = slabs of ``2**k`` slices (0 = the thin slices);
``pyramid.lows`` = level-``L`` slabs; ``pyramid.highs[k - 1]`` = the details that turn
level-``k`` slabs into level ``k - 1`` slabs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SlabPyramid",
    "SlabError",
    "forward_step",
    "inverse_step",
    "forward",
    "inverse",
    "counts",
    "slab_span",
    "default_levels",
    "band_bits",
    "isotropic_reduce",
]


class SlabError(ValueError):
    """The input cannot be turned into a slab pyramid (with the reason)."""


def forward_step(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One level along axis 0: (lows, highs), ``ceil(n/2)`` and ``floor(n/2)`` images.

    ``x`` is an integer array (n, ...); results are int32 (no overflow for 16-bit input).
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
        raise SlabError(f"the slab transform needs integer samples, got {x.dtype}")
    n = x.shape[0]
    if n == 0:
        raise SlabError("no slices")
    m = n // 2
    a = x[0:2 * m:2].astype(np.int32)
    b = x[1:2 * m:2].astype(np.int32)
    high = a - b
    low = np.empty((n - m,) + x.shape[1:], np.int32)
    low[:m] = (a + b) >> 1                       # arithmetic shift = floor division by 2
    if n % 2:
        low[m] = x[n - 1]                        # the unpaired last slice passes through
    return low, high


def inverse_step(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Undo :func:`forward_step`: ``len(low) + len(high)`` slices (int32), bit-exact."""
    low = np.asarray(low, dtype=np.int32)
    high = np.asarray(high, dtype=np.int32)
    m = high.shape[0]
    if low.shape[0] not in (m, m + 1) or low.shape[1:] != high.shape[1:]:
        raise SlabError(f"band shapes do not match: lows {low.shape}, highs {high.shape}")
    n = low.shape[0] + m
    out = np.empty((n,) + low.shape[1:], np.int32)
    a = low[:m] + ((high + 1) >> 1)
    out[0:2 * m:2] = a
    out[1:2 * m:2] = a - high
    if n % 2:
        out[n - 1] = low[m]
    return out


def counts(n: int, levels: int) -> tuple[list[int], list[int]]:
    """(slab count per level 0..L, detail count per level 1..L) for ``n`` slices."""
    slabs = [n]
    details = []
    for _ in range(levels):
        details.append(slabs[-1] // 2)
        slabs.append(slabs[-1] - slabs[-1] // 2)
    return slabs, details


def slab_span(n: int, level: int, index: int) -> tuple[int, int]:
    """Thin slices ``[start, stop)`` that slab ``index`` of ``level`` covers."""
    size = 1 << level
    start = index * size
    if start >= n or index < 0:
        raise IndexError(f"slab {index} of level {level} does not exist for {n} slices")
    return start, min(start + size, n)


def default_levels(n: int, min_slabs: int = 4, max_levels: int = 4) -> int:
    """Levels so that the thickest slabs still number at least ``min_slabs``."""
    levels = 0
    while (levels < max_levels and counts(n, levels)[0][-1] >= 2
           and counts(n, levels + 1)[0][-1] >= min_slabs):
        levels += 1
    return levels


@dataclass
class SlabPyramid:
    """Lows of level ``levels`` and the detail bands of levels ``levels .. 1``."""

    n: int
    levels: int
    lows: np.ndarray                      # (count at level L, ...) int32
    highs: list[np.ndarray]               # highs[k-1]: details of level k (k = 1..L)

    def band_count(self) -> int:
        return self.lows.shape[0] + sum(h.shape[0] for h in self.highs)

    def bands(self) -> list[tuple[str, int, int, np.ndarray]]:
        """Every image of the pyramid in sending order, thick first:
        ``("low", L, i, img)`` then ``("high", k, i, img)`` for k = L .. 1."""
        out = [("low", self.levels, i, self.lows[i]) for i in range(self.lows.shape[0])]
        for k in range(self.levels, 0, -1):
            h = self.highs[k - 1]
            out += [("high", k, i, h[i]) for i in range(h.shape[0])]
        return out


def forward(x: np.ndarray, levels: int | None = None) -> SlabPyramid:
    """Slab pyramid of ``x`` (n, H, W) integer slices, ``levels`` deep (default
    :func:`default_levels`)."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
        raise SlabError(f"the slab transform needs integer samples, got {x.dtype}")
    n = x.shape[0]
    if levels is None:
        levels = default_levels(n)
    if levels < 0 or (levels > 0 and counts(n, levels)[0][-1] < 1):
        raise SlabError(f"{levels} levels are too many for {n} slices")
    highs: list[np.ndarray] = []
    low = x.astype(np.int32)
    for _ in range(levels):
        if low.shape[0] < 2:
            raise SlabError(f"{levels} levels are too many for {n} slices")
        low, high = forward_step(low)
        highs.append(high)
    return SlabPyramid(n, levels, low, highs)


def inverse(p: SlabPyramid, level: int = 0) -> np.ndarray:
    """Slabs of ``level`` (0 = the thin slices, bit-exact) from the lows and the details
    of levels ``L .. level + 1``."""
    if not 0 <= level <= p.levels:
        raise SlabError(f"level must be 0..{p.levels}, got {level}")
    low = p.lows
    for k in range(p.levels, level, -1):
        low = inverse_step(low, p.highs[k - 1])
    return low


def band_bits(lo: int, hi: int, levels: int) -> tuple[int, int]:
    """(bits for the lows, bits for the details) of data spanning ``lo .. hi``, as signed
    magnitudes plus sign when negative values can occur."""
    span = hi - lo
    low_bits = max(abs(lo), abs(hi)).bit_length() + (1 if lo < 0 else 0)
    high_bits = span.bit_length() + 1 if levels else 0
    return max(low_bits, 1), high_bits


def isotropic_reduce(level: int, slice_spacing: float, pixel_spacing: float,
                     numres: int) -> int:
    """Resolution reduction that keeps voxels near-isotropic for slabs of ``level``:
    in-plane pixels ``pixel_spacing * 2**reduce`` about as large as the slab thickness
    ``slice_spacing * 2**level`` (never coarser than the codestream allows)."""
    if pixel_spacing <= 0 or slice_spacing <= 0:
        return 0
    ratio = slice_spacing * (1 << level) / pixel_spacing
    r = int(math.floor(math.log2(ratio) + 0.5)) if ratio > 1 else 0
    return max(0, min(r, numres - 1))
