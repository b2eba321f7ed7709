"""What a reading session keeps: switching Version keeps slice, zoom, pan and window; a
series opened after an import is highlighted in the browser."""
from __future__ import annotations

import pytest

from policyutil import copy_store_tree
from test_viewer_app import TIMEOUT, connect, make_window, open_and_wait_idle


def test_switching_version_keeps_slice_zoom_pan_and_window(qtbot, tmp_path, server, ct_series_uid):
    win = make_window(qtbot, tmp_path)
    try:
        connect(qtbot, win, server.url)
        open_and_wait_idle(qtbot, win, ct_series_uid)
        win.stack.request_slice(7)
        qtbot.waitUntil(lambda: win.stack.current_index() == 7, timeout=TIMEOUT)
        win.stack.zoom_by(2.0)
        win.stack.set_window(123.0, 456.0)
        before = win.stack.snapshot()
        assert not before.fit
        combo = win.version_selector.combo
        i = combo.findText("For reference")
        if i < 0:
            pytest.fail(f"no 'For reference' choice: {[combo.itemText(k) for k in range(combo.count())]}")
        old = win.loader
        combo.setCurrentIndex(i)                       # the series reopens in that version
        qtbot.waitUntil(lambda: win.loader is not old and win.loader is not None
                        and win.series_info is not None and win.stack.decoded() is not None,
                        timeout=TIMEOUT)
        assert win.stack.current_index() == 7 and win.series_ctl.shown == 7
        after = win.stack.snapshot()
        assert (after.center, after.width) == (123.0, 456.0)
        assert after.zoom == pytest.approx(before.zoom) and after.pan == pytest.approx(before.pan)
        assert not after.fit
        # opening another series still starts at its first slice, fitted, default window
        win.open_series(ct_series_uid)
        qtbot.waitUntil(lambda: win.stack.decoded() is not None, timeout=TIMEOUT)
        assert win.stack.current_index() == 0 and win.stack.snapshot().fit
    finally:
        win.close()


def test_the_series_opened_after_an_import_is_highlighted(qtbot, tmp_path, ct_store, ct_series_uid):
    from server.embedded import EmbeddedServer
    from server.sample import make_sample_ct

    store = tmp_path / "store"
    copy_store_tree(ct_store, store)
    files = make_sample_ct(tmp_path / "incoming", slices=4, size=64, seed=77)
    srv = EmbeddedServer(str(store)).start()
    win = make_window(qtbot, tmp_path)
    try:
        with qtbot.waitSignal(win.connected, timeout=TIMEOUT):
            win.adopt_server(srv, own=False)           # a local store: import is allowed
        open_and_wait_idle(qtbot, win, ct_series_uid)
        qtbot.waitUntil(lambda: win.browser.selected_series() == ct_series_uid, timeout=TIMEOUT)
        opened = []
        win.seriesOpened.connect(opened.append)
        with qtbot.waitSignal(win.importFinished, timeout=60_000) as blocker:
            win.import_paths([str(p) for p in files])
        new_uid = blocker.args[0].report.imported[0].series_instance_uid
        if win.files.last_import_dialog is not None:
            win.files.last_import_dialog.close()
        qtbot.waitUntil(lambda: bool(opened) and opened[-1] == new_uid, timeout=TIMEOUT)
        qtbot.waitUntil(lambda: win.browser.selected_series() == new_uid, timeout=TIMEOUT)
        # a later refresh of the list keeps the shown series highlighted
        win.browser.refresh()
        qtbot.waitUntil(lambda: "series" in win.browser.status.text(), timeout=TIMEOUT)
        assert win.browser.selected_series() == new_uid
    finally:
        win.close()
        srv.stop()
