"""Study browser: patient / study / series tree with search, filters, image counts and
series thumbnails that arrive progressively; and, as a second source, a remote PACS
(its studies listed by C-FIND, one retrieved into the local store on request).

The widget does no network work: it says which queries it wants
(:attr:`StudyBrowser.queryRequested`) and which thumbnails (:attr:`thumbnailsWanted`),
and the window answers with :meth:`StudyBrowser.set_results` and
:meth:`StudyBrowser.set_thumbnail`. The query building and grouping below are plain
functions, testable without a window.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PySide6.QtCore import QDate, QSize, Qt, QTimer, Signal
from PySide6.QtGui import QIcon, QPixmap
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDateEdit, QHBoxLayout, QHeaderView,
                               QLabel, QLineEdit, QPushButton, QTreeWidget, QTreeWidgetItem,
                               QVBoxLayout, QWidget)

from imaging.overlay import format_date, format_person_name
from .stackview import numpy_to_qimage

__all__ = ["MODALITIES", "study_queries", "remote_queries", "PatientGroup", "group_studies", "series_label",
           "StudyBrowser"]

MODALITIES = ("CT", "MR", "CR", "DX", "US", "XA", "MG", "PT", "NM", "RF", "OT", "SC")
THUMBNAIL_SIZE = 64
_ROLE = Qt.ItemDataRole.UserRole


# --------------------------------------------------------------------------- logic (no Qt)

def study_queries(text: str = "", modality: str | None = None, date_from: str | None = None,
                  date_to: str | None = None) -> list[dict]:
    """QIDO-RS study queries for the browser's filters; the results are merged.

    ``text`` matches the patient name *or* ID (two queries), as a substring unless it
    holds its own ``*``/``?`` wildcards; dates are ``YYYYMMDD``.
    """
    base: dict = {}
    if modality:
        base["ModalitiesInStudy"] = modality
    if date_from or date_to:
        base["StudyDate"] = f"{date_from or ''}-{date_to or ''}"
    text = text.strip()
    if not text:
        return [base]
    pattern = text if ("*" in text or "?" in text) else f"*{text}*"
    return [dict(base, PatientName=pattern), dict(base, PatientID=pattern)]


def remote_queries(text: str = "", modality: str | None = None, date_from: str | None = None,
                   date_to: str | None = None) -> list[dict]:
    """C-FIND study queries (keyword arguments of ``Pacs.find_studies``) for the
    browser's filters: the text matches the patient's name *or* ID, as for QIDO."""
    base: dict = {}
    if modality:
        base["modality"] = modality
    if date_from or date_to:
        base["date"] = f"{date_from or ''}-{date_to or ''}"
    text = text.strip()
    if not text:
        return [base]
    pattern = text if ("*" in text or "?" in text) else f"*{text}*"
    return [dict(base, name=pattern), dict(base, patient=pattern)]


@dataclass
class PatientGroup:
    patient_id: str
    patient_name: str
    studies: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        name = format_person_name(self.patient_name) or "(no name)"
        return f"{name}  [{self.patient_id}]" if self.patient_id else name


def group_studies(studies: Sequence[dict]) -> list[PatientGroup]:
    """Studies grouped by patient (ID and name), patients in the order first seen."""
    groups: dict[tuple[str, str], PatientGroup] = {}
    for st in studies:
        key = (st.get("PatientID") or "", st.get("PatientName") or "")
        groups.setdefault(key, PatientGroup(*key)).studies.append(st)
    return list(groups.values())


def study_label(st: dict) -> str:
    parts = [format_date(st.get("StudyDate") or ""), st.get("StudyDescription") or ""]
    return "  ".join(p for p in parts if p) or st.get("StudyInstanceUID", "")


def series_label(se: dict) -> str:
    """E.g. ``"#2  Axial 2.5 mm"``."""
    number = se.get("SeriesNumber")
    desc = se.get("SeriesDescription") or "(no description)"
    return f"#{number}  {desc}" if number is not None else desc


def series_images(se: dict) -> int:
    return int(se.get("NumberOfImages") or se.get("NumberOfSeriesRelatedInstances") or 0)


# --------------------------------------------------------------------------- widget

class StudyBrowser(QWidget):
    """Patient / study / series tree with search and filters."""

    seriesActivated = Signal(str)
    """A series was double-clicked (or Enter pressed on it): open it."""
    queryRequested = Signal(list)
    """The filters changed: run these QIDO queries and call :meth:`set_results`."""
    thumbnailsWanted = Signal(list)
    """Series UIDs now listed whose thumbnails are wanted."""
    remoteQueryRequested = Signal(str, list)
    """The source is a remote PACS: run these C-FIND queries on it (its name) and call
    :meth:`set_remote_results`."""
    retrieveRequested = Signal(str, str)
    """Retrieve this study (PACS name, Study Instance UID) into the local store."""

    COLUMNS = ("Patient / study / series", "Images", "Date", "Mod.")

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._series_items: dict[str, QTreeWidgetItem] = {}
        self._thumbnails: dict[str, QIcon] = {}
        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(300)
        self._debounce.timeout.connect(self.refresh)
        self._build_filters()
        self._build_source()
        self._build_tree()
        self._lay_out()

    def _build_filters(self) -> None:
        """Name search, modality, date range, refresh: a change queries again (typing
        and dates after a pause)."""
        self.search = QLineEdit(self)
        self.search.setPlaceholderText("Patient name or ID")
        self.search.setClearButtonEnabled(True)
        self.search.textChanged.connect(lambda _t: self._debounce.start())
        self.search.returnPressed.connect(self.refresh)

        self.modality = QComboBox(self)
        self.modality.addItem("Any modality", None)
        for m in MODALITIES:
            self.modality.addItem(m, m)
        self.modality.currentIndexChanged.connect(lambda _i: self.refresh())

        self.date_filter = QCheckBox("Date", self)
        today = QDate.currentDate()
        self.date_from = QDateEdit(today.addYears(-1), self)
        self.date_to = QDateEdit(today, self)
        for edit in (self.date_from, self.date_to):
            edit.setCalendarPopup(True)
            edit.setDisplayFormat("yyyy-MM-dd")
            edit.setEnabled(False)
            edit.dateChanged.connect(lambda _d: self._debounce.start())
        self.date_filter.toggled.connect(self._on_date_toggled)

        self.refresh_button = QPushButton("Refresh", self)
        self.refresh_button.clicked.connect(self.refresh)

    def _build_source(self) -> None:
        """This server or a remote PACS (shown once the server names one), and retrieve."""
        self.source = QComboBox(self)
        self.source.addItem("This server", None)
        self.source.setToolTip("Where the studies come from: the image server, or a remote "
                               "PACS (medview-server pacs add)")
        self.source.setVisible(False)
        self.source.currentIndexChanged.connect(lambda _i: self._on_source_changed())
        self.retrieve_button = QPushButton("Retrieve", self)
        self.retrieve_button.setToolTip("Copy the selected study from the PACS into the "
                                        "local store")
        self.retrieve_button.setVisible(False)
        self.retrieve_button.setEnabled(False)
        self.retrieve_button.clicked.connect(self._on_retrieve)

    def _build_tree(self) -> None:
        self.tree = QTreeWidget(self)
        self.tree.setColumnCount(len(self.COLUMNS))
        self.tree.setHeaderLabels(list(self.COLUMNS))
        self.tree.setIconSize(QSize(THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        self.tree.setUniformRowHeights(False)
        self.tree.setAlternatingRowColors(True)
        header = self.tree.header()
        header.setStretchLastSection(False)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for col in range(1, len(self.COLUMNS)):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        header.setMinimumSectionSize(36)
        self.tree.setMinimumWidth(360)
        self.tree.itemActivated.connect(self._on_activated)
        self.tree.currentItemChanged.connect(lambda _c, _p: self._update_retrieve())

        self.status = QLabel("", self)

    def _lay_out(self) -> None:
        row0 = QHBoxLayout()
        row0.addWidget(self.source, 1)
        row0.addWidget(self.retrieve_button)
        row1 = QHBoxLayout()
        row1.addWidget(self.search, 1)
        row1.addWidget(self.modality)
        row2 = QHBoxLayout()
        row2.addWidget(self.date_filter)
        row2.addWidget(self.date_from)
        row2.addWidget(QLabel("to", self))
        row2.addWidget(self.date_to)
        row2.addStretch(1)
        row2.addWidget(self.refresh_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(row0)
        layout.addLayout(row1)
        layout.addLayout(row2)
        layout.addWidget(self.tree, 1)
        layout.addWidget(self.status)

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt API)
        """Room for the series labels next to their thumbnails."""
        return QSize(440, 600)

    # ------------------------------------------------------------------ filters
    def _on_date_toggled(self, on: bool) -> None:
        self.date_from.setEnabled(on)
        self.date_to.setEnabled(on)
        self.refresh()

    def queries(self) -> list[dict]:
        """The QIDO queries for the current filters."""
        date_from = date_to = None
        if self.date_filter.isChecked():
            date_from = self.date_from.date().toString("yyyyMMdd")
            date_to = self.date_to.date().toString("yyyyMMdd")
        return study_queries(self.search.text(), self.modality.currentData(), date_from, date_to)

    def refresh(self) -> None:
        """Ask for the studies matching the filters (of the server or the PACS)."""
        self._debounce.stop()
        pacs = self.remote_source()
        self.status.setText(f"Searching {pacs}…" if pacs else "Searching…")
        if pacs:
            date_from = date_to = None
            if self.date_filter.isChecked():
                date_from = self.date_from.date().toString("yyyyMMdd")
                date_to = self.date_to.date().toString("yyyyMMdd")
            self.remoteQueryRequested.emit(pacs, remote_queries(
                self.search.text(), self.modality.currentData(), date_from, date_to))
        else:
            self.queryRequested.emit(self.queries())

    # ------------------------------------------------------------------ sources
    def set_pacs_sources(self, names: Sequence[str]) -> None:
        """The remote PACS that may be browsed (the selector shows only when there is
        one)."""
        current = self.remote_source()
        self.source.blockSignals(True)
        while self.source.count() > 1:
            self.source.removeItem(1)
        for n in names:
            self.source.addItem(f"Remote PACS: {n}", n)
        idx = self.source.findData(current) if current in names else 0
        self.source.setCurrentIndex(max(idx, 0))
        self.source.blockSignals(False)
        self.source.setVisible(bool(names))
        if current and current not in names:
            self._on_source_changed()

    def remote_source(self) -> str | None:
        """The PACS being browsed, or None for the image server."""
        return self.source.currentData()

    def _on_source_changed(self) -> None:
        remote = self.remote_source() is not None
        self.retrieve_button.setVisible(remote)
        self.tree.clear()
        self._series_items.clear()
        self._update_retrieve()
        self.refresh()

    def selected_remote_study(self) -> str | None:
        item = self.tree.currentItem()
        data = item.data(0, _ROLE) if item is not None else None
        return data[1] if data and data[0] == "remote-study" else None

    def _update_retrieve(self) -> None:
        self.retrieve_button.setEnabled(self.selected_remote_study() is not None)

    def _on_retrieve(self) -> None:
        uid, pacs = self.selected_remote_study(), self.remote_source()
        if uid and pacs:
            self.retrieveRequested.emit(pacs, uid)

    def set_remote_results(self, studies: list[dict]) -> None:
        """Show the PACS's studies (C-FIND rows: patient and study keys)."""
        self.tree.clear()
        self._series_items.clear()
        for group in group_studies(studies):
            p_item = QTreeWidgetItem([group.label, "", "", ""])
            p_item.setData(0, _ROLE, ("patient", group.patient_id))
            for st in group.studies:
                mods = st.get("ModalitiesInStudy") or []
                mods = ", ".join(mods) if isinstance(mods, list) else str(mods)
                n = st.get("NumberOfStudyRelatedInstances")
                item = QTreeWidgetItem([study_label(st), "" if n is None else str(n),
                                        format_date(st.get("StudyDate") or ""), mods])
                item.setData(0, _ROLE, ("remote-study", st["StudyInstanceUID"]))
                item.setToolTip(0, f"Study {st['StudyInstanceUID']} on the PACS\n"
                                   "Select it and press Retrieve")
                p_item.addChild(item)
            self.tree.addTopLevelItem(p_item)
        self.tree.expandAll()
        self._update_retrieve()
        self.status.setText(f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'} on "
                            f"{self.remote_source() or 'the PACS'}")

    # ------------------------------------------------------------------ results
    def set_results(self, studies: list[dict], series_by_study: dict[str, list[dict]]) -> None:
        """Show studies (rows of the QIDO study query) and their series."""
        modality = self.modality.currentData()
        selected = getattr(self, "_wanted_selection", None) or self.selected_series()
        self.tree.clear()
        self._series_items.clear()
        wanted: list[str] = []
        n_series = 0
        for group in group_studies(studies):
            p_item = QTreeWidgetItem([group.label, "", "", ""])
            p_item.setData(0, _ROLE, ("patient", group.patient_id))
            p_images = 0
            for st in group.studies:
                series = [se for se in series_by_study.get(st["StudyInstanceUID"], [])
                          if not modality or se.get("Modality") == modality]
                s_images = sum(series_images(se) for se in series)
                mods = ", ".join(st.get("ModalitiesInStudy") or [])
                s_item = QTreeWidgetItem([study_label(st), str(s_images),
                                          format_date(st.get("StudyDate") or ""), mods])
                s_item.setData(0, _ROLE, ("study", st["StudyInstanceUID"]))
                s_item.setToolTip(0, f"Study {st['StudyInstanceUID']}\n"
                                  f"Accession {st.get('AccessionNumber') or '–'}")
                for se in series:
                    uid = se["SeriesInstanceUID"]
                    item = QTreeWidgetItem([series_label(se), str(series_images(se)),
                                            format_date(se.get("SeriesDate") or ""),
                                            se.get("Modality") or ""])
                    item.setData(0, _ROLE, ("series", uid))
                    item.setToolTip(0, f"Series {uid}\nDouble-click to open")
                    item.setSizeHint(0, QSize(0, THUMBNAIL_SIZE + 4))
                    if uid in self._thumbnails:
                        item.setIcon(0, self._thumbnails[uid])
                    else:
                        wanted.append(uid)
                    s_item.addChild(item)
                    self._series_items[uid] = item
                    n_series += 1
                p_images += s_images
                p_item.addChild(s_item)
            p_item.setText(1, str(p_images))
            self.tree.addTopLevelItem(p_item)
        self.tree.expandAll()
        if selected:
            self.select_series(selected)
        self.status.setText(f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'}, "
                            f"{n_series} series")
        if wanted:
            self.thumbnailsWanted.emit(wanted)

    def set_error(self, message: str) -> None:
        self.status.setText(message)

    def set_thumbnail(self, uid: str, array: np.ndarray) -> None:
        """A (better) thumbnail for series ``uid``: (H, W) or (H, W, 3) uint8."""
        image, _buf = numpy_to_qimage(array)
        pixmap = QPixmap.fromImage(image.copy())   # the QImage borrows the array's memory
        icon = QIcon(pixmap)
        self._thumbnails[uid] = icon
        item = self._series_items.get(uid)
        if item is not None:
            item.setIcon(0, icon)

    def clear_thumbnails(self) -> None:
        """Forget the thumbnails (another server may hold other images under a UID)."""
        self._thumbnails.clear()
        for item in self._series_items.values():
            item.setIcon(0, QIcon())

    def thumbnail(self, uid: str) -> QIcon | None:
        return self._thumbnails.get(uid)

    def series_uids(self) -> list[str]:
        return list(self._series_items)

    # ------------------------------------------------------------------ selection
    def selected_series(self) -> str | None:
        item = self.tree.currentItem()
        data = item.data(0, _ROLE) if item is not None else None
        return data[1] if data and data[0] == "series" else None

    def selected_study(self) -> str | None:
        """The Study Instance UID of the selected study, or of the selected series' study
        (image server source only)."""
        item = self.tree.currentItem()
        while item is not None:
            data = item.data(0, _ROLE)
            if data and data[0] == "study":
                return data[1]
            item = item.parent()
        return None

    def select_series(self, uid: str) -> bool:
        """Highlight series ``uid``; one not listed yet (just imported, the list is being
        refreshed) is highlighted as soon as it appears. False when not listed yet."""
        self._wanted_selection = uid
        item = self._series_items.get(uid)
        if item is None:
            return False
        self.tree.setCurrentItem(item)
        self.tree.scrollToItem(item)
        return True

    def _on_activated(self, item: QTreeWidgetItem, _column: int) -> None:
        data = item.data(0, _ROLE)
        if data and data[0] == "series":
            self.seriesActivated.emit(data[1])
