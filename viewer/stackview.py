"""StackView: one image of a series, drawn progressively, with the usual radiology tools.

The widget never decodes or reads files: the owner gives it a :class:`SeriesInfo` and,
as increments arrive, :class:`DecodedImage` arrays with their :class:`ImageMeta`. Every
array is drawn into the image's *full-resolution* rectangle, so a low-resolution preview
is shown upscaled at exactly the place the full image will take (no geometry jump), and
a region-at-full-resolution patch is drawn over the base image at its place.

The view holds the state (series, image, window, geometry, measurements) and emits the
signals; the rest lives beside it, as napari and Cornerstone3D separate a canvas from its
tools: the maths in Qt-free modules (windowing, orientation, viewstate, measure,
overlay), the mouse, wheel and key tools in :mod:`viewer.stacktools` (which lists the
bindings), the painting in :mod:`viewer.stackpaint`.
"""

from __future__ import annotations

from dataclasses import dataclass

from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QKeyEvent, QMouseEvent, QPainter, QPaintEvent, QResizeEvent, QWheelEvent
from PySide6.QtWidgets import QSizePolicy, QWidget

from imaging import windowing
from imaging.measure import Measurement, measurement_label, value_under
from imaging.model import DecodedImage, ImageMeta, SeriesInfo
from imaging.orientation import EdgeLabels, Matrix2, edge_labels
from imaging.overlay import Corners, corner_lines
from imaging.viewstate import ViewState, rect_covers

from .stackpaint import StackPainter, numpy_to_qimage
from .stacktools import VIEW_SHORTCUTS, MouseMode, StackInput

__all__ = ["MouseMode", "ViewSnapshot", "StackView", "numpy_to_qimage", "VIEW_SHORTCUTS"]


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
        self._window: tuple[float, float] | None = None
        self._value_range = 0.0
        self._invert = False
        self._view = ViewState()
        self._target_index: int | None = None
        self._measurements: dict[int, list[Measurement]] = {}
        self._pending_region: tuple[int, int, int, int] | None = None
        self._input = StackInput(self)
        self._painter = StackPainter(self)

    # ------------------------------------------------------------------ data in
    def set_series(self, series: SeriesInfo | None) -> None:
        """Show another series: drops the image, measurements, window and view changes."""
        self._series = series
        self._meta = None
        self._base = None
        self._patches = []
        self._painter.forget()
        self._window = None
        self._invert = False
        self._measurements.clear()
        self._pending_region = None
        self._target_index = None
        self._input.cancel()
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
        if self._series is not None and not self._series.lists(meta):
            return False
        slice_changed = self._meta is None or self._meta.index != meta.index
        self._meta = meta
        if slice_changed:
            self._patches = []
            self._pending_region = None
            if self._base is not None and self._base.index != meta.index:
                self._base = None  # never draw one slice's data under another's metadata
        if decoded.is_region:
            self._patches = [p for p in self._patches if not rect_covers(decoded.region, p.region)]
            self._patches.append(decoded)
            if self._pending_region and rect_covers(decoded.region, self._pending_region):
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
            self._window = windowing.default_window(meta, decoded.pixels, self._modality())
        self._painter.forget(keep=self.sources())
        self.update()
        return True

    def clear_image(self) -> None:
        """Forget the displayed image (keeps series, window and view)."""
        self._base = None
        self._meta = None
        self._patches = []
        self._painter.forget()
        self.update()

    def clear_region_patches(self) -> None:
        """Drop the region-at-full-resolution patches of the shown slice."""
        self._patches = []
        self._pending_region = None
        self.update()

    def _modality(self) -> str | None:
        return self._series.modality if self._series else None

    def sources(self) -> list[DecodedImage]:
        """What is drawn, bottom up: the base image, then the region patches of its slice."""
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
        return windowing.presets_for(self._modality())

    def apply_preset(self, name: str) -> None:
        """Apply a named preset (see :data:`imaging.windowing.CT_PRESETS`)."""
        preset = windowing.find_preset(name, self._series.modality if self._series else "CT")
        self.set_window(preset.center, preset.width)

    def reset_window(self) -> None:
        """Back to the DICOM window (or the soft-tissue preset / histogram window)."""
        if self._meta is None or self._base is None:
            self._window = None
            return
        self.set_window(*windowing.default_window(self._meta, self._base.pixels, self._modality()))

    def set_invert(self, invert: bool) -> None:
        self._invert = bool(invert)
        self._view_changed()

    def toggle_invert(self) -> None:
        self.set_invert(not self._invert)

    def is_inverted(self) -> bool:
        return self._invert

    def value_range(self) -> float:
        """Span of the base image's modality values (scales the window drag)."""
        return self._value_range

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

    def pan_by(self, dx: float, dy: float) -> None:
        """Move the image by (dx, dy) widget pixels."""
        self._sync_viewport()
        self._view.pan_by(dx, dy)
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
        self._view.restore(snap.matrix, snap.zoom, snap.pan, snap.fit)
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
        self._input.set_mode(mode)
        self.setCursor(Qt.CursorShape.CrossCursor if self._input.draws() else Qt.CursorShape.ArrowCursor)
        self.update()

    def mouse_mode(self) -> MouseMode:
        return self._input.mode

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
        return measurement_label(measurement, self.sources(), self._meta, self._modality())

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

    def pending_region(self) -> tuple[int, int, int, int] | None:
        """The requested region not yet covered by a patch (drawn dashed)."""
        return self._pending_region

    # ------------------------------------------------------------------ overlays
    def set_overlays_visible(self, visible: bool) -> None:
        self._painter.overlays = bool(visible)
        self.update()

    def overlays_visible(self) -> bool:
        return self._painter.overlays

    def set_smooth(self, smooth: bool) -> None:
        """Bilinear interpolation when scaling (default on)."""
        self._painter.smooth = bool(smooth)
        self.update()

    def cursor_value(self):
        """(x, y, PixelValue | None) under the mouse, or None when the mouse is away."""
        cursor = self._input.cursor
        if cursor is None or self._meta is None:
            return None
        x, y = cursor
        return (x, y, value_under(self.sources(), self._meta, x, y, self._modality()))

    def overlay_corners(self) -> Corners:
        """The corner texts for the current state."""
        return corner_lines(
            self._series,
            self._meta,
            self._base,
            window=self._window,
            zoom=self.display_zoom() if self._meta is not None else None,
            patches=[p for p in self.sources() if p.is_region],
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

    def measurement_label_rect(self, m: Measurement) -> QRectF:
        """Where a measurement's text goes (widget coordinates): right of the shape, or
        left of it when that would leave the view, always inside the view."""
        return self._painter.label_rect(m)

    # ------------------------------------------------------------------ events
    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 (Qt API)
        self._sync_viewport()
        painter = QPainter(self)
        self._painter.paint(painter, self._input.preview())
        painter.end()

    def resizeEvent(self, event: QResizeEvent) -> None:  # noqa: N802
        super().resizeEvent(event)
        self._sync_viewport()
        ratio = self.devicePixelRatioF()
        self.displayedSizeChanged.emit(round(self.width() * ratio), round(self.height() * ratio))

    def mousePressEvent(self, event: QMouseEvent) -> None:  # noqa: N802
        if not self._input.press(event):
            super().mousePressEvent(event)

    def mouseMoveEvent(self, event: QMouseEvent) -> None:  # noqa: N802
        self._input.move(event)

    def mouseReleaseEvent(self, event: QMouseEvent) -> None:  # noqa: N802
        if not self._input.release(event):
            super().mouseReleaseEvent(event)

    def mouseDoubleClickEvent(self, event: QMouseEvent) -> None:  # noqa: N802
        if not self._input.double_click(event):
            super().mouseDoubleClickEvent(event)

    def leaveEvent(self, event) -> None:  # noqa: N802
        self._input.leave()
        super().leaveEvent(event)

    def wheelEvent(self, event: QWheelEvent) -> None:  # noqa: N802
        self._input.wheel(event)

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802
        if not self._input.key(event):
            super().keyPressEvent(event)
