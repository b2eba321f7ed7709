"""The series shown in the stack view: opening it (the old series' transfers cancelled,
nothing of it left on screen), the loader's results on the stack view, the focus
following the scrolling, regions at full resolution, cine, and the resolution the
viewport needs."""
from __future__ import annotations

from PySide6.QtCore import QObject, QTimer

from client.series_loader import ImageStatus, SeriesLoader, reduce_for_fit
from imaging.model import DecodedImage, SeriesInfo

from ..titles import series_name, window_title
from ..workers import Task

__all__ = ["SeriesController", "FOCUS_SETTLE_MS"]

FOCUS_SETTLE_MS = 200
"""The network plan moves to the shown slice once scrolling pauses this long (each move
cancels the transfer for the previous slice; the display itself follows at once)."""

REDUCE_SETTLE_MS = 120
"""The needed resolution is worked out once resizing or zooming pauses this long."""


class SeriesController(QObject):
    """One :class:`~client.series_loader.SeriesLoader` at a time for the stack view.

    Signals from a loader that is no longer the current one are dropped, and the stack
    view refuses images that are not part of its series, so a displayed slice always
    belongs to the selected series. Uses of the window: ``backend``, ``settings``,
    ``bridge``, ``stack``, ``cine_bar``, ``browser``, ``transfers``, ``reading``,
    ``presets``, its title, status bar and ``seriesOpened`` / ``imageDisplayed``."""

    def __init__(self, window) -> None:
        super().__init__(window)
        self.w = window
        self.loader: SeriesLoader | None = None
        self.series_info: SeriesInfo | None = None
        self.series_uid: str | None = None
        self.shown: int | None = None           # slice the view should show now
        self._keep_view = None
        self._focus_timer = QTimer(self)
        self._focus_timer.setSingleShot(True)
        self._focus_timer.setInterval(FOCUS_SETTLE_MS)
        self._focus_timer.timeout.connect(self._move_focus)
        self.reduce_timer = QTimer(self)
        self.reduce_timer.setSingleShot(True)
        self.reduce_timer.setInterval(REDUCE_SETTLE_MS)
        self.reduce_timer.timeout.connect(self.update_reduce)

    def is_current(self, loader) -> bool:
        return loader is self.loader and loader is not None and not loader.closed

    # ------------------------------------------------------------------ opening
    def open_series(self, uid: str, keep_view: bool = False) -> SeriesLoader | None:
        """Show series ``uid``: the old series' transfers are cancelled and nothing of it
        is shown any more; the new one loads progressively. ``keep_view`` (the same series
        reopened, e.g. in another version): keep the slice, zoom, pan and window."""
        w = self.w
        if w.backend.registry is None:
            return None
        keep = None
        if keep_view and uid == self.series_uid and self.series_info is not None:
            keep = (self.shown, w.stack.snapshot())
        self._keep_view = keep
        self.close_loader()
        self._focus_timer.stop()
        self.series_uid = uid
        self.series_info = None
        self.shown = 0
        w.stack.set_series(None)
        w.transfers.reset()
        self.loader = SeriesLoader(w.backend.registry, uid, w.backend.pool, w.bridge,
                                   focus=keep[0] if keep else 0, viewport=self.viewport(),
                                   prefetch=w.settings.prefetch(),
                                   decoded_budget=w.backend.memory)
        self.loader.set_cine_consistent(w.cine_bar.consistent_box.isChecked())
        self.loader.start()
        w.browser.select_series(uid)
        w.transfers.busy(True, "Opening the series…")
        return self.loader

    def open_study(self, study_uid: str) -> None:
        """Open the first series of a study (after an import); the list of its series is
        asked for in the pool."""
        backend = self.w.backend
        task = Task(lambda _ctx: backend.session.series(study_uid), name="study",
                    pool=backend.pool, parent=self)

        def done(rows: list[dict]) -> None:
            if rows:
                self.open_series(rows[0]["SeriesInstanceUID"])

        task.finished.connect(done)
        task.failed.connect(lambda e: self.w.statusBar().showMessage(f"Cannot open the study: {e}"))
        task.start()

    def close_loader(self) -> None:
        self.w.cine_bar.pause()
        self.w.reading.close_series()
        if self.loader is not None:
            self.loader.close()
            self.loader = None

    def forget(self) -> None:
        """Another server (or a new session): nothing of the old one stays on screen."""
        self.close_loader()
        self.series_info = None
        self.w.stack.set_series(None)
        self.w.panel.strip.set_count(0)

    def viewport(self) -> tuple[int, int]:
        stack = self.w.stack
        ratio = stack.devicePixelRatioF()
        return max(1, round(stack.width() * ratio)), max(1, round(stack.height() * ratio))

    # ------------------------------------------------------------------ loader reports
    def on_opened(self, loader, info: dict, images: list[dict], statuses: list[ImageStatus]) -> None:
        if not self.is_current(loader):
            return
        w = self.w
        series = SeriesInfo.from_dict(info, images)
        self.series_info = series
        w.stack.set_series(series)
        keep, self._keep_view = self._keep_view, None
        if keep is not None:
            w.stack.restore(keep[1])
        self.shown = loader.focus
        w.transfers.opened(statuses, self.shown)
        w.cine_bar.set_count(len(images))
        w.cine_bar.set_current(self.shown)
        w.cine_bar.set_sources(loader.cine_frame, loader.cine_levels)
        w.presets.rebuild()
        w.transfers.update_bars()
        if loader.sd is not None:
            w.reading.open_series(loader)
        w.setWindowTitle(window_title("MedView", info))
        w.statusBar().showMessage(f"Series {series_name(info)}: {len(images)} images", 4000)
        w.seriesOpened.emit(loader.uid)

    def on_decoded(self, loader, image: DecodedImage) -> None:
        if self.is_current(loader) and image.index == self.shown:
            cine = self.w.cine_bar
            if cine.is_playing() and cine.controller.consistent:
                return          # consistent cine shows only frames at the common level
            self.show(image)

    def on_cine_level(self, loader, level) -> None:
        if self.is_current(loader):
            self.w.statusBar().showMessage(
                f"Consistent cine level: resolution {level[0]}, {level[1]} layer"
                f"{'s' if level[1] != 1 else ''}", 3000)

    def show(self, image: DecodedImage) -> bool:
        if self.series_info is None or not 0 <= image.index < len(self.series_info.images):
            return False
        if self.w.stack.set_image(image, self.series_info.images[image.index]):
            self.w.imageDisplayed.emit(image)
            self.w.transfers.mark_progress()
            return True
        return False

    # ------------------------------------------------------------------ the reader
    def on_slice_requested(self, index: int) -> None:
        loader = self.loader
        if loader is None or self.series_info is None:
            return
        self.shown = index
        best, patches = loader.set_focus(index, fetch=False)
        self._focus_timer.start()          # the plan follows once scrolling settles
        if best is not None:
            self.show(best)
        elif (st := loader.image_status(index)) is not None and st.res < 0:
            self.w.stack.clear_image()     # nothing of it yet: never leave another slice up
        for p in patches:
            self.show(p)
        self.w.cine_bar.set_current(index)
        self.w.transfers.mark_progress()

    def _move_focus(self) -> None:
        """Scrolling has settled: the shown slice (then its neighbours) comes first."""
        if self.loader is not None and self.shown is not None:
            self.loader.set_focus(self.shown)

    def on_region_requested(self, x: int, y: int, w: int, h: int) -> None:
        if self.loader is None or self.shown is None:
            return
        self.loader.request_region(self.shown, (x, y, w, h))
        self.w.statusBar().showMessage(f"Fetching region {w}×{h} at {x},{y} at full resolution…", 4000)

    def update_reduce(self) -> None:
        """V4: tell the loader the resolution the viewport needs now."""
        loader, series, transfers = self.loader, self.series_info, self.w.transfers
        if loader is None or series is None or not series.images:
            return
        meta = series.images[0]
        statuses = transfers.statuses
        numres = statuses[0].numres if statuses and statuses[0] else 1
        if self.w.stack.decoded() is not None:
            reduce = self.w.stack.useful_reduce(max_reduce=numres - 1)
        else:
            reduce = reduce_for_fit(meta.columns, meta.rows, *self.viewport(), numres)
        if reduce != loader.reduce:
            loader.set_reduce(reduce)
            transfers.statuses = list(loader.statuses())
            transfers.refresh_strip()
            transfers.update_bars()

    # ------------------------------------------------------------------ cine
    def on_cine_frame(self, index: int, level, image) -> None:
        if self.series_info is None:
            return
        self.shown = index
        if image is not None:
            self.show(image)
        self.w.transfers.mark_progress()

    def on_cine_playing(self, playing: bool) -> None:
        if playing or self.loader is None or self.shown is None:
            return
        shown = self.shown
        self.w.stack.request_slice(shown)     # emits sliceRequested unless already the target
        if self.loader.focus != shown or self.w.stack.decoded() is None:
            self.on_slice_requested(shown)
        else:
            best = self.loader.best(shown)
            if best is not None:
                self.show(best)

    def on_consistent_toggled(self, on: bool) -> None:
        if self.loader is not None:
            self.loader.set_cine_consistent(on)
