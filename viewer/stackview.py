"""StackView: one image of a series, drawn progressively, with the usual radiology tools.

The widget never decodes or reads files: the owner gives it a :class:`SeriesInfo` and,
as increments arrive, :class:`DecodedImage` arrays with their :class:`ImageMeta`. Every
array is drawn into the image's *full-resolution* rectangle, so a low-resolution preview
is shown upscaled at exactly the place the full image will take (no geometry jump), and
a region-at-full-resolution patch is drawn over the base image at its place.

The logic lives in Qt-free modules (windowing, orientation, viewstate, measure, overlay);
this class builds the picture and turns input events into state changes and signals.

Mouse: left button = the current :class:`MouseMode` (window/level by default), middle =
pan, right = zoom, wheel = previous/next slice, Ctrl+wheel = zoom, double click = fit.
Keys: arrows / Page Up / Page Down / Home / End = slices, I invert, R / Shift+R rotate,
H / V flip, F fit, 1 one-to-one, 0 reset view, Delete remove last measurement, Esc cancel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np
from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtGui import (
    QColor,
    QFont,
    QFontMetricsF,
    QImage,
    QKeyEvent,
    QMouseEvent,
    QPainter,
    QPaintEvent,
    QPen,
    QResizeEvent,
    QTransform,
    QWheelEvent,
)
from PySide6.QtWidgets import QSizePolicy, QWidget

from imaging import windowing
from imaging.measure import Measurement, MeasureKind, measurement_label, value_at
from imaging.model import DecodedImage, ImageMeta, SeriesInfo
from imaging.orientation import EdgeLabels, Matrix2, edge_labels
from imaging.overlay import Corners, corner_lines
from imaging.viewstate import ViewState, nice_scale_bar

__all__ = ["MouseMode", "ViewSnapshot", "StackView", "numpy_to_qimage", "VIEW_SHORTCUTS"]

_WHEEL_STEP = 120  # angleDelta units per wheel notch
_DRAG_ZOOM_RATE = 0.01  # zoom factor exp(rate) per pixel of vertical right-drag
_WHEEL_ZOOM = 1.15
_MIN_SHAPE_PX = 3.0  # shorter drags do not create measurements or regions

_TEXT = QColor(235, 235, 235)
_SHADOW = QColor(0, 0, 0)
_MEASURE = QColor(255, 215, 0)
_REGION = QColor(0, 200, 255)


class MouseMode(str, Enum):
    """What the left mouse button does."""

    WINDOW = "window"
    PAN = "pan"
    ZOOM = "zoom"
    DISTANCE = "distance"
    RECT_ROI = "rect"
    ELLIPSE_ROI = "ellipse"
    REGION = "region"  # select a rectangle to fetch at full resolution


VIEW_SHORTCUTS: tuple[tuple[str, str], ...] = (
    ("Wheel, ↑ ↓ ← →", "Previous / next slice"),
    ("Page Up / Page Down", "Move a tenth of the series"),
    ("Home / End", "First / last slice"),
    ("Left drag", "Current tool (window/level by default)"),
    ("Middle drag", "Pan"),
    ("Right drag, Ctrl+wheel", "Zoom"),
    ("Double click", "Fit to window"),
    ("Delete", "Remove the last measurement on this slice"),
    ("Esc", "Abandon the shape being drawn"),
)
"""Bindings the stack view handles itself (listed in Help → Keyboard shortcuts)."""


_MEASURE_KINDS = {
    MouseMode.DISTANCE: MeasureKind.DISTANCE,
    MouseMode.RECT_ROI: MeasureKind.RECT,
    MouseMode.ELLIPSE_ROI: MeasureKind.ELLIPSE,
}


@dataclass(frozen=True)
class ViewSnapshot:
    """What :attr:`StackView.viewStateChanged` carries."""

    center: float | None
    width: float | None
    invert: bool
    zoom: float
    pan: tuple[float, float]
    matrix: Matrix2
    fit: bool


def numpy_to_qimage(array: np.ndarray) -> tuple[QImage, np.ndarray]:
    """Wrap a (H, W) or (H, W, 3) uint8 array as a QImage without copying.

    Returns the image and the contiguous array it points into: keep both alive together.
    """
    array = np.ascontiguousarray(array, dtype=np.uint8)
    h, w = array.shape[:2]
    if array.ndim == 2:
        image = QImage(array.data, w, h, w, QImage.Format.Format_Grayscale8)
    else:
        image = QImage(array.data, w, h, 3 * w, QImage.Format.Format_RGB888)
    return image, array


@dataclass
class _Rendered:
    """A windowed QImage cached for one decoded array and one window."""

    source: DecodedImage
    key: tuple
    image: QImage
    array: np.ndarray  # the QImage's buffer


@dataclass
class _Drag:
    action: MouseMode
    button: Qt.MouseButton
    start: QPointF
    last: QPointF
    image_start: tuple[float, float]
    image_end: tuple[float, float]


class StackView(QWidget):
    """Progressive single-image view of a series (see the module docstring)."""

    sliceRequested = Signal(int)
    """The user asked for another slice (index in the series); the owner loads it."""
    regionRequested = Signal(int, int, int, int)
    """x, y, w, h in full-res pixels: fetch this region at full resolution and quality."""
    displayedSizeChanged = Signal(int, int)
    """Viewport size in device pixels (never fetch more resolution than this shows)."""
    viewStateChanged = Signal(object)
    """A :class:`ViewSnapshot` after any window, zoom, pan, rotation or flip change."""
    measurementAdded = Signal(object)
    """A :class:`imaging.measure.Measurement` the user just drew."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setAttribute(Qt.WidgetAttribute.WA_OpaquePaintEvent)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.setMouseTracking(True)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setMinimumSize(64, 64)
        self._series: SeriesInfo | None = None
        self._meta: ImageMeta | None = None
        self._base: DecodedImage | None = None
        self._patches: list[DecodedImage] = []
        self._rendered: dict[int, _Rendered] = {}
        self._window: tuple[float, float] | None = None
        self._value_range = 0.0
        self._invert = False
        self._view = ViewState()
        self._mode = MouseMode.WINDOW
        self._drag: _Drag | None = None
        self._wheel_accumulator = 0
        self._target_index: int | None = None
        self._measurements: dict[int, list[Measurement]] = {}
        self._pending_region: tuple[int, int, int, int] | None = None
        self._cursor: tuple[float, float] | None = None
        self._overlays = True
        self._smooth = True
        font = QFont(self.font())
        font.setPointSizeF(9.0)
        self._overlay_font = font

    # ------------------------------------------------------------------ data in
    def set_series(self, series: SeriesInfo | None) -> None:
        """Show another series: drops the image, measurements, window and view changes."""
        self._series = series
        self._meta = None
        self._base = None
        self._patches = []
        self._rendered.clear()
        self._window = None
        self._invert = False
        self._measurements.clear()
        self._pending_region = None
        self._target_index = None
        self._drag = None
        self._view.reset()
        self.update()

    def set_image(self, decoded: DecodedImage, meta: ImageMeta) -> bool:
        """Display a (partial) decode of one image; returns False if it was not accepted.

        A region patch (``decoded.region``) is drawn over the base image of the same
        slice; any other array becomes the base image. An image that does not belong to
        the current series is refused, so a late result of an old series never shows.
        """
        if decoded.index != meta.index:
            raise ValueError(f"decoded index {decoded.index} != meta index {meta.index}")
        if not self._belongs_to_series(meta):
            return False
        slice_changed = self._meta is None or self._meta.index != meta.index
        self._meta = meta
        if slice_changed:
            self._patches = []
            self._pending_region = None
            if self._base is not None and self._base.index != meta.index:
                self._base = None  # never draw one slice's data under another's metadata
        if decoded.is_region:
            self._patches = [p for p in self._patches if not _covers(decoded.region, p.region)]
            self._patches.append(decoded)
            if self._pending_region and _covers(decoded.region, self._pending_region):
                self._pending_region = None
        else:
            if self._base is None or self._base is not decoded:
                self._value_range = windowing.value_range(decoded.pixels, meta.rescale_slope)
            self._base = decoded
        if self._target_index is None:
            self._target_index = meta.index
        spacing = meta.pixel_spacing
        aspect = spacing[0] / spacing[1] if spacing and spacing[1] > 0 else 1.0
        self._sync_viewport()
        self._view.set_image(meta.columns, meta.rows, aspect)
        if self._window is None and not meta.is_color and not decoded.is_region:
            modality = self._series.modality if self._series else None
            self._window = windowing.default_window(meta, decoded.pixels, modality)
        live = {id(d) for d in self._sources()}
        self._rendered = {k: v for k, v in self._rendered.items() if k in live}
        self.update()
        return True

    def clear_image(self) -> None:
        """Forget the displayed image (keeps series, window and view)."""
        self._base = None
        self._meta = None
        self._patches = []
        self._rendered.clear()
        self.update()

    def clear_region_patches(self) -> None:
        """Drop the region-at-full-resolution patches of the shown slice."""
        self._patches = []
        self._pending_region = None
        self.update()

    def _belongs_to_series(self, meta: ImageMeta) -> bool:
        if self._series is None or not self._series.images:
            return True
        if not 0 <= meta.index < len(self._series.images):
            return False
        listed = self._series.images[meta.index]
        return (listed.sop_instance_uid, listed.frame) == (meta.sop_instance_uid, meta.frame)

    def _sources(self) -> list[DecodedImage]:
        patches = [p for p in self._patches if self._meta is not None and p.index == self._meta.index]
        return ([self._base] if self._base is not None else []) + patches

    # ------------------------------------------------------------------ accessors
    def series(self) -> SeriesInfo | None:
        return self._series

    def meta(self) -> ImageMeta | None:
        """Metadata of the displayed image."""
        return self._meta

    def decoded(self) -> DecodedImage | None:
        """The displayed base image."""
        return self._base

    def patches(self) -> list[DecodedImage]:
        """Region patches drawn over the displayed image."""
        return list(self._patches)

    def current_index(self) -> int | None:
        """Index of the displayed image in the series."""
        return self._meta.index if self._meta is not None else None

    def target_index(self) -> int | None:
        """The slice last requested (what the user scrolled to), or the displayed one."""
        return self._target_index

    def slice_count(self) -> int:
        return len(self._series.images) if self._series is not None else 0

    def view_state(self) -> ViewState:
        """The geometry model (read it; change it through the widget's methods)."""
        self._sync_viewport()
        return self._view

    def snapshot(self) -> ViewSnapshot:
        v = self._view
        c, w = self._window if self._window else (None, None)
        return ViewSnapshot(c, w, self._invert, v.zoom, (v.pan_x, v.pan_y), v.matrix, v.fit_mode)

    # ------------------------------------------------------------------ slices
    def request_slice(self, index: int) -> None:
        """Ask for slice ``index`` (clamped to the series); emits :attr:`sliceRequested`."""
        count = self.slice_count()
        if count == 0:
            return
        index = min(max(int(index), 0), count - 1)
        if index == self._target_index:
            return
        self._target_index = index
        self.sliceRequested.emit(index)

    def step_slice(self, delta: int) -> None:
        """Move ``delta`` slices from the last requested one."""
        start = self._target_index if self._target_index is not None else (self.current_index() or 0)
        self.request_slice(start + delta)

    def page_size(self) -> int:
        """Slices per Page Up/Down: a tenth of the series, at least one."""
        return max(1, round(self.slice_count() / 10))

    # ------------------------------------------------------------------ window
    def window(self) -> tuple[float, float] | None:
        """(center, width) in modality units, None before the first image."""
        return self._window

    def set_window(self, center: float, width: float) -> None:
        self._window = (float(center), max(float(width), windowing.MIN_WIDTH))
        self._view_changed()

    def presets(self) -> tuple[windowing.WindowPreset, ...]:
        """Fixed presets for the series modality (CT)."""
        return windowing.presets_for(self._series.modality if self._series else None)

    def apply_preset(self, name: str) -> None:
        """Apply a named preset (see :data:`imaging.windowing.CT_PRESETS`)."""
        preset = windowing.find_preset(name, self._series.modality if self._series else "CT")
        self.set_window(preset.center, preset.width)

    def reset_window(self) -> None:
        """Back to the DICOM window (or the soft-tissue preset / histogram window)."""
        if self._meta is None or self._base is None:
            self._window = None
            return
        modality = self._series.modality if self._series else None
        self.set_window(*windowing.default_window(self._meta, self._base.pixels, modality))

    def set_invert(self, invert: bool) -> None:
        self._invert = bool(invert)
        self._view_changed()

    def toggle_invert(self) -> None:
        self.set_invert(not self._invert)

    def is_inverted(self) -> bool:
        return self._invert

    # ------------------------------------------------------------------ geometry
    def fit(self) -> None:
        self._sync_viewport()
        self._view.fit()
        self._view_changed()

    def one_to_one(self) -> None:
        """One full-res pixel per device pixel."""
        self._sync_viewport()
        self._view.one_to_one(self.devicePixelRatioF())
        self._view_changed()

    def zoom_by(self, factor: float, anchor: QPointF | None = None) -> None:
        self._sync_viewport()
        self._view.zoom_by(factor, (anchor.x(), anchor.y()) if anchor is not None else None)
        self._view_changed()

    def display_zoom(self) -> float:
        """Zoom as device pixels per full-res pixel (1.0 = 1:1)."""
        self._sync_viewport()
        return self._view.zoom * self.devicePixelRatioF()

    def rotate(self, quarter_turns: int = 1) -> None:
        """Rotate clockwise by ``quarter_turns`` x 90 degrees (negative: counter-clockwise)."""
        self._sync_viewport()
        self._view.rotate(quarter_turns)
        self._view_changed()

    def flip_horizontal(self) -> None:
        self._sync_viewport()
        self._view.flip_horizontal()
        self._view_changed()

    def flip_vertical(self) -> None:
        self._sync_viewport()
        self._view.flip_vertical()
        self._view_changed()

    def restore(self, snap: ViewSnapshot) -> None:
        """Take over a :meth:`snapshot` (window, invert, zoom, pan, rotation/flip), e.g.
        after the same series was reopened in another version."""
        if snap.center is not None and snap.width is not None:
            self._window = (float(snap.center), max(float(snap.width), windowing.MIN_WIDTH))
        self._invert = bool(snap.invert)
        v = self._view
        v.matrix = snap.matrix
        v.zoom = float(snap.zoom)
        v.pan_x, v.pan_y = (float(snap.pan[0]), float(snap.pan[1]))
        v.fit_mode = bool(snap.fit)
        self._view_changed()

    def reset_view(self) -> None:
        """No rotation/flip/invert, fitted, default window."""
        self._invert = False
        self._view.reset()
        self.reset_window()
        self._view_changed()

    def image_to_widget(self, x: float, y: float) -> QPointF:
        """Full-res image point -> widget coordinates (logical pixels)."""
        self._sync_viewport()
        return QPointF(*self._view.to_screen(x, y))

    def widget_to_image(self, point: QPointF) -> tuple[float, float]:
        """Widget point -> full-res image coordinates."""
        self._sync_viewport()
        return self._view.to_image(point.x(), point.y())

    def useful_reduce(self, max_reduce: int = 32) -> int:
        """Coarsest resolution reduction that still fills every device pixel at this zoom."""
        self._sync_viewport()
        return self._view.useful_reduce(self.devicePixelRatioF(), max_reduce)

    def _sync_viewport(self) -> None:
        size = (float(self.width()), float(self.height()))
        if (self._view.viewport_width, self._view.viewport_height) != size:
            self._view.set_viewport(*size)

    def _view_changed(self) -> None:
        self.update()
        self.viewStateChanged.emit(self.snapshot())

    # ------------------------------------------------------------------ tools
    def set_mouse_mode(self, mode: MouseMode | str) -> None:
        """Choose what the left button does."""
        self._mode = MouseMode(mode)
        self._drag = None
        drawing = self._mode in (*_MEASURE_KINDS, MouseMode.REGION)
        self.setCursor(Qt.CursorShape.CrossCursor if drawing else Qt.CursorShape.ArrowCursor)
        self.update()

    def mouse_mode(self) -> MouseMode:
        return self._mode

    def measurements(self, index: int | None = None) -> list[Measurement]:
        """Measurements on slice ``index`` (default: the shown one)."""
        index = self.current_index() if index is None else index
        return list(self._measurements.get(index, [])) if index is not None else []

    def add_measurement(self, measurement: Measurement) -> None:
        self._measurements.setdefault(measurement.index, []).append(measurement)
        self.measurementAdded.emit(measurement)
        self.update()

    def measurement_text(self, measurement: Measurement) -> list[str]:
        """The value lines drawn next to a measurement (mm, mm², mean/SD)."""
        if self._meta is None:
            return []
        modality = self._series.modality if self._series else None
        return measurement_label(measurement, self._sources(), self._meta, modality)

    def remove_last_measurement(self) -> None:
        items = self._measurements.get(self.current_index(), [])
        if items:
            items.pop()
            self.update()

    def clear_measurements(self) -> None:
        self._measurements.clear()
        self.update()

    def request_region(self, x: int, y: int, w: int, h: int) -> None:
        """Mark and emit a region-at-full-resolution request (full-res pixels)."""
        self._pending_region = (x, y, w, h)
        self.update()
        self.regionRequested.emit(x, y, w, h)

    # ------------------------------------------------------------------ overlays
    def set_overlays_visible(self, visible: bool) -> None:
        self._overlays = bool(visible)
        self.update()

    def overlays_visible(self) -> bool:
        return self._overlays

    def set_smooth(self, smooth: bool) -> None:
        """Bilinear interpolation when scaling (default on)."""
        self._smooth = bool(smooth)
        self.update()

    def cursor_value(self):
        """(x, y, PixelValue | None) under the mouse, or None when the mouse is away."""
        if self._cursor is None or self._meta is None:
            return None
        x, y = self._cursor
        modality = self._series.modality if self._series else None
        for source in reversed(self._sources()):  # patches (finest) first
            value = value_at(source, self._meta, x, y, modality)
            if value is not None:
                return (x, y, value)
        return (x, y, None)

    def overlay_corners(self) -> Corners:
        """The corner texts for the current state."""
        return corner_lines(
            self._series,
            self._meta,
            self._base,
            window=self._window,
            zoom=self.display_zoom() if self._meta is not None else None,
            patches=[p for p in self._sources() if p.is_region],
            cursor=self.cursor_value(),
        )

    def orientation_labels(self) -> EdgeLabels | None:
        if self._meta is None:
            return None
        return edge_labels(self._meta.image_orientation, self._view.matrix)

    def overlay_text(self) -> str:
        """All overlay text (corners and orientation labels), one item per line."""
        lines = self.overlay_corners().all_lines()
        labels = self.orientation_labels()
        if labels is not None:
            lines += [labels.top, labels.bottom, labels.left, labels.right]
        return "\n".join(lines)

    # ------------------------------------------------------------------ painting
    def _display_image(self, source: DecodedImage) -> QImage:
        """The windowed QImage of ``source``, recomputed only when it or the window changed."""
        assert self._meta is not None
        window = self._window or (128.0, 256.0)
        key = (window, self._invert, self._meta.photometric)
        cached = self._rendered.get(id(source))
        if cached is not None and cached.source is source and cached.key == key:
            return cached.image
        display = windowing.render_display(source.pixels, self._meta, window[0], window[1], self._invert)
        image, array = numpy_to_qimage(display)
        self._rendered[id(source)] = _Rendered(source, key, image, array)
        return image

    def _image_transform(self) -> QTransform:
        a, b, c, d, tx, ty = self._view.affine()
        return QTransform(a, c, b, d, tx, ty)

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 (Qt API)
        self._sync_viewport()
        painter = QPainter(self)
        painter.fillRect(self.rect(), Qt.GlobalColor.black)
        if self._meta is not None and self._sources():
            self._paint_image(painter)
            self._paint_measurements(painter)
        self._paint_drag(painter)
        if self._overlays:
            self._paint_overlays(painter)
        painter.end()

    def _paint_image(self, painter: QPainter) -> None:
        meta = self._meta
        assert meta is not None
        painter.save()
        painter.setTransform(self._image_transform())
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, self._smooth)
        painter.setClipRect(QRectF(0, 0, meta.columns, meta.rows))
        for source in self._sources():
            grid = source.grid(meta)
            target = QRectF(grid.x0, grid.y0, source.width * grid.sx, source.height * grid.sy)
            painter.drawImage(target, self._display_image(source), QRectF(0, 0, source.width, source.height))
        painter.restore()

    def _cosmetic_pen(self, color: QColor, width: float = 1.5, style=Qt.PenStyle.SolidLine) -> QPen:
        pen = QPen(color, width, style)
        pen.setCosmetic(True)
        return pen

    def _paint_shape(self, painter: QPainter, kind: MeasureKind, p0, p1, color: QColor, dashed=False) -> None:
        painter.save()
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, True)
        painter.setTransform(self._image_transform())
        style = Qt.PenStyle.DashLine if dashed else Qt.PenStyle.SolidLine
        painter.setPen(self._cosmetic_pen(color, 1.5, style))
        painter.setBrush(Qt.BrushStyle.NoBrush)
        if kind is MeasureKind.DISTANCE:
            painter.drawLine(QPointF(*p0), QPointF(*p1))
        else:
            rect = QRectF(QPointF(*p0), QPointF(*p1)).normalized()
            if kind is MeasureKind.ELLIPSE:
                painter.drawEllipse(rect)
            else:
                painter.drawRect(rect)
        painter.restore()

    def measurement_label_rect(self, m) -> QRectF:
        """Where a measurement's text goes (widget coordinates): right of the shape, or
        left of it when that would leave the view, always inside the view."""
        metrics = QFontMetricsF(self._overlay_font)
        lines = self.measurement_text(m)
        w = max((metrics.horizontalAdvance(t) for t in lines), default=0.0) + 1
        h = metrics.lineSpacing() * len(lines) + 1
        a, b = self.image_to_widget(*m.p0), self.image_to_widget(*m.p1)
        x = max(a.x(), b.x()) + 6
        if x + w > self.width():
            x = min(a.x(), b.x()) - 6 - w              # the other side of the shape
        x = min(max(x, 2.0), max(self.width() - w - 2, 2.0))
        y = min(max(min(a.y(), b.y()), 2.0), max(self.height() - h - 2, 2.0))
        return QRectF(x, y, w, h)

    def _paint_measurements(self, painter: QPainter) -> None:
        for m in self.measurements():
            self._paint_shape(painter, m.kind, m.p0, m.p1, _MEASURE)
            box = self.measurement_label_rect(m)
            self._draw_lines(painter, box.topLeft(), self.measurement_text(m), _MEASURE)
        if self._pending_region is not None:
            x, y, w, h = self._pending_region
            self._paint_shape(painter, MeasureKind.RECT, (x, y), (x + w, y + h), _REGION, dashed=True)

    def _paint_drag(self, painter: QPainter) -> None:
        drag = self._drag
        if drag is None:
            return
        if drag.action in _MEASURE_KINDS:
            self._paint_shape(painter, _MEASURE_KINDS[drag.action], drag.image_start, drag.image_end, _MEASURE)
        elif drag.action is MouseMode.REGION:
            self._paint_shape(painter, MeasureKind.RECT, drag.image_start, drag.image_end, _REGION, dashed=True)

    def _draw_lines(self, painter: QPainter, top_left: QPointF, lines: list[str], color: QColor = _TEXT,
                    align_right: bool = False) -> None:
        """Text lines with a dark shadow, from ``top_left`` downwards (or right-aligned)."""
        painter.save()
        painter.setFont(self._overlay_font)
        metrics = QFontMetricsF(self._overlay_font)
        y = top_left.y() + metrics.ascent()
        for line in lines:
            x = top_left.x() - metrics.horizontalAdvance(line) if align_right else top_left.x()
            painter.setPen(_SHADOW)
            painter.drawText(QPointF(x + 1, y + 1), line)
            painter.setPen(color)
            painter.drawText(QPointF(x, y), line)
            y += metrics.lineSpacing()
        painter.restore()

    def _paint_overlays(self, painter: QPainter) -> None:
        metrics = QFontMetricsF(self._overlay_font)
        line_h = metrics.lineSpacing()
        margin = 6.0
        w, h = float(self.width()), float(self.height())
        corners = self.overlay_corners()
        self._draw_lines(painter, QPointF(margin, margin), corners.top_left)
        self._draw_lines(painter, QPointF(w - margin, margin), corners.top_right, align_right=True)
        bl, br = corners.bottom_left, corners.bottom_right
        self._draw_lines(painter, QPointF(margin, h - margin - line_h * len(bl)), bl)
        self._draw_lines(painter, QPointF(w - margin, h - margin - line_h * len(br)), br, align_right=True)
        labels = self.orientation_labels()
        if labels is not None:
            top_x = (w - metrics.horizontalAdvance(labels.top)) / 2
            bottom_x = (w - metrics.horizontalAdvance(labels.bottom)) / 2
            self._draw_lines(painter, QPointF(top_x, margin), [labels.top])
            self._draw_lines(painter, QPointF(bottom_x, h - margin - line_h), [labels.bottom])
            self._draw_lines(painter, QPointF(margin, (h - line_h) / 2), [labels.left])
            self._draw_lines(painter, QPointF(w - margin, (h - line_h) / 2), [labels.right], align_right=True)
        self._paint_scale_bar(painter, margin + 1.5 * line_h)

    def _paint_scale_bar(self, painter: QPainter, bottom_gap: float) -> None:
        meta = self._meta
        if meta is None or not meta.mm_spacing:
            return
        px_per_mm = self._view.screen_pixels_per_mm(*meta.pixel_spacing)
        bar = nice_scale_bar(px_per_mm, self.width() / 4.0)
        if bar is None or bar[1] < 10:
            return
        _, length, label = bar
        x0 = (self.width() - length) / 2.0
        y = self.height() - bottom_gap - 4.0
        painter.save()
        for color, offset in ((_SHADOW, 1.0), (_TEXT, 0.0)):
            painter.setPen(QPen(color, 1.0))
            painter.drawLine(QPointF(x0 + offset, y + offset), QPointF(x0 + length + offset, y + offset))
            for x in (x0, x0 + length):
                painter.drawLine(QPointF(x + offset, y - 4 + offset), QPointF(x + offset, y + offset))
        painter.restore()
        metrics = QFontMetricsF(self._overlay_font)
        text_x = (self.width() - metrics.horizontalAdvance(label)) / 2.0
        self._draw_lines(painter, QPointF(text_x, y - 4 - metrics.lineSpacing()), [label])

    # ------------------------------------------------------------------ events
    def resizeEvent(self, event: QResizeEvent) -> None:  # noqa: N802
        super().resizeEvent(event)
        self._sync_viewport()
        ratio = self.devicePixelRatioF()
        self.displayedSizeChanged.emit(round(self.width() * ratio), round(self.height() * ratio))

    def _action_for(self, button: Qt.MouseButton) -> MouseMode | None:
        if button == Qt.MouseButton.LeftButton:
            return self._mode
        if button == Qt.MouseButton.MiddleButton:
            return MouseMode.PAN
        if button == Qt.MouseButton.RightButton:
            return MouseMode.ZOOM
        return None

    def mousePressEvent(self, event: QMouseEvent) -> None:  # noqa: N802
        action = self._action_for(event.button())
        if action is None or self._drag is not None:
            return super().mousePressEvent(event)
        pos = event.position()
        start = self.widget_to_image(pos)
        self._drag = _Drag(action, event.button(), pos, pos, start, start)
        event.accept()

    def mouseMoveEvent(self, event: QMouseEvent) -> None:  # noqa: N802
        pos = event.position()
        self._cursor = self.widget_to_image(pos)
        drag = self._drag
        if drag is None:
            self.update()
            return
        dx, dy = pos.x() - drag.last.x(), pos.y() - drag.last.y()
        drag.last = pos
        if drag.action is MouseMode.WINDOW:
            if self._window is not None:
                self._window = windowing.drag_window(*self._window, dx, dy, self._value_range)
                self._view_changed()
        elif drag.action is MouseMode.PAN:
            self._view.pan_by(dx, dy)
            self._view_changed()
        elif drag.action is MouseMode.ZOOM:
            self._view.zoom_by(math.exp(-dy * _DRAG_ZOOM_RATE), (drag.start.x(), drag.start.y()))
            self._view_changed()
        else:
            drag.image_end = self._cursor
            self.update()

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:  # noqa: N802
        drag = self._drag
        if drag is None or event.button() != drag.button:
            return super().mouseReleaseEvent(event)
        self._drag = None
        pos = event.position()
        drag.image_end = self.widget_to_image(pos)
        long_enough = math.hypot(pos.x() - drag.start.x(), pos.y() - drag.start.y()) >= _MIN_SHAPE_PX
        if drag.action in _MEASURE_KINDS and long_enough and self._meta is not None:
            self.add_measurement(
                Measurement(_MEASURE_KINDS[drag.action], drag.image_start, drag.image_end, self._meta.index)
            )
        elif drag.action is MouseMode.REGION and long_enough:
            region = self._region_from(drag.image_start, drag.image_end)
            if region is not None:
                self.request_region(*region)
        self.update()
        event.accept()

    def _region_from(self, p0, p1) -> tuple[int, int, int, int] | None:
        """Integer full-res rectangle spanning p0-p1, clipped to the image."""
        if self._meta is None:
            return None
        x0 = max(math.floor(min(p0[0], p1[0])), 0)
        y0 = max(math.floor(min(p0[1], p1[1])), 0)
        x1 = min(math.ceil(max(p0[0], p1[0])), self._meta.columns)
        y1 = min(math.ceil(max(p0[1], p1[1])), self._meta.rows)
        if x1 <= x0 or y1 <= y0:
            return None
        return (x0, y0, x1 - x0, y1 - y0)

    def mouseDoubleClickEvent(self, event: QMouseEvent) -> None:  # noqa: N802
        navigating = self._mode in (MouseMode.WINDOW, MouseMode.PAN, MouseMode.ZOOM)
        if event.button() == Qt.MouseButton.LeftButton and navigating:
            self.fit()
        else:
            super().mouseDoubleClickEvent(event)

    def leaveEvent(self, event) -> None:  # noqa: N802
        self._cursor = None
        self.update()
        super().leaveEvent(event)

    def wheelEvent(self, event: QWheelEvent) -> None:  # noqa: N802
        delta = event.angleDelta().y()
        if event.modifiers() & Qt.KeyboardModifier.ControlModifier:
            if delta:
                self.zoom_by(_WHEEL_ZOOM ** (delta / _WHEEL_STEP), event.position())
            event.accept()
            return
        self._wheel_accumulator += delta
        steps = int(self._wheel_accumulator / _WHEEL_STEP)
        if steps:
            self._wheel_accumulator -= steps * _WHEEL_STEP
            self.step_slice(-steps)  # wheel towards the user (negative delta) = next slice
        event.accept()

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802
        key = event.key()
        shift = bool(event.modifiers() & Qt.KeyboardModifier.ShiftModifier)
        K = Qt.Key
        slice_keys = {
            K.Key_Down: 1, K.Key_Right: 1, K.Key_Up: -1, K.Key_Left: -1,
            K.Key_PageDown: self.page_size(), K.Key_PageUp: -self.page_size(),
        }
        if key in slice_keys:
            self.step_slice(slice_keys[key])
        elif key == K.Key_Home:
            self.request_slice(0)
        elif key == K.Key_End:
            self.request_slice(self.slice_count() - 1)
        elif key == K.Key_I:
            self.toggle_invert()
        elif key == K.Key_R:
            self.rotate(-1 if shift else 1)
        elif key == K.Key_H:
            self.flip_horizontal()
        elif key == K.Key_V:
            self.flip_vertical()
        elif key == K.Key_F:
            self.fit()
        elif key == K.Key_1:
            self.one_to_one()
        elif key == K.Key_0:
            self.reset_view()
        elif key in (K.Key_Delete, K.Key_Backspace):
            self.remove_last_measurement()
        elif key == K.Key_Escape and self._drag is not None:
            self._drag = None
            self.update()
        else:
            super().keyPressEvent(event)
            return
        event.accept()


def _covers(outer: tuple[int, int, int, int] | None, inner: tuple[int, int, int, int] | None) -> bool:
    """True when rectangle ``outer`` (x, y, w, h) contains ``inner``."""
    if outer is None or inner is None:
        return False
    ox, oy, ow, oh = outer
    ix, iy, iw, ih = inner
    return ox <= ix and oy <= iy and ix + iw <= ox + ow and iy + ih <= oy + oh
