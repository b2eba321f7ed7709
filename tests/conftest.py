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
    """The run's throwaway PostgreSQL cluster (started on first use, stopped at exit;
    pytest-xdist workers use the one their controller started: MEDVIEW_TEST_PG_DIR)."""
    global _cluster
    if _cluster is None:
        from pgcluster import PgCluster

        shared = os.environ.get("MEDVIEW_TEST_PG_DIR")
        _cluster = PgCluster.attach(shared) if shared else PgCluster().start()
        os.environ["MEDVIEW_TEST_PG_DIR"] = str(_cluster.dir)
    return _cluster


# ----------------------------------------------------------------- both engines in CI
# ./test.sh runs the suite twice: first everything on SQLite, then — with
# MEDVIEW_TEST_DATABASE=postgresql — only the tests that touched a database in the first
# pass. MEDVIEW_TEST_DB_TESTS names the file that carries them from one pass to the next:
# the SQLite pass writes there the ids of the tests that opened a server database (a
# ``server.dbutil.Db``, in the test, in one of its fixtures of any scope, or through a
# Python subprocess or the cluster script they started); the PostgreSQL pass runs those.
# Tests that take the ``database``/``pg_url``/``pg_cluster`` fixtures choose their engines
# themselves (both, in every pass): the second pass leaves them out.
DB_TESTS_FILE = os.environ.get("MEDVIEW_TEST_DB_TESTS", "").strip()
RECORD = bool(DB_TESTS_FILE) and not PG_RUN
ENGINE_FIXTURES = {"database", "pg_url", "pg_cluster"}
_opened = [0]                          # databases opened (and server subprocesses started)
_reporter = [True]                     # this process writes DB_TESTS_FILE (not an xdist worker)


def _server_process(args) -> bool:
    """Whether a subprocess may open a store's database: any Python program (the server,
    the CLI, a viewer app run) or the cluster script."""
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    words = " ".join(str(a) for a in argv)
    return "python" in os.path.basename(str(argv[0])) or "cluster.sh" in words


def _watch_databases() -> None:
    import subprocess

    from server import dbutil

    db_init, popen_init = dbutil.Db.__init__, subprocess.Popen.__init__

    def counting_db_init(self, *a, **kw):
        _opened[0] += 1
        return db_init(self, *a, **kw)

    def counting_popen_init(self, args, *a, **kw):
        if _server_process(args):
            _opened[0] += 1
        return popen_init(self, args, *a, **kw)

    dbutil.Db.__init__ = counting_db_init
    subprocess.Popen.__init__ = counting_popen_init


def pytest_configure(config):
    _reporter[0] = not hasattr(config, "workerinput")
    if _reporter[0] and getattr(config.option, "numprocesses", None):
        _pg()           # the xdist controller: one cluster for its workers (started later)
    if PG_RUN:
        os.environ["MEDVIEW_DATABASE"] = _pg().url(schema="{store}")
    if RECORD:
        _watch_databases()
        if _reporter[0]:
            open(DB_TESTS_FILE, "w").close()


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    before = _opened[0]
    yield
    if RECORD and _opened[0] > before:
        fixturedef.medview_database = True


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.medview_opened = _opened[0]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    if RECORD and call.when == "teardown" and not ENGINE_FIXTURES & set(item.fixturenames):
        defs = item._fixtureinfo.name2fixturedefs
        if _opened[0] > getattr(item, "medview_opened", _opened[0]) or any(
                getattr(d, "medview_database", False)
                for name in item.fixturenames for d in defs.get(name, ())):
            item.user_properties.append(("medview_database", True))
    yield


def pytest_runtest_logreport(report):
    # in the process that reports (the controller under xdist): one line per DB test
    if RECORD and _reporter[0] and report.when == "teardown" and \
            ("medview_database", True) in report.user_properties:
        with open(DB_TESTS_FILE, "a") as f:
            f.write(report.nodeid + "\n")


def pytest_collection_modifyitems(config, items):
    if not (PG_RUN and DB_TESTS_FILE):
        return
    if not os.path.isfile(DB_TESTS_FILE):
        raise pytest.UsageError(f"MEDVIEW_TEST_DB_TESTS={DB_TESTS_FILE}: no such file (the "
                                "SQLite pass writes it; run that first, or unset it)")
    with open(DB_TESTS_FILE) as f:
        wanted = {line.strip() for line in f if line.strip()}
    keep, drop = [], []
    for item in items:
        (keep if item.nodeid in wanted and not ENGINE_FIXTURES & set(item.fixturenames)
         else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_unconfigure(config):
    global _cluster
    if _cluster is not None:
        _cluster.stop()
        _cluster = None


@pytest.fixture(scope="session")
def pg_cluster():
    """A PostgreSQL cluster on a unix socket in a temporary directory."""
    return _pg()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS, tests/seaweed.py) on loopback with throwaway data, for
    the whole run; its endpoint and credentials in the environment meanwhile."""
    import seaweed

    sw = seaweed.start(tmp_path_factory.mktemp("seaweed"))
    old = {k: os.environ.get(k) for k in sw.env()}
    os.environ.update(sw.env())
    yield sw
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    sw.stop(graceful=False)                  # throwaway data


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
