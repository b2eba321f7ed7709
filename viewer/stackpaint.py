"""Painting of the stack view: the windowed image and its region patches, measurements,
the shape being drawn, the overlay text and the scale bar.

:class:`StackPainter` reads the view through its public accessors and holds what only
painting needs: the windowed-QImage cache, the overlay font, smoothing and overlay
visibility (``view`` is typed as its base class so that this module does not import
the view that imports it). :func:`draw_text_lines` is the shadowed overlay text that
every image pane draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QColor, QFont, QFontMetricsF, QImage, QPainter, QPen, QTransform
from PySide6.QtWidgets import QWidget

from imaging import windowing
from imaging.measure import Measurement, MeasureKind
from imaging.model import DecodedImage
from imaging.overlay import label_origin
from imaging.viewstate import nice_scale_bar

from .stacktools import Shape

__all__ = ["TEXT", "SHADOW", "MEASURE", "REGION", "numpy_to_qimage", "cosmetic_pen", "draw_text_lines",
           "StackPainter"]

TEXT = QColor(235, 235, 235)
SHADOW = QColor(0, 0, 0)
MEASURE = QColor(255, 215, 0)
REGION = QColor(0, 200, 255)


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


def cosmetic_pen(color: QColor, width: float = 1.5, style=Qt.PenStyle.SolidLine) -> QPen:
    """A pen of ``width`` screen pixels whatever the painter's transform."""
    pen = QPen(color, width, style)
    pen.setCosmetic(True)
    return pen


def draw_text_lines(painter: QPainter, font: QFont, top_left: QPointF, lines: list[str],
                    color: QColor = TEXT, align_right: bool = False) -> None:
    """Text lines with a dark shadow, from ``top_left`` downwards (right-aligned on
    ``top_left.x()`` when ``align_right``); leaves the painter's pen and font as they were."""
    painter.save()
    painter.setFont(font)
    metrics = QFontMetricsF(font)
    y = top_left.y() + metrics.ascent()
    for line in lines:
        x = top_left.x() - metrics.horizontalAdvance(line) if align_right else top_left.x()
        painter.setPen(SHADOW)
        painter.drawText(QPointF(x + 1, y + 1), line)
        painter.setPen(color)
        painter.drawText(QPointF(x, y), line)
        y += metrics.lineSpacing()
    painter.restore()


@dataclass
class _Rendered:
    """A windowed QImage cached for one decoded array and one window."""

    source: DecodedImage
    key: tuple
    image: QImage
    array: np.ndarray  # the QImage's buffer


class StackPainter:
    """Paints one :class:`~viewer.stackview.StackView` (see the module docstring)."""

    def __init__(self, view: QWidget) -> None:
        self.view = view
        self.smooth = True  # bilinear interpolation when scaling
        self.overlays = True
        font = QFont(view.font())
        font.setPointSizeF(9.0)
        self.font = font
        self._rendered: dict[int, _Rendered] = {}

    def forget(self, keep: list[DecodedImage] | None = None) -> None:
        """Drop the cached windowed images, all but those of ``keep``."""
        live = {id(d) for d in keep or ()}
        self._rendered = {k: v for k, v in self._rendered.items() if k in live}

    def display_image(self, source: DecodedImage) -> QImage:
        """The windowed QImage of ``source``, recomputed only when it or the window changed."""
        view = self.view
        meta = view.meta()
        assert meta is not None
        window = view.window() or (128.0, 256.0)
        key = (window, view.is_inverted(), meta.photometric)
        cached = self._rendered.get(id(source))
        if cached is not None and cached.source is source and cached.key == key:
            return cached.image
        display = windowing.render_display(source.pixels, meta, window[0], window[1], view.is_inverted())
        image, array = numpy_to_qimage(display)
        self._rendered[id(source)] = _Rendered(source, key, image, array)
        return image

    def image_transform(self) -> QTransform:
        a, b, c, d, tx, ty = self.view.view_state().affine()
        return QTransform(a, c, b, d, tx, ty)

    def label_rect(self, m: Measurement) -> QRectF:
        """Where a measurement's text goes (widget coordinates): right of the shape, or
        left of it when that would leave the view, always inside the view."""
        view = self.view
        metrics = QFontMetricsF(self.font)
        lines = view.measurement_text(m)
        w = max((metrics.horizontalAdvance(t) for t in lines), default=0.0) + 1
        h = metrics.lineSpacing() * len(lines) + 1
        a, b = view.image_to_widget(*m.p0), view.image_to_widget(*m.p1)
        x, y = label_origin(a.toTuple(), b.toTuple(), (w, h), (view.width(), view.height()))
        return QRectF(x, y, w, h)

    # ---- painting --------------------------------------------------------------------
    def paint(self, painter: QPainter, preview: Shape | None = None) -> None:
        """The whole view; ``preview`` is the shape being drawn, if any."""
        view = self.view
        painter.fillRect(view.rect(), Qt.GlobalColor.black)
        if view.meta() is not None and view.sources():
            self._paint_image(painter)
            self._paint_measurements(painter)
        if preview is not None:
            self._paint_shape(painter, preview)
        if self.overlays:
            self._paint_overlays(painter)

    def _paint_image(self, painter: QPainter) -> None:
        meta = self.view.meta()
        assert meta is not None
        painter.save()
        painter.setTransform(self.image_transform())
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, self.smooth)
        painter.setClipRect(QRectF(0, 0, meta.columns, meta.rows))
        for source in self.view.sources():
            grid = source.grid(meta)
            target = QRectF(grid.x0, grid.y0, source.width * grid.sx, source.height * grid.sy)
            painter.drawImage(target, self.display_image(source), QRectF(0, 0, source.width, source.height))
        painter.restore()

    def _paint_shape(self, painter: QPainter, shape: Shape) -> None:
        painter.save()
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, True)
        painter.setTransform(self.image_transform())
        color, style = (REGION, Qt.PenStyle.DashLine) if shape.region else (MEASURE, Qt.PenStyle.SolidLine)
        painter.setPen(cosmetic_pen(color, 1.5, style))
        painter.setBrush(Qt.BrushStyle.NoBrush)
        if shape.kind is MeasureKind.DISTANCE:
            painter.drawLine(QPointF(*shape.p0), QPointF(*shape.p1))
        else:
            rect = QRectF(QPointF(*shape.p0), QPointF(*shape.p1)).normalized()
            if shape.kind is MeasureKind.ELLIPSE:
                painter.drawEllipse(rect)
            else:
                painter.drawRect(rect)
        painter.restore()

    def _paint_measurements(self, painter: QPainter) -> None:
        view = self.view
        for m in view.measurements():
            self._paint_shape(painter, Shape(m.kind, m.p0, m.p1))
            box = self.label_rect(m)
            draw_text_lines(painter, self.font, box.topLeft(), view.measurement_text(m), MEASURE)
        pending = view.pending_region()
        if pending is not None:
            x, y, w, h = pending
            self._paint_shape(painter, Shape(MeasureKind.RECT, (x, y), (x + w, y + h), region=True))

    def _text(self, painter: QPainter, top_left: QPointF, lines: list[str], align_right: bool = False) -> None:
        draw_text_lines(painter, self.font, top_left, lines, TEXT, align_right)

    def _paint_overlays(self, painter: QPainter) -> None:
        view = self.view
        metrics = QFontMetricsF(self.font)
        line_h = metrics.lineSpacing()
        margin = 6.0
        w, h = float(view.width()), float(view.height())
        corners = view.overlay_corners()
        self._text(painter, QPointF(margin, margin), corners.top_left)
        self._text(painter, QPointF(w - margin, margin), corners.top_right, align_right=True)
        bl, br = corners.bottom_left, corners.bottom_right
        self._text(painter, QPointF(margin, h - margin - line_h * len(bl)), bl)
        self._text(painter, QPointF(w - margin, h - margin - line_h * len(br)), br, align_right=True)
        labels = view.orientation_labels()
        if labels is not None:
            top_x = (w - metrics.horizontalAdvance(labels.top)) / 2
            bottom_x = (w - metrics.horizontalAdvance(labels.bottom)) / 2
            self._text(painter, QPointF(top_x, margin), [labels.top])
            self._text(painter, QPointF(bottom_x, h - margin - line_h), [labels.bottom])
            self._text(painter, QPointF(margin, (h - line_h) / 2), [labels.left])
            self._text(painter, QPointF(w - margin, (h - line_h) / 2), [labels.right], align_right=True)
        self._paint_scale_bar(painter, margin + 1.5 * line_h)

    def _paint_scale_bar(self, painter: QPainter, bottom_gap: float) -> None:
        view = self.view
        meta = view.meta()
        if meta is None or not meta.mm_spacing:
            return
        px_per_mm = view.view_state().screen_pixels_per_mm(*meta.pixel_spacing)
        bar = nice_scale_bar(px_per_mm, view.width() / 4.0)
        if bar is None or bar[1] < 10:
            return
        _, length, label = bar
        x0 = (view.width() - length) / 2.0
        y = view.height() - bottom_gap - 4.0
        painter.save()
        for color, offset in ((SHADOW, 1.0), (TEXT, 0.0)):
            painter.setPen(QPen(color, 1.0))
            painter.drawLine(QPointF(x0 + offset, y + offset), QPointF(x0 + length + offset, y + offset))
            for x in (x0, x0 + length):
                painter.drawLine(QPointF(x + offset, y - 4 + offset), QPointF(x + offset, y + offset))
        painter.restore()
        metrics = QFontMetricsF(self.font)
        text_x = (view.width() - metrics.horizontalAdvance(label)) / 2.0
        self._text(painter, QPointF(text_x, y - 4 - metrics.lineSpacing()), [label])
