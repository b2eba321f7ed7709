"""Behaviour that surprised a reader: the diagnosing role reads V1 at every status and
the dock says in one sentence which version is shown and why; background prefetch off
takes effect at once; the rate counts active transfer time only; a slide zoomed past its
scan says so."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest  # noqa: E402

from client.policy_text import explain_shown_version  # noqa: E402
from client.transferstats import TransferRate  # noqa: E402

from policyutil import copy_store_tree  # noqa: E402
from test_viewer_app import TIMEOUT, connect, make_window, wait_thumbnail_done  # noqa: E402

VERSIONS = [
    {"name": "V1", "purpose": "diagnosis", "lossless": True, "quality": 100, "target_ratio": 1,
     "bytes": 3 << 20, "allowed": True},
    {"name": "V2", "purpose": "reference", "lossless": False, "quality": 50, "target_ratio": 20,
     "bytes": 400_000, "allowed": True},
    {"name": "V3", "purpose": "comparison", "lossless": False, "quality": 25, "target_ratio": 50,
     "bytes": 160_000, "allowed": False},
]
NAMES = {"1": "unread", "5": "report"}


def test_default_policy_gives_the_diagnosing_role_v1_at_every_status():
    from server.policy import load_policy

    pol = load_policy()
    assert pol.diagnosing_versions == ["V1"]
    for status in range(1, 6):
        assert "V1" in pol.allowed_versions(status, diagnosing=True), status
    assert pol.allowed_versions(5) == ["V2", "V3"]                 # others: the status row
    assert pol.allowed_versions(1, diagnosing=True) == ["V1"]       # unread: still only V1


def test_the_dock_says_in_one_sentence_which_version_is_shown_and_why():
    best = explain_shown_version({}, VERSIONS, None, 5, NAMES)
    assert best.startswith("Shown: V1 – diagnosis, original quality (lossless)")
    assert "best version you may receive while the study is 5 – report" in best
    auto = explain_shown_version({"version": "auto"}, VERSIONS,
                                 {"version": "V2", "reasons": ["a slow link gets the reference"]})
    assert auto.startswith("Shown: V2") and "automatically because a slow link" in auto
    refused = explain_shown_version({"purpose": "comparison"}, VERSIONS, None, 5, NAMES)
    assert refused.startswith("Shown: V2") and "V3 may not be sent now while the study is 5 – report" in refused
    for text in (best, auto, refused):
        assert text.count(". ") == 0 and text.endswith(".")         # one sentence
    assert "No version" in explain_shown_version({}, [dict(v, allowed=False) for v in VERSIONS])


def test_reopening_a_reported_study_best_allowed_is_v1_for_the_radiologist(qtbot, tmp_path, ct_store):
    from server.embedded import EmbeddedServer
    from server.store import Store

    store = tmp_path / "store"
    copy_store_tree(ct_store, store)
    with Store(store) as st:
        (series,) = [s for s in st.catalogue.query_series() if s["Modality"] == "CT"]
    srv = EmbeddedServer(str(store)).start()
    win = make_window(qtbot, tmp_path)
    try:
        connect(qtbot, win, srv.url)
        srv.app.state.server.diagnosis.set_status(series["StudyInstanceUID"], 5, "test")
        win.open_series(series["SeriesInstanceUID"])
        qtbot.waitUntil(lambda: win.loader is not None and win.loader.sd is not None
                        and win.version_selector.combo.count() > 2, timeout=TIMEOUT)
        sel = win.version_selector
        allowed = {v["name"]: v.get("allowed") for v in sel._versions}
        assert allowed["V1"] is True
        assert sel.detail.text().startswith("Shown: V1") and "5 – report" in sel.detail.text()
        qtbot.waitUntil(lambda: win.loader.state == "idle", timeout=TIMEOUT)
        sd = win.loader.sd
        assert all(sd.levels(i)[0] == sd.images[i]["nlayers"] for i in [0])   # every layer: lossless
    finally:
        win.close()
        srv.stop()


def test_prefetch_off_stops_the_background_transfer_now(qtbot, tmp_path, server, ct_series_uid,
                                                        monkeypatch):
    from netsim import slow_packet_streams
    from client.series_loader import BACKGROUND

    win = make_window(qtbot, tmp_path, size=(600, 500))
    try:
        connect(qtbot, win, server.url)
        wait_thumbnail_done(qtbot, win, ct_series_uid)
        slow_packet_streams(monkeypatch, piece=1024, delay=0.02)   # ~50 kB/s
        stages = []
        win.bridge.stageChanged.connect(lambda _l, stage, st, _m: stages.append((stage.kind, st)))
        win.open_series(ct_series_uid)
        qtbot.waitUntil(lambda: (BACKGROUND, "started") in stages, timeout=TIMEOUT)
        dlg = win.show_preferences()
        dlg.prefetch.setChecked(False)
        n_started = sum(1 for k, st in stages if k == BACKGROUND and st == "started")
        dlg.accept()                                   # takes effect now, no restart
        qtbot.waitUntil(lambda: ("background", "cancelled") in stages, timeout=TIMEOUT)
        qtbot.waitUntil(lambda: win.loader.running_stage() is None and win.loader.state == "idle",
                        timeout=TIMEOUT)
        assert sum(1 for k, st in stages if k == BACKGROUND and st == "started") == n_started
        assert not all(s.done for s in win.loader.statuses())        # the rest was not fetched
        assert win.settings.prefetch() is False
    finally:
        win.close()


def test_rate_is_measured_over_active_transfer_time():
    """Fed active seconds, the rate after idling is still the transfer's (fed wall-clock
    seconds, 10 s of idling made it a twentieth)."""
    rate = TransferRate(window_s=3.0)
    for k in range(1, 11):                 # 1 MB/s for 1 s of transfer
        snap = rate.update(k * 100_000, 2_000_000, 2_000_000, k * 0.1)
    assert snap.speed == pytest.approx(1_000_000, rel=0.01)
    snap = rate.update(1_050_000, 2_000_000, 2_000_000, 1.05)      # a new stage after idling
    assert snap.speed == pytest.approx(1_000_000, rel=0.05)


def test_loader_elapsed_counts_only_transfers(qtbot, tmp_path, server, ct_series_uid):
    win = make_window(qtbot, tmp_path)
    try:
        connect(qtbot, win, server.url)
        win.open_series(ct_series_uid)
        qtbot.waitUntil(lambda: win.loader.state == "idle" and win.loader.running_stage() is None,
                        timeout=TIMEOUT)
        first = win.loader._series_status().elapsed
        assert first > 0
        qtbot.wait(300)                                      # idle
        assert win.loader._series_status().elapsed == first  # idle time is not counted
    finally:
        win.close()


def test_high_resolution_zoom_past_the_scan_says_enlarged(qtbot, tmp_path):
    from client.slides import LocalSlide
    from imaging.slide_sample import make_ihc_slide
    from imaging.tilesource import ArraySource
    from pathology_util import new_store
    from viewer.slideview import open_slide_window

    st = new_store(tmp_path / "store")
    img, assoc = make_ihc_slide(640, 480, seed=4)
    rec = st.ingest(ArraySource(img, mpp=0.125, associated=assoc), patient_id="P1", accession="A1",
                    tile_size=256, label="hi")
    pane = open_slide_window(LocalSlide.from_store(st, rec["pk"]))
    qtbot.addWidget(pane)
    pane.resize(800, 600)
    v = pane.view
    try:
        assert v.mode == "high"
        v.zoom_to(1.0, animate=False)
        assert v.beyond_scan() is None and v.beyond_scan_text() == ""
        v.zoom_to(3.0, animate=False)
        assert v.beyond_scan() == pytest.approx(3.0)
        assert v.beyond_scan_text().startswith("enlarged ×3.0 beyond scan (scan 80.0×)")
        v.grab()
    finally:
        pane.close()
        st.close()
