"""Slides (issue 6): the server's slides listed and opened in their own windows, and the
reading station's worklist (W7). Listing, the slide description and the generated-tile
cache are made ready in the worker pool; the windows open on the UI thread."""
from __future__ import annotations

from PySide6.QtCore import QObject
from PySide6.QtWidgets import QInputDialog, QMessageBox

from client.pool import INTERACTION

from ..workers import Task

__all__ = ["SlideController"]


class SlideController(QObject):
    """Uses of the window: ``backend``, ``config`` (``station``, ``station_cache``),
    ``slideOpened`` and its status bar."""

    def __init__(self, window) -> None:
        super().__init__(window)
        self.w = window
        self.windows: list = []          # the slide windows opened (closed ones dropped)
        self.worklist = None             # the station's worklist window, once shown

    def _message(self, text: str, ms: int = 0) -> None:
        self.w.statusBar().showMessage(text, ms)

    def choose_slide(self) -> None:
        """List the server's slides (off the UI thread), let the user pick one, open it."""
        backend = self.w.backend
        if backend.session is None:
            self._message("Not connected", 4000)
            return
        task = Task(lambda _ctx: backend.list_slides(), name="slides",
                    pool=backend.pool, priority=INTERACTION, parent=self)

        def listed(rows: list[dict]) -> None:
            if not rows:
                QMessageBox.information(self.w, "MedView", "The server holds no slides.")
                return
            labels = [f"{r.get('patient_id') or '?'} · {r.get('label') or r['slide_uid']} · "
                      f"{r.get('width')}×{r.get('height')} px · {r.get('state') or 'high'} res"
                      + (" · QC FLAGGED" if r.get("qc_status") == "flagged" else "")
                      for r in rows]
            label, ok = QInputDialog.getItem(self.w, "Open slide", "Slide:", labels, 0, False)
            if ok:
                self.open_slide(rows[labels.index(label)]["slide_uid"])

        task.finished.connect(listed)
        task.failed.connect(lambda e: self._message(f"Cannot list slides: {e}", 6000))
        task.start()

    def open_slide(self, slide_uid: str) -> Task | None:
        """Open a slide in its own window; its description is fetched off the UI thread."""
        from client.slides import RemoteSlide

        backend = self.w.backend
        session = backend.session
        if session is None:
            return None

        def load(_ctx):
            provider = RemoteSlide(session, slide_uid)
            # generated tiles: the temporary tier (bundled) or the client-side folder
            return provider, backend.sr_cache_for(provider)

        task = Task(load, name="slide", pool=backend.pool, priority=INTERACTION, parent=self)

        def failed(e) -> None:
            if getattr(e, "status", None) == 403:
                from client.policy_text import explain_slide_rights_error

                text = explain_slide_rights_error(e)
            else:
                text = f"Cannot open the slide: {e}"
            self._message(text, 10000)

        task.finished.connect(lambda loaded: self.show_slide(*loaded))
        task.failed.connect(failed)
        task.start()
        return task

    def show_slide(self, provider, sr_cache=None):
        """A slide window for an opened provider (UI thread)."""
        from ..slideview import open_slide_window

        backend = self.w.backend
        pane = open_slide_window(provider, sr_cache=sr_cache, cache_bytes=backend.memory,
                                 pool=backend.pool)
        # the pane's rights banner and news (label refused, rights changed) also go
        # to the status bar, in plain words
        pane.notice.connect(lambda text: self._message(text, 15000))
        pane.show()
        if pane.rights_text:
            self._message(pane.rights_text, 15000)
        self.windows = [w for w in self.windows if w.isVisible()] + [pane]
        self.w.slideOpened.emit(pane)
        return pane

    def show_station_worklist(self):
        """The reading station's worklist (``medview --station NAME``), refreshed."""
        from client.stations import Station

        from ..worklist import StationWorklistWindow

        backend, config = self.w.backend, self.w.config
        if backend.session is None or not config.station:
            self._message("Not connected" if config.station else
                          "This window is not a reading station "
                          "(start medview --station NAME)", 6000)
            return None
        w = self.worklist
        if w is None or w.station.session is not backend.session:
            if w is not None:
                w.close()
            station = Station(backend.session, config.station, config.station_cache,
                              packet_cache=backend.cache)
            w = self.worklist = StationWorklistWindow(station, backend, self.w)
            w.notice.connect(lambda text: self._message(text, 10000))
            w.opened.connect(lambda got, sr: self.show_slide(got.provider, sr))
        w.show()
        w.refresh()
        return w
