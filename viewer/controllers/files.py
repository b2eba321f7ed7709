"""Local files: import of DICOM files and folders into the bundled server's store (menu,
drag and drop, a cancellable progress dialog, the per-file result) and export of a study's
original files with a DICOMDIR. Both run on their own worker thread."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QObject, Qt
from PySide6.QtWidgets import QFileDialog, QMessageBox, QProgressDialog

from ..dialogs import ImportResultDialog
from ..services import ImportOutcome
from ..workers import Task

__all__ = ["FilesController"]


class FilesController(QObject):
    """Uses of the window: ``backend``, ``browser``, ``series_ctl`` (to open what was
    imported), ``importFinished`` and its status bar."""

    def __init__(self, window) -> None:
        super().__init__(window)
        self.w = window
        self.last_import_dialog: ImportResultDialog | None = None
        self.import_progress: QProgressDialog | None = None

    # ------------------------------------------------------------------ import
    def choose_folder(self) -> None:
        if not self.check_import():
            return
        folder = QFileDialog.getExistingDirectory(self.w, "Import a folder of DICOM files")
        if folder:
            self.import_paths([folder])

    def choose_files(self) -> None:
        if not self.check_import():
            return
        files, _ = QFileDialog.getOpenFileNames(self.w, "Import DICOM files")
        if files:
            self.import_paths(files)

    def check_import(self) -> bool:
        backend = self.w.backend
        if backend.can_import:
            return True
        QMessageBox.information(
            self.w, "Import",
            f"Import adds files to the bundled local server's store. You are connected to "
            f"{backend.url or 'no server'}, which keeps its own store, so import is "
            f"disabled. Start medview without --server to import files.")
        return False

    def import_paths(self, paths: list[str | Path]) -> Task | None:
        """Import files/folders into the local store, with a cancellable progress dialog,
        then list what happened per file and open the (first) imported study."""
        if not self.check_import():
            return None
        backend = self.w.backend
        dialog = QProgressDialog("Looking for DICOM files…", "Cancel", 0, 0, self.w)
        dialog.setWindowTitle("Import")
        dialog.setWindowModality(Qt.WindowModality.WindowModal)
        dialog.setMinimumDuration(0)
        dialog.setAutoClose(False)
        dialog.setAutoReset(False)
        self.import_progress = dialog

        def work(ctx):
            return backend.import_paths(paths, progress=ctx.progress, log_fn=ctx.message,
                                        cancelled=lambda: ctx.cancelled)

        task = Task(work, name="import", parent=self)

        def on_progress(done: int, total: int) -> None:
            dialog.setMaximum(max(total, 1))
            dialog.setValue(min(done, max(total, 1)))

        def on_cancel() -> None:
            task.cancel()
            dialog.setLabelText("Cancelling after the files in progress…")

        def finish(outcome: ImportOutcome) -> None:
            dialog.canceled.disconnect(on_cancel)
            dialog.close()
            self._import_done(outcome)

        def fail(error: BaseException) -> None:
            dialog.canceled.disconnect(on_cancel)
            dialog.close()
            QMessageBox.critical(self.w, "Import failed", str(error))

        task.progress.connect(on_progress)
        task.message.connect(lambda m: dialog.setLabelText(m if len(m) < 110 else "…" + m[-108:]))
        dialog.canceled.connect(on_cancel)
        task.finished.connect(finish)
        task.failed.connect(fail)
        dialog.show()
        return task.start()

    def _import_done(self, outcome: ImportOutcome) -> None:
        w = self.w
        r = outcome.report
        w.statusBar().showMessage(f"Import: {r.summary()}" +
                                  (" (cancelled)" if outcome.cancelled else ""), 8000)
        dlg = ImportResultDialog(outcome, w)
        dlg.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose, True)
        dlg.openRequested.connect(w.series_ctl.open_study)
        self.last_import_dialog = dlg
        dlg.show()
        w.browser.refresh()
        if outcome.studies:
            w.series_ctl.open_study(outcome.studies[0])
        w.importFinished.emit(outcome)

    def drag_enter(self, event) -> None:
        """Local files and folders dropped on the window are imported."""
        urls = event.mimeData().urls() if event.mimeData().hasUrls() else []
        if urls and all(u.isLocalFile() for u in urls):
            event.acceptProposedAction()
        else:
            event.ignore()

    def drop(self, event) -> None:
        paths = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
        if paths:
            event.acceptProposedAction()
            self.import_paths(paths)

    # ------------------------------------------------------------------ export
    def choose_export(self) -> None:
        study = self.w.browser.selected_study()
        if study is None:
            QMessageBox.information(self.w, "Export", "Select a study (or one of its series) "
                                    "in the study browser first.")
            return
        folder = QFileDialog.getExistingDirectory(self.w, "Export the study into an empty folder")
        if folder:
            self.export_study(study, folder)

    def export_study(self, study_uid: str, out: str | Path) -> Task:
        """Original files and a DICOMDIR into ``out``, off the UI thread."""
        backend, bar = self.w.backend, self.w.statusBar()
        task = Task(lambda ctx: backend.export_study(study_uid, out, progress=ctx.progress),
                    name="export", parent=self)
        task.progress.connect(lambda d, t: bar.showMessage(f"Exporting: {d} of {t} files"))
        task.finished.connect(lambda rep: bar.showMessage(rep.summary(), 10000))
        task.failed.connect(lambda e: QMessageBox.critical(self.w, "Export failed", str(e)))
        return task.start()
