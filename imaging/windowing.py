"""Window/level: modality LUT, VOI linear window (DICOM PS3.3 C.11.2.1.2), presets.

No Qt. Values flow stored -> modality values (rescale slope/intercept, e.g. HU) ->
window -> uint8 display values; MONOCHROME1 is displayed inverted; RGB passes through.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .model import ImageMeta

__all__ = [
    "WindowPreset",
    "CT_PRESETS",
    "modality_values",
    "apply_window",
    "window_stored",
    "render_display",
    "histogram_window",
    "default_window",
    "initial_window",
    "header_window",
    "presets_for",
    "find_preset",
    "drag_window",
    "window_label",
    "value_range",
    "MIN_WIDTH",
]

MIN_WIDTH = 1.0
"""Smallest window width the linear function allows (PS3.3: width >= 1)."""

_LUT_MAX_ENTRIES = 1 << 20
"""Integer data with a value range up to this size is windowed through a lookup table."""


@dataclass(frozen=True)
class WindowPreset:
    """A named window: ``center`` and ``width`` in modality units (HU for CT)."""

    name: str
    center: float
    width: float


CT_PRESETS: tuple[WindowPreset, ...] = (
    WindowPreset("Brain", 40, 80),
    WindowPreset("Subdural", 75, 215),
    WindowPreset("Soft tissue", 40, 400),
    WindowPreset("Mediastinum", 50, 350),
    WindowPreset("Abdomen", 50, 400),
    WindowPreset("Liver", 30, 150),
    WindowPreset("Lung", -600, 1500),
    WindowPreset("Bone", 400, 1800),
)
"""Usual CT windows (level/width in HU) as radiology viewers ship them."""


def modality_values(stored: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """Modality LUT (linear rescale): ``stored * slope + intercept`` as float32."""
    values = np.asarray(stored, dtype=np.float32)
    if slope != 1.0:
        values = values * np.float32(slope)
    if intercept != 0.0:
        values = values + np.float32(intercept)
    return values


def apply_window(values: np.ndarray, center: float, width: float, invert: bool = False) -> np.ndarray:
    """VOI linear function of DICOM PS3.3 C.11.2.1.2.1, output range 0..255 (uint8).

    ``x <= c - 0.5 - (w-1)/2`` gives 0, ``x > c - 0.5 + (w-1)/2`` gives 255, otherwise
    ``((x - (c - 0.5)) / (w - 1) + 0.5) * 255`` rounded. ``invert`` flips black and white.
    """
    width = max(float(width), MIN_WIDTH)
    x = np.asarray(values, dtype=np.float64)
    lower = center - 0.5 - (width - 1.0) / 2.0
    upper = center - 0.5 + (width - 1.0) / 2.0
    if width == MIN_WIDTH:
        y = np.where(x > upper, 255.0, 0.0)
    else:
        y = ((x - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0
        y = np.where(x <= lower, 0.0, np.where(x > upper, 255.0, y))
    out = np.clip(np.rint(y), 0, 255).astype(np.uint8)
    return 255 - out if invert else out


def window_stored(
    stored: np.ndarray,
    center: float,
    width: float,
    *,
    slope: float = 1.0,
    intercept: float = 0.0,
    invert: bool = False,
) -> np.ndarray:
    """Stored values -> windowed uint8, through a lookup table for integer data.

    Same result as ``apply_window(modality_values(stored, slope, intercept), ...)``, but
    integer arrays with a modest value range only window each distinct value once, which
    keeps interactive window/level dragging cheap on large images.
    """
    stored = np.asarray(stored)
    if stored.size and np.issubdtype(stored.dtype, np.integer):
        lo, hi = int(stored.min()), int(stored.max())
        if hi - lo < _LUT_MAX_ENTRIES:
            domain = np.arange(lo, hi + 1, dtype=np.int64)
            lut = apply_window(modality_values(domain, slope, intercept), center, width, invert)
            return lut[stored.astype(np.int64, copy=False) - lo]
    return apply_window(modality_values(stored, slope, intercept), center, width, invert)


def render_display(
    stored: np.ndarray, meta: ImageMeta, center: float, width: float, invert: bool = False
) -> np.ndarray:
    """Display values for one image: (H, W) uint8 for grayscale, (H, W, 3) uint8 for colour.

    Grayscale is rescaled and windowed; MONOCHROME1 is shown inverted (``invert`` toggles
    on top of that). Colour (an (H, W, 3) array) passes through unwindowed (``invert``
    still negates it).
    """
    if stored.ndim == 3:
        rgb = np.asarray(stored)[..., :3]
        if rgb.dtype != np.uint8:
            rgb = np.clip(rgb, 0, 255).astype(np.uint8)
        return 255 - rgb if invert else rgb
    flip = invert != meta.is_monochrome1
    return window_stored(
        stored, center, width, slope=meta.rescale_slope, intercept=meta.rescale_intercept, invert=flip
    )


def histogram_window(values: np.ndarray, low: float = 1.0, high: float = 99.0) -> tuple[float, float]:
    """Window spanning the ``low``..``high`` percentiles of ``values``: (center, width).

    Large arrays are subsampled (about 256k values) so this stays fast on big images.
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size == 0:
        return 0.0, MIN_WIDTH
    step = max(1, flat.size // 262_144)
    p_low, p_high = np.percentile(flat[::step], [low, high])
    width = max(float(p_high - p_low), MIN_WIDTH)
    return float(p_low + p_high) / 2.0, width


def header_window(center, width) -> tuple[float, float] | None:
    """The (center, width) of a DICOM WindowCenter/WindowWidth pair when usable, else None.

    Multi-valued attributes use their first value; a width of 1 or less (e.g. the
    0/0 some scanners write) or a non-number is unusable."""
    def first(v):
        if v is None or isinstance(v, str) and not v.strip():
            return None
        if isinstance(v, (list, tuple)) or (hasattr(v, "__len__") and not isinstance(v, str)):
            v = v[0] if len(v) else None
        try:
            f = float(v) if v is not None else None
        except (TypeError, ValueError):
            return None
        return f if f is not None and np.isfinite(f) else None

    c, w = first(center), first(width)
    if c is None or w is None or w <= MIN_WIDTH:
        return None
    return c, w


def initial_window(
    center=None,
    width=None,
    values: np.ndarray | None = None,
    *,
    projection: bool = False,
    low: float = 1.0,
    high: float = 99.0,
) -> tuple[float, float] | None:
    """The one rule for the window a view opens with (2D, MPR, MIP, VR, snapshot, render).

    The header's window (``center``/``width`` as in DICOM) when it is usable and overlaps
    the data; otherwise the ``low``..``high`` percentile window of ``values`` (modality
    values; NaNs ignored). A projection (MIP) is not what the header's window was chosen
    for: with ``projection`` the window always comes from the projected ``values``.
    Returns None when nothing can be decided yet (no usable header and no data with a
    spread, e.g. a volume whose voxels have not arrived): ask again when they have.
    """
    head = None if projection else header_window(center, width)
    arr = None
    if values is not None:
        arr = np.asarray(values, dtype=np.float64).ravel()
        step = max(1, arr.size // 262_144)
        arr = arr[::step]
        arr = arr[np.isfinite(arr)]
    if head is not None:
        if arr is None or arr.size == 0:
            return head
        lo, hi = float(arr.min()), float(arr.max())
        c, w = head
        if c + w / 2 >= lo and c - w / 2 <= hi:
            return head
    if arr is None or arr.size == 0 or float(arr.max()) <= float(arr.min()):
        return head
    if projection:
        # a projection's background (air, the empty corners) must not set the floor
        floor = np.percentile(arr, 50.0)
        arr = arr[arr >= floor]
    c, w = histogram_window(arr, low, high)
    return (c, w) if w > MIN_WIDTH else None


def presets_for(modality: str | None) -> tuple[WindowPreset, ...]:
    """Fixed presets that make sense for a modality (CT only: other modalities use the
    DICOM window values or the histogram)."""
    return CT_PRESETS if (modality or "").upper() == "CT" else ()


def find_preset(name: str, modality: str | None = "CT") -> WindowPreset:
    """The preset called ``name`` (case-insensitive); KeyError lists the known names."""
    presets = presets_for(modality) or CT_PRESETS
    for preset in presets:
        if preset.name.lower() == name.lower():
            return preset
    raise KeyError(f"unknown window preset {name!r}; known: {', '.join(p.name for p in presets)}")


def default_window(
    meta: ImageMeta, stored: np.ndarray | None = None, modality: str | None = None
) -> tuple[float, float]:
    """The window to open an image with: (center, width) in modality units, chosen by
    :func:`initial_window` (the header's window when usable, else the percentile window
    of the image's modality values); with neither (no pixels yet, a uniform image) CT
    opens at the soft-tissue preset and other modalities at 128/256."""
    values = None
    if stored is not None and np.asarray(stored).size and np.asarray(stored).ndim == 2:
        values = modality_values(stored, meta.rescale_slope, meta.rescale_intercept)
    chosen = initial_window(meta.window_center, meta.window_width, values)
    if chosen is not None:
        return chosen
    if (modality or meta.modality or "").upper() == "CT":
        preset = find_preset("Soft tissue")
        return preset.center, preset.width
    return 128.0, 256.0


def drag_window(
    center: float, width: float, dx: float, dy: float, value_range: float
) -> tuple[float, float]:
    """New (center, width) after a mouse drag of (dx, dy) screen pixels.

    Dragging right widens the window (less contrast), dragging down raises the center
    (darker image), as in most PACS. The step scales with the data's value range so that
    crossing about 1000 pixels sweeps the whole range.
    """
    step = max(float(value_range) / 1024.0, 0.01)
    return center + dy * step, max(width + dx * step, MIN_WIDTH)


def window_label(center: float, width: float) -> str:
    """Overlay text for a window, e.g. ``"W 400 L 40"``."""
    return f"W {_num(width)} L {_num(center)}"


def _num(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 10 or float(value).is_integer() else f"{value:.2f}"


def value_range(stored: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> float:
    """Span of the modality values of an array (used to scale window dragging)."""
    arr = np.asarray(stored)
    if arr.size == 0:
        return 0.0
    return float(abs(slope) * (float(arr.max()) - float(arr.min())))

