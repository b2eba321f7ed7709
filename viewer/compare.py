"""Current and prior side by side (seed 001): a comparison window of 1×2 or 2×2 panes.

The current series is on the left (top left in 2×2), the most recent relevant prior on
its right, further priors below. Every pane is a :class:`viewer.stackview.StackView` with
its own :class:`client.series_loader.SeriesLoader` (the series' own cache and plan), so its
measurements and annotations stay with its own series and study.

Scrolling together (on by default): a slice asked for in one pane brings the matching
slice in the others — by patient position when the two series share their frame of
reference, else by relative position along the stack; the banner says which
(:class:`client.priors.SliceSync`). Zoom and pan together, and window together, are
optional. Nothing here reads files or waits on the network: the loaders do it in the pool.
"""
from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QCheckBox, QGridLayout, QHBoxLayout, QLabel, QVBoxLayout,
                               QWidget)

from client.priors import SliceSync

from client.series_loader import SeriesLoader
from imaging.model import DecodedImage, SeriesInfo
from .stackview import StackView
from .workers import LoaderBridge

__all__ = ["ComparePane", "ComparisonView", "LAYOUTS"]

LAYOUTS = {"1x2": (1, 2), "2x2": (2, 2)}


def _date(d: str) -> str:
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d or "") == 8 and d.isdigit() else (d or "")


class ComparePane(QWidget):
    """One series of the comparison: a title and a stack view."""

    def __init__(self, uid: str, role: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.uid, self.role = uid, role
        self.title = QLabel(role, self)
        self.title.setStyleSheet("font-weight: bold")
        self.view = StackView(self)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(1, 1, 1, 1)
        lay.addWidget(self.title)
        lay.addWidget(self.view, 1)
        self.loader: SeriesLoader | None = None
        self.info: SeriesInfo | None = None
        self.raw_info: dict = {}
        self.shown = 0
        self.heading = role
        self.recalling = False
        self.listener = None

    @property
    def study(self) -> str | None:
        return self.raw_info.get("StudyInstanceUID")

    def positions(self) -> list[float | None]:
        return [m.slice_location for m in (self.info.images if self.info else [])]


class ComparisonView(QWidget):
    """The comparison window (see the module docstring)."""

    opened = Signal()
    """Every pane has its series description (slices can be synchronised)."""
    _recall = Signal(object, bool)          # pane, recalling (from transfer threads)

    def __init__(self, registry, pool, current: str, priors: list[str], layout: str = "1x2",
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}")
        rows, cols = LAYOUTS[layout]
        self.setWindowTitle("MedView — comparison with prior studies")
        self.registry, self.pool = registry, pool
        uids = [current, *priors][: rows * cols]
        self.panes = [ComparePane(uid, "Current" if k == 0 else f"Prior {k}", self)
                      for k, uid in enumerate(uids)]
        self.banner = QLabel("", self)
        self.banner.setWordWrap(True)
        self.sync_scroll = QCheckBox("Scroll together", self)
        self.sync_scroll.setChecked(True)
        self.sync_zoom = QCheckBox("Zoom and pan together", self)
        self.sync_window = QCheckBox("Window together", self)
        bar = QHBoxLayout()
        for w in (self.sync_scroll, self.sync_zoom, self.sync_window):
            bar.addWidget(w)
        bar.addStretch(1)
        grid = QGridLayout()
        grid.setSpacing(2)
        for k, pane in enumerate(self.panes):
            grid.addWidget(pane, k // cols, k % cols)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addLayout(bar)
        lay.addWidget(self.banner)
        lay.addLayout(grid, 1)
        self._syncing = False
        self._maps: dict[tuple[int, int], SliceSync] = {}
        self.bridge = LoaderBridge(self)
        self.bridge.opened.connect(self._on_opened)
        self.bridge.decoded.connect(self._on_decoded)
        for k, pane in enumerate(self.panes):
            pane.view.sliceRequested.connect(lambda i, k=k: self._slice_requested(k, i))
            pane.view.viewStateChanged.connect(lambda snap, k=k: self._view_changed(k, snap))
        self.sync_scroll.toggled.connect(self._say_sync)
        self._recall.connect(self._recalling, Qt.ConnectionType.QueuedConnection)

    # ------------------------------------------------------------------ life
    def start(self) -> "ComparisonView":
        for pane in self.panes:
            pane.loader = SeriesLoader(self.registry, pane.uid, self.pool, self.bridge,
                                       focus=0, viewport=(512, 512))
            pane.loader.start()
        return self

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt API)
        self.close_loaders()
        super().closeEvent(event)

    def close_loaders(self) -> None:
        for pane in self.panes:
            if pane.loader is not None:
                sd = pane.loader.sd
                if sd is not None and pane.listener in sd.listeners:
                    sd.listeners.remove(pane.listener)
                pane.loader.close()
                pane.loader = None

    def pane_of(self, loader) -> ComparePane | None:
        return next((p for p in self.panes if p.loader is loader and loader is not None), None)

    # ------------------------------------------------------------------ loaders
    def _on_opened(self, loader, info: dict, images: list[dict], _statuses) -> None:
        pane = self.pane_of(loader)
        if pane is None:
            return
        pane.raw_info = dict(info)
        pane.info = SeriesInfo.from_dict(info, images)
        pane.view.set_series(pane.info)
        date = _date(info.get("StudyDate") or "")
        what = " · ".join(x for x in (date, info.get("Modality"), info.get("StudyDescription")
                                      or info.get("SeriesDescription")) if x)
        pane.heading = f"{pane.role}: {what}" if what else pane.role
        pane.title.setText(pane.heading)
        if loader.sd is not None:               # "recalling from archive" per pane
            pane.listener = (lambda kind, _msg, pane=pane: kind in ("recalling", "recalled")
                             and self._recall.emit(pane, kind == "recalling"))
            loader.sd.listeners.append(pane.listener)
        pane.shown = loader.focus
        best = loader.best(pane.shown)
        if best is not None:
            self._show(pane, best)
        if all(p.info is not None for p in self.panes):
            self._build_maps()
            self.opened.emit()

    def _recalling(self, pane: ComparePane, on: bool) -> None:
        pane.recalling = on
        pane.title.setText(f"{pane.heading} — recalling from archive…" if on else pane.heading)

    def _on_decoded(self, loader, image: DecodedImage) -> None:
        pane = self.pane_of(loader)
        if pane is not None and image.index == pane.shown:
            self._show(pane, image)

    def _show(self, pane: ComparePane, image: DecodedImage) -> None:
        if pane.info is not None and 0 <= image.index < len(pane.info.images):
            pane.view.set_image(image, pane.info.images[image.index])

    # ------------------------------------------------------------------ synchronising
    def _build_maps(self) -> None:
        self._maps.clear()
        for a, pa in enumerate(self.panes):
            for b, pb in enumerate(self.panes):
                if a != b:
                    self._maps[(a, b)] = SliceSync(
                        pa.positions(), pb.positions(),
                        pa.raw_info.get("FrameOfReferenceUID"), pb.raw_info.get("FrameOfReferenceUID"))
        self._say_sync()

    def sync_words(self) -> str:
        """What the banner says about how the panes scroll together."""
        if not self.sync_scroll.isChecked():
            return "Each pane scrolls on its own."
        if not self._maps or len(self.panes) < 2:
            return ""
        pairs = [self._maps[(0, b)] for b in range(1, len(self.panes))]
        if all(m.by_position for m in pairs):
            return pairs[0].words
        if not any(m.by_position for m in pairs):
            return pairs[0].words
        return ("Scrolling together: by patient position where the frame of reference is "
                "the same, else by relative position along the stack (approximate).")

    def _say_sync(self, *_args) -> None:
        self.banner.setText(self.sync_words())

    def map_slice(self, src: int, dst: int, index: int) -> int:
        m = self._maps.get((src, dst))
        return m.map(index) if m is not None else index

    def _slice_requested(self, k: int, index: int) -> None:
        pane = self.panes[k]
        pane.shown = index
        if pane.loader is not None:
            best, patches = pane.loader.set_focus(index)
            if best is not None:
                self._show(pane, best)
            for p in patches:
                self._show(pane, p)
        if self._syncing or not self.sync_scroll.isChecked() or not self._maps:
            return
        self._syncing = True
        try:
            for j, other in enumerate(self.panes):
                if j != k:
                    other.view.request_slice(self.map_slice(k, j, index))
        finally:
            self._syncing = False

    def _view_changed(self, k: int, snap) -> None:
        if self._syncing or not (self.sync_zoom.isChecked() or self.sync_window.isChecked()):
            return
        self._syncing = True
        try:
            for j, other in enumerate(self.panes):
                if j == k:
                    continue
                v = other.view
                if self.sync_window.isChecked() and snap.center is not None:
                    v.set_window(snap.center, snap.width)
                if self.sync_zoom.isChecked():
                    state = v.view_state()
                    state.set_zoom(snap.zoom)
                    state.pan_x, state.pan_y = snap.pan
                    v.update()
        finally:
            self._syncing = False
