"""Shared fixtures: a small ingested CT series served on loopback."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest


@pytest.fixture(scope="session")
def ct_store(tmp_path_factory):
    """A store holding a 12-slice 256x256 synthetic CT series (ingested once)."""
    from server_stub.ingest import ingest_paths
    from server_stub.sample import make_sample_ct
    from server_stub.store import Store

    root = tmp_path_factory.mktemp("ctstore")
    files = make_sample_ct(root / "dicom", slices=12, size=256, seed=3)
    store = Store(root / "store")
    report = ingest_paths(files, store)
    assert len(report.imported) == 12, report
    store.close()
    return root / "store"


@pytest.fixture()
def server(ct_store):
    from server_stub.embedded import EmbeddedServer

    srv = EmbeddedServer(str(ct_store)).start()
    yield srv
    srv.stop()


@pytest.fixture()
def ct_series_uid(ct_store):
    from server_stub.store import Store

    with Store(ct_store) as st:
        (series,) = [s for s in st.catalogue.query_series() if s["Modality"] == "CT"]
        return series["SeriesInstanceUID"]
