"""The one database access layer of the server: the catalogue (:mod:`server.catalogue`)
and the modules that keep their own tables in the catalogue database (users and rights,
audit, diagnosis records, storage tiers, version records, the slide catalogue, policy
copies, job leases).

Two engines behind one interface (:class:`Db`), chosen by where the database is:

* SQLite (a file path; the embedded default, ``STORE/catalogue.sqlite``): WAL,
  ``foreign_keys=ON``, ``synchronous=FULL``, a busy timeout so that a command-line tool and
  the server can write the same file, one connection per thread (connections of threads
  that have ended are closed when the next thread connects), and one lock plus
  ``BEGIN IMMEDIATE`` per write transaction. The lock is the file's writer lock
  (:class:`_WriterLock`): a thread lock per file shared by every :class:`Db` of the
  process, and across processes (``serve --workers N``, a command-line tool) a
  ``flock`` on ``<file>-writer``, whose waiter the kernel wakes as soon as the lock is
  free; SQLite's busy handler polls with sleeps of up to 100 ms, which under write load
  from several processes made every contended write wait tens of milliseconds longer.
* PostgreSQL (a ``postgresql://`` URL, :func:`is_postgres`): psycopg 3 with a connection
  pool per URL shared by every :class:`Db` of the process. A statement outside a
  transaction borrows a connection for that statement; a write transaction holds one for
  its length, ``BEGIN`` then a transaction-level advisory lock (:data:`_WRITE_LOCK`), so
  that write transactions are serialised across every process and replica exactly as
  SQLite's one writer serialises them (read-check-write sequences such as get-or-create
  stay correct at READ COMMITTED). Reads never take the lock. A URL whose ``options`` set
  ``search_path`` to a schema that does not exist gets that schema created (one schema
  per store: tests, or several stores in one database).

What differs between the engines is here and nowhere else: the connection set-up, the
``?`` parameter style (:meth:`Db.execute` is the one place SQL reaches the driver; for
PostgreSQL ``?`` becomes ``%s``), DDL types (:func:`ddl_for`: ``{PK}`` is an
auto-numbered key, INTEGER is 64-bit, REAL is double precision), the table-exists and
column probes (:meth:`Db.table_exists`, :meth:`Db.columns`), :attr:`Db.dialect` for the
few queries written twice (QIDO's match on the stored header: SQLite JSON1 ``json_each``,
PostgreSQL ``jsonb_array_elements``), triggers (SQLite's one-statement
``CREATE TRIGGER ... BEGIN ...; END`` becomes a PL/pgSQL trigger function), and the
error mapping: every driver error leaves
:meth:`Db.execute` as :class:`IntegrityError` (a constraint), :class:`OperationalError`
or :class:`DatabaseError`, whatever the engine. Portable SQL everywhere else:
``INSERT ... ON CONFLICT (...) DO NOTHING / DO UPDATE``, ``RETURNING pk``.

Schema: versioned migrations per component (:meth:`Db.migrate`, table
``schema_migrations``), applied when a component opens its database and by
``medview-server upgrade``; each step runs once, in a write transaction.

A full disk (SQLite): a write that fails for lack of space raises :class:`StorageFull`
(HTTP 507). A database file put in read-only mode (:func:`set_read_only`, when the server
starts on a full disk) is opened read-only, creates no tables, and every write transaction
raises :class:`StorageFull` at once; reads go on. Leaving read-only mode (space again)
makes each thread reopen its connection read-write at its next use. PostgreSQL's own
"disk full" (SQLSTATE 53100) is reported as :class:`StorageFull` too.
"""
from __future__ import annotations

import functools
import re
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence


class DbClosedError(RuntimeError):
    """The database was closed (e.g. the server is shutting down)."""


class StorageFull(Exception):
    """A write failed, or was refused, because the store's disk is full (HTTP 507)."""

    status = 507


class DatabaseError(Exception):
    """A database error, whatever the engine (the driver's error is the ``__cause__``)."""


class IntegrityError(DatabaseError):
    """A constraint refused a write (unique key, foreign key, NOT NULL, check)."""


class OperationalError(DatabaseError):
    """The database could not do it (locked, missing table, disk, connection...)."""


_DISK_WORDS = ("database or disk is full", "disk i/o error", "attempt to write a readonly")
_read_only: dict[str, str] = {}            # resolved path -> why
_mode_changes: dict[str, int] = {}         # resolved path -> times its mode changed

# PostgreSQL: the advisory lock every write transaction takes (one writer at a time,
# across processes, as with SQLite)
_WRITE_LOCK = 0x6D65_6476           # "medv"


def is_postgres(where: Any) -> bool:
    """Whether ``where`` names a PostgreSQL database (a ``postgresql://`` URL)."""
    return isinstance(where, str) and where.startswith(("postgresql://", "postgres://"))


def is_disk_full(exc: BaseException) -> bool:
    """Whether a database or OS error means "no space left" (or an I/O error on write)."""
    import errno

    if isinstance(exc, StorageFull):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if getattr(exc, "disk_full", False):
        return True
    return isinstance(exc, (sqlite3.OperationalError, OperationalError)) and any(
        w in str(exc).lower() for w in _DISK_WORDS)


def map_error(exc: BaseException) -> BaseException:
    """A driver error as this module's exception (others unchanged)."""
    if isinstance(exc, DatabaseError):
        return exc
    if isinstance(exc, sqlite3.IntegrityError):
        out: DatabaseError = IntegrityError(str(exc))
    elif isinstance(exc, sqlite3.OperationalError):
        out = OperationalError(str(exc))
    elif isinstance(exc, sqlite3.Error):
        out = DatabaseError(str(exc))
    else:
        try:
            import psycopg
        except ImportError:                  # pragma: no cover - psycopg is a dependency
            return exc
        if isinstance(exc, psycopg.errors.IntegrityError):
            out = IntegrityError(str(exc))
        elif isinstance(exc, psycopg.errors.DiskFull):
            out = OperationalError(str(exc))
            out.disk_full = True             # type: ignore[attr-defined]
        elif isinstance(exc, (psycopg.OperationalError, psycopg.errors.UndefinedTable,
                              psycopg.errors.UndefinedColumn)):
            out = OperationalError(str(exc))
        elif isinstance(exc, psycopg.Error):
            out = DatabaseError(str(exc))
        else:
            return exc
    out.__cause__ = exc
    return out


def set_read_only(path: str | Path, reason: str | None) -> None:
    """Open ``path`` read-only from now on (``reason`` None: read-write again, for Dbs
    opened later)."""
    key = _key(path)
    if reason is None:
        if _read_only.pop(key, None) is None:
            return
    else:
        _read_only[key] = reason
    _mode_changes[key] = _mode_changes.get(key, 0) + 1


class _WriterLock:
    """One writer at a time on an SQLite file: a thread lock (re-entrant: a nested
    transaction of another :class:`Db` on the same file behaves as without it) and,
    held by the outermost holder, an exclusive ``flock`` on ``<file>-writer`` opened once
    per process. Without that file (a read-only directory, a full disk) only the thread
    lock; SQLite's own locking still decides then."""

    _all: dict[str, "_WriterLock"] = {}
    _all_lock = threading.Lock()

    def __init__(self, path: str) -> None:
        self.path = f"{path}-writer"
        self.lock = threading.RLock()
        self.depth = 0
        self.fd: int | None = None
        self.pid = 0

    @classmethod
    def of(cls, key: str) -> "_WriterLock":
        with cls._all_lock:
            wl = cls._all.get(key)
            if wl is None:
                wl = cls._all[key] = cls(key)
            return wl

    def _file(self) -> int | None:
        import os

        if self.pid != os.getpid():         # a forked child: its own open file
            self.fd, self.pid = None, os.getpid()
        if self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError:
                return None
        return self.fd

    def __enter__(self) -> "_WriterLock":
        import fcntl

        self.lock.acquire()
        if self.depth == 0:
            fd = self._file()
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except OSError:
                    pass
        self.depth += 1
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        self.depth -= 1
        try:
            if self.depth == 0 and self.fd is not None:
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
                except OSError:
                    pass
        finally:
            self.lock.release()


def read_only_reason(path: str | Path) -> str | None:
    return _read_only.get(_key(path))


def _key(where: str | Path) -> str:
    return str(where) if is_postgres(str(where)) else str(Path(where).resolve())


# --------------------------------------------------------------------------- dialects

_PG_TYPES = [(re.compile(r"\{PK\}"), "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
             (re.compile(r"\bINTEGER\b", re.I), "BIGINT"),
             (re.compile(r"\bREAL\b", re.I), "DOUBLE PRECISION"),
             (re.compile(r"\bBLOB\b", re.I), "BYTEA")]


def ddl_for(dialect: str, stmt: str) -> str:
    """A CREATE / ALTER statement for ``dialect``: ``{PK}`` is an auto-numbered primary
    key; for PostgreSQL INTEGER is BIGINT (SQLite's integers are 64-bit) and REAL is
    DOUBLE PRECISION (SQLite's REAL is 8 bytes)."""
    if dialect == "sqlite":
        return stmt.replace("{PK}", "INTEGER PRIMARY KEY")
    for rx, repl in _PG_TYPES:
        stmt = rx.sub(repl, stmt)
    return stmt


@functools.lru_cache(maxsize=4096)
def _pg_sql(sql: str) -> str:
    """``?`` placeholders to psycopg's ``%s`` (outside quoted strings and identifiers),
    ``%`` doubled; DDL types translated."""
    head = sql.lstrip()[:6].upper()
    if head in ("CREATE", "ALTER "):
        sql = ddl_for("postgresql", sql)
    out = []
    quote = None
    for ch in sql:
        if quote:
            if ch == quote:
                quote = None
        elif ch in ("'", '"'):
            quote = ch
        elif ch == "?":
            out.append("%s")
            continue
        out.append("%%" if ch == "%" else ch)
    return "".join(out)


_TRIGGER_RE = re.compile(r"CREATE TRIGGER IF NOT EXISTS (\w+) (BEFORE|AFTER) "
                         r"(INSERT|UPDATE|DELETE) ON (\w+) BEGIN (.*?);\s*END\s*$", re.S)


@functools.lru_cache(maxsize=256)
def _pg_trigger(stmt: str) -> tuple[str, ...]:
    """SQLite's ``CREATE TRIGGER IF NOT EXISTS n WHEN EVENT ON t BEGIN body; END`` (one
    statement in the body) as PostgreSQL: a trigger function running the same statement,
    and ``CREATE OR REPLACE TRIGGER`` (row level, like SQLite's)."""
    m = _TRIGGER_RE.match(stmt.strip())
    if m is None:
        raise ValueError(f"trigger not in the portable form: {stmt[:80]}")
    name, when, event, table, body = m.groups()
    ret = "OLD" if event == "DELETE" else "NEW"
    return (f"CREATE OR REPLACE FUNCTION {name}_fn() RETURNS trigger LANGUAGE plpgsql AS "
            f"$medview$ BEGIN {body}; RETURN {ret}; END $medview$",
            f"CREATE OR REPLACE TRIGGER {name} {when} {event} ON {table} FOR EACH ROW "
            f"EXECUTE FUNCTION {name}_fn()")


class _Rows:
    """A PostgreSQL result, fetched whole (the connection went back to the pool)."""

    __slots__ = ("_rows", "_i", "rowcount", "description")

    def __init__(self, rows: list[tuple], rowcount: int, description) -> None:
        self._rows = rows
        self._i = 0
        self.rowcount = rowcount
        self.description = description

    def fetchone(self) -> tuple | None:
        if self._i >= len(self._rows):
            return None
        self._i += 1
        return self._rows[self._i - 1]

    def fetchall(self) -> list[tuple]:
        rest = self._rows[self._i:]
        self._i = len(self._rows)
        return rest

    def __iter__(self):
        return iter(self.fetchall())


class _PgPool:
    """One psycopg connection pool per URL, shared by the process's Db objects."""

    _all: dict[str, "_PgPool"] = {}
    _all_lock = threading.Lock()

    def __init__(self, url: str) -> None:
        from psycopg_pool import ConnectionPool

        self.url = url
        self.users = 0
        self.local = threading.local()       # .conn: the connection of a transaction
        _ensure_schema(url)
        self.pool = ConnectionPool(url, min_size=1, max_size=20, timeout=60.0,
                                   kwargs={"autocommit": True}, configure=_configure,
                                   open=True, name="medview")

    @classmethod
    def get(cls, url: str) -> "_PgPool":
        with cls._all_lock:
            p = cls._all.get(url)
            if p is None:
                p = cls._all[url] = cls(url)
            p.users += 1
            return p

    def release(self) -> None:
        with self._all_lock:
            self.users -= 1
            if self.users > 0:
                return
            self._all.pop(self.url, None)
        self.pool.close()


def _configure(conn) -> None:
    """Adapters: Python booleans stored as integers (as SQLite does); NUMERIC (SUM of
    integers) read back as int or float, never Decimal."""
    from psycopg.adapt import Dumper, Loader

    class BoolAsInt(Dumper):
        oid = conn.adapters.types["int8"].oid

        def dump(self, obj):
            return b"1" if obj else b"0"

    class NumericAsNumber(Loader):
        def load(self, data):
            s = bytes(data).decode()
            try:
                return int(s)
            except ValueError:
                return float(s)

    conn.adapters.register_dumper(bool, BoolAsInt)
    conn.adapters.register_loader("numeric", NumericAsNumber)


def _ensure_schema(url: str) -> None:
    """Create the first schema of the URL's search_path when it does not exist."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        if conn.execute("SELECT current_schema()").fetchone()[0] is not None:
            return
        first = conn.execute("SHOW search_path").fetchone()[0].split(",")[0].strip()
        first = first.strip('"')
        if not first or first.startswith("$"):
            return
        try:
            conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{first}"')
        except psycopg.errors.UniqueViolation:      # created by another process meanwhile
            pass


# --------------------------------------------------------------------------- Db

Migration = Sequence[str] | Callable[["Db"], None]


class Db:
    """Thread-safe access to one database: an SQLite file (one connection per thread) or
    a PostgreSQL URL (a shared connection pool).

    ``ddl``: statements run at every open (idempotent ``CREATE ... IF NOT EXISTS``);
    ``migrations`` with ``component``: versioned steps (:meth:`migrate`)."""

    def __init__(self, path: str | Path, ddl: Iterable[str] = (), *,
                 closed_error: type[Exception] = DbClosedError,
                 component: str | None = None,
                 migrations: dict[int, Migration] | None = None) -> None:
        self.path = str(path)
        self.dialect = "postgresql" if is_postgres(self.path) else "sqlite"
        self._local = threading.local()
        self._lock = threading.RLock()
        self._conns: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        self._closed_error = closed_error
        self._key = _key(self.path)
        self._pg: _PgPool | None = _PgPool.get(self.path) if self.dialect != "sqlite" else None
        ddl = list(ddl)
        if ddl and not self.read_only:
            with self.transaction():
                for stmt in ddl:
                    self.execute(stmt)
        if migrations:
            self.migrate(component or "main", migrations)

    def __repr__(self) -> str:
        return f"Db({redact(self.path)!r})"

    @staticmethod
    def _connect_read_only(path: str) -> sqlite3.Connection:
        """Read-only, on a full disk: ``mode=ro`` needs the ``-shm`` file (which a full
        disk may not let SQLite create); ``immutable`` needs none but does not see the
        write-ahead log, so it is used only when the log is empty (every commit is in
        the main file: the state after a clean shutdown)."""
        uri = Path(path).resolve().as_uri()
        try:
            conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=30.0,
                                   isolation_level=None, check_same_thread=False)
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError:
            wal = Path(f"{path}-wal")
            if wal.exists() and wal.stat().st_size > 0:
                raise
        conn = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, isolation_level=None,
                               check_same_thread=False)
        return conn

    @staticmethod
    def _connect(path: str) -> sqlite3.Connection:
        """Open a connection for the calling thread (SQLite-specific set-up)."""
        if read_only_reason(path):
            return Db._connect_read_only(path)
        conn = sqlite3.connect(path, timeout=30.0, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA foreign_keys = ON")
        _ensure_wal(conn)
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    @property
    def read_only(self) -> str | None:
        """Why this database is read-only (a full disk), or None."""
        return _read_only.get(self._key)

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise self._closed_error(f"database {self.path} is closed")
        conn = getattr(self._local, "conn", None)
        mode = _mode_changes.get(self._key, 0)
        if conn is not None and getattr(self._local, "mode", 0) != mode \
                and not conn.in_transaction:
            with self._conns_lock:           # read-only mode began or ended: reopen
                self._conns = [(t, c) for t, c in self._conns if c is not conn]
            _close_quietly(conn)
            conn = None
        if conn is None:
            try:
                conn = self._connect(self.path)
            except sqlite3.Error as e:
                raise map_error(e) from e
            self._local.conn = conn
            self._local.mode = mode
            with self._conns_lock:
                # close the connections of threads that have ended (e.g. an ingest's pool)
                alive = []
                for thread, c in self._conns:
                    if thread.is_alive():
                        alive.append((thread, c))
                    else:
                        _close_quietly(c)
                alive.append((threading.current_thread(), conn))
                self._conns = alive
        return conn

    @property
    def closed(self) -> bool:
        return self._closed

    def execute(self, sql: str, params: Iterable[Any] = ()):
        """The one place where SQL with ``?`` placeholders reaches the driver. Returns a
        cursor (``fetchone``, ``fetchall``, iteration, ``rowcount``)."""
        if self._pg is None:
            if sql[:6] in ("CREATE", "ALTER "):
                sql = ddl_for("sqlite", sql)
            try:
                return self._conn().execute(sql, tuple(params))
            except sqlite3.Error as e:
                raise map_error(e) from e
        if self._closed:
            raise self._closed_error(f"database {redact(self.path)} is closed")
        if sql.startswith("CREATE TRIGGER"):
            for stmt in _pg_trigger(sql)[:-1]:
                self.execute(stmt)
            sql = _pg_trigger(sql)[-1]
        q = _pg_sql(sql)
        params = tuple(_no_nul(p) for p in params)
        conn = getattr(self._pg.local, "conn", None)
        try:
            if conn is not None:                 # inside this thread's transaction
                return _fetch(conn.execute(q, params))
            with self._pg.pool.connection() as conn:
                return _fetch(conn.execute(q, params))
        except Exception as e:
            mapped = map_error(e)
            if mapped is e:
                raise
            raise mapped from e

    def all(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        return self.execute(sql, params).fetchall()

    def one(self, sql: str, params: Iterable[Any] = ()) -> tuple | None:
        return self.execute(sql, params).fetchone()

    def insert(self, sql: str, params: Iterable[Any] = (), pk: str = "pk") -> int:
        """Run an INSERT of one row and return its key column ``pk`` (``RETURNING``,
        which both engines have: no driver-specific ``lastrowid``)."""
        row = self.one(f"{sql} RETURNING {pk}", params)
        if row is None:
            raise IntegrityError(f"the insert returned no {pk}")
        return row[0]

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction (nested use joins the outer one)."""
        if self._pg is not None:
            with self._pg_transaction():
                yield
            return
        if self.read_only:
            # reads inside a "transaction" (e.g. a schema check) work; a write fails
            try:
                yield
            except (sqlite3.OperationalError, OperationalError) as e:
                if is_disk_full(e):
                    raise StorageFull(f"the store's disk is full; the server is read-only "
                                      f"({self.read_only})") from e
                raise
            return
        from . import faults

        with self._lock:
            conn = self._conn()
            if conn.in_transaction:
                yield
                return
            with _WriterLock.of(self._key):
                try:
                    faults.check_disk("db")
                    # IMMEDIATE takes the write lock now
                    conn.execute("BEGIN IMMEDIATE")
                except (sqlite3.OperationalError, OSError) as e:
                    if is_disk_full(e):
                        raise StorageFull(f"the store's disk is full: {e}") from e
                    raise map_error(e) from e
                try:
                    yield
                    conn.execute("COMMIT")
                except BaseException as e:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    if isinstance(e, (sqlite3.OperationalError, OperationalError, OSError)) \
                            and is_disk_full(e):
                        raise StorageFull(f"the store's disk is full: {e}") from e
                    if isinstance(e, sqlite3.Error):
                        raise map_error(e) from e
                    raise

    @contextmanager
    def _pg_transaction(self) -> Iterator[None]:
        """BEGIN, then the write lock (transaction-level advisory lock: released by
        COMMIT / ROLLBACK, and by the server if this process dies)."""
        if self._closed:
            raise self._closed_error(f"database {redact(self.path)} is closed")
        local = self._pg.local
        if getattr(local, "conn", None) is not None:          # nested: join
            yield
            return
        with self._pg.pool.connection() as conn:
            try:
                conn.execute("BEGIN")
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
            except Exception as e:
                raise map_error(e) from e
            local.conn = conn
            try:
                yield
                conn.execute("COMMIT")
            except BaseException as e:
                try:
                    conn.execute("ROLLBACK")
                except Exception:       # the connection broke: the pool discards it
                    pass
                mapped = map_error(e)
                if mapped is not e:
                    if is_disk_full(mapped):
                        raise StorageFull(f"the database's disk is full: {e}") from e
                    raise mapped from e
                if isinstance(e, OperationalError) and is_disk_full(e):
                    raise StorageFull(f"the database's disk is full: {e}") from e
                raise
            finally:
                local.conn = None

    def table_exists(self, name: str) -> bool:
        if self._pg is not None:
            return self.one("SELECT 1 FROM information_schema.tables WHERE table_schema = "
                            "current_schema() AND table_name = lower(?)", [name]) is not None
        return self.one("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                        [name]) is not None

    def columns(self, table: str) -> list[str]:
        """The column names of ``table``, lower case ([] when there is no such table)."""
        if self._pg is not None:
            rows = self.all("SELECT column_name FROM information_schema.columns WHERE "
                            "table_schema = current_schema() AND table_name = lower(?) "
                            "ORDER BY ordinal_position", [table])
            return [r[0].lower() for r in rows]
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", table):
            raise ValueError(f"not a table name: {table!r}")
        return [r[1].lower() for r in self.all(f"PRAGMA table_info({table})")]

    # ------------------------------------------------------------------ migrations

    def migration_version(self, component: str) -> int:
        """The last migration step applied for ``component`` (0: none)."""
        if not self.table_exists("schema_migrations"):
            return 0
        row = self.one("SELECT version FROM schema_migrations WHERE component = ?",
                       [component])
        return 0 if row is None else int(row[0])

    def migrate(self, component: str, steps: dict[int, Migration], *,
                baseline: Callable[["Db"], int] | None = None) -> int:
        """Apply the steps of ``component`` above its recorded version, in order, each in
        the one write transaction with its record (a step is SQL statements or a function
        of this Db). ``baseline``: the version of a database made before it recorded
        versions (called once, when the component has no record). Returns the version."""
        top = max(steps) if steps else 0
        if self.read_only:
            return self.migration_version(component)
        have = self.migration_version(component)
        if have > top:
            return self._too_new(component, top)
        if have == top and top > 0:
            return top
        with self.transaction():
            self.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                         " component TEXT PRIMARY KEY, version INTEGER NOT NULL,"
                         " applied_at TEXT NOT NULL)")
            row = self.one("SELECT version FROM schema_migrations WHERE component = ?",
                           [component])
            if row is None:
                have = baseline(self) if baseline else 0
                self.execute("INSERT INTO schema_migrations (component, version, applied_at)"
                             " VALUES (?, ?, ?)", [component, have, _now()])
            else:
                have = int(row[0])
            if have > top:
                return self._too_new(component, top)
            for version in sorted(v for v in steps if v > have):
                step = steps[version]
                if callable(step):
                    step(self)
                else:
                    for stmt in step:
                        self.execute(stmt)
                self.execute("UPDATE schema_migrations SET version = ?, applied_at = ? "
                             "WHERE component = ?", [version, _now(), component])
                have = version
            return have

    def _too_new(self, component: str, top: int) -> int:
        have = self.migration_version(component)
        raise DatabaseError(f"{redact(self.path)}: {component} has schema version {have}; "
                            f"this program knows up to {top}")

    def close(self) -> None:
        """Close every connection opened by any thread; later use raises."""
        if self._closed:
            return
        self._closed = True
        if self._pg is not None:
            self._pg.release()
            return
        with self._conns_lock:
            for _thread, c in self._conns:
                _close_quietly(c)
            self._conns.clear()
        self._local = threading.local()


def _no_nul(value: Any) -> Any:
    """PostgreSQL text cannot hold NUL: a NUL in a text parameter becomes U+FFFD (an audit
    row of a request with ``%00`` in its path is written, a query for such a value matches
    nothing stored, as on SQLite, instead of failing)."""
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


def _fetch(cur) -> _Rows:
    rows = cur.fetchall() if cur.description is not None else []
    return _Rows(rows, cur.rowcount, cur.description)


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def redact(where: str) -> str:
    """A database name for messages and logs (a URL's password removed)."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", str(where))


def _close_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error:
        pass


def _ensure_wal(conn: sqlite3.Connection, patience_s: float = 30.0) -> None:
    """WAL mode, set once per database file. Switching the mode takes a lock that SQLite
    does not wait for (no busy handler), so a connection opened while another process
    writes could fail with "database is locked": the mode is only set when it is not WAL
    already, and retried with a growing pause while another process holds the lock."""
    import time

    if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
        return
    deadline, pause = time.monotonic() + patience_s, 0.01
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(pause)                      # another process's write: wait it out
            pause = min(pause * 2, 0.5)
