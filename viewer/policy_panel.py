"""Viewer side of the server policy (issue 5): the diagnosis panel (status, notes,
annotations, report, history), the version/quality/purpose selector, and the controller
that connects them to the server and to the series being shown.

The widgets only build and wire themselves: they show what they are given
(``set_record``, ``set_series``...) and say what the user wants through signals. The
:class:`PolicyController` does the talking to the server (through
:class:`client.policy.PolicyClient`, off the UI thread with the ``runner`` it is given),
follows the open series (:class:`client.series.SeriesData`: its rights, versions,
diagnosis record, and its ``limited`` / ``recalling`` events) and turns rights errors
into words (:mod:`client.policy_text`).

Wiring into the main window: see ``docs/POLICY.md`` ("Viewer").
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import (QComboBox, QHBoxLayout, QLabel, QListWidget, QListWidgetItem,
                               QPlainTextEdit, QPushButton, QSpinBox, QTabWidget, QVBoxLayout,
                               QWidget)

from client.link import ContextReporter
from client.policy_text import (explain_choice, explain_link, explain_recall, explain_rights,
                                explain_rights_error, explain_shown_version, status_label,
                                version_label)

log = logging.getLogger("medview.policy")

__all__ = ["VersionSelector", "DiagnosisPanel", "PolicyController", "measurement_annotation",
           "sync_runner"]

Runner = Callable[[Callable[[], Any], Callable[[Any], None], Callable[[BaseException], None]], None]


def sync_runner(fn, done, failed) -> None:
    """Run at once on the calling thread (tests, and calls known to be quick)."""
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - handed to the caller's error path
        failed(e)
        return
    done(result)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else ""


# --------------------------------------------------------------------------- selector
class VersionSelector(QWidget):
    """Which version of the series to load: the best the rights allow, automatic (the
    server chooses, V8), a version, a purpose, or at least a quality figure (V3)."""

    selectionChanged = Signal(dict)
    """{} (best allowed), {"version": "auto" | name}, {"purpose": p} or {"quality": q}."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.combo = QComboBox(self)
        self.quality = QSpinBox(self)
        self.quality.setRange(0, 100)
        self.quality.setSuffix(" %")
        self.quality.setValue(70)
        self.quality.setVisible(False)
        self.detail = QLabel(self)
        self.detail.setWordWrap(True)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(QLabel("Version", self))
        row.addWidget(self.combo, 1)
        row.addWidget(self.quality)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.detail)
        self.why = QLabel(self)           # which version is loaded and why (one sentence)
        self.why.setWordWrap(True)
        layout.addWidget(self.why)
        self._versions: list[dict] = []
        self._auto: dict | None = None
        self._updating = False
        self.combo.currentIndexChanged.connect(self._changed)
        self.quality.valueChanged.connect(self._changed)
        self.set_series(None, None)

    def set_series(self, versions: list[dict] | None, auto: dict | None,
                   selection: dict | None = None) -> None:
        """Fill the choices for a series (``versions``/``auto`` as in its description)."""
        self._updating = True
        try:
            self._versions, self._auto = list(versions or []), auto
            self.combo.clear()
            self.combo.addItem("Best allowed", {})
            if not self._versions:
                self.combo.setEnabled(False)
                self.detail.setText("")
                return
            self.combo.setEnabled(True)
            now = f" (now {auto['version']})" if auto else ""
            self.combo.addItem(f"Automatic{now}", {"version": "auto"})
            if auto:
                self.combo.setItemData(1, "\n".join(auto.get("reasons", [])), Qt.ItemDataRole.ToolTipRole)
            model = self.combo.model()
            for v in self._versions:
                self.combo.addItem(version_label(v), {"version": v["name"]})
                if not v.get("allowed", True):
                    model.item(self.combo.count() - 1).setEnabled(False)
                    self.combo.setItemData(self.combo.count() - 1, "may not be sent now",
                                           Qt.ItemDataRole.ToolTipRole)
            for purpose in dict.fromkeys(v.get("purpose") for v in self._versions if v.get("purpose")):
                self.combo.addItem(f"For {purpose}", {"purpose": purpose})
            self.combo.addItem("At least a quality of…", {"quality": None})
            self._select(selection or {})
        finally:
            self._updating = False
        self._show_detail()

    def set_choice(self, sentence: str, detail: str = "") -> None:
        """Say which version is loaded and why (``detail``: the measurements, tooltip)."""
        self.why.setText(sentence)
        self.why.setToolTip(detail)

    def _select(self, selection: dict) -> None:
        for i in range(self.combo.count()):
            data = self.combo.itemData(i) or {}
            if data == selection or ("quality" in data and "quality" in selection):
                if "quality" in selection:
                    self.quality.setValue(int(selection["quality"]))
                self.combo.setCurrentIndex(i)
                break
        self.quality.setVisible("quality" in (self.combo.currentData() or {}))

    def selection(self) -> dict:
        data = dict(self.combo.currentData() or {})
        if "quality" in data:
            data["quality"] = self.quality.value()
        return data

    def resolved(self) -> dict | None:
        """The version the current choice means (None: best allowed / unknown)."""
        sel = self.selection()
        vs = self._versions
        if not vs or not sel:
            return None
        if sel.get("version") == "auto":
            name = (self._auto or {}).get("version")
            return next((v for v in vs if v["name"] == name), None)
        if "version" in sel:
            return next((v for v in vs if v["name"] == sel["version"]), None)
        if "purpose" in sel:
            return next((v for v in vs if v.get("purpose") == sel["purpose"]), None)
        ok = [v for v in vs if v.get("quality", 0) >= sel["quality"]]
        return min(ok, key=lambda v: v["quality"]) if ok else vs[0]

    def set_status(self, status: int | None, names: dict | None = None) -> None:
        """The study's diagnosis status (the sentence names it when it limits versions)."""
        self._status, self._status_names = status, names
        self._show_detail()

    def _show_detail(self) -> None:
        """One sentence: which version is shown and why (policy_text.explain_shown_version)."""
        text = explain_shown_version(self.selection(), self._versions, self._auto,
                                     getattr(self, "_status", None), getattr(self, "_status_names", None))
        v = self.resolved() or next((x for x in self._versions if x.get("allowed", True)), None)
        if text and v is not None and v.get("bytes") and v.get("allowed", True):
            text += f" ({v['bytes'] / 2 ** 20:.1f} MB for the series)"
        self.detail.setText(text)

    def _changed(self, *_args) -> None:
        self.quality.setVisible("quality" in (self.combo.currentData() or {}))
        self._show_detail()
        if not self._updating:
            self.selectionChanged.emit(self.selection())


# --------------------------------------------------------------------------- panel
def _wrap_list(lst: QListWidget) -> None:
    """Long notes and annotation labels wrap in their lists (no sideways scrolling)."""
    lst.setWordWrap(True)
    lst.setTextElideMode(Qt.TextElideMode.ElideNone)
    lst.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)


class DiagnosisPanel(QWidget):
    """Diagnosis status, reading notes, annotations, report and their history."""

    statusChangeRequested = Signal(int)
    noteAddRequested = Signal(str)
    noteSaveRequested = Signal(int, str, int)            # id, text, base revision
    noteDeleteRequested = Signal(int, int)               # id, base revision
    annotationAddRequested = Signal()                    # "add the current measurement"
    annotationDeleteRequested = Signal(int, int)
    annotationActivated = Signal(dict)                   # show it (go to its image)
    reportSaveRequested = Signal(str, object)            # text, base revision or None
    historyRequested = Signal(int)                       # item id

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.banner = QLabel(self)
        self.banner.setWordWrap(True)
        self.banner.setVisible(False)
        self.status = QComboBox(self)
        self.status_info = QLabel(self)
        self.tabs = QTabWidget(self)
        self.tabs.tabBar().setUsesScrollButtons(False)      # all four tabs always readable
        self.tabs.tabBar().setExpanding(False)
        notes, anns, rep, hist = (self._notes_tab(), self._annotations_tab(),
                                  self._report_tab(), self._history_tab())
        self._report_revisions: list[dict] = []
        self.tabs.addTab(notes, "Notes")
        self.tabs.addTab(anns, "Annotations")
        self.tabs.addTab(rep, "Report")
        self.tabs.addTab(hist, "History")
        self.history_tab = hist
        top = QHBoxLayout()
        top.addWidget(QLabel("Diagnosis status", self))
        top.addWidget(self.status, 1)
        layout = QVBoxLayout(self)
        layout.addWidget(self.banner)
        layout.addLayout(top)
        layout.addWidget(self.status_info)
        layout.addWidget(self.tabs, 1)

        self.record: dict | None = None
        self._editable = True
        self._updating = False
        self.status.currentIndexChanged.connect(self._status_changed)
        self.notes.currentItemChanged.connect(self._note_selected)
        self.note_new.clicked.connect(self._note_new)
        self.note_save.clicked.connect(self._note_save)
        self.note_delete.clicked.connect(self._note_delete)
        self.ann_add.clicked.connect(self.annotationAddRequested)
        self.ann_delete.clicked.connect(self._ann_delete)
        self.annotations.itemDoubleClicked.connect(
            lambda it: self.annotationActivated.emit(it.data(Qt.ItemDataRole.UserRole)))
        self.annotations.currentItemChanged.connect(self._item_for_history)
        self.report_save.clicked.connect(self._report_save)
        self.set_record(None)

    # ---------------------------------------------------------------- tabs
    def _notes_tab(self) -> QWidget:
        self.notes = QListWidget(self)
        self.note_edit = QPlainTextEdit(self)
        self.note_edit.setPlaceholderText("Reading note…")
        self.note_new = QPushButton("New", self)
        self.note_save = QPushButton("Save note", self)
        self.note_delete = QPushButton("Delete", self)
        notes = QWidget(self)
        nl = QVBoxLayout(notes)
        nl.addWidget(self.notes, 1)
        nl.addWidget(self.note_edit, 1)
        nb = QHBoxLayout()
        for b in (self.note_new, self.note_save, self.note_delete):
            nb.addWidget(b)
        nl.addLayout(nb)
        _wrap_list(self.notes)
        return notes

    def _annotations_tab(self) -> QWidget:
        self.annotations = QListWidget(self)
        self.ann_add = QPushButton("Add current measurement", self)
        self.ann_delete = QPushButton("Delete", self)
        anns = QWidget(self)
        al = QVBoxLayout(anns)
        al.addWidget(self.annotations, 1)
        ab = QHBoxLayout()
        ab.addWidget(self.ann_add)
        ab.addWidget(self.ann_delete)
        al.addLayout(ab)
        _wrap_list(self.annotations)
        return anns

    def _report_tab(self) -> QWidget:
        self.report = QPlainTextEdit(self)
        self.report.setPlaceholderText("Diagnostic report…")
        self.report_info = QLabel(self)
        self.report_save = QPushButton("Save report", self)
        rep = QWidget(self)
        rl = QVBoxLayout(rep)
        rl.addWidget(self.report, 1)
        rb = QHBoxLayout()
        rb.addWidget(self.report_info, 1)
        rb.addWidget(self.report_save)
        rl.addLayout(rb)
        return rep

    def _history_tab(self) -> QWidget:
        """The study's timeline (status changes, report revisions) and the revisions of
        the selected note or annotation."""
        self.timeline = QListWidget(self)
        self.history = QListWidget(self)
        for lst in (self.timeline, self.history):
            lst.setWordWrap(True)
            lst.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        hist = QWidget(self)
        hl = QVBoxLayout(hist)
        hl.addWidget(QLabel("Study: status changes and report revisions", hist))
        hl.addWidget(self.timeline, 1)
        hl.addWidget(QLabel("Selected note or annotation", hist))
        hl.addWidget(self.history, 1)
        return hist

    # ---------------------------------------------------------------- setters
    def show_message(self, text: str, warning: bool = False) -> None:
        """A sentence above the panel (rights, recall, conflicts); "" hides it."""
        self.banner.setText(text)
        self.banner.setStyleSheet("color: #c33" if warning else "color: #36c")
        self.banner.setVisible(bool(text))

    def set_editable(self, on: bool) -> None:
        """False when the user may not change diagnostic records (no ``diagnose`` right)."""
        self._editable = on
        self._enable()

    def _enable(self) -> None:
        have = self.record is not None
        on = self._editable and have
        for w in (self.status, self.note_new, self.note_save, self.note_edit, self.ann_add,
                  self.report, self.report_save):
            w.setEnabled(on)
        self.note_delete.setEnabled(on and self.notes.currentItem() is not None)
        self.ann_delete.setEnabled(on and self.annotations.currentItem() is not None)

    def set_record(self, rec: dict | None) -> None:
        """Show a study's diagnosis record (``GET /api/studies/{study}/diagnosis`` or the
        ``diagnosis`` block of a series description); None clears the panel."""
        self._updating = True
        try:
            keep_note = self._current_id(self.notes)
            self.record = rec
            self.status.clear()
            names = (rec or {}).get("status_names") or {}
            for s in range(1, 6):
                self.status.addItem(status_label(s, names), s)
            if rec:
                self.status.setCurrentIndex(int(rec.get("status", 1)) - 1)
                who = rec.get("changed_by")
                self.status_info.setText(f"set by {who}, {_when(rec.get('changed_at'))}" if who else "")
            else:
                self.status_info.setText("")
            self.notes.clear()
            for n in (rec or {}).get("notes", []):
                first = (n.get("text") or "").strip().splitlines()[0] if n.get("text") else ""
                it = QListWidgetItem(f"{n.get('updated_by')}, {_when(n.get('updated_at'))}: {first}")
                it.setData(Qt.ItemDataRole.UserRole, n)
                self.notes.addItem(it)
                if n["id"] == keep_note:
                    self.notes.setCurrentItem(it)
            if self.notes.currentItem() is None:
                self.note_edit.setPlainText("")
            self.annotations.clear()
            for a in (rec or {}).get("annotations", []):
                m = a.get("measurement")
                value = f" – {m['value']:.1f} {m.get('unit', '')}".rstrip() if m else ""
                label = a.get("label") or a.get("shape")
                it = QListWidgetItem(f"{label}{value} ({a.get('shape')}, image {a.get('image', '')[-12:]})")
                it.setData(Qt.ItemDataRole.UserRole, a)
                self.annotations.addItem(it)
            report = (rec or {}).get("report")
            if not report or (self._report_revisions
                              and self._report_revisions[-1].get("rev") != report.get("rev")):
                self._report_revisions = []          # a newer revision: fetched again
            self._fill_timeline()
            self.report.setPlainText(report.get("text", "") if report else "")
            self.report_info.setText(
                f"revision {report['rev']} by {report.get('updated_by')}, "
                f"{_when(report.get('updated_at'))}" if report else "no report yet")
        finally:
            self._updating = False
        self._enable()

    def set_report_history(self, revisions: list[dict]) -> None:
        """The report's revisions (``GET .../items/{id}/history``) for the study timeline."""
        self._report_revisions = list(revisions)
        self._fill_timeline()

    def _fill_timeline(self) -> None:
        """Status changes (``status_history``, or the current status) and report
        revisions, oldest first."""
        rec = self.record or {}
        names = rec.get("status_names") or {}
        rows: list[tuple[float, str]] = []
        changes = rec.get("status_history")
        if changes:
            for c in changes:
                prev = f" (was {status_label(c['previous'], names)})" if c.get("previous") else ""
                note = f": {c['comment']}" if c.get("comment") else ""
                rows.append((c.get("changed_at") or 0.0,
                             f"{_when(c.get('changed_at'))} status {status_label(c['status'], names)}"
                             f"{prev} by {c.get('changed_by')}{note}"))
        elif rec.get("changed_by"):
            rows.append((rec.get("changed_at") or 0.0,
                         f"{_when(rec.get('changed_at'))} status {status_label(rec.get('status', 1), names)} "
                         f"by {rec.get('changed_by')}"))
        revs = self._report_revisions
        report = rec.get("report")
        if not revs and report:
            revs = [{"rev": report.get("rev"), "action": "saved", "author": report.get("updated_by"),
                     "at": report.get("updated_at")}]
        for r in revs:
            rows.append((r.get("at") or 0.0, f"{_when(r.get('at'))} report revision {r.get('rev')} "
                                              f"{r.get('action', '')} by {r.get('author')}"))
        self.timeline.clear()
        for _t, text in sorted(rows, key=lambda x: x[0]):
            self.timeline.addItem(text)

    def set_history(self, item: dict, revisions: list[dict]) -> None:
        """Show every revision of an item (newest last) and switch to the History tab."""
        self.history.clear()
        self.history.addItem(f"{item.get('kind')} {item.get('id')}:")
        for r in revisions:
            text = r.get("text") or r.get("label") or r.get("shape") or ""
            self.history.addItem(f"  rev {r['rev']} {r['action']} by {r.get('author')}, "
                                 f"{_when(r.get('at'))}: {text.strip()[:80]}")
        self.tabs.setCurrentWidget(self.history_tab)

    # ---------------------------------------------------------------- user actions
    @staticmethod
    def _current_id(lst: QListWidget) -> int | None:
        it = lst.currentItem()
        return it.data(Qt.ItemDataRole.UserRole)["id"] if it is not None else None

    def _status_changed(self, index: int) -> None:
        if self._updating or index < 0 or self.record is None:
            return
        status = index + 1
        if status != self.record.get("status"):
            self.statusChangeRequested.emit(status)

    def _note_selected(self, cur, _prev) -> None:
        if cur is not None:
            self.note_edit.setPlainText(cur.data(Qt.ItemDataRole.UserRole).get("text", ""))
            if not self._updating:
                self.historyRequested.emit(cur.data(Qt.ItemDataRole.UserRole)["id"])
        self._enable()

    def _item_for_history(self, cur, _prev) -> None:
        if cur is not None and not self._updating:
            self.historyRequested.emit(cur.data(Qt.ItemDataRole.UserRole)["id"])
        self._enable()

    def _note_new(self) -> None:
        self.notes.setCurrentItem(None)
        self.notes.clearSelection()
        self.note_edit.setPlainText("")
        self.note_edit.setFocus()
        self._enable()

    def _note_save(self) -> None:
        text = self.note_edit.toPlainText()
        if not text.strip():
            self.show_message("A note needs some text.", warning=True)
            return
        it = self.notes.currentItem()
        if it is None:
            self.noteAddRequested.emit(text)
        else:
            n = it.data(Qt.ItemDataRole.UserRole)
            self.noteSaveRequested.emit(n["id"], text, n["rev"])

    def _note_delete(self) -> None:
        it = self.notes.currentItem()
        if it is not None:
            n = it.data(Qt.ItemDataRole.UserRole)
            self.noteDeleteRequested.emit(n["id"], n["rev"])

    def _ann_delete(self) -> None:
        it = self.annotations.currentItem()
        if it is not None:
            a = it.data(Qt.ItemDataRole.UserRole)
            self.annotationDeleteRequested.emit(a["id"], a["rev"])

    def _report_save(self) -> None:
        text = self.report.toPlainText()
        if not text.strip():
            self.show_message("The report is empty.", warning=True)
            return
        report = (self.record or {}).get("report")
        self.reportSaveRequested.emit(text, report["rev"] if report else None)


# --------------------------------------------------------------------------- annotations
def measurement_annotation(m, meta, series_uid: str, label: str | None = None) -> dict:
    """An annotation body (see :mod:`server.diagnosis`) for a viewer measurement
    (:class:`imaging.measure.Measurement` on image ``meta``: a :class:`imaging.model.ImageMeta`)."""
    from imaging.measure import MeasureKind, distance

    body: dict = {"series": series_uid, "image": f"{meta.sop_instance_uid}/{meta.frame}",
                  "points": [list(m.p0), list(m.p1)]}
    if m.kind is MeasureKind.DISTANCE:
        d = distance(m.p0, m.p1, meta.mm_spacing)
        body.update(shape="line", measurement={"kind": "distance", "value": d.length, "unit": d.unit},
                    label=label or str(d))
    else:
        w, h = abs(m.p1[0] - m.p0[0]), abs(m.p1[1] - m.p0[1])
        area = w * h * (3.141592653589793 / 4 if m.kind is MeasureKind.ELLIPSE else 1.0)
        unit = "px²"
        if meta.mm_spacing:
            area *= meta.mm_spacing[0] * meta.mm_spacing[1]
            unit = "mm²"
        body.update(shape="ellipse" if m.kind is MeasureKind.ELLIPSE else "rect",
                    measurement={"kind": "area", "value": area, "unit": unit},
                    label=label or f"area {area:.1f} {unit}")
    return body


# --------------------------------------------------------------------------- controller
class PolicyController(QObject):
    """Connects the panel and the selector to the server and the open series."""

    selectionChanged = Signal(str, dict)
    """(series UID, selection): the window should reload the series (reopen its loader:
    packets already held are reused)."""
    notice = Signal(str)
    """A sentence for the status bar (rights, recall, saved...)."""
    recallingChanged = Signal(bool, str)
    recordChanged = Signal(dict)
    contextChanged = Signal(dict)
    """The context (link, latency, memory, processors) the server accepted (V8)."""
    failed = Signal(str)
    _event = Signal(str, object)          # from transfer threads to this (UI) thread

    def __init__(self, panel: DiagnosisPanel, selector: VersionSelector | None = None,
                 runner: Runner | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.panel, self.selector = panel, selector
        self.runner = runner or sync_runner
        self.client = None                 # client.policy.PolicyClient
        self.sd = None                     # client.series.SeriesData
        self.study: str | None = None
        self.measurement: Callable[[], dict | None] = lambda: None
        self.reporter: ContextReporter | None = None   # link/memory/CPU to the server
        self.context: dict = {}
        self.place: str | None = None
        self._version: dict | None = None  # the version the last transfer named
        self._event.connect(self._on_event, Qt.ConnectionType.QueuedConnection)
        p = panel
        p.statusChangeRequested.connect(lambda s: self._call(
            lambda c: c.set_status(self.study, s), "Diagnosis status changed."))
        p.noteAddRequested.connect(lambda t: self._call(
            lambda c: c.add_note(self.study, t), "Note saved."))
        p.noteSaveRequested.connect(lambda i, t, r: self._call(
            lambda c: c.edit_note(self.study, i, t, r), "Note saved."))
        p.noteDeleteRequested.connect(lambda i, r: self._call(
            lambda c: c.delete_note(self.study, i, r), "Note deleted."))
        p.annotationDeleteRequested.connect(lambda i, r: self._call(
            lambda c: c.delete_annotation(self.study, i, r), "Annotation deleted."))
        p.annotationAddRequested.connect(self._add_annotation)
        p.reportSaveRequested.connect(lambda t, r: self._call(
            lambda c: c.save_report(self.study, t, r), "Report saved."))
        p.historyRequested.connect(self._history)
        if selector is not None:
            selector.selectionChanged.connect(self._selected)

    # ---------------------------------------------------------------- wiring
    def set_client(self, client) -> None:
        """The :class:`client.policy.PolicyClient` of the current session (None: none)."""
        self.client = client
        if self.reporter is not None:
            self.reporter.close()
            self.reporter = None
        if client is None:
            self.close_series()
            return
        meter = getattr(getattr(client, "session", None), "link", None)
        if meter is not None:           # measured from our own transfers; sent at once
            self.reporter = ContextReporter(client, meter, place=self.place,
                                            on_report=lambda c: self._event.emit("context", c))
            self.reporter.maybe_report()

    def set_measurement_source(self, fn: Callable[[], dict | None]) -> None:
        """``fn()`` returns the annotation body of the current measurement (see
        :func:`measurement_annotation`), or None when there is none."""
        self.measurement = fn

    def open_series(self, sd) -> None:
        """Follow a series (a :class:`client.series.SeriesData`, e.g. the loader's)."""
        self.close_series()
        self.sd = sd
        sd.listeners.append(self._listener)
        self.study = sd.info.get("StudyInstanceUID") or (sd.diagnosis or {}).get("study")
        self._version = None
        if self.selector is not None:
            rec = sd.diagnosis or {}
            self.selector._status, self.selector._status_names = rec.get("status"), rec.get("status_names")
            self.selector.set_series(sd.versions, sd.auto, sd.selection)
        self._say_choice()
        self.panel.set_record(sd.diagnosis)
        self.panel.set_editable(True)
        rights = explain_rights(sd.rights, images=sd.images, versions=sd.versions,
                                status_names=(sd.diagnosis or {}).get("status_names"))
        self.panel.show_message(rights)
        if rights:
            self.notice.emit(rights)
        if self.client is not None and self.study is not None:
            self.refresh()                  # the full record: status history for the timeline

    def close_series(self) -> None:
        if self.sd is not None:
            try:
                self.sd.listeners.remove(self._listener)
            except ValueError:
                pass
        self.sd, self.study, self._version = None, None, None
        self.panel.set_record(None)
        self.panel.show_message("")
        if self.selector is not None:
            self.selector.set_series(None, None)
            self.selector.set_choice("")

    def explain(self, error) -> str:
        """A rights error (403 ServerError or body) in words, for this series."""
        sd = self.sd
        return explain_rights_error(error, images=sd.images if sd else None,
                                    versions=sd.versions if sd else None,
                                    status_names=((sd.diagnosis or {}).get("status_names")
                                                  if sd else None))

    # ---------------------------------------------------------------- events
    def _listener(self, kind: str, msg: dict) -> None:      # any thread
        self._event.emit(kind, msg)

    def _on_event(self, kind: str, msg) -> None:             # UI thread
        if kind == "limited":
            text = self.explain(msg)
            self.panel.show_message(text, warning=True)
            self.notice.emit(text)
        elif kind in ("recalling", "recalled"):
            text = explain_recall(msg, kind == "recalling")
            self.panel.show_message(text)
            self.recallingChanged.emit(kind == "recalling", text)
            self.notice.emit(text)
        elif kind == "version":
            self._version = msg
            self._say_choice()
        elif kind == "context":
            self._context(msg)

    def _say_choice(self) -> None:
        sd = self.sd
        if self.selector is None or sd is None:
            return
        self.selector.set_choice(explain_choice(self._version, sd.selection, sd.auto, sd.versions),
                                 explain_link(self.context))

    def _context(self, ctx: dict) -> None:
        """The server accepted a new context: the automatic choice may differ now."""
        self.context = dict(ctx or {})
        self.contextChanged.emit(self.context)
        sd, client = self.sd, self.client
        if sd is None or client is None or not sd.versions:
            self._say_choice()
            return

        def done(info: dict) -> None:
            if self.sd is sd and info.get("auto"):
                sd.auto = info["auto"]
                sd._notify("auto", sd.auto)         # the loader re-plans its fill
                if self.selector is not None:
                    self.selector.set_series(sd.versions, sd.auto, sd.selection)
                if sd.selection.get("version") == "auto":
                    self._version = None      # the next transfer says what it sends
                self._say_choice()
        self.runner(lambda: client.versions(sd.uid), done, self._failed)

    def _selected(self, selection: dict) -> None:
        if self.sd is None:
            return
        self.sd.select(**selection)
        self._version = None
        self._say_choice()
        self.selectionChanged.emit(self.sd.uid, selection)

    # ---------------------------------------------------------------- server calls
    def report_context(self, *, link_bps: float | None = None, place: str | None = None) -> None:
        """Tell the server what ``version=auto`` should weigh (V8): this computer's memory
        and processors, the measured link speed (bits/s) and the place of use."""
        if place is not None:
            self.place = place
            if self.reporter is not None:
                self.reporter.place = place
        if self.client is None:
            return
        from client.link import machine_facts

        client = self.client
        if link_bps is None and self.reporter is not None:
            self.runner(self.reporter.report, lambda _c: None, self._failed)   # on_report tells
            return
        self.runner(lambda: client.set_context(link_bps=link_bps, place=place, **machine_facts()),
                    self._context, self._failed)

    def refresh(self) -> None:
        """Reload the diagnosis record of the current study."""
        if self.client is None or self.study is None:
            return
        series = self.sd.uid if self.sd is not None else None

        def done(rec: dict) -> None:
            if series is not None:
                rec = dict(rec, annotations=[a for a in rec.get("annotations", [])
                                             if a.get("series") == series])
            if self.sd is not None:
                self.sd.diagnosis = rec
            self.panel.set_record(rec)
            if self.selector is not None:
                self.selector.set_status(rec.get("status"), rec.get("status_names"))
            self.recordChanged.emit(rec)
            report = rec.get("report")
            if report and self.client is not None:
                client, study = self.client, self.study
                self.runner(lambda: client.history(study, report["id"]),
                            lambda h: self.panel.set_report_history(h["revisions"]), self._failed)
        self.runner(lambda: self.client.diagnosis(self.study), done, self._failed)

    def _call(self, fn, ok_text: str) -> None:
        if self.client is None or self.study is None:
            return
        client = self.client

        def done(_result) -> None:
            self.panel.show_message("")
            self.notice.emit(ok_text)
            self.refresh()
        self.runner(lambda: fn(client), done, self._failed)

    def _add_annotation(self) -> None:
        body = self.measurement()
        if body is None:
            self.panel.show_message("Draw a measurement first, then add it.", warning=True)
            return
        self._call(lambda c: c.add_annotation(self.study, body), "Annotation saved.")

    def _history(self, item_id: int) -> None:
        if self.client is None or self.study is None:
            return
        self.runner(lambda: self.client.history(self.study, item_id),
                    lambda h: self.panel.set_history(h["item"], h["revisions"]), self._failed)

    def _failed(self, error: BaseException) -> None:
        status = getattr(error, "status", None)
        body = getattr(error, "body", {}) or {}
        if status == 403:
            text = self.explain(error)
            if "action" in (body.get("denied") or []):
                self.panel.set_editable(False)
        elif status == 409:
            text = "Someone changed this meanwhile; the panel now shows their version."
            self.refresh()
        else:
            text = f"The server could not do this: {getattr(error, 'message', error)}"
        self.panel.show_message(text, warning=True)
        self.failed.emit(text)
