"""Geometry of a 2D image view: zoom, pan, rotation/flip, fit, 1:1. No Qt.

All image coordinates are full-resolution pixel coordinates, whatever resolution is
actually decoded, so the geometry never jumps when a better resolution arrives. The
mapping is::

    screen = viewport_center + pan + zoom * M @ S @ (p - image_center)

with ``M`` the orthogonal rotation/flip matrix (see :mod:`imaging.orientation`) and
``S = diag(1, aspect)`` the pixel aspect ratio (row spacing / column spacing), so one
column-pixel is ``zoom`` screen pixels wide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .orientation import FLIP_H, FLIP_V, IDENTITY, Matrix2, compose, rotation_matrix

__all__ = ["ViewState", "MIN_ZOOM", "MAX_ZOOM", "nice_scale_bar", "region_between", "rect_covers"]

MIN_ZOOM = 1e-3
MAX_ZOOM = 128.0


@dataclass
class ViewState:
    """Mutable view geometry; the widget owns one and asks it for transforms."""

    image_width: float = 1.0  # full-res columns
    image_height: float = 1.0  # full-res rows
    aspect: float = 1.0  # row spacing / column spacing
    viewport_width: float = 1.0  # logical pixels
    viewport_height: float = 1.0
    matrix: Matrix2 = IDENTITY
    zoom: float = 1.0
    pan_x: float = 0.0
    pan_y: float = 0.0
    fit_mode: bool = True

    # ---- configuration -------------------------------------------------------------
    def set_viewport(self, width: float, height: float) -> None:
        """Viewport size in logical pixels; keeps fitting when in fit mode."""
        self.viewport_width, self.viewport_height = max(float(width), 1.0), max(float(height), 1.0)
        if self.fit_mode:
            self.fit()

    def set_image(self, width: float, height: float, aspect: float = 1.0) -> bool:
        """Full-res image size and pixel aspect; returns True when the geometry changed."""
        geometry = (max(float(width), 1.0), max(float(height), 1.0), float(aspect) if aspect > 0 else 1.0)
        changed = geometry != (self.image_width, self.image_height, self.aspect)
        self.image_width, self.image_height, self.aspect = geometry
        if changed and self.fit_mode:
            self.fit()
        return changed

    # ---- transforms ----------------------------------------------------------------
    def linear(self) -> tuple[float, float, float, float]:
        """Row-major ``zoom * M @ S``."""
        a, b, c, d = self.matrix
        z, s = self.zoom, self.aspect
        return (z * a, z * b * s, z * c, z * d * s)

    def affine(self) -> tuple[float, float, float, float, float, float]:
        """``(a, b, c, d, tx, ty)`` with ``screen = [[a, b], [c, d]] @ p + (tx, ty)``."""
        a, b, c, d = self.linear()
        cx, cy = self.image_width / 2.0, self.image_height / 2.0
        tx = self.viewport_width / 2.0 + self.pan_x - (a * cx + b * cy)
        ty = self.viewport_height / 2.0 + self.pan_y - (c * cx + d * cy)
        return (a, b, c, d, tx, ty)

    def to_screen(self, x: float, y: float) -> tuple[float, float]:
        """Full-res image point -> screen (logical pixels)."""
        a, b, c, d, tx, ty = self.affine()
        return (a * x + b * y + tx, c * x + d * y + ty)

    def to_image(self, sx: float, sy: float) -> tuple[float, float]:
        """Screen point (logical pixels) -> full-res image point."""
        a, b, c, d, tx, ty = self.affine()
        det = a * d - b * c
        u, v = sx - tx, sy - ty
        return ((d * u - b * v) / det, (-c * u + a * v) / det)

    def displayed_extent(self, zoom: float | None = None) -> tuple[float, float]:
        """Width and height on screen of the whole image at ``zoom`` (default: current)."""
        a, b, c, d = self.matrix
        z = self.zoom if zoom is None else zoom
        w, h = self.image_width, self.image_height * self.aspect
        return (z * (abs(a) * w + abs(b) * h), z * (abs(c) * w + abs(d) * h))

    # ---- operations ----------------------------------------------------------------
    def fit_zoom(self) -> float:
        """Zoom at which the whole image fits the viewport."""
        w, h = self.displayed_extent(1.0)
        return min(self.viewport_width / w, self.viewport_height / h)

    def fit(self) -> None:
        """Fit the image to the viewport, centred; stays fitted on resize."""
        self.zoom = min(max(self.fit_zoom(), MIN_ZOOM), MAX_ZOOM)
        self.pan_x = self.pan_y = 0.0
        self.fit_mode = True

    def set_zoom(self, zoom: float, anchor: tuple[float, float] | None = None) -> None:
        """Set the zoom, keeping the image point under ``anchor`` (screen) in place."""
        if anchor is None:
            anchor = (self.viewport_width / 2.0, self.viewport_height / 2.0)
        px, py = self.to_image(*anchor)
        self.zoom = min(max(float(zoom), MIN_ZOOM), MAX_ZOOM)
        nx, ny = self.to_screen(px, py)
        self.pan_x += anchor[0] - nx
        self.pan_y += anchor[1] - ny
        self.fit_mode = False

    def zoom_by(self, factor: float, anchor: tuple[float, float] | None = None) -> None:
        """Multiply the zoom by ``factor`` around ``anchor`` (default: viewport centre)."""
        self.set_zoom(self.zoom * factor, anchor)

    def one_to_one(self, device_pixel_ratio: float = 1.0) -> None:
        """One full-res pixel per device pixel, keeping the view centre."""
        self.set_zoom(1.0 / device_pixel_ratio)

    def pan_by(self, dx: float, dy: float) -> None:
        """Move the image by (dx, dy) screen pixels."""
        self.pan_x += dx
        self.pan_y += dy
        self.fit_mode = False

    def _apply(self, m: Matrix2) -> None:
        self.matrix = compose(m, self.matrix)
        a, b, c, d = m
        self.pan_x, self.pan_y = a * self.pan_x + b * self.pan_y, c * self.pan_x + d * self.pan_y
        if self.fit_mode:
            self.fit()

    def rotate(self, quarter_turns: int = 1) -> None:
        """Rotate the view clockwise by ``quarter_turns`` x 90 degrees (negative: counter)."""
        self._apply(rotation_matrix(quarter_turns))

    def flip_horizontal(self) -> None:
        """Mirror left-right as seen on screen."""
        self._apply(FLIP_H)

    def flip_vertical(self) -> None:
        """Mirror top-bottom as seen on screen."""
        self._apply(FLIP_V)

    def restore(self, matrix: Matrix2, zoom: float, pan: tuple[float, float], fit: bool) -> None:
        """Take over saved geometry as it was (rotation/flip, zoom, pan, fit mode)."""
        self.matrix = matrix
        self.zoom = float(zoom)
        self.pan_x, self.pan_y = (float(pan[0]), float(pan[1]))
        self.fit_mode = bool(fit)

    def reset(self) -> None:
        """No rotation or flip, fitted."""
        self.matrix = IDENTITY
        self.fit()

    # ---- derived quantities --------------------------------------------------------
    def screen_pixels_per_mm(self, row_spacing: float, column_spacing: float) -> float:
        """Screen pixels per mm along the screen's horizontal axis."""
        a, b, c, d = self.linear()
        det = a * d - b * c
        # image-space vector that maps to one screen pixel to the right
        vx, vy = d / det, -c / det
        mm = math.hypot(vx * column_spacing, vy * row_spacing)
        return 1.0 / mm if mm > 0 else 0.0

    def useful_reduce(self, device_pixel_ratio: float = 1.0, max_reduce: int = 32) -> int:
        """Largest resolution reduction that still gives every device pixel its own sample.

        E.g. a 4096-pixel image shown 1024 device pixels wide needs ``reduce = 2``.
        """
        density = self.zoom * max(1.0, self.aspect) * device_pixel_ratio
        if density >= 1.0:
            return 0
        return int(min(max(math.floor(math.log2(1.0 / density) + 1e-9), 0), max_reduce))


def nice_scale_bar(pixels_per_mm: float, max_pixels: float) -> tuple[float, float, str] | None:
    """Longest 1/2/5 x 10^k mm bar no longer than ``max_pixels``.

    Returns ``(length_mm, length_px, label)`` (label in mm below 1 cm, else cm), or None.
    """
    if pixels_per_mm <= 0 or max_pixels <= 0:
        return None
    limit_mm = max_pixels / pixels_per_mm
    exponent = math.floor(math.log10(limit_mm))
    best = None
    for k in (exponent - 1, exponent):
        for m in (1, 2, 5):
            length = m * 10.0**k
            if length <= limit_mm * (1 + 1e-9):
                best = length
    if best is None:
        return None
    label = f"{best / 10:g} cm" if best >= 10 else f"{best:g} mm"
    return best, best * pixels_per_mm, label


Rect = tuple[int, int, int, int]  # x, y, w, h in full-res pixels


def region_between(p0: tuple[float, float], p1: tuple[float, float], columns: int, rows: int) -> Rect | None:
    """The integer full-res rectangle spanning image points ``p0``-``p1``, clipped to a
    ``columns`` x ``rows`` image, or None when nothing of it is inside."""
    x0 = max(math.floor(min(p0[0], p1[0])), 0)
    y0 = max(math.floor(min(p0[1], p1[1])), 0)
    x1 = min(math.ceil(max(p0[0], p1[0])), columns)
    y1 = min(math.ceil(max(p0[1], p1[1])), rows)
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1 - x0, y1 - y0)


def rect_covers(outer: Rect | None, inner: Rect | None) -> bool:
    """True when rectangle ``outer`` (x, y, w, h) contains ``inner``."""
    if outer is None or inner is None:
        return False
    ox, oy, ow, oh = outer
    ix, iy, iw, ih = inner
    return ox <= ix and oy <= iy and ix + iw <= ox + ow and iy + ih <= oy + oh
