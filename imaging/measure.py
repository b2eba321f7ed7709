"""Measurements in full-res image coordinates: distance, rectangle/ellipse ROI, pixel value.

No Qt. Points are full-res pixel coordinates (x = column, y = row, continuous: the centre
of pixel (row 3, column 5) is (5.5, 3.5)). Whatever resolution is decoded, values are read
from the array pixels that cover the full-res-equivalent region (see
:meth:`imaging.model.DecodedImage.grid`). Lengths use PixelSpacing, which DICOM orders as
(row spacing, column spacing): a horizontal step is scaled by the *column* spacing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import numpy as np

from .model import DecodedImage, ImageMeta, PixelGrid

__all__ = [
    "MeasureKind",
    "Measurement",
    "Distance",
    "RoiStats",
    "PixelValue",
    "distance",
    "roi_stats",
    "value_at",
    "value_under",
    "modality_unit",
    "measurement_label",
    "best_source",
]

Point = tuple[float, float]


class MeasureKind(str, Enum):
    """Kinds of measurement a user can draw."""

    DISTANCE = "distance"
    RECT = "rect"
    ELLIPSE = "ellipse"


@dataclass(frozen=True)
class Measurement:
    """A drawn measurement on image ``index``: a line p0-p1 or the box p0-p1 of an ROI."""

    kind: MeasureKind
    p0: Point
    p1: Point
    index: int


@dataclass(frozen=True)
class Distance:
    """A length: in mm when PixelSpacing is known, else in (column) pixels."""

    length: float
    unit: str  # "mm" or "px"

    def __str__(self) -> str:
        return f"{self.length:.1f} {self.unit}"


@dataclass(frozen=True)
class RoiStats:
    """Statistics of the modality values inside an ROI (population SD)."""

    mean: float
    sd: float
    minimum: float
    maximum: float
    n_pixels: int  # array pixels used (at the decoded resolution)
    area: float  # geometric area of the drawn shape
    area_unit: str  # "mm²" or "px²"
    unit: str  # value unit, "HU" for CT, "" when unknown

    def lines(self) -> list[str]:
        """Overlay text lines."""
        u = f" {self.unit}" if self.unit else ""
        return [
            f"Mean {self.mean:.1f}{u}  SD {self.sd:.1f}",
            f"Min {self.minimum:.0f}  Max {self.maximum:.0f}",
            f"Area {self.area:.1f} {self.area_unit}",
        ]


class PixelValue(NamedTuple):
    """Value of one pixel: stored, after the modality rescale, and the rescaled unit."""

    stored: float | tuple[float, ...]
    modality_value: float | tuple[float, ...]
    unit: str


def distance(p0: Point, p1: Point, pixel_spacing: Sequence[float] | None) -> Distance:
    """Distance between two full-res points; PixelSpacing is (row, column) in mm."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    if not pixel_spacing:
        return Distance(math.hypot(dx, dy), "px")
    row_spacing, column_spacing = pixel_spacing[0], pixel_spacing[1]
    return Distance(math.hypot(dx * column_spacing, dy * row_spacing), "mm")


def modality_unit(meta: ImageMeta, modality: str | None = None) -> str:
    """Unit of the modality values: RescaleType if given, HU for CT, else ""."""
    if meta.rescale_type and meta.rescale_type.upper() != "US":
        return meta.rescale_type
    if (modality or meta.modality or "").upper() == "CT":
        return "HU"
    return ""


def value_at(
    decoded: DecodedImage, meta: ImageMeta, x_full: float, y_full: float, modality: str | None = None
) -> PixelValue | None:
    """Value under a full-res point, read from whatever resolution ``decoded`` holds.

    Returns None outside the array (or outside a region patch). For colour images the
    stored and modality values are the (R, G, B) tuple and the unit is "RGB".
    """
    grid = decoded.grid(meta)
    if not grid.contains(x_full, y_full):
        return None
    i, j = grid.to_array(x_full, y_full)
    if not (0 <= i < decoded.height and 0 <= j < decoded.width):
        return None
    sample = decoded.pixels[i, j]
    if np.ndim(sample) > 0:
        rgb = tuple(float(v) for v in np.ravel(sample)[:3])
        return PixelValue(rgb, rgb, "RGB")
    stored = float(sample)
    value = stored * meta.rescale_slope + meta.rescale_intercept
    return PixelValue(stored, value, modality_unit(meta, modality))


def value_under(
    sources: Sequence[DecodedImage], meta: ImageMeta, x_full: float, y_full: float, modality: str | None = None
) -> PixelValue | None:
    """Value under a full-res point from the last of ``sources`` (drawn bottom up: the
    base image, then the finer region patches) that holds it; None when none does."""
    for source in reversed(sources):
        value = value_at(source, meta, x_full, y_full, modality)
        if value is not None:
            return value
    return None


def _shape_mask(grid: PixelGrid, shape: tuple[int, int], kind: MeasureKind, p0: Point, p1: Point):
    """(row slice, column slice, boolean mask) of array pixels whose centres lie inside."""
    xa, xb = sorted((p0[0], p1[0]))
    ya, yb = sorted((p0[1], p1[1]))
    h, w = shape
    j0 = min(max(math.floor((xa - grid.x0) / grid.sx), 0), w)
    j1 = min(max(math.ceil((xb - grid.x0) / grid.sx), 0), w)
    i0 = min(max(math.floor((ya - grid.y0) / grid.sy), 0), h)
    i1 = min(max(math.ceil((yb - grid.y0) / grid.sy), 0), h)
    cx = grid.x0 + (np.arange(j0, j1) + 0.5) * grid.sx
    cy = grid.y0 + (np.arange(i0, i1) + 0.5) * grid.sy
    if kind is MeasureKind.ELLIPSE:
        ex, ey = (xa + xb) / 2.0, (ya + yb) / 2.0
        a, b = max((xb - xa) / 2.0, 1e-9), max((yb - ya) / 2.0, 1e-9)
        mask = ((cx[None, :] - ex) / a) ** 2 + ((cy[:, None] - ey) / b) ** 2 <= 1.0
    else:
        mask = ((cx >= xa) & (cx <= xb))[None, :] & ((cy >= ya) & (cy <= yb))[:, None]
    return slice(i0, i1), slice(j0, j1), mask


def roi_stats(
    decoded: DecodedImage,
    meta: ImageMeta,
    kind: MeasureKind,
    p0: Point,
    p1: Point,
    modality: str | None = None,
) -> RoiStats | None:
    """Mean/SD/min/max (modality units) and area of a rectangle or ellipse ROI.

    The ROI is the box ``p0``-``p1`` in full-res coordinates (the ellipse is inscribed in
    it). Array pixels count when their centre (mapped to full res) lies inside the shape;
    an ROI smaller than one decoded pixel uses the pixel under its centre. The area is the
    shape's geometric area. None for colour images or an ROI outside the data.
    """
    if kind is MeasureKind.DISTANCE:
        raise ValueError("roi_stats needs a RECT or ELLIPSE measurement")
    if decoded.pixels.ndim != 2:
        return None
    grid = decoded.grid(meta)
    rows, cols, mask = _shape_mask(grid, decoded.pixels.shape, kind, p0, p1)
    values = decoded.pixels[rows, cols][mask]
    if values.size == 0:
        centre = ((p0[0] + p1[0]) / 2.0, (p0[1] + p1[1]) / 2.0)
        pv = value_at(decoded, meta, *centre)
        if pv is None:
            return None
        values = np.asarray([pv.stored])
    hu = values.astype(np.float64) * meta.rescale_slope + meta.rescale_intercept
    width, height = abs(p1[0] - p0[0]), abs(p1[1] - p0[1])
    area = width * height * (math.pi / 4.0 if kind is MeasureKind.ELLIPSE else 1.0)
    if meta.mm_spacing:
        area *= meta.mm_spacing[0] * meta.mm_spacing[1]
        area_unit = "mm²"
    else:
        area_unit = "px²"
    return RoiStats(
        mean=float(hu.mean()),
        sd=float(hu.std()),
        minimum=float(hu.min()),
        maximum=float(hu.max()),
        n_pixels=int(hu.size),
        area=float(area),
        area_unit=area_unit,
        unit=modality_unit(meta, modality),
    )


def best_source(
    sources: Sequence[DecodedImage], meta: ImageMeta, p0: Point, p1: Point
) -> DecodedImage | None:
    """The finest decoded array (region patches first) that covers the box ``p0``-``p1``."""
    xa, xb = sorted((p0[0], p1[0]))
    ya, yb = sorted((p0[1], p1[1]))
    best = None
    best_key = None
    for source in sources:
        g = source.grid(meta)
        if source.is_region and not (
            g.x0 <= xa and xb <= g.x0 + g.width and g.y0 <= ya and yb <= g.y0 + g.height
        ):
            continue
        key = (-(g.sx * g.sy), source.layers)
        if best_key is None or key > best_key:
            best, best_key = source, key
    return best


def measurement_label(
    m: Measurement, sources: Sequence[DecodedImage], meta: ImageMeta, modality: str | None = None
) -> list[str]:
    """Text lines for a measurement, computed from the best data available. On an image
    whose geometry the server flagged as impossible, lengths and areas stay in pixels and
    a line says why (no mm from nonsense spacing)."""
    refused = [GEOMETRY_REFUSAL] if meta.geometry_flagged else []
    if m.kind is MeasureKind.DISTANCE:
        return [str(distance(m.p0, m.p1, meta.mm_spacing))] + refused
    source = best_source(sources, meta, m.p0, m.p1)
    stats = roi_stats(source, meta, m.kind, m.p0, m.p1, modality) if source is not None else None
    return (stats.lines() + refused) if stats else []


GEOMETRY_REFUSAL = "no mm: geometry flagged as impossible"
