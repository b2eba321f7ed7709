"""Shared fixtures: a small ingested CT series served on loopback."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest

# MEDVIEW_TEST_DATABASE=postgresql: every store of the run keeps its tables in PostgreSQL
# (a throwaway cluster, one schema per store) instead of STORE/catalogue.sqlite.
PG_RUN = os.environ.get("MEDVIEW_TEST_DATABASE", "").lower() in ("postgresql", "postgres", "pg")
_cluster = None


def _pg():
    """The run's throwaway PostgreSQL cluster (started on first use, stopped at exit)."""
    global _cluster
    if _cluster is None:
        from pgcluster import PgCluster

        _cluster = PgCluster().start()
    return _cluster


def pytest_configure(config):
    if PG_RUN:
        os.environ["MEDVIEW_DATABASE"] = _pg().url(schema="{store}")


def pytest_unconfigure(config):
    global _cluster
    if _cluster is not None:
        _cluster.stop()
        _cluster = None


@pytest.fixture(scope="session")
def pg_cluster():
    """A PostgreSQL cluster on a unix socket in a temporary directory."""
    return _pg()


@pytest.fixture()
def pg_url(pg_cluster):
    """A PostgreSQL URL with a schema of its own (empty)."""
    return pg_cluster.fresh_url()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request):
    """A test that takes this runs once per engine: None (a store's own SQLite file,
    ``Store(root, database=None)``) or a PostgreSQL URL with a fresh schema."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("pg_cluster").fresh_url()


@pytest.fixture(scope="session")
def ct_store(tmp_path_factory):
    """A store holding a 12-slice 256x256 synthetic CT series (ingested once)."""
    from server.ingest import ingest_paths
    from server.sample import make_sample_ct
    from server.store import Store

    root = tmp_path_factory.mktemp("ctstore")
    files = make_sample_ct(root / "dicom", slices=12, size=256, seed=3)
    store = Store(root / "store")
    report = ingest_paths(files, store)
    assert len(report.imported) == 12, report
    store.close()
    return root / "store"


@pytest.fixture()
def server(ct_store):
    from server.embedded import EmbeddedServer

    srv = EmbeddedServer(str(ct_store)).start()
    yield srv
    srv.stop()


@pytest.fixture()
def ct_series_uid(ct_store):
    from server.store import Store

    with Store(ct_store) as st:
        (series,) = [s for s in st.catalogue.query_series() if s["Modality"] == "CT"]
        return series["SeriesInstanceUID"]


@pytest.fixture(autouse=True)
def _default_pool_per_test():
    """Each test has its own default worker pool (the one a window or loader uses when it
    is handed none), shut down after it: jobs a test leaves running never hold the
    workers of the next test, as each window's own threads once did not."""
    from client.pool import WorkerPool, install_default_pool

    pool = WorkerPool(4)
    install_default_pool(pool)
    yield pool
    pool.shutdown(wait=False)
