"""Progress widgets (SPEC P12): quality-level bar, byte bar, per-slice strip, rate label.

They only display what they are told; the numbers come from the client library's
transfer callbacks. Formatting lives in :mod:`client.transferstats`.
"""

from __future__ import annotations

from collections.abc import Sequence

from PySide6.QtCore import QPointF, QRectF, QSize, Qt, Signal
from PySide6.QtGui import QColor, QMouseEvent, QPainter, QPaintEvent, QPen, QPolygonF
from PySide6.QtWidgets import (QFrame, QGridLayout, QHBoxLayout, QLabel, QPushButton,
                               QSizePolicy, QWidget)

from client.transferstats import TransferRate, TransferSnapshot, format_bytes, level_fraction

from .cinebar import CineBar

__all__ = ["ThreeToneBar", "LevelBar", "BytesBar", "SeriesStrip", "TransferLabel", "TransferPanel",
           "level_color"]

_EMPTY = QColor(45, 45, 48)
_REQUESTED = QColor(70, 110, 150)
_REACHED = QColor(70, 180, 90)
_BORDER = QColor(20, 20, 20)


class ThreeToneBar(QWidget):
    """One bar showing reached <= requested <= maximum as three tones, with a caption."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._reached = 0.0
        self._requested = 0.0
        self._maximum = 0.0
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def sizeHint(self) -> QSize:  # noqa: N802
        return QSize(180, max(18, self.fontMetrics().height() + 4))

    def _set(self, reached: float, requested: float, maximum: float) -> None:
        self._maximum = max(float(maximum), 0.0)
        limit = self._maximum if self._maximum > 0 else float("inf")
        self._requested = min(max(float(requested), 0.0), limit)
        self._reached = min(max(float(reached), 0.0), limit)
        self.setToolTip(self.text())
        self.update()

    def values(self) -> tuple[float, float, float]:
        """(reached, requested, maximum)."""
        return (self._reached, self._requested, self._maximum)

    def fractions(self) -> tuple[float, float]:
        """Reached and requested as fractions of the maximum."""
        return level_fraction(self._reached, self._maximum), level_fraction(self._requested, self._maximum)

    def text(self) -> str:  # overridden
        return ""

    def short_text(self) -> str:  # overridden: a shorter form for a narrow bar
        return self.text()

    def display_text(self) -> str:
        """The text drawn: the full one when it fits, else the short one, else elided."""
        fm = self.fontMetrics()
        room = max(self.width() - 6, 0)
        for t in (self.text(), self.short_text()):
            if fm.horizontalAdvance(t) <= room:
                return t
        return fm.elidedText(self.short_text(), Qt.TextElideMode.ElideRight, room)

    def minimumSizeHint(self) -> QSize:  # noqa: N802
        return QSize(self.fontMetrics().horizontalAdvance(self.short_text()) + 8,
                     super().minimumSizeHint().height())

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802
        painter = QPainter(self)
        rect = QRectF(self.rect()).adjusted(0.5, 0.5, -0.5, -0.5)
        painter.fillRect(rect, _EMPTY)
        reached, requested = self.fractions()
        painter.fillRect(QRectF(rect.x(), rect.y(), rect.width() * requested, rect.height()), _REQUESTED)
        painter.fillRect(QRectF(rect.x(), rect.y(), rect.width() * reached, rect.height()), _REACHED)
        painter.setPen(QPen(_BORDER, 1.0))
        painter.drawRect(rect)
        painter.setPen(Qt.GlobalColor.white)
        painter.drawText(rect, Qt.AlignmentFlag.AlignCenter, self.display_text())
        painter.end()


class LevelBar(ThreeToneBar):
    """Quality level reached / requested / maximum for the shown image."""

    def set_levels(self, reached: int, requested: int, maximum: int) -> None:
        self._set(reached, requested, maximum)

    def levels(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.values())  # type: ignore[return-value]

    def text(self) -> str:
        reached, requested, maximum = self.levels()
        return f"Quality {reached} / {requested} (max {maximum})"

    def short_text(self) -> str:
        reached, requested, maximum = self.levels()
        return f"Q {reached}/{requested}/{maximum}"


class BytesBar(ThreeToneBar):
    """Bytes received / requested / total available."""

    def set_bytes(self, received: int, requested: int, total: int) -> None:
        self._set(received, requested, total)

    def byte_counts(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.values())  # type: ignore[return-value]

    def text(self) -> str:
        received, requested, total = self.byte_counts()
        return f"{format_bytes(received)} / {format_bytes(requested)} (of {format_bytes(total)})"

    def short_text(self) -> str:
        received, requested, _total = self.byte_counts()
        return f"{format_bytes(received)} / {format_bytes(requested)}"


def level_color(level: int | None, maximum: int) -> QColor:
    """Cell colour: dark grey for nothing, then red -> yellow -> green as the level rises."""
    if level is None or level <= 0 or maximum <= 0:
        return _EMPTY
    fraction = level_fraction(level, maximum)
    return QColor.fromHsvF(0.33 * fraction, 0.75, 0.55 + 0.35 * fraction)


class SeriesStrip(QWidget):
    """One cell per slice coloured by the level it has reached; click to go to a slice."""

    sliceClicked = Signal(int)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._levels: list[int | None] = []
        self._maximum = 1
        self._current: int | None = None
        self._last_emitted: int | None = None
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setMouseTracking(False)

    def sizeHint(self) -> QSize:  # noqa: N802
        return QSize(240, 16)

    # data
    def set_count(self, count: int) -> None:
        """Number of slices (levels reset to nothing)."""
        self._levels = [None] * max(int(count), 0)
        if self._current is not None and self._current >= len(self._levels):
            self._current = None
        self.update()

    def count(self) -> int:
        return len(self._levels)

    def set_max_level(self, maximum: int) -> None:
        self._maximum = max(int(maximum), 1)
        self.update()

    def set_levels(self, levels: Sequence[int | None], maximum: int | None = None) -> None:
        """Level reached by every slice (None or 0 = nothing yet)."""
        self._levels = list(levels)
        if maximum is not None:
            self._maximum = max(int(maximum), 1)
        self.update()

    def set_level(self, index: int, level: int | None) -> None:
        if 0 <= index < len(self._levels):
            self._levels[index] = level
            self.update(self._cell_rect(index).toAlignedRect().adjusted(-1, 0, 1, 0))

    def levels(self) -> list[int | None]:
        return list(self._levels)

    def set_current(self, index: int | None) -> None:
        """Mark the shown slice."""
        self._current = index
        self.update()

    def current(self) -> int | None:
        return self._current

    # geometry
    def _cell_rect(self, index: int) -> QRectF:
        n = max(len(self._levels), 1)
        w = self.width() / n
        return QRectF(index * w, 0.0, w, float(self.height()))

    def index_at(self, x: float) -> int | None:
        """Slice under widget x coordinate."""
        n = len(self._levels)
        if n == 0 or self.width() <= 0:
            return None
        return min(max(int(x * n / self.width()), 0), n - 1)

    # painting / input
    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802
        painter = QPainter(self)
        painter.fillRect(self.rect(), _BORDER)
        n = len(self._levels)
        gap = 1.0 if n and self.width() / n >= 4 else 0.0
        for i, level in enumerate(self._levels):
            cell = self._cell_rect(i)
            painter.fillRect(cell.adjusted(0, 0, -gap, 0), level_color(level, self._maximum))
        if self._current is not None and 0 <= self._current < n:
            cell = self._cell_rect(self._current)
            painter.setPen(QPen(Qt.GlobalColor.white, 1.5))
            painter.setBrush(Qt.BrushStyle.NoBrush)
            painter.drawRect(cell.adjusted(0.75, 0.75, -0.75, -0.75))
            cx = cell.center().x()
            painter.setBrush(Qt.GlobalColor.white)
            painter.drawPolygon(QPolygonF([QPointF(cx - 3, 0), QPointF(cx + 3, 0), QPointF(cx, 4)]))
        painter.end()

    def _emit_at(self, x: float) -> None:
        index = self.index_at(x)
        if index is not None and index != self._last_emitted:
            self._last_emitted = index
            self.sliceClicked.emit(index)

    def mousePressEvent(self, event: QMouseEvent) -> None:  # noqa: N802
        if event.button() == Qt.MouseButton.LeftButton:
            self._last_emitted = None
            self._emit_at(event.position().x())
            event.accept()

    def mouseMoveEvent(self, event: QMouseEvent) -> None:  # noqa: N802
        if event.buttons() & Qt.MouseButton.LeftButton:
            self._emit_at(event.position().x())


class TransferLabel(QLabel):
    """Total bytes, speed and time left of a transfer, from cumulative updates."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._rate = TransferRate()
        self._snapshot: TransferSnapshot | None = None
        self.setText("–")

    def update_transfer(self, received: int, requested: int, total: int, elapsed_s: float) -> None:
        self._snapshot = self._rate.update(received, requested, total, elapsed_s)
        self.setText(self._snapshot.text())

    def reset(self) -> None:
        self._rate.reset()
        self._snapshot = None
        self.setText("–")

    def snapshot(self) -> TransferSnapshot | None:
        """The last derived state (speed, time left), or None before any update."""
        return self._snapshot


class TransferPanel(QFrame):
    """The panel under the stack view: the shown image's level and bytes bars and
    resolution, the series strip, the transfer rate, the cancel button and the cine bar."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.level_bar = LevelBar(self)
        self.bytes_bar = BytesBar(self)
        self.res_label = QLabel("–", self)
        self.strip = SeriesStrip(self)
        self.transfer_label = TransferLabel(self)
        self.cancel_button = QPushButton("Cancel", self)
        self.cancel_button.setToolTip("Stop the transfers of this series (Ctrl+.); "
                                      "press again to resume")
        self.cancel_button.setEnabled(False)
        self.cine_bar = CineBar(self)
        grid = QGridLayout(self)
        grid.setContentsMargins(6, 4, 6, 4)
        grid.addWidget(QLabel("Image", self), 0, 0)
        grid.addWidget(self.level_bar, 0, 1)
        grid.addWidget(self.bytes_bar, 0, 2)
        grid.addWidget(self.res_label, 0, 3, 1, 2)
        grid.addWidget(QLabel("Series", self), 1, 0)
        grid.addWidget(self.strip, 1, 1, 1, 2)
        grid.addWidget(self.transfer_label, 1, 3)
        grid.addWidget(self.cancel_button, 1, 4)
        grid.setColumnStretch(1, 1)
        grid.setColumnStretch(2, 1)
        # the texts beside the bars wrap rather than squeeze the bars below their text
        for label in (self.res_label, self.transfer_label):
            label.setWordWrap(True)
            label.setMinimumWidth(label.fontMetrics().horizontalAdvance("Shown 0000×0000 ·"))
        cine_row = QHBoxLayout()
        cine_row.addWidget(QLabel("Cine", self))
        cine_row.addWidget(self.cine_bar, 1)
        grid.addLayout(cine_row, 2, 0, 1, 5)

    def reset(self) -> None:
        """Nothing transferred yet (another series is opening)."""
        self.strip.set_count(0)
        self.transfer_label.reset()
        self.level_bar.set_levels(0, 0, 0)
        self.bytes_bar.set_bytes(0, 0, 0)
        self.res_label.setText("–")
