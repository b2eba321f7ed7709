"""Connecting: the bundled server (started, with the sample study on first run, off the UI
thread) or a login to a remote server, and what a new session changes in the window."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QObject
from PySide6.QtWidgets import QMessageBox

from ..dialogs import LoginDialog
from ..workers import Task

__all__ = ["ConnectionController"]


class ConnectionController(QObject):
    """Uses of the window: ``config``, ``settings``, ``backend``, the other controllers
    (each forgets the old session or starts on the new one), the import actions,
    ``browser``, ``connected`` / ``connectionFailed`` / ``serverBusy``."""

    def __init__(self, window) -> None:
        super().__init__(window)
        self.w = window
        self.closing = False                 # the window is closing: ask nothing more

    def start(self) -> None:
        """Connect as configured: the bundled server, or the login dialog for --server."""
        config = self.w.config
        if config.server_url:
            if config.password is not None:
                self.connect_to(config.server_url, config.user, config.password)
            else:
                self.ask_login(config.server_url, config.user)
        else:
            self.start_bundled(config.store_dir)

    def start_bundled(self, store_dir: Path | None) -> Task:
        """Start the bundled server on ``store_dir`` (sample study on first run), off the
        UI thread, then log in as the local user."""
        from client.appdirs import default_data_dir

        w = self.w
        store = Path(store_dir) if store_dir else default_data_dir() / "store"
        w.transfers.busy(True, f"Preparing the local store {store} (the sample study is "
                               f"created on first run and takes about 20 s)…")
        dicom = (w.settings.dicom_port(), w.settings.dicom_ae_title())
        backend, sample = w.backend, w.config.sample
        task = Task(lambda ctx: backend.start_bundled(store, ctx.message, sample=sample,
                                                      dicom_port=dicom[0], ae_title=dicom[1]),
                    name="bundled-server", parent=self)
        task.message.connect(lambda m: w.statusBar().showMessage(m))
        task.finished.connect(self._on_connected)
        task.failed.connect(lambda e: self._on_connect_failed(e, interactive=False))
        return task.start()

    def adopt_server(self, server, own: bool = False) -> Task:
        """Use a running embedded server (its store receives imports) and log in."""
        self.w.backend.adopt_server(server, own=own)
        return self.connect_to(server.url, "local", None, interactive=False)

    def connect_to(self, url: str, user: str = "local", password: str | None = None,
                   interactive: bool = False) -> Task:
        """Log in to ``url`` off the UI thread (``connected`` or ``connectionFailed``)."""
        self.w.transfers.busy(True, f"Connecting to {url}…")
        backend = self.w.backend

        def login(_ctx) -> str:
            backend.login(url, user, password)
            return url

        task = Task(login, name="login", parent=self)
        task.finished.connect(self._on_connected)
        task.failed.connect(lambda e: self._on_connect_failed(e, interactive, url, user))
        return task.start()

    def ask_login(self, url: str | None = None, user: str | None = None, message: str = "") -> None:
        last_url, last_user = self.w.settings.last_server()
        dlg = LoginDialog(url or last_url or "http://", user or last_user or "local", message, self.w)
        if dlg.exec() == LoginDialog.DialogCode.Accepted:
            url, user, password = dlg.values()
            self.connect_to(url, user, password, interactive=True)

    def _on_connected(self, url: str) -> None:
        w = self.w
        backend = w.backend
        w.transfers.busy(False)
        loader = w.series_ctl.loader
        if loader is not None and loader.registry is not backend.registry:
            w.series_ctl.forget()
        w.browsing.forget_thumbnails()
        s = backend.session
        if backend.server is None:               # a remote server: offer it next time
            w.settings.set_last_server(url, s.username)
        where = "bundled server" if backend.own_server else url
        w.transfers.server_label.setText(f"{s.username} @ {where}")
        w.statusBar().showMessage(f"Connected to {url} as {s.username}", 5000)
        s.on_busy = w.serverBusy.emit             # client.session retries, we say so
        self.set_connected_ui(True)
        w.reading.set_session(s)
        w.browsing.on_connected()
        if w.config.station:
            w.slides.show_station_worklist()
        w.connected.emit(url)

    def _on_connect_failed(self, error: BaseException, interactive: bool, url: str = "",
                           user: str = "") -> None:
        w = self.w
        w.transfers.busy(False)
        message = str(error)
        w.statusBar().showMessage(f"Not connected: {message}")
        w.connectionFailed.emit(message)
        if self.closing:
            return
        if interactive:
            self.ask_login(url, user, message)
        else:
            QMessageBox.critical(w, "MedView", f"Could not connect:\n{message}")

    def set_connected_ui(self, on: bool) -> None:
        w = self.w
        can_import = on and w.backend.can_import
        for a in (w.act_open_folder, w.act_import_files, w.act_export):
            a.setEnabled(can_import)
            a.setToolTip(a.statusTip() if can_import else
                         "Import goes into the bundled server's store; connected to a "
                         "remote server, import is disabled")
        w.browser.setEnabled(on)
