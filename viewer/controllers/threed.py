"""3-D: the shown series, or a series selected from a folder, in the 2×2 MPR + VR
window. The series description (a request) and the folder scan (file reads, M1–M3) run
in the worker pool; the window opens on the UI thread."""
from __future__ import annotations

from PySide6.QtCore import QObject
from PySide6.QtWidgets import QFileDialog

from client.pool import INTERACTION

from ..workers import Task

__all__ = ["ThreeDController"]


class ThreeDController(QObject):
    """Uses of the window: ``backend``, ``series_ctl`` (the shown series and its
    loader's packets) and its status bar."""

    def __init__(self, window) -> None:
        super().__init__(window)
        self.w = window
        self.windows: list = []          # the MPR windows opened (closed ones dropped)

    def _message(self, text: str, ms: int = 0) -> None:
        self.w.statusBar().showMessage(text, ms)

    def _keep(self, win) -> None:
        self.windows = [w for w in self.windows if w.isVisible()] + [win]

    def open_mpr(self, thick_to_thin: bool = False):
        """Open the current series in the 2×2 MPR + VR layout, sharing the stack view's
        packets (the loader's SeriesData) so nothing is fetched twice."""
        from ..mprlayout import open_series

        backend, series = self.w.backend, self.w.series_ctl
        if series.series_uid is None or backend.session is None:
            self._message("Open a series first", 4000)
            return None
        loader, uid = series.loader, series.series_uid
        sd = loader.sd if loader is not None and loader.uid == uid else None

        def show(described):
            try:
                win = open_series(backend.session, uid, cache=backend.cache, series=described,
                                  parent=self.w, thick_to_thin=thick_to_thin,
                                  memory=backend.memory, pool=backend.pool)
            except RuntimeError:
                return None      # the refusal (too few images, no volume) was shown
            self._keep(win)
            return win

        if sd is not None:
            return show(sd)
        # the series description is a request: made in the pool, never on the UI thread
        task = Task(lambda _ctx: backend.registry.get(uid), name="mpr-series",
                    pool=backend.pool, priority=INTERACTION, parent=self)
        task.finished.connect(show)
        task.failed.connect(lambda e: self._message(f"Cannot open MPR: {e}", 8000))
        self._message("Opening MPR…")
        return task.start()

    def open_mpr_folder(self) -> None:
        """Pick a folder; its DICOM files are scanned and the series selected in a worker
        (M1–M3), then the MPR window opens on the UI thread."""
        from imaging.series_select import ServerCatalogue, select_series

        from ..mprlayout import open_selection

        backend = self.w.backend
        folder = QFileDialog.getExistingDirectory(self.w, "Folder with a DICOM series")
        if not folder:
            return
        catalogue = ServerCatalogue(backend.session) if backend.session else None
        task = Task(lambda _ctx: select_series(folder, catalogue=catalogue), name="select",
                    pool=backend.pool, priority=INTERACTION, parent=self)

        def selected(sel) -> None:
            try:
                win = open_selection(sel, parent=self.w, memory=backend.memory, pool=backend.pool,
                                     report=lambda m: self._message((m.splitlines() or [""])[0], 8000))
            except RuntimeError:
                return           # the refusal (too few images) was shown
            self._keep(win)

        task.finished.connect(selected)
        task.failed.connect(lambda e: self._message(f"Cannot read the folder: {e}", 8000))
        self._message(f"Reading {folder}…")
        task.start()
