"""Transfers of the shown series on screen: the progress panel (level and bytes bars,
series strip, rate), stage and state messages in the status bar, cancel / resume, the busy
indicator, "server busy" retries, and cache upkeep once a series is loaded."""
from __future__ import annotations

import math

from PySide6.QtCore import QObject, QTimer
from PySide6.QtWidgets import QLabel, QProgressBar

from client.series_loader import (BACKGROUND, FOCUS, NEAR, PREVIEW, REGION, ImageStatus,
                                  SeriesStatus, Stage)

from ..workers import Task

__all__ = ["TransferController", "PROGRESS_INTERVAL_MS"]

PROGRESS_INTERVAL_MS = 150
"""Progress widgets repaint at most this often while a transfer runs (about 7 times a
second: readable, and cheap for the event loop)."""

_STAGE_TEXT = {PREVIEW: "preview (nearest first)", REGION: "region at full resolution",
               FOCUS: "shown image", NEAR: "neighbouring images", BACKGROUND: "rest of the series"}


class TransferController(QObject):
    """Progress of the series loader on the panel and in the status bar.

    Uses of the window: ``panel`` (a :class:`viewer.progress.TransferPanel`), ``stack``,
    ``series_ctl`` (which loader is current, the shown slice), ``backend``,
    ``loaderStateChanged``."""

    def __init__(self, window) -> None:
        super().__init__(window)
        self.w = window
        self.panel = window.panel
        self.statuses: list[ImageStatus | None] = []
        self._dirty = False
        self._series_status: SeriesStatus | None = None
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(PROGRESS_INTERVAL_MS)
        self._timer.timeout.connect(self.flush_progress)
        bar = window.statusBar()
        self.busy_bar = QProgressBar(window)
        self.busy_bar.setRange(0, 0)
        self.busy_bar.setMaximumWidth(120)
        self.busy_bar.setVisible(False)
        self.server_label = QLabel("Not connected", window)
        bar.addPermanentWidget(self.busy_bar)
        bar.addPermanentWidget(self.server_label)

    def message(self, text: str, ms: int = 0) -> None:
        self.w.statusBar().showMessage(text, ms)

    def busy(self, on: bool, message: str | None = None) -> None:
        self.busy_bar.setVisible(on)
        if message:
            self.message(message)

    def show_server_busy(self, pause: float, attempt: int) -> None:
        self.message(f"Server busy, retrying in {pause:.0f} s (attempt {attempt})…",
                     int(pause * 1000) + 2000)

    # ------------------------------------------------------------------ the panel
    def reset(self) -> None:
        """Another series is opening: nothing of the old one's progress stays."""
        self.statuses = []
        self._timer.stop()
        self._dirty = False
        self._series_status = None
        self.panel.reset()

    def opened(self, statuses: list[ImageStatus], shown: int) -> None:
        self.statuses = list(statuses)
        self.panel.strip.set_count(len(statuses))
        self.refresh_strip()
        self.panel.strip.set_current(shown)

    def mark_progress(self) -> None:
        """The progress widgets are out of date: refresh them soon."""
        self._dirty = True
        if not self._timer.isActive():
            self._timer.start()

    def flush_progress(self) -> None:
        """Progress widgets follow the transfer and the scrolling every
        PROGRESS_INTERVAL_MS (a transfer reports far more often than anyone can read,
        and each repaint costs)."""
        if self._dirty:
            self._dirty = False
            self.refresh_strip()
            if self.w.series_ctl.shown is not None:
                self.panel.strip.set_current(self.w.series_ctl.shown)
            self.update_bars()
        status = self._series_status
        if status is not None:
            self._series_status = None
            label = self.panel.transfer_label
            label.update_transfer(status.held, status.requested, status.total, status.elapsed)
            label.setToolTip(f"{status.images_done} of {status.count} images "
                             f"complete for this viewport")

    def refresh_strip(self) -> None:
        levels = [s.level if s is not None else None for s in self.statuses]
        maximum = max((s.max_level for s in self.statuses if s is not None), default=1)
        self.panel.strip.set_levels(levels, maximum)

    def update_bars(self) -> None:
        shown, series_info = self.w.series_ctl.shown, self.w.series_ctl.series_info
        st = self.statuses[shown] if (
            shown is not None and 0 <= shown < len(self.statuses)) else None
        if st is None:
            return
        self.panel.level_bar.set_levels(st.layers, st.requested_layers, st.max_layers)
        self.panel.bytes_bar.set_bytes(st.held_bytes, st.requested_bytes, st.total_bytes)
        meta = series_info.images[st.index] if series_info else None
        if meta is None:
            return

        def size(r: int) -> str:
            f = 1 << max(st.numres - 1 - r, 0)
            return f"{math.ceil(meta.columns / f)}×{math.ceil(meta.rows / f)}"

        decoded = self.w.stack.decoded()
        text = f"Held {size(st.res) if st.res >= 0 else 'nothing'} · needed {size(st.target_res)}"
        if decoded is not None and decoded.index == st.index:
            text = f"Shown {decoded.width}×{decoded.height} · " + text
        self.panel.res_label.setText(text)

    # ------------------------------------------------------------------ loader reports
    def on_image_status(self, loader, status: ImageStatus) -> None:
        if not self.w.series_ctl.is_current(loader) or status.index >= len(self.statuses):
            return
        self.statuses[status.index] = status
        self.mark_progress()

    def on_series_status(self, loader, status: SeriesStatus) -> None:
        if not self.w.series_ctl.is_current(loader):
            return
        self._series_status = status
        if status.stage is None:            # the end of a stage: show it now
            self.flush_progress()
        elif not self._timer.isActive():
            self._timer.start()

    def on_stage(self, loader, stage: Stage, state: str, message: str) -> None:
        if not self.w.series_ctl.is_current(loader):
            return
        n = len(stage.comps) if stage.comps is not None else loader.count
        what = _STAGE_TEXT.get(stage.kind, stage.kind)
        if state == "started":
            self.message(f"Fetching {what} ({n} image{'s' if n != 1 else ''})…")
        elif state == "failed":
            self.message(f"Transfer of the {what} failed: {message}")

    def on_loader_state(self, loader, state: str) -> None:
        if not self.w.series_ctl.is_current(loader):
            return
        self.busy(state == "loading")
        button = self.panel.cancel_button
        button.setEnabled(state in ("loading", "paused", "failed"))
        button.setText("Resume" if state in ("paused", "failed") else "Cancel")
        self.flush_progress()
        if state == "idle":
            self.message("Series loaded for this view", 4000)
            self.evict_cache()
        elif state == "paused":
            self.message("Transfers stopped (press Resume to continue)")
        self.w.loaderStateChanged.emit(state)

    def on_loader_failed(self, loader, message: str) -> None:
        if self.w.series_ctl.is_current(loader):
            self.message(message)

    def cancel_or_resume(self) -> None:
        """Cancel the series' transfers, or resume them after a cancel."""
        loader = self.w.series_ctl.loader
        if loader is None:
            return
        if loader.state == "loading":
            loader.cancel()
        else:
            loader.resume()

    def evict_cache(self) -> None:
        """Bring the packet cache under its limit (in the pool), keeping the shown series."""
        backend, loader = self.w.backend, self.w.series_ctl.loader
        if backend.cache is None or loader is None or loader.sd is None:
            return
        keep = {im["key"] for im in loader.sd.images}
        Task(lambda _ctx: backend.evict_cache(keep), name="evict", pool=backend.pool,
             parent=self).start()
