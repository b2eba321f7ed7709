"""W7: gather takes everything of a patient (slides and radiology originals, bit for bit);
a reading station lists the exams assigned to it and opens them from its pre-distributed
cache first, falling back to the server."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from imaging.slide_sample import make_ihc_slide
from imaging.tilesource import ArraySource
from server.sample import PATIENT_ID, make_sample_ct

from pathology_util import new_store


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def slide_img():
    return make_ihc_slide(256, 192, seed=8)[0]


def _store_with_ct_and_slides(root: Path, tmp: Path, slide_img):
    """A store with one CT study and two slide exams of the sample patient, and a slide of
    another patient. Returns (slide store, image store, CT files, slide rows)."""
    from server.ingest import ingest_paths
    from server.store import Store

    images = Store(root)
    ct = make_sample_ct(tmp / "ct", slices=4, size=32, seed=2)
    rep = ingest_paths(ct, images)
    assert len(rep.imported) == 4
    st = new_store(root)
    rows = [st.ingest(ArraySource(slide_img, mpp=0.5), patient_id=PATIENT_ID, accession=acc,
                      tile_size=128, run_qc=False) for acc in ("PA-1", "PA-2")]
    rows.append(st.ingest(ArraySource(slide_img, mpp=0.5), patient_id="OTHER",
                          accession="PB-1", tile_size=128, run_qc=False))
    return st, images, ct, rows


def test_gather_includes_the_radiology_originals_bit_for_bit(tmp_path, slide_img):
    from client.slides import LocalSlide
    from server.slide_organise import gather_patient

    st, images, ct, rows = _store_with_ct_and_slides(tmp_path / "store", tmp_path, slide_img)
    try:
        out = tmp_path / "out"
        idx = gather_patient(st, PATIENT_ID, out, image_store=images)
        base = out / PATIENT_ID
        assert sorted(s["slide_uid"] for s in idx["slides"]) == sorted(
            r["slide_uid"] for r in rows[:2])
        for s in idx["slides"]:
            assert LocalSlide.from_folder(base / s["folder"]).stored.verify() == []
        (study,) = idx["studies"]
        assert study["files"] == 4 and study["copy"] == "copied" and "CT" in study["modalities"]
        got = {_sha(p) for p in (base / study["folder"]).rglob("*.dcm")}
        assert got == {_sha(p) for p in ct}                     # the originals, bit for bit
        assert not list(base.glob("radiology/.incoming-*"))
        # again: what is in place and intact is left alone; a damaged file is replaced
        assert gather_patient(st, PATIENT_ID, out, image_store=images)["studies"][0]["copy"] \
            == "present"
        victim = next((base / study["folder"]).rglob("*.dcm"))
        victim.write_bytes(victim.read_bytes()[:-8] + bytes(8))
        assert gather_patient(st, PATIENT_ID, out)["studies"][0]["copy"] == "copied"
        assert {_sha(p) for p in (base / study["folder"]).rglob("*.dcm")} == {_sha(p) for p in ct}
        # a patient without radiology: slides only, and the other patient's CT not there
        other = gather_patient(st, "OTHER", out, image_store=images)
        assert other["studies"] == [] and len(other["slides"]) == 1
    finally:
        st.close()
        images.close()


# --------------------------------------------------------------------------- stations
@pytest.fixture
def station_server(tmp_path, slide_img):
    """A server with two exams of P1 assigned to station ws-1 (A1 distributed, A2 not),
    one of P2 assigned too, and one exam assigned to another station."""
    from server.embedded import EmbeddedServer
    from server.slide_organise import distribute

    root = tmp_path / "store"
    st = new_store(root)
    rows = {acc: st.ingest(ArraySource(slide_img, mpp=0.5), patient_id=pid, accession=acc,
                           tile_size=128, run_qc=False, label=f"slide {acc}")
            for pid, acc in (("P1", "A1"), ("P1", "A2"), ("P2", "B1"), ("P3", "C1"))}
    st.catalogue.add_station("ws-1", str(tmp_path / "ws1"))
    st.catalogue.add_station("ws-2", str(tmp_path / "ws2"))
    for acc in ("A1", "B1"):
        st.catalogue.assign(acc, "ws-1")
    st.catalogue.assign("C1", "ws-2")
    distribute(st, "ws-1")
    st.catalogue.assign("A2", "ws-1")              # assigned later: not distributed yet
    st.close()
    srv = EmbeddedServer(str(root)).start()
    try:
        yield srv, rows, tmp_path / "ws1"
    finally:
        srv.stop()


def test_station_worklist_and_cache_first(station_server):
    from client.session import ServerError, Session
    from client.slides import LocalSlide, RemoteSlide
    from client.stations import Station

    srv, rows, ws1 = station_server
    s = Session(srv.url, "local", None)
    try:
        station = Station(s, "ws-1")
        exams = station.worklist()
        assert [e["accession"] for e in exams] == ["A1", "B1", "A2"]
        assert station.cache_dir == ws1                 # as configured on the server
        by = {e["accession"]: e for e in exams}
        assert by["A1"]["patient_id"] == "P1" and by["B1"]["patient_id"] == "P2"
        assert [x["cached"] for x in by["A1"]["slides"]] == [True]
        assert [x["cached"] for x in by["A2"]["slides"]] == [False]
        # distributed: opened from the cache, the same pixels as the server's
        got = station.open(by["A1"]["slides"][0])
        assert got.source == "cache" and isinstance(got.provider, LocalSlide)
        assert got.provider.info["patient_id"] == "P1"
        remote = RemoteSlide(s, rows["A1"]["slide_uid"])
        assert np.array_equal(got.provider.read_level(0, 0, 0, 256, 192),
                              remote.read_level(0, 0, 0, 256, 192))
        # not distributed yet: from the server, saying why
        got = station.open(by["A2"]["slides"][0])
        assert got.source == "server" and isinstance(got.provider, RemoteSlide)
        assert "not distributed" in got.reason
        # a cached copy that differs from the server's is not used
        man = ws1 / rows["A1"]["slide_uid"] / "manifest.json"
        man.write_bytes(man.read_bytes().replace(b"{", b"{ ", 1))
        got = station.open(by["A1"]["slides"][0])
        assert got.source == "server" and "differs" in got.reason
        # a station's own folder overrides the server's word
        assert Station(s, "ws-1", cache_dir=ws1 / "elsewhere").cached_copy(
            by["B1"]["slides"][0])[0] is None
        with pytest.raises(ServerError) as e:
            Station(s, "nope").worklist()
        assert e.value.status == 404
    finally:
        s.logout()


def test_station_worklist_within_the_rights(station_server):
    from client.session import Session
    from client.stations import Station
    from server.rights import Rule

    srv, rows, _ws1 = station_server
    auth = srv.app.state.server.auth
    auth.add_user("reader", "pw-reader-1")
    auth.set_rule(Rule("reader", "patient:P2", actions=set()))        # P2 hidden
    auth.set_rule(Rule("reader", "patient:P1", max_layers=2))         # P1 limited
    s = Session(srv.url, "reader", "pw-reader-1")
    try:
        station = Station(s, "ws-1")
        exams = station.worklist()
        assert [e["accession"] for e in exams] == ["A1", "A2"]        # B1 left out
        a1 = exams[0]["slides"][0]
        assert a1["cached"] and a1["unlimited"] is False
        got = station.open(a1)                      # in the cache, but the rights limit it
        assert got.source == "server" and "limited" in got.reason
        assert got.provider.max_layers == 2
    finally:
        s.logout()


def test_viewer_as_station_opens_from_the_cache(qtbot, station_server, tmp_path):
    from PySide6.QtCore import QSettings

    from client.slides import LocalSlide
    from viewer.mainwindow import AppConfig, MainWindow
    from waits import WAIT_MS

    srv, rows, ws1 = station_server
    settings = QSettings(str(tmp_path / "medview.ini"), QSettings.Format.IniFormat)
    win = MainWindow(AppConfig(server_url=srv.url, station="ws-1"), settings)
    qtbot.addWidget(win)
    try:
        with qtbot.waitSignal(win.connected, timeout=WAIT_MS):
            win.connect_to(srv.url)
        wl = win.slides.worklist
        qtbot.waitUntil(lambda: wl.table.rowCount() == 3, timeout=WAIT_MS)
        assert [wl.table.item(r, 2).text() for r in range(3)] == ["A1", "B1", "A2"]
        assert [wl.table.item(r, 6).text() for r in range(3)] == \
            ["station cache", "station cache", "server"]
        with qtbot.waitSignal(win.slideOpened, timeout=WAIT_MS) as sig:
            wl.open_row(0)
        pane = sig.args[0]
        qtbot.addWidget(pane)
        assert isinstance(pane.provider, LocalSlide)
        assert pane.provider.info["slide_uid"] == rows["A1"]["slide_uid"]
        pane.close()
        # closed, the worklist comes back from the File menu
        assert win.act_station.isVisible()
        wl.close()
        win.act_station.trigger()
        assert win.slides.worklist is wl and wl.isVisible()
    finally:
        win.close()


def test_station_option_reaches_the_window():
    from viewer.app import config_from_args
    from viewer.cli import build_parser

    args = build_parser().parse_args(["--station", "ws-1", "--station-cache", "/mnt/ws1"])
    cfg = config_from_args(args)
    assert cfg.station == "ws-1" and str(cfg.station_cache) == "/mnt/ws1"
