"""The desktop's Remote PACS source (study browser) and File → Export, against a real
DICOM SCP (the project's own, pynetdicom) holding a study the local store lacks."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


import pydicom
import pytest
from PySide6.QtCore import QSettings, Qt

from server.dimse import DimseServer, Peers, wait_for_port
from server.embedded import EmbeddedServer
from server.sample import make_sample_ct
from server.store import Store
from viewer.browser import remote_queries
from viewer.mainwindow import AppConfig, MainWindow

TIMEOUT = 60_000


def test_remote_queries():
    assert remote_queries() == [{}]
    assert remote_queries("doe", "CT", "20200101", "20201231") == [
        {"modality": "CT", "date": "20200101-20201231", "name": "*doe*"},
        {"modality": "CT", "date": "20200101-20201231", "patient": "*doe*"}]
    assert remote_queries("D?E")[0]["name"] == "D?E"


@pytest.fixture()
def pacs(tmp_path):
    """A remote PACS (the project's SCP on its own store) with one 3-slice CT study."""
    files = make_sample_ct(tmp_path / "ct", slices=3, size=64, seed=21)
    from server.ingest import ingest_paths
    store = Store(tmp_path / "pacs")
    assert len(ingest_paths(files, store).imported) == 3
    Peers(store.catalogue).add_destination("MEDVIEW", "127.0.0.1", 104)   # may call it
    srv = DimseServer(store, ae_title="PACS", port=0).start()
    wait_for_port("127.0.0.1", srv.port)
    srv.files = files
    yield srv
    srv.stop()
    store.close()


def test_browse_remote_pacs_retrieve_and_export(qtbot, tmp_path, pacs):
    local = tmp_path / "local"
    Store(local).close()
    with Store(local) as st:
        Peers(st.catalogue).add_pacs("hospital", "127.0.0.1", pacs.port, "PACS")
    srv = EmbeddedServer(str(local)).start()
    settings = QSettings(str(tmp_path / "medview.ini"), QSettings.Format.IniFormat)
    w = MainWindow(AppConfig(cache_path=None), settings)
    w.show()
    try:
        with qtbot.waitSignal(w.connected, timeout=TIMEOUT):
            w.adopt_server(srv)
        b = w.browser
        qtbot.waitUntil(lambda: b.source.count() == 2, timeout=TIMEOUT)
        assert b.source.isVisible()
        b.source.setCurrentIndex(1)                       # "Remote PACS: hospital"
        study = str(pydicom.dcmread(pacs.files[0]).StudyInstanceUID)
        qtbot.waitUntil(lambda: b.tree.topLevelItemCount() == 1, timeout=TIMEOUT)
        item = b.tree.topLevelItem(0).child(0)
        assert item.data(0, Qt.ItemDataRole.UserRole) == ("remote-study", study)
        assert item.text(1) == "3"
        b.tree.setCurrentItem(item)
        assert b.retrieve_button.isEnabled()
        with qtbot.waitSignal(b.retrieveRequested, timeout=TIMEOUT):
            b.retrieve_button.click()
        qtbot.waitUntil(lambda: w.browsing.retrieve_task.done, timeout=TIMEOUT)
        assert w.browsing.retrieve_task.error is None, w.browsing.retrieve_task.error
        assert w.browsing.retrieve_task.result["imported"] == 3
        assert len(srv.store.catalogue.query_instances(StudyInstanceUID=study)) == 3
        assert b.remote_source() is None                  # back on the server's studies
        assert any(r["user"] == "MEDVIEW" and r["action"] == "dimse-get"
                   for r in pacs.auth.audit_rows())

        # File → Export of that study: the originals and a DICOMDIR
        out = tmp_path / "export"
        task = w.export_study(study, out)
        qtbot.waitUntil(lambda: task.done, timeout=TIMEOUT)
        assert task.error is None, task.error
        assert (out / "DICOMDIR").is_file()
        assert len([p for p in out.rglob("*") if p.is_file()]) == 4
    finally:
        w.close()
        srv.stop()
