"""The desktop app, offscreen: browser, progressive stack view, progress, cancel, cine,
presets, HU under the cursor, region at full resolution, series switching, local
import, snapshot command, closing."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from server.fsck import fsck
from PySide6.QtCore import QEvent, QMimeData, QPoint, QPointF, QSettings, Qt, QUrl
from PySide6.QtGui import QDropEvent, QImage, QMouseEvent
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication

from client.series_loader import BACKGROUND, NEAR
from viewer.mainwindow import AppConfig, MainWindow
from imaging.windowing import apply_window

from netsim import slow_packet_streams
from tests.policyutil import copy_store_tree
from waits import WAIT_MS, WAIT_S

TIMEOUT = WAIT_MS   # bounds a hang only


# --------------------------------------------------------------------------- helpers

def dicom_hu(ct_store: Path, index: int) -> np.ndarray:
    """HU of slice ``index`` straight from the DICOM file the store was built from."""
    ds = pydicom.dcmread(ct_store.parent / "dicom" / f"CT{index + 1:04d}.dcm")
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def gray(image: QImage) -> np.ndarray:
    img = image.convertToFormat(QImage.Format.Format_Grayscale8)
    a = np.frombuffer(img.constBits(), np.uint8, img.bytesPerLine() * img.height())
    return a.reshape(img.height(), img.bytesPerLine())[:, :img.width()].copy()


def make_window(qtbot, tmp_path, cache_path=None, size=(1100, 800), prefetch=True) -> MainWindow:
    settings = QSettings(str(tmp_path / "medview.ini"), QSettings.Format.IniFormat)
    settings.setValue("loading/prefetch", "true" if prefetch else "false")
    win = MainWindow(AppConfig(cache_path=cache_path), settings)
    win.resize(*size)
    win.show()
    qtbot.waitExposed(win)
    return win


def connect(qtbot, win: MainWindow, url: str) -> None:
    with qtbot.waitSignal(win.connected, timeout=TIMEOUT):
        win.connect_to(url)


def open_and_wait_idle(qtbot, win: MainWindow, uid: str):
    win.open_series(uid)
    qtbot.waitUntil(lambda: win.loader is not None and win.loader.state == "idle"
                    and win.stack.decoded() is not None, timeout=TIMEOUT)
    # the last decode of the shown slice may still be on its way
    qtbot.waitUntil(lambda: win.stack.decoded().layers == win.loader.image_status(win.series_ctl.shown).layers
                    or win.loader.best(win.series_ctl.shown) is win.stack.decoded(), timeout=TIMEOUT)
    return win.loader


def wait_thumbnail_done(qtbot, win: MainWindow, uid: str) -> None:
    """The browser's thumbnail fetch for ``uid`` is over (it shares the series' data)."""
    def done() -> bool:
        sd = win.backend.registry.peek(uid) if win.backend.registry else None
        if sd is None or win.browser.thumbnail(uid) is None:
            return False
        mid = len(sd) // 2
        return sd.levels(mid)[0] == sd.images[mid]["nlayers"]
    qtbot.waitUntil(done, timeout=TIMEOUT)


@pytest.fixture()
def win(qtbot, tmp_path, server):
    w = make_window(qtbot, tmp_path)
    connect(qtbot, w, server.url)
    yield w
    w.close()


@pytest.fixture()
def two_series_server(ct_store, tmp_path):
    """A copy of the CT store plus a second, small series (another study)."""
    from server.embedded import EmbeddedServer
    from server.ingest import ingest_paths
    from server.sample import make_sample_ct
    from server.store import Store

    root = tmp_path / "store2"
    copy_store_tree(ct_store, root)
    files = make_sample_ct(tmp_path / "other", slices=6, size=128, seed=21)
    with Store(root) as st:
        assert len(ingest_paths(files, st).imported) == 6
    srv = EmbeddedServer(str(root)).start()
    with Store(root) as st:
        uids = {s["Modality"] + str(s["NumberOfImages"]): s["SeriesInstanceUID"]
                for s in st.catalogue.query_series()}
    yield srv, uids["CT12"], uids["CT6"]
    srv.stop()


# --------------------------------------------------------------------------- browsing, loading

def test_browser_lists_the_study_with_counts_and_progressive_thumbnails(qtbot, win, ct_series_uid):
    qtbot.waitUntil(lambda: ct_series_uid in win.browser.series_uids(), timeout=TIMEOUT)
    tree = win.browser.tree
    patient = tree.topLevelItem(0)
    assert "PHANTOM" in patient.text(0) and "MV-0001" in patient.text(0) and patient.text(1) == "12"
    series_item = patient.child(0).child(0)
    assert series_item.text(1) == "12" and series_item.text(3) == "CT"
    thumbs = []
    win.thumbs.ready.connect(lambda uid, a: thumbs.append((uid, a.shape)))
    qtbot.waitUntil(lambda: win.browser.thumbnail(ct_series_uid) is not None, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: len(thumbs) >= 1, timeout=TIMEOUT)
    assert all(max(shape) <= 64 for _uid, shape in thumbs)
    # filters: the name search and the modality filter go to the server
    win.browser.search.setText("nobody-here")
    win.browser.refresh()
    qtbot.waitUntil(lambda: win.browser.series_uids() == [], timeout=TIMEOUT)
    win.browser.search.setText("phantom")
    win.browser.modality.setCurrentIndex(win.browser.modality.findData("CT"))
    qtbot.waitUntil(lambda: win.browser.series_uids() == [ct_series_uid], timeout=TIMEOUT)
    win.browser.modality.setCurrentIndex(win.browser.modality.findData("MR"))
    qtbot.waitUntil(lambda: win.browser.series_uids() == [], timeout=TIMEOUT)


def test_open_series_increments_arrive_and_bars_match_the_client(qtbot, win, ct_series_uid,
                                                                 monkeypatch):
    wait_thumbnail_done(qtbot, win, ct_series_uid)
    slow_packet_streams(monkeypatch)          # increments spread out as on a real link
    shown, image_statuses = [], []
    win.imageDisplayed.connect(lambda img: shown.append((img.index, img.reduce, img.layers)))
    win.bridge.imageStatus.connect(lambda _l, st: image_statuses.append(st))
    loader = open_and_wait_idle(qtbot, win, ct_series_uid)
    sd = loader.sd
    first = [(r, q) for i, r, q in shown if i == 0]
    # the preview first (lowest resolution, first layer), then better, never worse
    assert first[0] == (2, 1)
    assert len(set(first)) >= 2 and first[-1] == (0, 4)
    keys = [(-r, q) for r, q in first]
    assert keys == sorted(keys)
    # the progress widgets follow the transfer on a timer (PROGRESS_INTERVAL_MS): its
    # flush after the last increment updates the bars, then the transfer label
    held = sum(sd.held_bytes(i) for i in range(len(sd)))
    qtbot.waitUntil(lambda: (win.transfer_label.snapshot() is not None
                             and win.transfer_label.snapshot().received == held), timeout=TIMEOUT)
    # bars of the shown slice = what the client library holds and reports
    assert win.bytes_bar.byte_counts() == (sd.held_bytes(0), sd.held_bytes(0), sd.images[0]["total_bytes"])
    assert win.level_bar.levels() == (4, 4, 4)
    for st in image_statuses:
        assert st.held_bytes <= st.requested_bytes <= st.total_bytes
    assert [s for s in image_statuses if s.index == 0][-1].held_bytes == sd.held_bytes(0)
    snap = win.transfer_label.snapshot()
    assert snap.received == held
    assert snap.total == sum(im["total_bytes"] for im in sd.images)
    assert win.strip.levels() == [12] * 12 and win.strip.count() == 12
    assert "Im: 1 / 12" in win.stack.overlay_text()
    # scrolling shows other slices (already loaded: no waiting)
    QTest.keyClick(win.stack, Qt.Key.Key_End)
    qtbot.waitUntil(lambda: win.stack.current_index() == 11 and win.strip.current() == 11,
                    timeout=TIMEOUT)
    assert "Im: 12 / 12" in win.stack.overlay_text()


def test_small_viewport_never_fetches_beyond_what_it_shows(qtbot, tmp_path, server, ct_series_uid):
    w = make_window(qtbot, tmp_path)
    try:
        w.browser_dock.hide()
        w.resize(700, 285)
        qtbot.waitUntil(lambda: w.stack.height() < 128 or w.stack.width() < 128, timeout=TIMEOUT)
        connect(qtbot, w, server.url)
        loader = open_and_wait_idle(qtbot, w, ct_series_uid)
        assert loader.reduce >= 1
        target = 2 - loader.reduce
        sd = loader.sd
        assert all(sd.levels(i)[1] == target for i in range(len(sd))), \
            [sd.levels(i) for i in range(len(sd))]
        assert w.stack.decoded().reduce == loader.reduce
        # zooming in asks for more resolution (only for what is then needed)
        w.stack.one_to_one()
        qtbot.waitUntil(lambda: loader.reduce == 0 and loader.state == "idle", timeout=TIMEOUT)
        qtbot.waitUntil(lambda: w.stack.decoded().reduce == 0, timeout=TIMEOUT)
    finally:
        w.close()


def test_cancel_stops_the_transfer_and_resume_finishes(qtbot, win, ct_series_uid, monkeypatch):
    wait_thumbnail_done(qtbot, win, ct_series_uid)
    slow_packet_streams(monkeypatch)
    stages = []
    win.bridge.stageChanged.connect(lambda _l, stage, st, _m: stages.append((stage.kind, st)))
    win.open_series(ct_series_uid)
    qtbot.waitUntil(lambda: win.loader.running_stage() is not None
                    and win.loader.running_stage().kind in (NEAR, BACKGROUND), timeout=TIMEOUT)
    assert win.cancel_button.isEnabled() and win.cancel_button.text() == "Cancel"
    qtbot.mouseClick(win.cancel_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: win.loader.state == "paused" and win.loader.running_stage() is None,
                    timeout=TIMEOUT)
    sd = win.loader.sd
    held = [sd.held_bytes(i) for i in range(len(sd))]
    qtbot.wait(400)
    assert [sd.held_bytes(i) for i in range(len(sd))] == held        # nothing more arrives
    assert ("cancelled" in {st for _k, st in stages})
    assert win.cancel_button.text() == "Resume"
    assert not all(s.done for s in win.loader.statuses())
    qtbot.mouseClick(win.cancel_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: win.loader.state == "idle", timeout=TIMEOUT)
    assert all(s.done for s in win.loader.statuses())


def test_switching_series_mid_transfer_never_shows_the_old_series(qtbot, tmp_path, two_series_server,
                                                                  monkeypatch):
    srv, uid_a, uid_b = two_series_server
    slow_packet_streams(monkeypatch)
    w = make_window(qtbot, tmp_path)
    try:
        connect(qtbot, w, srv.url)
        w.open_series(uid_a)
        old = w.loader
        qtbot.waitUntil(lambda: w.stack.decoded() is not None and old.running_stage() is not None
                        and old.running_stage().kind in (NEAR, BACKGROUND), timeout=TIMEOUT)
        shown = []
        w.imageDisplayed.connect(lambda img: shown.append(w.stack.meta().sop_instance_uid))
        w.open_series(uid_b)
        assert old.closed and w.stack.decoded() is None
        qtbot.waitUntil(lambda: w.loader.state == "idle" and w.stack.decoded() is not None,
                        timeout=TIMEOUT)
        sops_b = {im.sop_instance_uid for im in w.series_info.images}
        assert shown and set(shown) <= sops_b
        assert w.stack.meta().sop_instance_uid in sops_b and w.stack.slice_count() == 6
        qtbot.waitUntil(lambda: old.running_stage() is None, timeout=TIMEOUT)   # old transfer gone
    finally:
        w.close()


# --------------------------------------------------------------------------- cine, window, values

def test_cine_plays_and_consistent_mode_plays_at_the_common_level(qtbot, tmp_path, server, ct_series_uid):
    w = make_window(qtbot, tmp_path, prefetch=False)    # only the shown slice and neighbours
    try:
        connect(qtbot, w, server.url)
        loader = open_and_wait_idle(qtbot, w, ct_series_uid)
        assert loader.sd.levels(0) == (4, 2) and loader.sd.levels(8) == (1, 0)
        assert loader.common_level() == (0, 1)
        frames = []
        w.cine_bar.frameChanged.connect(lambda i, level, img: frames.append((i, level, img)))
        w.cine_bar.set_fps(60)
        w.cine_bar.set_consistent(True)
        w.cine_bar.play()
        qtbot.waitUntil(lambda: len(frames) >= 14, timeout=TIMEOUT)
        w.cine_bar.pause()
        indices = [i for i, _l, _img in frames]
        assert len(set(indices)) == 12                       # every slice played, looping
        for i, level, img in frames:
            assert level == (0, 1)
            assert img.index == i and (img.reduce, img.layers) == (2, 1) and img.pixels.shape == (64, 64)
        # plain cine: the best each slice has, frames advance
        frames.clear()
        w.cine_bar.set_consistent(False)
        w.cine_bar.play()
        qtbot.waitUntil(lambda: len(frames) >= 8, timeout=TIMEOUT)
        w.cine_bar.pause()
        assert len({i for i, _l, _img in frames}) >= 6 and all(level is None for _i, level, _img in frames)
        best0 = [img for i, _l, img in frames if i == 0 and img is not None]
        assert all(img.reduce == 0 for img in best0)
    finally:
        w.close()


def test_window_presets_change_the_window_and_the_picture(qtbot, win, ct_series_uid):
    open_and_wait_idle(qtbot, win, ct_series_uid)
    assert win.stack.window() == (40.0, 400.0)              # the DICOM window
    before = gray(win.stack.grab().toImage())
    names = [a.data().name for a in win.presets.actions]
    assert {"Brain", "Soft tissue", "Lung", "Bone"} <= set(names)
    lung = win.preset_action("Lung")
    assert lung.shortcut().toString() and lung.isEnabled()
    lung.trigger()
    assert win.stack.window() == (-600.0, 1500.0)
    after = gray(win.stack.grab().toImage())
    assert np.abs(after.astype(int) - before.astype(int)).mean() > 5
    assert "W 1500 L -600" in win.stack.overlay_text()
    win.preset_action("Bone").trigger()
    assert win.stack.window() == (400.0, 1800.0)
    win.act_default_window.trigger()
    assert win.stack.window() == (40.0, 400.0)


def test_value_under_the_cursor_is_hu(qtbot, win, ct_store, ct_series_uid):
    open_and_wait_idle(qtbot, win, ct_series_uid)
    assert win.stack.decoded().reduce == 0 and win.stack.decoded().layers == 4
    hu = dicom_hu(ct_store, 0)
    for x, y in ((100, 120), (30, 200), (128, 40)):
        pos = win.stack.image_to_widget(x + 0.5, y + 0.5)
        # a hover move straight to the widget: QTest.mouseMove goes through the platform's
        # cursor, which the offscreen platform may coalesce away when it is busy
        QApplication.sendEvent(win.stack, QMouseEvent(
            QEvent.Type.MouseMove, QPointF(pos), win.stack.mapToGlobal(QPointF(pos)),
            Qt.MouseButton.NoButton, Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier))
        qtbot.waitUntil(lambda: win.stack.cursor_value() is not None
                        and (int(win.stack.cursor_value()[0]),
                             int(win.stack.cursor_value()[1])) == (x, y), timeout=TIMEOUT)
        cx, cy, value = win.stack.cursor_value()
        assert (int(cx), int(cy)) == (x, y)
        assert value.unit == "HU" and value.modality_value == pytest.approx(hu[y, x])
        assert f"{hu[y, x]:.0f} HU" in win.stack.overlay_text()


def test_region_at_full_resolution_fetches_only_the_region(qtbot, tmp_path, server, ct_store, ct_series_uid):
    w = make_window(qtbot, tmp_path)
    try:
        w.browser_dock.hide()
        w.resize(700, 285)
        qtbot.waitUntil(lambda: w.stack.height() < 128 or w.stack.width() < 128, timeout=TIMEOUT)
        connect(qtbot, w, server.url)
        loader = open_and_wait_idle(qtbot, w, ct_series_uid)
        assert loader.reduce >= 1
        patches = []
        w.imageDisplayed.connect(lambda img: patches.append(img) if img.region else None)
        w.set_tool("region")
        # inside one 128x128 precinct of the full resolution
        a = w.stack.image_to_widget(20, 30).toPoint()
        b = w.stack.image_to_widget(80, 90).toPoint()
        QTest.mousePress(w.stack, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, a)
        QTest.mouseMove(w.stack, b)
        QTest.mouseRelease(w.stack, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, b)
        qtbot.waitUntil(lambda: bool(patches) and patches[-1].layers == 4 and patches[-1].reduce == 0,
                        timeout=TIMEOUT)
        patch = patches[-1]
        x, y, pw, ph = patch.region
        hu = dicom_hu(ct_store, 0)
        expected = hu[y:y + ph, x:x + pw] + 1024                    # stored values, lossless
        assert np.array_equal(patch.pixels.astype(np.float64), expected)
        assert patch in w.stack.patches()
        # only the region's precincts came at full resolution: the image as a whole did not
        assert loader.sd.levels(0)[1] < 2
        assert loader.sd.held_bytes(0) < loader.sd.images[0]["total_bytes"] * 0.8
    finally:
        w.close()


# --------------------------------------------------------------------------- import

def test_import_folder_lists_errors_imports_good_files_and_loses_nothing(qtbot, tmp_path, ct_store):
    from server.embedded import EmbeddedServer
    from server.sample import make_sample_ct
    from server.store import Store

    store = tmp_path / "store"
    copy_store_tree(ct_store, store)
    folder = tmp_path / "incoming"
    good = make_sample_ct(folder / "good", slices=4, size=64, seed=31)
    bad_src = make_sample_ct(tmp_path / "bad", slices=1, size=64, seed=32)[0]
    truncated = folder / "broken" / "truncated.dcm"
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes(bad_src.read_bytes()[:3000])
    notes = folder / "notes.txt"
    notes.write_text("not an image")
    duplicate = folder / "again.dcm"
    shutil.copy(ct_store.parent / "dicom" / "CT0001.dcm", duplicate)
    inputs = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    srv = EmbeddedServer(str(store)).start()
    w = make_window(qtbot, tmp_path)
    try:
        with qtbot.waitSignal(w.connected, timeout=TIMEOUT):
            w.adopt_server(srv, own=False)
        assert w.act_open_folder.isEnabled()
        opened = []
        w.seriesOpened.connect(opened.append)
        mime = QMimeData()
        mime.setUrls([QUrl.fromLocalFile(str(folder))])
        drop = QDropEvent(QPointF(20, 20), Qt.DropAction.CopyAction, mime,
                          Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier)
        with qtbot.waitSignal(w.importFinished, timeout=TIMEOUT) as blocker:
            w.dropEvent(drop)                      # a folder dropped on the window
        outcome = blocker.args[0]
        report = outcome.report
        assert sorted(f.path for f in report.imported) == sorted(good)
        assert [d.path for d in report.duplicates] == [duplicate]
        reasons = {s.path: (s.kind, s.reason) for s in report.skipped}
        assert set(reasons) == {truncated, notes}
        assert reasons[notes][0] == "not-dicom"
        assert reasons[truncated][0] not in ("not-dicom", "not-image") and reasons[truncated][1]
        # the result dialog lists every file, with the reason for each skip
        dlg = w.files.last_import_dialog
        assert dlg is not None and dlg.isVisible()
        rows = {Path(f): (result, detail) for f, result, detail in dlg.rows()}
        assert set(rows) == set(inputs)
        assert rows[truncated][0] == "error" and rows[truncated][1] == reasons[truncated][1]
        assert rows[notes][0] == "skipped"
        assert all(rows[p][0] == "imported" for p in good)
        dlg.close()
        # the imported study opens
        qtbot.waitUntil(lambda: bool(opened), timeout=TIMEOUT)
        assert opened[-1] == report.imported[0].series_instance_uid
        qtbot.waitUntil(lambda: w.stack.decoded() is not None, timeout=TIMEOUT)
        assert w.stack.slice_count() == 4
        # nothing lost: the store holds the old and the new series intact, inputs untouched
        with Store(store) as st:
            counts = {s["SeriesInstanceUID"]: s["NumberOfImages"] for s in st.catalogue.query_series()}
            assert counts[report.imported[0].series_instance_uid] == 4 and 12 in counts.values()
            assert fsck(st).consistent
        assert all(p.read_bytes() == data for p, data in inputs.items())
    finally:
        w.close()
        srv.stop()


def test_cancelled_import_keeps_what_was_imported_complete(tmp_path, ct_store):
    from server.embedded import EmbeddedServer
    from server.sample import make_sample_ct
    from server.store import Store
    from viewer.services import Backend

    store = tmp_path / "store"
    copy_store_tree(ct_store, store)
    files = make_sample_ct(tmp_path / "many", slices=10, size=32, seed=41)
    srv = EmbeddedServer(str(store)).start()
    backend = Backend(None)
    try:
        backend.adopt_server(srv)
        backend.login(srv.url)
        seen = []
        outcome = backend.import_paths([tmp_path / "many"], batch=4,
                                       progress=lambda d, t: seen.append((d, t)),
                                       cancelled=lambda: len(seen) > 1)
        assert outcome.cancelled and outcome.total == 10 and outcome.processed == 4
        assert len(outcome.report.imported) == 4 and seen[-1] == (4, 10)
        with Store(store) as st:
            assert fsck(st).consistent
            sops = {i["SOPInstanceUID"] for i in st.catalogue.query_instances(
                SeriesInstanceUID=outcome.series[0])}
        assert sops == {f.sop_instance_uid for f in outcome.report.imported}
        assert {f.path for f in outcome.report.imported} == set(files[:4])
    finally:
        backend.close()
        srv.stop()


def test_server_option_logs_in_through_the_dialog(qtbot, tmp_path, server, monkeypatch):
    from viewer.dialogs import LoginDialog

    shown = []

    def fake_exec(dialog):
        shown.append((dialog.url.text(), dialog.user.text(), dialog.message.text()))
        if len(shown) == 1:
            dialog.url.setText("http://127.0.0.1:9")        # nothing listens there
            return LoginDialog.DialogCode.Accepted
        if len(shown) == 2:
            dialog.url.setText(server.url)
            return LoginDialog.DialogCode.Accepted
        return LoginDialog.DialogCode.Rejected

    monkeypatch.setattr(LoginDialog, "exec", fake_exec)
    settings = QSettings(str(tmp_path / "login.ini"), QSettings.Format.IniFormat)
    w = MainWindow(AppConfig(server_url="http://example.invalid:8042", cache_path=None), settings)
    w.show()
    try:
        with qtbot.waitSignal(w.connected, timeout=TIMEOUT):
            w.start()
        assert shown[0][:2] == ("http://example.invalid:8042", "local")
        assert "cannot reach" in shown[1][2]                # the error is shown in the dialog
        assert w.backend.url == server.url and not w.backend.can_import
        assert w.settings.last_server() == (server.url, "local")
    finally:
        w.close()


def test_import_is_disabled_against_a_remote_server(qtbot, win):
    from viewer.services import ImportDisabled

    assert not win.act_open_folder.isEnabled() and not win.backend.can_import
    with pytest.raises(ImportDisabled, match="Start medview without --server"):
        win.backend.import_paths(["/nonexistent"])


# --------------------------------------------------------------------------- snapshot

def test_snapshot_command_renders_the_slice(tmp_path, server, ct_store, ct_series_uid, capsys):
    from viewer.cli import main

    def snap(name, *extra):
        out = tmp_path / name
        rc = main(["snapshot", "--server", server.url, "--series", ct_series_uid, "--slice", "7",
                   "--size", "256,256", "--no-cache", "--out", str(out), *extra])
        assert rc == 0 and out.exists()
        # 1-based, as the viewer shows it: --slice 7 is "Im: 7 / 12", the file CT0007.dcm
        assert "slice 7 of 12" in capsys.readouterr().out
        return gray(QImage(str(out)))

    hu = dicom_hu(ct_store, 6)
    soft = snap("soft.png", "--window", "40,400", "--no-overlays")
    assert soft.shape == (256, 256)
    # the rendered view is the slice, windowed: pixel for pixel
    assert np.abs(soft.astype(int) - apply_window(hu, 40, 400).astype(int)).max() <= 1
    lung_mask = hu < -500
    assert lung_mask.any() and soft[~lung_mask].mean() > soft[lung_mask].mean() + 50
    lung = snap("lung.png", "--window=-600,1500", "--no-overlays")
    assert np.abs(lung.astype(int) - apply_window(hu, -600, 1500).astype(int)).max() <= 1
    assert np.abs(lung.astype(int) - soft.astype(int)).mean() > 10
    # fewer layers at a lower level: same anatomy, coarser
    rough = snap("rough.png", "--window", "40,400", "--no-overlays", "--layers", "1", "--level", "2")
    assert 0 < np.abs(rough.astype(int) - soft.astype(int)).mean() < 40
    assert np.corrcoef(rough.ravel(), soft.ravel())[0, 1] > 0.8
    # with overlays the text is drawn over the same picture
    labelled = snap("overlay.png", "--window", "40,400")
    assert (labelled != soft).any()
    assert np.abs(labelled[96:160, 96:160].astype(int) - soft[96:160, 96:160].astype(int)).max() <= 1


def test_snapshot_command_reports_bad_arguments(tmp_path, server, ct_series_uid, capsys):
    from viewer.cli import main

    for bad in ("40", "13", "0"):
        rc = main(["snapshot", "--server", server.url, "--series", ct_series_uid, "--slice", bad,
                   "--no-cache", "--out", str(tmp_path / "x.png")])
        err = capsys.readouterr().err
        assert rc == 1 and "out of range" in err and "(1-12)" in err, bad
        assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- app shell

def test_settings_shortcuts_about_and_preferences(qtbot, tmp_path, server, ct_series_uid):
    w = make_window(qtbot, tmp_path, cache_path=tmp_path / "cache" / "packets.sqlite")
    try:
        connect(qtbot, w, server.url)
        assert w.settings.last_server() == (server.url, "local")
        open_and_wait_idle(qtbot, w, ct_series_uid)
        rows = dict((what, keys) for keys, what in w.shortcut_rows())
        assert rows["Invert"] == "I" and rows["Cancel transfer"] and rows["Lung"] == "Ctrl+7"
        dlg = w.show_shortcuts()
        assert ("I", "Invert") in dlg.rows()
        dlg.close()
        prefs = w.show_preferences()
        qtbot.waitUntil(lambda: "image" in prefs.cache_use.text(), timeout=TIMEOUT)
        assert not prefs.cache_use.text().startswith("0 B")
        qtbot.waitUntil(lambda: w.backend.cache_usage()[1] == 12, timeout=TIMEOUT)
        prefs.cache_limit.setValue(512)
        prefs.dicom_port.setValue(11113)
        prefs.dicom_ae.setText("MYVIEW")
        prefs.accept()
        assert w.settings.cache_limit_mb() == 512
        assert (w.settings.dicom_port(), w.settings.dicom_ae_title()) == (11113, "MYVIEW")
        w.backend.clear_cache()
        assert w.backend.cache_usage() == (0, 0)
    finally:
        w.close()
    assert w.settings.geometry() is not None            # the layout was saved on close


def test_packet_cache_is_reused_by_the_next_session(qtbot, tmp_path, server, ct_series_uid):
    cache = tmp_path / "cache" / "packets.sqlite"
    first = make_window(qtbot, tmp_path, cache_path=cache)
    try:
        connect(qtbot, first, server.url)
        sd = open_and_wait_idle(qtbot, first, ct_series_uid).sd
        # idle may also mean the adaptive fill waits for the reader to rest (a loaded
        # machine measures loopback as a slow link): wait until every image is whole
        qtbot.waitUntil(lambda: all(sd.levels(i)[0] == sd.images[i]["nlayers"]
                                    for i in range(len(sd))), timeout=TIMEOUT)
        held = [first.loader.sd.held_bytes(i) for i in range(12)]
    finally:
        first.close()
        assert first.backend.wait_closed(WAIT_S)   # its cache is closed off the UI thread
    second = make_window(qtbot, tmp_path, cache_path=cache)
    try:
        connect(qtbot, second, server.url)
        stages = []
        second.bridge.stageChanged.connect(lambda _l, stage, st, _m: stages.append(stage.kind))
        loader = open_and_wait_idle(qtbot, second, ct_series_uid)
        assert [loader.sd.held_bytes(i) for i in range(12)] == held
        assert stages == []                       # everything came from the cache
        assert second.stack.decoded().reduce == 0 and second.stack.decoded().layers == 4
    finally:
        second.close()


def test_closing_stops_the_bundled_server_it_started(qtbot, tmp_path, ct_store):
    import requests

    store = tmp_path / "bundled"
    copy_store_tree(ct_store, store)
    settings = QSettings(str(tmp_path / "b.ini"), QSettings.Format.IniFormat)
    w = MainWindow(AppConfig(store_dir=store, cache_path=None, sample=False), settings)
    w.show()
    with qtbot.waitSignal(w.connected, timeout=TIMEOUT) as blocker:
        w.start()
    url = blocker.args[0]
    assert url.startswith("http://127.0.0.1:") and w.backend.own_server
    assert requests.get(f"{url}/api/health", timeout=WAIT_MS / 1000).json()["status"] == "ok"
    assert w.act_open_folder.isEnabled()                # the bundled store takes imports
    w.close()                        # returns at once; a shutdown thread stops the server
    assert w.backend.wait_closed(WAIT_S)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/api/health", timeout=2)


@pytest.fixture()
def private_server(ct_store, tmp_path):
    """A server on a private copy of the CT store, for tests that write reading records
    (notes, status): the shared store stays unread for every other test."""
    from policyutil import copy_store
    from server.embedded import EmbeddedServer

    srv = EmbeddedServer(str(copy_store(ct_store, tmp_path / "private" / "store"))).start()
    yield srv
    srv.stop()


def test_reading_panel_follows_the_series_and_saves_notes(qtbot, tmp_path, private_server,
                                                          ct_series_uid):
    """The Reading dock (issue 5) is wired: it follows the open series, and a note typed
    there reaches the server, off the UI thread."""
    from client.policy import PolicyClient
    from client.session import Session

    win = make_window(qtbot, tmp_path)
    try:
        connect(qtbot, win, private_server.url)
        open_and_wait_idle(qtbot, win, ct_series_uid)
        assert win.policy.sd is win.loader.sd
        qtbot.waitUntil(lambda: win.diagnosis_panel.record is not None, timeout=TIMEOUT)
        study = win.loader.sd.info["StudyInstanceUID"]
        win.diagnosis_panel.noteAddRequested.emit("nodule 4 mm, right upper lobe")
        pc = PolicyClient(Session(private_server.url))
        qtbot.waitUntil(lambda: any("nodule 4 mm" in n.get("text", "")
                                    for n in pc.diagnosis(study).get("notes", [])),
                        timeout=TIMEOUT)
        win.series_ctl.close_loader()
        assert win.policy.sd is None
    finally:
        win.close()


def test_open_in_mpr_from_the_main_window(qtbot, win, ct_series_uid):
    """Ctrl+M opens the shown series in the 2×2 MPR layout, sharing the stack view's
    packets (no second metadata request, nothing fetched twice)."""
    loader = open_and_wait_idle(qtbot, win, ct_series_uid)
    mpr = win.open_mpr()
    assert mpr is not None
    qtbot.addWidget(mpr)
    qtbot.waitUntil(lambda: bool(mpr.load_events) and mpr.load_events[-1].final, timeout=TIMEOUT)
    assert "complete" in mpr.mpr.status.text()
    assert mpr.mpr.volume is not None and len(mpr.mpr.volume.filled_slots()) == 0
    assert loader.sd is win.loader.sd
    mpr.close()


def test_open_slide_from_the_main_window(qtbot, tmp_path):
    """File → Open slide: a whole slide held by the server opens in its pane, tiles
    arriving through the packet protocol."""
    import shutil

    from imaging.slide_sample import make_ihc_slide
    from imaging.tilesource import ArraySource
    from server.embedded import EmbeddedServer
    from pathology_util import new_store

    root = tmp_path / "store"
    st = new_store(root)
    img, assoc = make_ihc_slide(640, 480, seed=3)
    rec = st.ingest(ArraySource(img, mpp=0.5, associated=assoc), patient_id="P9",
                    accession="A9", tile_size=256, label="ihc test")
    st.close()
    with EmbeddedServer(str(root)) as srv:
        w = make_window(qtbot, tmp_path, cache_path=tmp_path / "cache" / "packets.sqlite")
        try:
            connect(qtbot, w, srv.url)
            with qtbot.waitSignal(w.slideOpened, timeout=TIMEOUT) as sig:
                w.open_slide(rec["slide_uid"])
            pane = sig.args[0]
            qtbot.addWidget(pane)
            v = pane.view
            ov = v._overview
            qtbot.waitUntil(lambda: all((ov, t) in v.cache
                                        for t in range(pane.provider.levels[ov].count)),
                            timeout=TIMEOUT)
            assert pane.provider.bytes_received > 0
            # generated tiles of this (remote) server's slide go to the client-side folder
            sr = pane.view.sr.cache
            assert sr is not None and not sr.catalogued
            assert sr.dir.is_relative_to(w.backend.sr_dir)
            pane.close()
        finally:
            w.close()
    shutil.rmtree(root, ignore_errors=True)


def test_open_folder_in_mpr_scans_off_the_ui_thread(qtbot, win, tmp_path, monkeypatch):
    from PySide6.QtWidgets import QFileDialog

    from server.sample import make_sample_ct

    folder = tmp_path / "series"
    make_sample_ct(folder, slices=12, size=64, seed=5)
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(folder))
    win.open_mpr_folder()
    qtbot.waitUntil(lambda: bool(win.threed.windows), timeout=TIMEOUT)
    mpr = win.threed.windows[-1]
    qtbot.addWidget(mpr)
    qtbot.waitUntil(lambda: "complete" in mpr.mpr.status.text(), timeout=TIMEOUT)
    assert len(mpr.mpr.volume.own_slots()) == 12
    mpr.close()


def test_a_busy_server_is_shown_in_the_status_bar(qtbot, win):
    """The session's busy hook (a 503 + Retry-After being waited out, on a worker
    thread) reaches the status bar through a queued signal."""
    import threading

    hook = win.backend.session.on_busy
    assert hook is not None
    t = threading.Thread(target=hook, args=(3.2, 2))
    t.start()
    t.join()
    qtbot.waitUntil(lambda: "Server busy, retrying" in win.statusBar().currentMessage(),
                    timeout=TIMEOUT)
    assert "attempt 2" in win.statusBar().currentMessage()
