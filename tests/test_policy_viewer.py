"""Viewer side of the server policy: rights and recall in plain words, the version
selector, the diagnosis panel, and the controller against a live server."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402

from client import SeriesData, Session  # noqa: E402
from client.policy import PolicyClient  # noqa: E402
from client.session import ServerError  # noqa: E402
from server.embedded import EmbeddedServer  # noqa: E402
from server.rights import Rule  # noqa: E402
from imaging.measure import MeasureKind, Measurement  # noqa: E402
from imaging.model import ImageMeta  # noqa: E402
from viewer.policy_panel import (DiagnosisPanel, PolicyController, VersionSelector,  # noqa: E402
                                 measurement_annotation)
from client.policy_text import (explain_login_error, explain_recall, explain_rights,  # noqa: E402
                                explain_rights_error, image_ranges_1based)
from tests.policyutil import clear_tables, copy_store, series_uid, study_uid  # noqa: E402
from waits import WAIT_MS  # noqa: E402

VERSIONS = [
    {"name": "V1", "purpose": "diagnosis", "lossless": True, "layers": None, "quality": 100,
     "target_ratio": 1, "actual_ratio": 2.6, "bytes": 3 << 20, "allowed": True},
    {"name": "V2", "purpose": "reference", "lossless": False, "layers": 2, "quality": 50,
     "target_ratio": 20, "actual_ratio": 20.3, "bytes": 400_000, "allowed": True},
    {"name": "V3", "purpose": "comparison", "lossless": False, "layers": 1, "quality": 25,
     "target_ratio": 50, "actual_ratio": 49.1, "bytes": 160_000, "allowed": False},
]
IMAGES = [{"Columns": 512, "Rows": 512, "nlayers": 4, "numres": 4}] * 64


# ---------------------------------------------------------------- words
def test_rights_in_words():
    assert image_ranges_1based("0-9,12,20-21") == "1 to 10, 13 and 21 to 22"
    text = explain_rights({"max_layers": 2, "max_reduce_min": 1, "allowed_images": "0-9"},
                          images=IMAGES, versions=VERSIONS)
    assert "images 1 to 10 of 64 only" in text
    assert "reference quality (V2" in text and "not the original" in text
    assert "half resolution: 256 × 256 instead of 512 × 512" in text
    body = {"error": "beyond your rights: ...", "status": 403, "denied": ["resolution"],
            "max_reduce_min": 2, "allowed_versions": ["V2", "V3"], "diagnosis_status": 5}
    text = explain_rights_error(body, images=IMAGES, versions=VERSIONS,
                                status_names={"5": "report"})
    assert text.startswith("The image resolution you asked for is higher")
    assert "a quarter of the resolution" in text and "while the study is 5 – report" in text
    assert text.endswith("The viewer shows the series within these limits.")
    err = ServerError(403, "your account may not load images",
                      {"denied": ["action"], "allowed_actions": ["browse", "metadata"]})
    assert "not allowed" in explain_rights_error(err) and "search the study list" in explain_rights_error(err)
    assert "try again in 42 seconds" in explain_login_error(
        ServerError(429, "too many", {"retry_after": 42}))
    assert "not correct" in explain_login_error(ServerError(401, "no"))
    assert "3 images from the archive" in explain_recall({"images": [0, 1, 2]})
    assert "back" in explain_recall({}, recalling=False)
    assert explain_rights({}) == ""


# ---------------------------------------------------------------- widgets
def test_version_selector(qtbot):
    sel = VersionSelector()
    qtbot.addWidget(sel)
    assert not sel.combo.isEnabled()
    sel.set_series(VERSIONS, {"version": "V2", "reasons": ["slow link"]}, {})
    texts = [sel.combo.itemText(i) for i in range(sel.combo.count())]
    assert texts[:2] == ["Best allowed", "Automatic (now V2)"]
    assert texts[3].startswith("V2 – reference, about 1:20 (reaches 1:20.3)")
    assert not sel.combo.model().item(4).isEnabled()             # V3 may not be sent now
    with qtbot.waitSignal(sel.selectionChanged, timeout=WAIT_MS) as sig:
        sel.combo.setCurrentIndex(texts.index("For comparison"))
    assert sig.args == [{"purpose": "comparison"}]
    assert "may not be sent now" in sel.detail.text()
    with qtbot.waitSignal(sel.selectionChanged, timeout=WAIT_MS) as sig:
        sel.combo.setCurrentIndex(texts.index("At least a quality of…"))
    assert sig.args == [{"quality": 70}] and sel.quality.isVisibleTo(sel)
    assert sel.resolved()["name"] == "V1"
    with qtbot.waitSignal(sel.selectionChanged, timeout=WAIT_MS) as sig:
        sel.quality.setValue(40)
    assert sig.args == [{"quality": 40}] and sel.resolved()["name"] == "V2"
    sel.set_series(VERSIONS, None, {"version": "auto"})          # restoring emits nothing
    assert sel.selection() == {"version": "auto"}


RECORD = {
    "study": "1.2", "status": 3, "changed_by": "ann", "changed_at": 1.7e9,
    "status_names": {"1": "unread", "2": "read", "3": "notes", "4": "annotations", "5": "report"},
    "notes": [{"id": 7, "rev": 2, "text": "first line\nsecond", "updated_by": "ann",
               "updated_at": 1.7e9, "kind": "note"}],
    "annotations": [{"id": 9, "rev": 1, "shape": "line", "label": "lesion", "image": "1.2.3/1",
                     "series": "1.2.4", "measurement": {"kind": "distance", "value": 12.5, "unit": "mm"},
                     "kind": "annotation"}],
    "report": {"id": 11, "rev": 4, "text": "Findings: none.", "updated_by": "bob", "updated_at": 1.7e9},
}


def test_diagnosis_panel(qtbot):
    p = DiagnosisPanel()
    qtbot.addWidget(p)
    assert not p.status.isEnabled()
    p.set_record(RECORD)
    assert p.status.currentText() == "3 – notes" and "ann" in p.status_info.text()
    assert p.notes.count() == 1 and "first line" in p.notes.item(0).text()
    assert "lesion – 12.5 mm" in p.annotations.item(0).text()
    assert p.report.toPlainText() == "Findings: none." and "revision 4 by bob" in p.report_info.text()
    with qtbot.waitSignal(p.statusChangeRequested, timeout=WAIT_MS) as sig:
        p.status.setCurrentIndex(4)
    assert sig.args == [5]
    p.note_edit.setPlainText("a new note")
    with qtbot.waitSignal(p.noteAddRequested, timeout=WAIT_MS) as sig:
        p.note_save.click()
    assert sig.args == ["a new note"]
    with qtbot.waitSignal(p.historyRequested, timeout=WAIT_MS) as hist:
        p.notes.setCurrentRow(0)
    assert hist.args == [7] and p.note_edit.toPlainText() == "first line\nsecond"
    p.note_edit.setPlainText("edited")
    with qtbot.waitSignal(p.noteSaveRequested, timeout=WAIT_MS) as sig:
        p.note_save.click()
    assert sig.args == [7, "edited", 2]
    with qtbot.waitSignal(p.noteDeleteRequested, timeout=WAIT_MS) as sig:
        p.note_delete.click()
    assert sig.args == [7, 2]
    p.report.setPlainText("Findings: nodule.")
    with qtbot.waitSignal(p.reportSaveRequested, timeout=WAIT_MS) as sig:
        p.report_save.click()
    assert sig.args == ["Findings: nodule.", 4]
    with qtbot.waitSignal(p.annotationActivated, timeout=WAIT_MS) as sig:
        p.annotations.itemDoubleClicked.emit(p.annotations.item(0))
    assert sig.args[0]["id"] == 9
    p.set_history({"kind": "note", "id": 7}, [
        {"rev": 1, "action": "create", "author": "ann", "at": 1.7e9, "text": "x"},
        {"rev": 2, "action": "edit", "author": "ann", "at": 1.7e9, "text": "y"}])
    assert p.history.count() == 3 and p.tabs.currentWidget() is p.history_tab
    p.set_editable(False)
    assert not p.note_save.isEnabled() and not p.report_save.isEnabled()
    p.show_message("hello", warning=True)
    assert p.banner.isVisibleTo(p) and p.banner.text() == "hello"


def test_measurement_to_annotation():
    meta = ImageMeta(index=0, sop_instance_uid="1.2.3", frame=1, rows=100, columns=100,
                     samples_per_pixel=1, photometric="MONOCHROME2", pixel_spacing=(0.5, 0.5),
                     image_position=None, image_orientation=None, slice_thickness=None)
    a = measurement_annotation(Measurement(MeasureKind.DISTANCE, (0, 0), (30, 40), 0), meta, "1.2.4")
    assert a["shape"] == "line" and a["image"] == "1.2.3/1"
    assert a["measurement"] == {"kind": "distance", "value": 25.0, "unit": "mm"}
    a = measurement_annotation(Measurement(MeasureKind.RECT, (0, 0), (10, 20), 0), meta, "1.2.4")
    assert a["shape"] == "rect" and a["measurement"]["value"] == pytest.approx(50.0)


# ---------------------------------------------------------------- against a server
@pytest.fixture(scope="module")
def vsrv(ct_store, tmp_path_factory):
    store = copy_store(ct_store, tmp_path_factory.mktemp("viewer") / "store")
    # the shared store may carry reading history from other tests (notes, status): these
    # tests start from an unread study
    clear_tables(store, ("diag_revision", "diag_item", "study_status_history", "study_status"))
    srv = EmbeddedServer(str(store)).start()
    srv.study, srv.series, srv.store_dir = study_uid(store), series_uid(store), store
    yield srv
    srv.stop()


def test_controller_round_trip(qtbot, vsrv):
    panel, sel = DiagnosisPanel(), VersionSelector()
    qtbot.addWidget(panel)
    qtbot.addWidget(sel)
    ctl = PolicyController(panel, sel)
    s = Session(vsrv.url)
    sd = SeriesData(s, None, vsrv.series)
    ctl.set_client(PolicyClient(s))
    ctl.open_series(sd)
    assert panel.status.currentText() == "1 – unread" and panel.status.isEnabled()
    assert sel.combo.count() > 2
    assert panel.banner.text() == ("Versions that may be sent while the study is 1 – unread: "
                                   "V1 – diagnosis, original quality (lossless).")
    # status through the panel reaches the server, and the record comes back
    with qtbot.waitSignal(ctl.recordChanged, timeout=WAIT_MS) as sig:
        panel.status.setCurrentIndex(1)
    assert sig.args[0]["status"] == 2 and PolicyClient(s).diagnosis(vsrv.study)["status"] == 2
    panel.note_edit.setPlainText("compare with prior")
    with qtbot.waitSignal(ctl.recordChanged, timeout=WAIT_MS) as sig:
        panel.note_save.click()
    assert [n["text"] for n in sig.args[0]["notes"]] == ["compare with prior"]
    assert panel.notes.count() == 1
    # someone else edits the note meanwhile: a clear message, the panel reloads
    note = sig.args[0]["notes"][0]
    PolicyClient(Session(vsrv.url)).edit_note(vsrv.study, note["id"], "theirs", note["rev"])
    panel.notes.setCurrentRow(0)
    panel.note_edit.setPlainText("mine")
    with qtbot.waitSignal(ctl.failed, timeout=WAIT_MS) as sig:
        panel.note_save.click()
    assert "changed this meanwhile" in sig.args[0]
    assert panel.notes.item(0).data(0x0100)["text"] == "theirs"
    # the current measurement becomes an annotation on the server
    meta = ImageMeta.from_dict(sd.images[2])
    ctl.set_measurement_source(lambda: measurement_annotation(
        Measurement(MeasureKind.DISTANCE, (10, 10), (50, 40), 2), meta, sd.uid))
    with qtbot.waitSignal(ctl.recordChanged, timeout=WAIT_MS) as sig:
        panel.ann_add.click()
    assert sig.args[0]["annotations"][0]["image"] == sd.images[2]["key"]
    # the selector asks the window to reload the series with the chosen version
    with qtbot.waitSignal(ctl.selectionChanged, timeout=WAIT_MS) as sig:
        sel.combo.setCurrentIndex(sel.combo.findText("For reference"))
    assert sig.args == [sd.uid, {"purpose": "reference"}] and sd.selection == {"purpose": "reference"}
    ctl.report_context(link_bps=3e6, place="home")
    assert PolicyClient(s).me()["context"]["link_bps"] == 3e6
    PolicyClient(s).set_status(vsrv.study, 1)
    ctl.close_series()
    assert panel.record is None


def test_controller_explains_limits(qtbot, vsrv):
    auth = vsrv.app.state.server.auth
    auth.add_user("ref1", "a long password")
    auth.set_rule(Rule("ref1", "*", actions={"browse", "metadata", "fetch"}, max_layers=3))
    s = Session(vsrv.url, "ref1", "a long password")
    panel = DiagnosisPanel()
    qtbot.addWidget(panel)
    ctl = PolicyController(panel)
    sd = SeriesData(s, None, vsrv.series)
    ctl.set_client(PolicyClient(s))
    ctl.open_series(sd)
    assert "quality level 3 of 4" in panel.banner.text()
    # writing is refused: the panel says so in words and stops offering it
    panel.note_edit.setPlainText("x")
    with qtbot.waitSignal(ctl.failed, timeout=WAIT_MS) as sig:
        panel.note_save.click()
    assert "not allowed" in sig.args[0] and not panel.note_save.isEnabled()
    # the rights shrink while the series is open: the transfer learns, the panel explains
    auth.set_rule(Rule("ref1", "*", actions={"browse", "metadata", "fetch"}, max_layers=1))
    with qtbot.waitSignal(ctl.notice, timeout=WAIT_MS) as sig:
        sd.transfer(comps=[0], layers=2).run()
    assert "higher than your account may load" in sig.args[0]
    assert "reference quality (V3" in panel.banner.text()
