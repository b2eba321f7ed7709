"""CineBar: play/pause, frame rate, loop/bounce and consistent mode, driving a QTimer.

The stepping logic is :class:`client.cine.CineController`; this widget builds the
controls and emits :attr:`CineBar.frameChanged` on every tick that yields a frame.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QHBoxLayout, QStyle, QToolButton, QWidget

from client.cine import CineController, CineMode

__all__ = ["CineBar"]


class CineBar(QWidget):
    """Cine controls. Give it the slice count and, for consistent mode, the sources."""

    frameChanged = Signal(int, object, object)
    """(index, level, image): show this slice (level None = best available)."""
    playingChanged = Signal(bool)

    def __init__(self, parent: QWidget | None = None, controller: CineController | None = None) -> None:
        super().__init__(parent)
        self.controller = controller or CineController()
        self._timer = QTimer(self)
        self._timer.setTimerType(Qt.TimerType.PreciseTimer)
        self._timer.timeout.connect(self._tick)

        self.play_button = QToolButton(self)
        self.play_button.setCheckable(True)
        self.play_button.setToolTip("Play / pause (cine)")
        self.play_button.toggled.connect(self._on_play_toggled)

        self.fps_box = QDoubleSpinBox(self)
        self.fps_box.setRange(CineController.MIN_FPS, CineController.MAX_FPS)
        self.fps_box.setDecimals(1)
        self.fps_box.setSuffix(" fps")
        self.fps_box.setValue(self.controller.fps)
        self.fps_box.valueChanged.connect(self.set_fps)

        self.mode_box = QComboBox(self)
        self.mode_box.addItem("Loop", CineMode.LOOP)
        self.mode_box.addItem("Bounce", CineMode.BOUNCE)
        self.mode_box.setCurrentIndex(self.mode_box.findData(self.controller.mode))
        self.mode_box.currentIndexChanged.connect(
            lambda i: setattr(self.controller, "mode", CineMode(self.mode_box.itemData(i)))
        )

        self.consistent_box = QCheckBox("Consistent", self)
        self.consistent_box.setToolTip("Play only at the quality every slice has reached")
        self.consistent_box.setChecked(self.controller.consistent)
        self.consistent_box.toggled.connect(lambda on: setattr(self.controller, "consistent", on))

        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for widget in (self.play_button, self.fps_box, self.mode_box, self.consistent_box):
            layout.addWidget(widget)
        layout.addStretch(1)
        self._update_icon()

    # ---- configuration ----------------------------------------------------------
    def set_count(self, count: int) -> None:
        """Number of slices in the series."""
        self.controller.count = max(int(count), 0)
        self.controller.seek(self.controller.current)

    def set_current(self, index: int) -> None:
        """The slice shown now (playback continues from there)."""
        self.controller.seek(index)

    def set_sources(
        self,
        image_at: Callable[[int, Any], Any] | None,
        levels: Callable[[], Sequence[Any]] | None,
    ) -> None:
        """``image_at(index, level)`` and ``levels()`` as in :class:`CineController`."""
        self.controller.image_at = image_at
        self.controller.levels = levels

    def set_fps(self, fps: float) -> None:
        self.controller.fps = fps
        if self.fps_box.value() != self.controller.fps:
            self.fps_box.setValue(self.controller.fps)
        self._timer.setInterval(self.controller.interval_ms)

    def set_mode(self, mode: CineMode | str) -> None:
        self.mode_box.setCurrentIndex(self.mode_box.findData(CineMode(mode)))

    def set_consistent(self, on: bool) -> None:
        self.consistent_box.setChecked(on)

    # ---- playback ---------------------------------------------------------------
    def is_playing(self) -> bool:
        return self._timer.isActive()

    def play(self) -> None:
        self.play_button.setChecked(True)

    def pause(self) -> None:
        self.play_button.setChecked(False)

    def toggle(self) -> None:
        self.play_button.toggle()

    def _on_play_toggled(self, on: bool) -> None:
        if on:
            self._timer.start(self.controller.interval_ms)
        else:
            self._timer.stop()
        self._update_icon()
        self.playingChanged.emit(on)

    def _update_icon(self) -> None:
        pixmap = QStyle.StandardPixmap.SP_MediaPause if self.is_playing() else QStyle.StandardPixmap.SP_MediaPlay
        self.play_button.setIcon(self.style().standardIcon(pixmap))

    def _tick(self) -> None:
        frame = self.controller.step()
        if frame is not None:
            self.frameChanged.emit(frame.index, frame.level, frame.image)
