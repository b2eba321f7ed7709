"""The layout at 1366×768 and 1920×1080: every label's text fits its widget (font
metrics against the width), the Reading dock needs no horizontal scroll bar and its tabs
no scroll arrows, progress bars show their whole text; window titles are words; the
History tab lists status changes and report revisions. Screenshots are kept as test
artefacts (MEDVIEW_TEST_ARTEFACTS, else a tmp folder)."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402
from PySide6.QtWidgets import (QAbstractButton, QLabel, QScrollArea, QTabWidget,  # noqa: E402
                               QWidget)

from viewer.progress import ThreeToneBar  # noqa: E402
from viewer.titles import series_name, window_title  # noqa: E402

from policyutil import copy_store_tree  # noqa: E402
from test_viewer_app import TIMEOUT, connect, make_window, open_and_wait_idle  # noqa: E402

SIZES = [(1366, 768), (1920, 1080)]


def artefacts(tmp_path) -> Path:
    d = Path(os.environ.get("MEDVIEW_TEST_ARTEFACTS") or tmp_path / "artefacts") / "layout"
    d.mkdir(parents=True, exist_ok=True)
    return d


def misfits(root: QWidget) -> list[str]:
    """Every visible text that does not fit its widget, in words."""
    out = []
    for w in [root] + root.findChildren(QWidget):
        if not w.isVisibleTo(root) or w.width() <= 1:
            continue
        fm = w.fontMetrics()
        name = f"{type(w).__name__}({w.objectName() or ''})"
        if isinstance(w, QLabel) and not w.wordWrap() and w.text() and w.pixmap().isNull() \
                and not w.text().lstrip().startswith("<"):
            lines = w.text().splitlines() or [""]
            need = max(fm.horizontalAdvance(t) for t in lines)
            have = w.contentsRect().width() - 2 * w.margin() - w.indent() if w.indent() > 0 else \
                w.contentsRect().width() - 2 * w.margin()
            if need > have + 1:
                out.append(f"{name} {w.text()!r}: needs {need} px, has {have}")
        elif isinstance(w, ThreeToneBar):
            text = w.display_text()
            if text != w.text() and text != w.short_text() or fm.horizontalAdvance(text) > w.width() - 4:
                out.append(f"{name} {w.text()!r} shown as {text!r} in {w.width()} px")
        elif isinstance(w, QAbstractButton) and w.text() and type(w).__name__ in ("QPushButton", "QCheckBox"):
            if w.width() < w.minimumSizeHint().width() - 1:
                out.append(f"{name} {w.text()!r}: {w.width()} px < {w.minimumSizeHint().width()}")
        elif isinstance(w, QTabWidget):
            bar = w.tabBar()
            need = sum(bar.tabSizeHint(i).width() for i in range(bar.count()))
            if need > bar.width() + 1:
                out.append(f"{name} tabs need {need} px (scroll arrows), have {bar.width()}")
    return out


@pytest.fixture()
def own_server(ct_store, tmp_path):
    """A server on a copy of the CT store: the reports and notes written here stay here."""
    from server.embedded import EmbeddedServer

    copy_store_tree(ct_store, tmp_path / "own-store")
    srv = EmbeddedServer(str(tmp_path / "own-store")).start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_main_window_reading_dock_and_mpr_fit(qtbot, tmp_path, own_server, ct_series_uid, size):
    server = own_server
    out = artefacts(tmp_path)
    tag = f"{size[0]}x{size[1]}"
    win = make_window(qtbot, tmp_path, size=size)
    try:
        connect(qtbot, win, server.url)
        open_and_wait_idle(qtbot, win, ct_series_uid)
        panel = win.diagnosis_panel
        # save a report (the dock overflowed after one), with a long first note line
        with qtbot.waitSignal(win.policy.recordChanged, timeout=TIMEOUT):
            panel.report.setPlainText("Findings: no focal lesion. " * 8)
            panel.report_save.click()
        qtbot.waitUntil(lambda: (panel.record or {}).get("report") is not None, timeout=TIMEOUT)
        with qtbot.waitSignal(win.policy.recordChanged, timeout=TIMEOUT):
            panel.note_edit.setPlainText("a long reading note that must wrap in the list " * 4)
            panel.note_save.click()
        qtbot.wait(50)
        win.grab().save(str(out / f"main-{tag}.png"))
        win.reading_dock.grab().save(str(out / f"reading-{tag}.png"))
        bad = misfits(win)
        scroll = win.reading_dock.widget()
        assert isinstance(scroll, QScrollArea)
        if scroll.horizontalScrollBar().isVisible():
            bad.append("Reading dock: horizontal scroll bar")
        assert panel.notes.wordWrap(), "notes do not wrap"
        assert not bad, "\n".join(bad)
        # the MPR window at the same size
        mpr = win.open_mpr()
        qtbot.addWidget(mpr)
        mpr.resize(*size)
        qtbot.waitUntil(lambda: bool(mpr.load_events) and mpr.load_events[-1].final, timeout=TIMEOUT)
        qtbot.wait(50)
        mpr.grab().save(str(out / f"mpr-{tag}.png"))
        bad = misfits(mpr)
        assert not bad, "\n".join(bad)
        assert "—  —" not in mpr.windowTitle()
        mpr.close()
    finally:
        win.close()


def test_titles_are_words():
    info = {"SeriesInstanceUID": "1.2.840.1", "Modality": "MR", "SeriesNumber": 3,
            "SeriesDate": "20240501", "PatientName": ""}
    assert series_name(info) == "MR 3 — 2024-05-01"
    assert window_title("MPR", dict(info, SeriesDescription="FSE PD AXIAL OBL")) == "MPR — FSE PD AXIAL OBL"
    assert window_title("MedView", dict(info, PatientName="DOE^JANE")) == "MedView — DOE, JANE — MR 3 — 2024-05-01"
    assert "1.2.840.1" not in window_title("MedView", info)


def test_history_lists_status_changes_and_report_revisions(qtbot, tmp_path, ct_store):
    from server.embedded import EmbeddedServer
    from server.store import Store

    store = tmp_path / "store"
    copy_store_tree(ct_store, store)
    with Store(store) as st:
        uid = [s for s in st.catalogue.query_series() if s["Modality"] == "CT"][0]["SeriesInstanceUID"]
    srv = EmbeddedServer(str(store)).start()
    win = make_window(qtbot, tmp_path)
    try:
        connect(qtbot, win, srv.url)
        open_and_wait_idle(qtbot, win, uid)
        panel = win.diagnosis_panel
        with qtbot.waitSignal(win.policy.recordChanged, timeout=TIMEOUT):
            panel.status.setCurrentIndex(1)                      # 2 – read
        for text in ("first draft", "second draft"):
            with qtbot.waitSignal(win.policy.recordChanged, timeout=TIMEOUT):
                panel.report.setPlainText(text)
                panel.report_save.click()
        texts = lambda: [panel.timeline.item(i).text() for i in range(panel.timeline.count())]  # noqa: E731
        qtbot.waitUntil(lambda: any("report revision 2" in t for t in texts())
                        and any("report revision 1" in t for t in texts()), timeout=TIMEOUT)
        lines = texts()
        assert any("status 2 – read" in t for t in lines), lines
        assert any("status 5 – report" in t for t in lines), lines          # raised by the report
        assert any("report revision 1" in t for t in lines), lines
    finally:
        win.close()
        srv.stop()


def test_rectangle_roi_label_stays_inside_the_view_at_the_image_edge(qtbot):
    from PySide6.QtCore import QRectF

    from imaging.measure import MeasureKind, Measurement
    from imaging.model import DecodedImage

    from test_viewer_widgets import make_series, square_image

    view_ = __import__("viewer.stackview", fromlist=["StackView"]).StackView()
    qtbot.addWidget(view_)
    view_.resize(200, 200)
    view_.set_series(make_series())
    meta = view_.series().images[0]
    view_.set_image(DecodedImage(0, square_image(), 4, 4, 0), meta)
    inside = QRectF(0, 0, view_.width(), view_.height())
    for p0, p1 in [((40, 2), (63, 20)), ((50, 50), (63, 63)), ((0, 0), (10, 10))]:   # right, corner, left
        m = Measurement(MeasureKind.RECT, p0, p1, 0)
        view_.add_measurement(m)
        box = view_.measurement_label_rect(m)
        assert inside.contains(box), (p0, p1, box, view_.measurement_text(m))
    view_.grab()
