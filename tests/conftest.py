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
