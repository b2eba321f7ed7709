"""Dialogs of the desktop app and its persistent settings (QSettings "MedView"/"medview").

They only build and wire their widgets; the window runs any work they ask for.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from PySide6.QtCore import QByteArray, QSettings, Qt, Signal
from PySide6.QtWidgets import (QAbstractItemView, QCheckBox, QDialog, QDialogButtonBox,
                               QFormLayout, QHBoxLayout, QHeaderView, QLabel, QLineEdit,
                               QListWidget, QListWidgetItem, QPushButton, QSpinBox,
                               QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from client.transferstats import format_bytes
from imaging.windowing import CT_PRESETS, WindowPreset

__all__ = ["ORGANISATION", "APPLICATION", "AppSettings", "LoginDialog", "PreferencesDialog",
           "ShortcutsDialog", "ImportResultDialog", "app_version", "about_text"]

ORGANISATION = "MedView"
APPLICATION = "medview"


def app_version() -> str:
    try:
        from importlib.metadata import version

        return version("medview")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "0.1.0"


def about_text() -> str:
    return (f"<h3>MedView {app_version()}</h3>"
            "<p>Progressive medical imaging workstation: images travel as JPEG 2000 "
            "packets (quality layers × resolution levels × precincts), so a whole series "
            "can be scrolled almost at once and sharpens while you work.</p>"
            "<p>Not for diagnostic use.</p>")


# --------------------------------------------------------------------------- settings

class AppSettings:
    """Typed access to the app's QSettings: last server, window layout, window presets,
    cache size limit, background prefetch."""

    DEFAULT_CACHE_MB = 2048

    def __init__(self, settings: QSettings | None = None) -> None:
        self.q = settings if settings is not None else QSettings(ORGANISATION, APPLICATION)

    # server
    def last_server(self) -> tuple[str, str]:
        return str(self.q.value("server/url", "") or ""), str(self.q.value("server/user", "") or "")

    def set_last_server(self, url: str, user: str) -> None:
        self.q.setValue("server/url", url)
        self.q.setValue("server/user", user)

    # window layout
    def geometry(self) -> QByteArray | None:
        v = self.q.value("window/geometry")
        return v if isinstance(v, QByteArray) and not v.isEmpty() else None

    def state(self) -> QByteArray | None:
        v = self.q.value("window/state")
        return v if isinstance(v, QByteArray) and not v.isEmpty() else None

    def set_layout(self, geometry: QByteArray, state: QByteArray) -> None:
        self.q.setValue("window/geometry", geometry)
        self.q.setValue("window/state", state)

    # presets
    def presets(self) -> list[WindowPreset]:
        """Window presets (the CT ones until the user changes the list)."""
        raw = self.q.value("window/presets")
        if raw:
            try:
                return [WindowPreset(str(p["name"]), float(p["center"]), float(p["width"]))
                        for p in json.loads(str(raw))]
            except (ValueError, KeyError, TypeError):
                pass
        return list(CT_PRESETS)

    def set_presets(self, presets: Sequence[WindowPreset]) -> None:
        self.q.setValue("window/presets", json.dumps(
            [{"name": p.name, "center": p.center, "width": p.width} for p in presets]))

    # cache
    def cache_limit_mb(self) -> int:
        try:
            return max(64, int(self.q.value("cache/limit_mb", self.DEFAULT_CACHE_MB)))
        except (TypeError, ValueError):
            return self.DEFAULT_CACHE_MB

    def set_cache_limit_mb(self, mb: int) -> None:
        self.q.setValue("cache/limit_mb", int(mb))

    def prefetch(self) -> bool:
        return str(self.q.value("loading/prefetch", "true")).lower() in ("true", "1")

    def set_prefetch(self, on: bool) -> None:
        self.q.setValue("loading/prefetch", "true" if on else "false")

    # DICOM listener of the bundled server (0 = off)
    def dicom_port(self) -> int:
        try:
            return max(0, min(65535, int(self.q.value("dicom/port", 0))))
        except (TypeError, ValueError):
            return 0

    def dicom_ae_title(self) -> str:
        return str(self.q.value("dicom/ae_title", "MEDVIEW") or "MEDVIEW")

    def set_dicom(self, port: int, ae_title: str) -> None:
        self.q.setValue("dicom/port", int(port))
        self.q.setValue("dicom/ae_title", ae_title.strip() or "MEDVIEW")

    def sync(self) -> None:
        self.q.sync()


# --------------------------------------------------------------------------- dialogs

class LoginDialog(QDialog):
    """Server URL, user name and password for ``--server``."""

    def __init__(self, url: str = "", user: str = "", message: str = "",
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Connect to an image server")
        self.url = QLineEdit(url, self)
        self.user = QLineEdit(user, self)
        self.password = QLineEdit(self)
        self.password.setEchoMode(QLineEdit.EchoMode.Password)
        self.message = QLabel(message, self)
        self.message.setWordWrap(True)
        self.message.setStyleSheet("color: #c33")
        self.message.setVisible(bool(message))
        form = QFormLayout()
        form.addRow("Server URL", self.url)
        form.addRow("User", self.user)
        form.addRow("Password", self.password)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok
                                   | QDialogButtonBox.StandardButton.Cancel, self)
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Log in")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(self.message)
        layout.addLayout(form)
        layout.addWidget(buttons)
        (self.password if url and user else self.url).setFocus()

    def values(self) -> tuple[str, str, str | None]:
        return (self.url.text().strip(), self.user.text().strip() or "local",
                self.password.text() or None)


class PreferencesDialog(QDialog):
    """Cache use and limit (with "Clear cache"), background prefetch, window presets."""

    clearCacheRequested = Signal()

    def __init__(self, settings: AppSettings, cache_path: Path | None,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Preferences")
        self.settings = settings
        self.cache_path = QLabel(str(cache_path) if cache_path else "(no cache)", self)
        self.cache_path.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.cache_use = QLabel("…", self)
        self.cache_limit = QSpinBox(self)
        self.cache_limit.setRange(64, 1 << 20)
        self.cache_limit.setSingleStep(256)
        self.cache_limit.setSuffix(" MB")
        self.cache_limit.setValue(settings.cache_limit_mb())
        self.clear_button = QPushButton("Clear cache", self)
        self.clear_button.setEnabled(cache_path is not None)
        self.clear_button.clicked.connect(self.clearCacheRequested)
        self.prefetch = QCheckBox("Fetch the rest of a series in the background", self)
        self.prefetch.setChecked(settings.prefetch())
        self.dicom_port = QSpinBox(self)
        self.dicom_port.setRange(0, 65535)
        self.dicom_port.setSpecialValueText("off")
        self.dicom_port.setValue(settings.dicom_port())
        self.dicom_port.setToolTip("The bundled server also receives and answers DICOM "
                                   "(C-STORE, C-FIND, C-MOVE, C-GET) on this port, on this "
                                   "machine only (127.0.0.1)")
        self.dicom_ae = QLineEdit(settings.dicom_ae_title(), self)
        self.dicom_ae.setMaxLength(16)

        self.presets = QListWidget(self)
        for p in settings.presets():
            item = QListWidgetItem(f"{p.name}  (L {p.center:g}, W {p.width:g})")
            item.setData(Qt.ItemDataRole.UserRole, p)
            self.presets.addItem(item)
        remove = QPushButton("Remove preset", self)
        remove.clicked.connect(self._remove_selected)
        restore = QPushButton("Restore CT presets", self)
        restore.clicked.connect(self._restore_presets)

        form = QFormLayout()
        form.addRow("Packet cache", self.cache_path)
        use_row = QHBoxLayout()
        use_row.addWidget(self.cache_use, 1)
        use_row.addWidget(self.clear_button)
        form.addRow("In use", use_row)
        form.addRow("Size limit", self.cache_limit)
        form.addRow("", self.prefetch)
        form.addRow("DICOM port (bundled server)", self.dicom_port)
        form.addRow("DICOM AE title", self.dicom_ae)
        preset_buttons = QHBoxLayout()
        preset_buttons.addWidget(remove)
        preset_buttons.addWidget(restore)
        preset_buttons.addStretch(1)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok
                                   | QDialogButtonBox.StandardButton.Cancel, self)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(QLabel("Window presets", self))
        layout.addWidget(self.presets)
        layout.addLayout(preset_buttons)
        layout.addWidget(buttons)

    def _remove_selected(self) -> None:
        for item in self.presets.selectedItems():
            self.presets.takeItem(self.presets.row(item))

    def _restore_presets(self) -> None:
        self.presets.clear()
        for p in CT_PRESETS:
            item = QListWidgetItem(f"{p.name}  (L {p.center:g}, W {p.width:g})")
            item.setData(Qt.ItemDataRole.UserRole, p)
            self.presets.addItem(item)

    def set_usage(self, nbytes: int, images: int) -> None:
        self.cache_use.setText(f"{format_bytes(nbytes)} in {images} image{'s' if images != 1 else ''}")

    def chosen_presets(self) -> list[WindowPreset]:
        return [self.presets.item(i).data(Qt.ItemDataRole.UserRole)
                for i in range(self.presets.count())]

    def save(self) -> None:
        """Write the choices to the settings."""
        self.settings.set_cache_limit_mb(self.cache_limit.value())
        self.settings.set_prefetch(self.prefetch.isChecked())
        self.settings.set_presets(self.chosen_presets())
        self.settings.set_dicom(self.dicom_port.value(), self.dicom_ae.text())


class ShortcutsDialog(QDialog):
    """Keyboard shortcuts and mouse bindings, as a two-column table."""

    def __init__(self, rows: Sequence[tuple[str, str]], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Keyboard shortcuts")
        self.table = QTableWidget(len(rows), 2, self)
        self.table.setHorizontalHeaderLabels(["Keys", "Action"])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        for r, (keys, what) in enumerate(rows):
            self.table.setItem(r, 0, QTableWidgetItem(keys))
            self.table.setItem(r, 1, QTableWidgetItem(what))
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close, self)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(self.table)
        layout.addWidget(buttons)
        self.resize(520, 560)

    def rows(self) -> list[tuple[str, str]]:
        return [(self.table.item(r, 0).text(), self.table.item(r, 1).text())
                for r in range(self.table.rowCount())]


class ImportResultDialog(QDialog):
    """What an import did, file by file: imported, already there, or skipped and why."""

    openRequested = Signal(str)
    """Open this study (the first one imported)."""

    def __init__(self, outcome, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Import result")
        self.outcome = outcome
        report = outcome.report
        rows: list[tuple[str, str, str]] = []
        for s in report.skipped:
            rows.append((str(s.path), "error" if s.is_error else "skipped", s.reason))
        for d in report.duplicates:
            rows.append((str(d.path), "already stored", "identical file already in the store"))
        for q in getattr(report, "quarantined", ()):
            rows.append((str(q.path), "quarantined", q.reason))
        for f in report.imported:
            rows.append((str(f.path), "imported (flagged)" if f.flags else "imported",
                         f"{f.frames} frame{'s' if f.frames != 1 else ''}, SOP {f.sop_instance_uid}"
                         + (f"; impossible values: {'; '.join(f.flags)}" if f.flags else "")))
        self._rows = rows
        head = report.summary()
        if outcome.cancelled:
            head += f" — cancelled after {outcome.processed} of {outcome.total} files"
        self.summary = QLabel(head, self)
        self.summary.setWordWrap(True)
        self.table = QTableWidget(len(rows), 3, self)
        self.table.setHorizontalHeaderLabels(["File", "Result", "Details"])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        for r, row in enumerate(rows):
            for c, text in enumerate(row):
                item = QTableWidgetItem(text)
                item.setToolTip(text)
                self.table.setItem(r, c, item)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Interactive)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        self.table.setColumnWidth(0, 320)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close, self)
        buttons.rejected.connect(self.reject)
        if outcome.studies:
            open_button = buttons.addButton("Open study", QDialogButtonBox.ButtonRole.AcceptRole)
            open_button.clicked.connect(lambda: self.openRequested.emit(outcome.studies[0]))
            open_button.clicked.connect(self.accept)
        layout = QVBoxLayout(self)
        layout.addWidget(self.summary)
        layout.addWidget(self.table)
        layout.addWidget(buttons)
        self.resize(820, 420)

    def rows(self) -> list[tuple[str, str, str]]:
        """(file, result, details) per file, errors first."""
        return list(self._rows)
