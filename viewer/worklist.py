"""The reading station's worklist window (W7): ``medview --station NAME``.

Lists the exams assigned to the station (one row per slide: patient, accession, exam
date, slide, where it will open from) and opens a slide on a double-click or Enter — from
the station's pre-distributed cache first, else from the server
(:class:`client.stations.Station`). The list and every opening run on the worker pool;
the UI thread only builds rows.
"""
from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QAbstractItemView, QHBoxLayout, QLabel, QPushButton,
                               QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from client.pool import INTERACTION

from .workers import Task

COLUMNS = ("Patient", "Name", "Accession", "Exam date", "Slide", "QC", "Opens from")


class StationWorklistWindow(QWidget):
    """The station's worklist. ``opened(Opened, sr_cache)`` when a slide is open."""

    opened = Signal(object, object)
    listed = Signal(int)               # exams listed
    notice = Signal(str)

    def __init__(self, station, backend, parent: QWidget | None = None) -> None:
        super().__init__(parent, Qt.WindowType.Window)
        self.station = station
        self.backend = backend
        self.exams: list[dict] = []
        self.rows: list[dict] = []         # the slide of each table row
        self._tasks: list[Task] = []
        self.setWindowTitle(f"Worklist — station {station.name}")
        lay = QVBoxLayout(self)
        top = QHBoxLayout()
        self.summary = QLabel("Loading the worklist…")
        top.addWidget(self.summary, 1)
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.clicked.connect(self.refresh)
        top.addWidget(self.refresh_button)
        lay.addLayout(top)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.cellDoubleClicked.connect(lambda r, _c: self.open_row(r))
        lay.addWidget(self.table, 1)
        self.resize(900, 420)

    def _run(self, fn, done, name: str) -> Task:
        task = Task(lambda _ctx: fn(), name=name, pool=self.backend.pool,
                    priority=INTERACTION, parent=self)
        task.finished.connect(done)
        task.failed.connect(lambda e: self._failed(name, e))
        self._tasks = [t for t in self._tasks if not t.done] + [task]
        task.start()
        return task

    def _failed(self, what: str, e: BaseException) -> None:
        text = f"Station {self.station.name}: {what} failed: {e}"
        self.summary.setText(text)
        self.notice.emit(text)

    def refresh(self) -> Task:
        return self._run(self.station.worklist, self._show, "worklist")

    def _show(self, exams: list[dict]) -> None:
        self.exams = exams
        self.rows = [dict(s, _exam=e) for e in exams for s in e.get("slides") or []]
        self.table.setRowCount(len(self.rows))
        for i, s in enumerate(self.rows):
            e = s["_exam"]
            cells = (e.get("patient_id"), e.get("patient_name"), e.get("accession"),
                     e.get("exam_date"), s.get("label") or s["slide_uid"],
                     s.get("qc_status"),
                     "station cache" if s.get("cached") and s.get("unlimited") else "server")
            for c, v in enumerate(cells):
                self.table.setItem(i, c, QTableWidgetItem("" if v is None else str(v)))
        cached = sum(1 for s in self.rows if s.get("cached"))
        self.summary.setText(f"{len(exams)} exam(s), {len(self.rows)} slide(s); "
                             f"{cached} in the station's cache "
                             f"({self.station.cache_dir or 'no cache folder'})")
        self.listed.emit(len(exams))

    def keyPressEvent(self, ev) -> None:
        if ev.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and self.table.currentRow() >= 0:
            self.open_row(self.table.currentRow())
            return
        super().keyPressEvent(ev)

    def open_row(self, row: int) -> Task | None:
        if not 0 <= row < len(self.rows):
            return None
        slide = {k: v for k, v in self.rows[row].items() if k != "_exam"}
        backend = self.backend

        def load():
            got = self.station.open(slide)
            return got, backend.sr_cache_for(got.provider)

        def done(result) -> None:
            got, sr_cache = result
            self.notice.emit(got.reason)
            self.opened.emit(got, sr_cache)

        return self._run(load, done, f"opening {slide['slide_uid']}")
