"""The study browser's requests: catalogue searches, the PACS list and C-FIND queries,
C-GET retrieve into the local store, and series thumbnails. Each runs in the worker pool
(or its own thread for a retrieve); a newer search supersedes an older one."""
from __future__ import annotations

from PySide6.QtCore import QObject
from PySide6.QtWidgets import QPushButton

from client.pool import VISIBLE

from ..workers import Task, ThumbnailBridge

__all__ = ["BrowseController"]


class BrowseController(QObject):
    """Uses of the window: ``backend``, ``settings`` (the AE title), ``browser``,
    ``series_ctl`` (to open a retrieved study) and its status bar."""

    def __init__(self, window) -> None:
        super().__init__(window)
        self.w = window
        self.thumbs = ThumbnailBridge(self)
        self.retrieve_task: Task | None = None     # the last PACS retrieve
        self._query_seq = 0

    def on_connected(self) -> None:
        """A new session: list its studies and PACS (the thumbnails were forgotten)."""
        self.w.browser.refresh()
        self.refresh_pacs_sources()

    def forget_thumbnails(self) -> None:
        self.thumbs.cancel_all()
        self.w.browser.clear_thumbnails()

    def run_query(self, queries: list[dict]) -> None:
        backend = self.w.backend
        if not backend.connected:
            return
        self._query_seq += 1
        seq = self._query_seq

        def work(_ctx):
            studies = backend.studies(queries)
            return studies, backend.series_of([s["StudyInstanceUID"] for s in studies])

        task = Task(work, name="query", pool=backend.pool, priority=VISIBLE, parent=self)

        def done(result) -> None:
            if seq == self._query_seq:          # a newer search supersedes this one
                self.w.browser.set_results(*result)

        def failed(error) -> None:
            if seq == self._query_seq:
                self.w.browser.set_error(f"Search failed: {error}")

        task.finished.connect(done)
        task.failed.connect(failed)
        task.start()

    def want_thumbnails(self, uids: list[str]) -> None:
        backend = self.w.backend
        if backend.registry is None:
            return
        for uid in uids[:200]:
            self.thumbs.request(backend.pool, backend.registry, uid)

    # ------------------------------------------------------------------ remote PACS
    def refresh_pacs_sources(self) -> None:
        backend = self.w.backend
        t = Task(lambda _ctx: backend.pacs_names(), name="pacs-names", pool=backend.pool,
                 parent=self)
        t.finished.connect(self.w.browser.set_pacs_sources)
        t.start()

    def run_remote_query(self, pacs: str, queries: list[dict]) -> None:
        self._query_seq += 1
        seq = self._query_seq
        backend, title, browser = self.w.backend, self.w.settings.dicom_ae_title(), self.w.browser
        task = Task(lambda _ctx: backend.pacs_studies(pacs, queries, title), name="pacs-query",
                    pool=backend.pool, priority=VISIBLE, parent=self)
        task.finished.connect(lambda rows: seq == self._query_seq
                              and browser.set_remote_results(rows))
        task.failed.connect(lambda e: seq == self._query_seq
                            and browser.set_error(f"{pacs}: {e}"))
        task.start()

    def retrieve_study(self, pacs: str, study_uid: str) -> Task:
        """C-GET a study from the PACS into the local store, progress in the status bar
        with a cancel button; then it is listed (and opened) from the image server."""
        w = self.w
        backend, title = w.backend, w.settings.dicom_ae_title()
        bar = w.statusBar()
        cancel = QPushButton("Cancel retrieve", w)
        bar.addPermanentWidget(cancel)
        task = Task(lambda ctx: backend.pacs_retrieve(pacs, study_uid, ae_title=title,
                                                      progress=ctx.progress,
                                                      cancelled=lambda: ctx.cancelled),
                    name="pacs-retrieve", parent=self)
        self.retrieve_task = task

        def on_cancel() -> None:
            task.cancel()
            cancel.setEnabled(False)
            bar.showMessage(f"Cancelling the retrieve from {pacs}…")

        def finish(counts) -> None:
            bar.removeWidget(cancel)
            cancel.deleteLater()
            bar.showMessage(f"Retrieved from {pacs}: {counts['completed']} received, "
                            f"{counts['imported']} new, {counts['failed']} failed"
                            + (" (cancelled)" if task.cancelled else ""), 10000)
            w.browser.source.setCurrentIndex(0)        # back to the server's studies
            if counts["imported"] or counts["duplicates"]:
                w.series_ctl.open_study(study_uid)

        def fail(error) -> None:
            bar.removeWidget(cancel)
            cancel.deleteLater()
            bar.showMessage(f"Retrieve from {pacs} failed: {error}", 15000)

        cancel.clicked.connect(on_cancel)
        task.progress.connect(lambda d, t: bar.showMessage(
            f"Retrieving from {pacs}: {d} of {t} instances"))
        task.finished.connect(finish)
        task.failed.connect(fail)
        bar.showMessage(f"Retrieving study {study_uid} from {pacs}…")
        return task.start()
