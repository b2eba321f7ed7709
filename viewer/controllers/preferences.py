"""The preferences dialog and what its settings change: the packet cache's size (usage
read, cache cleared and limit applied in workers), background loading of the shown series,
window presets and the bundled server's DICOM listener."""
from __future__ import annotations

import shiboken6
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QMessageBox

from ..dialogs import PreferencesDialog
from ..workers import Task

__all__ = ["show_preferences"]


def show_preferences(window) -> PreferencesDialog:
    """Open the dialog on ``window`` (uses its ``settings``, ``backend``, ``series_ctl``,
    ``presets`` and status bar)."""
    backend, settings = window.backend, window.settings
    dlg = PreferencesDialog(settings, backend.cache_path, window)

    def refresh_usage() -> None:
        t = Task(lambda _ctx: backend.cache_usage(), name="cache-usage", pool=backend.pool,
                 parent=window)
        # the dialog may be closed (and deleted) before the figure arrives
        t.finished.connect(lambda u: shiboken6.isValid(dlg) and dlg.set_usage(*u))
        t.failed.connect(lambda e: shiboken6.isValid(dlg) and dlg.cache_use.setText(f"unknown ({e})"))
        t.start()

    def clear() -> None:
        if QMessageBox.question(window, "Clear cache", "Delete every cached packet? Images "
                                "will be fetched again from the server.") != QMessageBox.StandardButton.Yes:
            return
        dlg.cache_use.setText("Clearing…")
        t = Task(lambda _ctx: backend.clear_cache(), name="cache-clear", parent=window)
        t.finished.connect(lambda _r: refresh_usage())
        t.start()

    dlg.clearCacheRequested.connect(clear)
    refresh_usage()

    def accepted() -> None:
        dlg.save()
        limit = settings.cache_limit_mb() << 20
        Task(lambda _ctx: backend.set_cache_limit(limit), name="cache-limit", parent=window).start()
        loader = window.series_ctl.loader
        if loader is not None:
            loader.set_prefetch(settings.prefetch())
        window.presets.rebuild()
        if backend.server is not None and backend.own_server:
            port, title = settings.dicom_port(), settings.dicom_ae_title()
            bar = window.statusBar()
            t = Task(lambda _ctx: backend.set_dicom(port, title), name="dicom", parent=window)
            t.finished.connect(lambda _r: bar.showMessage(
                f"DICOM listener {title} on port {port}" if port else "DICOM listener off"))
            t.failed.connect(lambda e: bar.showMessage(f"DICOM listener not started: {e}"))
            t.start()

    dlg.accepted.connect(accepted)
    dlg.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose, True)
    dlg.open()
    return dlg
