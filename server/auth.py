"""Users, groups, sessions, rights, the audit log, and the one authorisation function
every request passes through.

Users live in the catalogue database (table ``users``), passwords as salted scrypt
hashes. The built-in user ``local`` logs in without a password, and only where the
desktop app runs its own bundled server (:mod:`server.embedded`; ``medview-server
serve`` only with ``--allow-local``): ``allow_local`` must be on, and the request must
come straight from a loopback address — the real TCP peer, with no forwarding header —
as PostgreSQL's ``trust`` for local connections.

* Groups: table ``groups`` and ``user_groups``.
* Rights rules: table ``rights`` (see :mod:`server.rights` for what a rule holds, its
  scopes — series, study, patient, slide, exam, ``*`` — and how rules combine).
* Sessions: table ``sessions`` (the SHA-256 of the session id, never the id itself), so
  that every replica of a cluster serves every session; they end on logout, after
  ``idle_s`` without a request, after ``max_age_s`` in any case, and when their user is
  removed. A session's JPIP cache model stays in the memory of the replica that streams
  to it; the table records which replica that is (``model_owner``), and a replica that
  finds another one has streamed to the session since forgets its own (stale) model —
  the client declares what it holds whenever it reconnects (see docs/ARCHITECTURE.md).
  On a read-only store (full disk), new sessions live in memory only.
* Failed log-ins (see :class:`LoginThrottle`) are throttled per user name (from every
  address) and per client address, with delays that double after each further failure
  (HTTP 429 with ``retry_after``). A user name in its delay is refused even with the
  right password. An address in its delay (many failures, whatever the names) gets no
  further try for any name that failed from it; but another user's correct password
  from the same address still logs in (a reading room, a NAT, the desktop's ``local``
  user share addresses), and ``local`` is never throttled (it has no secret to guess).
  The failure records are in table ``login_failures``, shared by the replicas.
* Audit: table ``audit``, one row per request (who, from where, what, on which
  resource, the outcome, and for packet requests what was actually sent);
  ``medview-server audit`` reads it. Rows are written off the request path by
  :class:`AuditWriter` (a bounded queue, group commit; see docs/ARCHITECTURE.md for what
  a crash can lose).

:meth:`Authority.authorize` is the single decision point: it checks the session and the
action and returns the user's :class:`~server.rights.Grant` on the series or study
named, which carries the diagnosis status and the versions the status matrix allows. The
packet planner enforces the grant.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .dbutil import Db, OperationalError
from .packets import CacheModel
from .rights import (ACTION_WORDS, ACTIONS, EXAM_PREFIX, PATIENT_PREFIX, Grant, Rule, decide,
                     format_ranges, parse_ranges)

__all__ = ["LOCAL_USER", "AuthError", "Authority", "AuditWriter", "Grant", "LoginThrottle",
           "Session", "hash_password", "verify_password", "is_loopback"]

log = logging.getLogger("medview.server")

LOCAL_USER = "local"
SESSION_IDLE_S = 12 * 3600
SESSION_MAX_S = 24 * 3600

_DDL = [
    "CREATE TABLE IF NOT EXISTS users ("
    " name TEXT PRIMARY KEY, password_hash TEXT, created REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS groups (name TEXT PRIMARY KEY, created REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS user_groups ("
    ' "user" TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,'
    " grp TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,"
    ' PRIMARY KEY ("user", grp))',
    "CREATE TABLE IF NOT EXISTS rights ("
    " id {PK}, subject TEXT NOT NULL, scope TEXT NOT NULL DEFAULT '*',"
    " max_layers INTEGER, max_reduce_min INTEGER, regions TEXT, images TEXT,"
    " versions TEXT, actions TEXT, created REAL NOT NULL, UNIQUE (subject, scope))",
    "CREATE TABLE IF NOT EXISTS audit ("
    ' id {PK}, at REAL NOT NULL, "user" TEXT, session TEXT, peer TEXT,'
    " action TEXT NOT NULL, resource TEXT, outcome TEXT NOT NULL, http_status INTEGER,"
    " detail TEXT)",
    "CREATE INDEX IF NOT EXISTS audit_at ON audit (at)",
    'CREATE INDEX IF NOT EXISTS audit_user ON audit ("user", at)',
]
# step 2: sessions and login throttling in the database, so that any replica serves any
# request (a new table is a new migration step: stores past step 1 get it too)
_DDL_2 = [
    "CREATE TABLE IF NOT EXISTS sessions ("
    " id_sha256 TEXT PRIMARY KEY, user_name TEXT NOT NULL, created REAL NOT NULL,"
    " last_used REAL NOT NULL, peer TEXT, context TEXT, model_owner TEXT)",
    "CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user_name)",
    "CREATE TABLE IF NOT EXISTS login_failures ("
    " k TEXT PRIMARY KEY, failures INTEGER NOT NULL, last_at REAL NOT NULL,"
    " until_at REAL NOT NULL)",
]
SESSION_TOUCH_S = 30.0     # a session's last use is written at most this often
AUDIT_COLS = ("id", "at", "user", "session", "peer", "action", "resource", "outcome",
              "http_status", "detail")
# "user" is a reserved word in PostgreSQL: quoted in SQL (both engines take the quotes)
_AUDIT_SQL = tuple('"user"' if c == "user" else c for c in AUDIT_COLS)


class AuthError(Exception):
    """Refused: ``status`` 401 (who are you), 403 (not allowed), 429 (too many failed
    log-ins). ``extra`` goes into the JSON error body; ``session`` (if known) is who was
    refused, for the audit log."""

    def __init__(self, message: str, status: int = 401, *, session: "Session | None" = None,
                 **extra):
        super().__init__(message)
        self.status = status
        self.extra = extra
        self.session = session


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(16)
    dk = hashlib.scrypt(password.encode(), salt=salt, n=2 ** 14, r=8, p=1, dklen=32)
    return f"scrypt$16384$8$1${salt.hex()}${dk.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        _alg, n, r, p, salt, dk = stored.split("$")
        got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r),
                             p=int(p), dklen=len(dk) // 2)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got.hex(), dk)


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass
class Session:
    id: str
    user: str
    created: float
    last_used: float
    model: dict[str, CacheModel] = field(default_factory=dict)   # per target
    peer: str | None = None
    context: dict = field(default_factory=dict)   # what the client reports (V8)
    claim: Callable[["Session"], None] | None = field(default=None, repr=False)
    model_owner: str | None = field(default=None, repr=False)
    # True once another replica streamed to the session: JPIP channels this process does
    # not hold may have been opened there (server.packets.resolve_model)
    foreign_channels: bool = field(default=False, repr=False)
    closed_channels: set = field(default_factory=set, repr=False)

    def claim_model(self) -> None:
        """Before the cache model is used: make this replica the model's owner, and
        forget the model if another replica has streamed to the session since."""
        if self.claim is not None:
            self.claim(self)

    @property
    def serial(self) -> str:
        """A short name of the session for logs and the audit (not a credential)."""
        return hashlib.sha256(self.id.encode()).hexdigest()[:12]

    def model_for(self, target: str) -> CacheModel:
        return self.model.setdefault(target, CacheModel())


def _subject_ok(subject: str) -> None:
    name = subject[1:] if subject.startswith("@") else subject
    if not name or any(c.isspace() for c in name) or len(name) > 64:
        raise ValueError(f"bad user or group name {subject!r}")


class LoginThrottle:
    """Failed log-ins, per user name, per address, and per (name, address).

    A key is free for its first ``free`` failures; each further failure sets a delay of
    ``base_delay_s`` doubled per failure (capped at ``max_delay_s``) from that failure. A
    key's failures are forgotten ``window_s`` after its last one, and a user name's on a
    successful log-in. Memory is bounded (``max_keys``: the stalest keys go first).
    """

    def __init__(self, clock: Callable[[], float], *, user_free: int = 5,
                 address_free: int = 10, window_s: float = 900.0, base_delay_s: float = 1.0,
                 max_delay_s: float = 900.0, max_keys: int = 100_000, records=None) -> None:
        self.clock = clock
        self.user_free, self.address_free = user_free, address_free
        self.window_s, self.base_delay_s, self.max_delay_s = window_s, base_delay_s, max_delay_s
        self.max_keys = max_keys
        # key -> [failures, last, until]: a dict, or a DbFailures shared by the replicas
        self.records = {} if records is None else records

    def _free(self, key: tuple) -> int:
        return self.address_free if key[0] == "addr" else self.user_free

    def _get(self, key: tuple, now: float) -> list[float] | None:
        rec = self.records.get(key)
        if rec is not None and now - rec[1] >= max(self.window_s, rec[2] - rec[1]):
            del self.records[key]
            return None
        return rec

    def wait(self, key: tuple, now: float) -> float:
        """Seconds until ``key`` may try again (0: now)."""
        rec = self._get(key, now)
        return max(0.0, rec[2] - now) if rec is not None else 0.0

    def failed_recently(self, key: tuple, now: float) -> bool:
        return self._get(key, now) is not None

    def _until(self, key: tuple, failures: int, now: float) -> float | None:
        """The end of the delay after a key's ``failures``-th failure (None: still free)."""
        over = failures - self._free(key)
        if over < 0:
            return None
        return now + min(self.max_delay_s, self.base_delay_s * 2 ** min(over, 40))

    def fail(self, key: tuple, now: float) -> None:
        records = self.records
        if not (isinstance(records, DbFailures)
                and records.add_failure(key, now, self.window_s,
                                        lambda n: self._until(key, n, now))):
            rec = self._get(key, now) or [0, now, now]
            rec[0] += 1
            rec[1] = now
            until = self._until(key, rec[0], now)
            if until is not None:
                rec[2] = until
            records[key] = rec
        if len(records) > self.max_keys:
            self._prune(now)

    def forget(self, key: tuple) -> None:
        self.records.pop(key, None)

    def _prune(self, now: float) -> None:
        for key in list(self.records):
            self._get(key, now)
        if len(self.records) > self.max_keys:
            for key, _rec in sorted(self.records.items(), key=lambda kv: kv[1][1])[
                    :len(self.records) - self.max_keys * 9 // 10]:
                del self.records[key]

    def clear(self) -> None:
        self.records.clear()


class DbFailures:
    """:class:`LoginThrottle`'s records in the database (table ``login_failures``), so
    that every replica counts the same failures: a mapping ``key tuple -> [failures,
    last, until]``. A store that cannot be written (full disk) keeps them in memory."""

    def __init__(self, db: Db) -> None:
        self.db = db
        self._mem: dict[tuple, list[float]] = {}

    @staticmethod
    def _k(key: tuple) -> str:
        return json.dumps(list(key), separators=(",", ":"))

    def get(self, key: tuple, default=None):
        if key in self._mem:
            return self._mem[key]
        row = self.db.one("SELECT failures, last_at, until_at FROM login_failures WHERE k = ?",
                          (self._k(key),))
        return [row[0], row[1], row[2]] if row else default

    def __getitem__(self, key: tuple):
        v = self.get(key)
        if v is None:
            raise KeyError(key)
        return v

    def __contains__(self, key: tuple) -> bool:
        return self.get(key) is not None

    def __setitem__(self, key: tuple, rec) -> None:
        try:
            with self.db.transaction():
                self.db.execute(
                    "INSERT INTO login_failures (k, failures, last_at, until_at) VALUES (?,?,?,?) "
                    "ON CONFLICT(k) DO UPDATE SET failures = excluded.failures, "
                    "last_at = excluded.last_at, until_at = excluded.until_at",
                    (self._k(key), int(rec[0]), float(rec[1]), float(rec[2])))
            self._mem.pop(key, None)
        except Exception:  # noqa: BLE001 - a read-only store: remember them here
            self._mem[key] = rec

    def add_failure(self, key: tuple, now: float, window_s: float,
                    until_of: Callable[[int], float | None]) -> bool:
        """Count one more failure of ``key`` at ``now`` in one atomic statement (replicas
        failing the same log-in at once each add theirs: no read-then-write), starting
        afresh when the record has expired (``window_s`` past its last failure and past
        its delay); ``until_of(failures)`` gives the delay's end (None: no delay yet).
        False: the database cannot be written (the caller keeps the count in memory)."""
        if key in self._mem:
            return False
        try:
            with self.db.transaction():
                expired = "? - login_failures.last_at >= ? AND ? >= login_failures.until_at"
                row = self.db.one(
                    "INSERT INTO login_failures (k, failures, last_at, until_at) "
                    "VALUES (?, 1, ?, ?) ON CONFLICT(k) DO UPDATE SET "
                    f"failures = CASE WHEN {expired} THEN 1 "
                    "ELSE login_failures.failures + 1 END, "
                    f"until_at = CASE WHEN {expired} THEN excluded.until_at "
                    "ELSE login_failures.until_at END, "
                    "last_at = excluded.last_at RETURNING failures",
                    (self._k(key), float(now), float(now),
                     float(now), float(window_s), float(now),
                     float(now), float(window_s), float(now)))
                until = until_of(int(row[0]))
                if until is not None:      # the row is this transaction's until it commits
                    self.db.execute("UPDATE login_failures SET until_at = ? "
                                    "WHERE k = ? AND until_at < ?",
                                    (float(until), self._k(key), float(until)))
            return True
        except Exception:  # noqa: BLE001 - a read-only store: counted in memory instead
            return False

    def __delitem__(self, key: tuple) -> None:
        if self.pop(key, None) is None:
            raise KeyError(key)

    def pop(self, key: tuple, default=None):
        v = self.get(key)
        self._mem.pop(key, None)
        if v is not None:
            try:
                with self.db.transaction():
                    self.db.execute("DELETE FROM login_failures WHERE k = ?", (self._k(key),))
            except Exception:  # noqa: BLE001 - read-only: it expires by itself
                pass
        return default if v is None else v

    def __len__(self) -> int:
        return (self.db.one("SELECT COUNT(*) FROM login_failures") or (0,))[0] + len(self._mem)

    def __iter__(self):
        keys = [tuple(json.loads(k)) for (k,) in self.db.all("SELECT k FROM login_failures")]
        return iter(keys + list(self._mem))

    def items(self):
        return [(k, self[k]) for k in list(self)]

    def clear(self) -> None:
        self._mem.clear()
        try:
            with self.db.transaction():
                self.db.execute("DELETE FROM login_failures")
        except Exception:  # noqa: BLE001
            pass


class AuditWriter:
    """The audit log's writer: rows go into a bounded queue and a writer thread commits
    them in batches, one transaction per batch (group commit: while one batch commits,
    the next one gathers), so a request never waits for the disk.

    * ``batch`` is the crash bound: at most that many rows are queued or being committed
      at any time while the database takes writes (a request that would exceed it waits
      for room), so a crash (``kill -9``, power cut) loses at most ``batch`` rows.
    * When writes fail (a full disk: :class:`StorageFull`; any database error), rows stay
      in memory — up to ``buffer`` rows — and the writer retries with a growing pause;
      they are written, oldest first, as soon as the database takes writes again.
      While rows are held this way a crash loses them too; :meth:`stats` (shown by
      ``/api/health``) counts them.
    * Rows beyond ``buffer`` are not written; they are counted (``dropped``), logged, and
      once writes work again a row ``audit-gap`` records how many were lost and when.
    * :meth:`close` writes everything still queued (shutdown), then stops the thread.
    """

    def __init__(self, db: Db, *, batch: int = 256, buffer: int = 100_000,
                 retry_s: tuple[float, float] = (0.05, 1.0)) -> None:
        self.db = db
        self.batch, self.buffer = batch, buffer
        self.retry_s = retry_s
        self._rows: deque[tuple] = deque()    # queued or being written, oldest first
        self._cond = threading.Condition()
        self._writing = 0                  # of those, rows in the transaction under way
        self._closing = False
        self.failing: str | None = None    # the last write error while writes fail
        self.failed_writes = 0             # batches that failed
        self.written = 0
        self.dropped = 0
        self._gap: list[float] | None = None      # [first, last, count] of dropped rows
        self._thread = threading.Thread(target=self._run, name="medview-audit", daemon=True)
        self._thread.start()

    def put(self, row: tuple) -> None:
        """Queue one row (``at`` first); waits only while the database is healthy and
        ``batch`` rows are already on their way (the crash bound)."""
        with self._cond:
            if self._closing and not self._thread.is_alive():
                # a request that ended while the server shut down (a stream whose client
                # went away): the audit database is closed, so the row goes to the log
                # in full instead of being lost without a trace
                self.dropped += 1
                log.warning("audit row after the audit log closed (kept in this log "
                            "only): %r", row)
                return
            while (self.failing is None and not self._closing
                   and len(self._rows) >= self.batch):
                self._cond.wait(1.0)
            if len(self._rows) >= self.buffer:
                self._drop(row)
                return
            self._rows.append(row)
            self._cond.notify_all()

    def _drop(self, row: tuple) -> None:
        self.dropped += 1
        at = row[0]
        if self._gap is None:
            self._gap = [at, at, 0]
        self._gap[0], self._gap[1] = min(self._gap[0], at), max(self._gap[1], at)
        self._gap[2] += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            log.error("audit buffer full (%d rows held): %d audit rows not written",
                      self.buffer, self.dropped)

    def stats(self) -> dict:
        with self._cond:
            return {"pending": len(self._rows), "written": self.written,
                    "failing": self.failing, "failed_writes": self.failed_writes,
                    "dropped": self.dropped, "batch": self.batch, "buffer": self.buffer}

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every row queued so far is written (False: not within ``timeout``,
        e.g. while the disk is full)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._cond.notify_all()
            while self._rows or self._writing:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._rows:
            log.error("%d audit rows could not be written before shutdown (%s)",
                      len(self._rows), self.failing)

    def _run(self) -> None:
        pause = self.retry_s[0]
        closing_failures = 0
        while True:
            with self._cond:
                while not self._rows and not self._closing:
                    self._cond.wait()
                if not self._rows and self._closing:
                    return
                n = min(len(self._rows), self.batch)
                rows = [self._rows[i] for i in range(n)]
                self._writing = n
                gap = tuple(self._gap) if self._gap else None
            try:
                self._write(rows, gap)
            except Exception as e:  # noqa: BLE001 - any failure: keep the rows, retry
                with self._cond:
                    self._writing = 0
                    self.failed_writes += 1
                    first = self.failing is None
                    self.failing = f"{type(e).__name__}: {e}"
                    self._cond.notify_all()
                if first:
                    log.error("audit rows cannot be written (%s); holding them in memory "
                              "and retrying", e)
                if self._closing:
                    closing_failures += 1
                    if self.db.closed or self.db.read_only or closing_failures > 3:
                        return               # shutting down: do not retry for ever
                with self._cond:
                    if not self._closing:
                        self._cond.wait(pause)
                    else:
                        self._cond.wait(min(pause, 0.2))
                pause = min(pause * 2, self.retry_s[1])
                continue
            with self._cond:
                for _ in range(n):
                    self._rows.popleft()
                self._writing = 0
                self.written += n
                if gap is not None and self._gap is not None:
                    self._gap[2] -= gap[2]         # drops while this batch was written stay
                    self._gap[0] = gap[1]
                    if self._gap[2] <= 0:
                        self._gap = None
                if self.failing is not None:
                    log.warning("audit writes work again; %d held rows written", n)
                self.failing = None
                self._cond.notify_all()
            pause = self.retry_s[0]

    _INSERT = ('INSERT INTO audit(at, "user", session, peer, action, resource, outcome,'
               " http_status, detail) VALUES (?,?,?,?,?,?,?,?,?)")

    def _write(self, rows: list[tuple], gap: tuple | None) -> None:
        with self.db.transaction():
            for row in rows:
                self.db.execute(self._INSERT, row)
            if gap is not None:
                self.db.execute(self._INSERT, (
                    gap[1], None, None, None, "audit-gap", None, "error", None,
                    json.dumps({"dropped": gap[2], "first": gap[0], "last": gap[1],
                                "error": "audit rows lost: the buffer was full while "
                                         "writes failed"})))


class Authority:
    """Users, groups, rights, sessions and audit, over the catalogue database.

    ``status_of(study_uid) -> int`` and ``policy() -> SitePolicy`` (both optional) give
    the diagnosis status and the status matrix; without them grants carry no status.
    """

    def __init__(self, db_path: str, *, status_of: Callable[[str], int] | None = None,
                 policy: Callable[[], Any] | None = None, clock: Callable[[], float] = time.time,
                 idle_s: float = SESSION_IDLE_S, max_age_s: float = SESSION_MAX_S,
                 max_failures: int = 5, failure_window_s: float = 900.0,
                 address_failures: int | None = None, allow_local: bool = False,
                 audit_batch: int = 256, audit_buffer: int = 100_000) -> None:
        self._db_path = db_path
        self.db = Db(db_path, component="auth", migrations={1: _DDL, 2: _DDL_2})
        self.status_of = status_of
        self.policy = policy
        self.clock = clock
        self.idle_s, self.max_age_s = idle_s, max_age_s
        self.allow_local = allow_local
        self.throttle = LoginThrottle(
            clock, user_free=max_failures, window_s=failure_window_s,
            address_free=address_failures if address_failures is not None else 2 * max_failures,
            records=DbFailures(self.db))
        self._failures = self.throttle.records       # cleared by tests and admins
        self._lock = threading.Lock()
        # sessions this process has seen (with their cache models); the table is the truth
        self._sessions: dict[str, Session] = {}
        self._mem_only: set[str] = set()             # made while the store was read-only
        self.replica = secrets.token_hex(8)          # this process, as a model owner
        self._pruned = float("-inf")
        if not self.db.read_only:
            with self.db.transaction():
                self.db.execute("INSERT INTO users(name, password_hash, created) "
                                "VALUES (?,?,?) ON CONFLICT DO NOTHING", (LOCAL_USER, None, time.time()))
        self.audit_writer = AuditWriter(self.db, batch=audit_batch, buffer=audit_buffer)

    @property
    def max_failures(self) -> int:
        """Failed log-ins a user name has before its delays start."""
        return self.throttle.user_free

    @max_failures.setter
    def max_failures(self, n: int) -> None:
        self.throttle.user_free = n

    def close(self) -> None:
        """Write the queued audit rows, then close the database."""
        self.audit_writer.close()
        self.db.close()

    # ----------------------------------------------------------------- users and groups
    def add_user(self, name: str, password: str | None, groups: Iterable[str] = ()) -> None:
        """Create a user (or replace its password); ``password`` None only for ``local``."""
        _subject_ok(name)
        if name.startswith("@"):
            raise ValueError("user names cannot start with @ (that marks a group)")
        if password is None and name != LOCAL_USER:
            raise ValueError("a password is required")
        with self.db.transaction():
            self.db.execute("INSERT INTO users(name, password_hash, created) VALUES (?,?,?) "
                            "ON CONFLICT(name) DO UPDATE SET password_hash = excluded.password_hash",
                            (name, hash_password(password) if password else None, time.time()))
            if groups:
                self.set_groups(name, groups)

    def set_password(self, name: str, password: str) -> None:
        if not password:
            raise ValueError("a password is required")
        with self.db.transaction():
            cur = self.db.execute("UPDATE users SET password_hash = ? WHERE name = ?",
                                  (hash_password(password), name))
            if cur.rowcount == 0:
                raise KeyError(f"no user {name!r}")

    def remove_user(self, name: str) -> bool:
        """Remove a user, their group memberships and rules; their sessions end."""
        with self.db.transaction():
            self.db.execute('DELETE FROM user_groups WHERE "user" = ?', (name,))
            self.db.execute("DELETE FROM rights WHERE subject = ?", (name,))
            gone = self.db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount > 0
        self._end_sessions_of(name)
        return gone

    def set_groups(self, name: str, groups: Iterable[str]) -> None:
        groups = [g.lstrip("@") for g in groups if g.strip()]
        for g in groups:
            _subject_ok(g)
        with self.db.transaction():
            if self.db.one("SELECT 1 FROM users WHERE name = ?", (name,)) is None:
                raise KeyError(f"no user {name!r}")
            self.db.execute('DELETE FROM user_groups WHERE "user" = ?', (name,))
            for g in groups:
                self.db.execute("INSERT INTO groups(name, created) VALUES (?,?) "
                                "ON CONFLICT DO NOTHING",
                                (g, time.time()))
                self.db.execute('INSERT INTO user_groups("user", grp) VALUES (?,?) '
                                "ON CONFLICT DO NOTHING",
                                (name, g))

    def groups_of(self, name: str) -> list[str]:
        return [r[0] for r in self.db.all(
            'SELECT grp FROM user_groups WHERE "user" = ? ORDER BY grp', (name,))]

    def users(self) -> list[dict]:
        out = []
        for name, ph, created in self.db.all("SELECT name, password_hash, created FROM users "
                                             "ORDER BY name"):
            out.append({"name": name, "password": ph is not None, "created": created,
                        "groups": self.groups_of(name)})
        return out

    def user_exists(self, name: str) -> bool:
        return self.db.one("SELECT 1 FROM users WHERE name = ?", (name,)) is not None

    # ----------------------------------------------------------------- rules
    def set_rule(self, rule: Rule) -> None:
        """Store a rights rule, replacing the rule of the same subject and scope."""
        _subject_ok(rule.subject)
        if rule.actions is not None and rule.actions - set(ACTIONS):
            raise ValueError(f"unknown action(s) {', '.join(sorted(rule.actions - set(ACTIONS)))}; "
                             f"known: {', '.join(ACTIONS)}")
        for v, what in ((rule.max_layers, "max_layers"), (rule.max_reduce_min, "max_reduce_min")):
            if v is not None and v < 0:
                raise ValueError(f"{what} must not be negative")
        scope = rule.scope or "*"
        if scope in (PATIENT_PREFIX, EXAM_PREFIX):
            raise ValueError(f"scope {scope!r} names no patient or exam")
        for r in rule.regions or []:
            if len(r) != 4 or r[2] <= 0 or r[3] <= 0 or min(r) < 0:
                raise ValueError(f"a region is x,y,w,h with w, h > 0: {r}")
        with self.db.transaction():
            if rule.subject.startswith("@"):
                self.db.execute("INSERT INTO groups(name, created) VALUES (?,?) "
                                "ON CONFLICT DO NOTHING",
                                (rule.subject[1:], time.time()))
            elif not self.user_exists(rule.subject):
                raise KeyError(f"no user {rule.subject!r}")
            self.db.execute(
                "INSERT INTO rights(subject, scope, max_layers, max_reduce_min, regions, images,"
                " versions, actions, created) VALUES (?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(subject, scope) DO UPDATE SET max_layers = excluded.max_layers,"
                " max_reduce_min = excluded.max_reduce_min, regions = excluded.regions,"
                " images = excluded.images, versions = excluded.versions,"
                " actions = excluded.actions, created = excluded.created",
                (rule.subject, rule.scope or "*", rule.max_layers, rule.max_reduce_min,
                 json.dumps([list(r) for r in rule.regions]) if rule.regions is not None else None,
                 format_ranges(rule.images) if rule.images is not None else None,
                 ",".join(rule.versions) if rule.versions is not None else None,
                 ",".join(sorted(rule.actions)) if rule.actions is not None else None,
                 time.time()))

    def remove_rule(self, subject: str, scope: str = "*") -> bool:
        with self.db.transaction():
            return self.db.execute("DELETE FROM rights WHERE subject = ? AND scope = ?",
                                   (subject, scope or "*")).rowcount > 0

    def rules(self, subjects: Iterable[str] | None = None) -> list[Rule]:
        sql = ("SELECT subject, scope, max_layers, max_reduce_min, regions, images, versions,"
               " actions FROM rights")
        params: list = []
        if subjects is not None:
            subjects = list(subjects)
            if not subjects:
                return []
            sql += f" WHERE subject IN ({', '.join('?' * len(subjects))})"
            params = subjects
        out = []
        for subj, scope, ml, mr, regions, images, versions, actions in self.db.all(
                sql + " ORDER BY subject, scope", params):
            out.append(Rule(subj, scope, ml, mr,
                            [tuple(r) for r in json.loads(regions)] if regions is not None else None,
                            parse_ranges(images) if images is not None else None,
                            [v for v in versions.split(",") if v] if versions is not None else None,
                            {a for a in actions.split(",") if a} if actions is not None else None))
        return out

    # ----------------------------------------------------------------- log-in
    def login(self, name: str, password: str | None, peer: str | None, *,
              direct_loopback: bool | None = None) -> Session:
        """A new session for ``name``, or :class:`AuthError` (401 wrong, 429 throttled,
        with ``retry_after``). ``peer`` is the client address (:mod:`server.peers`);
        ``direct_loopback`` whether the TCP peer itself is loopback with no forwarding
        header — the only way ``local`` logs in (default: ``peer`` is loopback)."""
        now = self.clock()
        th = self.throttle
        addr = peer or "?"
        if direct_loopback is None:
            direct_loopback = is_loopback(peer)
        if name == LOCAL_USER:
            return self._login_local(addr, now, direct_loopback)
        user_key, addr_key, pair_key = ("user", name), ("addr", addr), ("pair", name, addr)
        with self._lock:
            wait = th.wait(user_key, now)
            if wait == 0 and th.wait(addr_key, now) > 0 and th.failed_recently(pair_key, now):
                wait = th.wait(addr_key, now)
            if wait > 0:
                who = "this user" if th.wait(user_key, now) > 0 else "this user from this address"
                raise self._too_many(who, wait)
        row = self.db.one("SELECT password_hash FROM users WHERE name = ?", (name,))
        if row is None or row[0] is None:   # unknown (as slow as a wrong password: names
            verify_password(password or "", self._dummy_hash())       # stay secret)
            ok = False
        else:
            ok = verify_password(password or "", row[0])
        if ok:
            with self._lock:
                th.forget(user_key)
                th.forget(pair_key)
            s = Session(secrets.token_urlsafe(24), name, now, now, peer=peer)
            self._new_session(s)
            return s
        with self._lock:
            for key in (user_key, addr_key, pair_key):
                th.fail(key, now)
            wait = th.wait(user_key, now)
        extra = {"retry_after": max(1, math.ceil(wait))} if wait > 0 else {}
        raise AuthError("unknown user or wrong password", 401, **extra)

    def _login_local(self, addr: str, now: float, direct_loopback: bool) -> Session:
        """``local`` has no password: nothing to guess, so nothing to throttle — it is
        refused outright unless this server allows it and the peer is this machine."""
        if not self.allow_local:
            why = ("the password-less local user exists only in the desktop app's own "
                   "server (medview-server serve --allow-local enables it)")
        elif not direct_loopback:
            why = ("the password-less local user logs in only from this machine, straight "
                   "to the server (not through a proxy)")
        else:
            s = Session(secrets.token_urlsafe(24), LOCAL_USER, now, now, peer=addr)
            self._new_session(s)
            return s
        with self._lock:
            self.throttle.fail(("addr", addr), now)
        raise AuthError(f"unknown user or wrong password: {why}", 401)

    @staticmethod
    def _too_many(who: str, wait: float) -> AuthError:
        secs = max(1, math.ceil(wait))
        return AuthError(f"too many failed log-ins for {who}: try again in {secs} s",
                         429, retry_after=secs)

    _dummy: str | None = None

    @classmethod
    def _dummy_hash(cls) -> str:
        if cls._dummy is None:
            cls._dummy = hash_password(secrets.token_hex(8))
        return cls._dummy

    # ----------------------------------------------------------------- sessions (shared)
    @staticmethod
    def _sid_key(sid: str) -> str:
        return hashlib.sha256(sid.encode("utf-8", "surrogateescape")).hexdigest()

    def _write(self, sql: str, params: tuple) -> bool:
        """A small write to the sessions table; False when the store cannot be written."""
        try:
            with self.db.transaction():
                self.db.execute(sql, params)
            return True
        except Exception as e:  # noqa: BLE001 - a read-only store, a full disk
            log.warning("sessions: cannot write (%s); kept in this process only", e)
            return False

    def _new_session(self, s: Session) -> None:
        s.claim, s.model_owner = self._claim, self.replica
        if s.created - self._pruned >= 60:       # ended sessions leave the table
            self._pruned = s.created
            self._write("DELETE FROM sessions WHERE last_used < ? OR created < ?",
                        (s.created - self.idle_s, s.created - self.max_age_s))
        stored = self._write(
            "INSERT INTO sessions (id_sha256, user_name, created, last_used, peer, context,"
            " model_owner) VALUES (?,?,?,?,?,?,?)",
            (self._sid_key(s.id), s.user, s.created, s.last_used, s.peer, "{}", self.replica))
        with self._lock:
            self._sessions[s.id] = s
            if not stored:
                self._mem_only.add(s.id)
            if len(self._sessions) > 1000:       # forget idle ones (the table keeps them)
                now = self.clock()
                for k in [k for k, v in self._sessions.items()
                          if now - v.last_used > 600 and k not in self._mem_only]:
                    del self._sessions[k]

    def _claim(self, s: Session) -> None:
        if s.model_owner == self.replica or s.id in self._mem_only:
            return
        s.model.clear()                          # another replica streamed since
        s.foreign_channels = True
        s.model_owner = self.replica
        self._write("UPDATE sessions SET model_owner = ? WHERE id_sha256 = ?",
                    (self.replica, self._sid_key(s.id)))

    def _end_sessions_of(self, name: str) -> None:
        self._write("DELETE FROM sessions WHERE user_name = ?", (name,))
        with self._lock:
            for sid in [k for k, s in self._sessions.items() if s.user == name]:
                del self._sessions[sid]
                self._mem_only.discard(sid)

    def save_context(self, s: Session) -> None:
        """Record what the client reported (``/api/session/context``) for every replica."""
        self._write("UPDATE sessions SET context = ? WHERE id_sha256 = ?",
                    (json.dumps(s.context), self._sid_key(s.id)))

    def logout(self, sid: str) -> None:
        self._write("DELETE FROM sessions WHERE id_sha256 = ?", (self._sid_key(sid),))
        with self._lock:
            self._sessions.pop(sid, None)
            self._mem_only.discard(sid)

    def session(self, sid: str | None) -> Session:
        if not sid:
            raise AuthError("a session is required: log in first (POST /api/login)", 401)
        now = self.clock()
        with self._lock:
            mem_only = sid in self._mem_only
        row = None
        if not mem_only:
            row = self.db.one("SELECT user_name, created, last_used, peer, context, model_owner"
                              " FROM sessions WHERE id_sha256 = ?", (self._sid_key(sid),))
        with self._lock:
            s = self._sessions.get(sid)
            if row is None and not mem_only:
                s = None                          # logged out, or ended, on any replica
            elif row is not None:
                user, created, last_used, peer, context, owner = row
                if s is None or s.user != user:
                    try:
                        ctx = json.loads(context or "{}")
                    except ValueError:
                        ctx = {}
                    s = Session(sid, user, created, last_used, peer=peer, context=ctx,
                                claim=self._claim, model_owner=owner)
                    self._sessions[sid] = s
                else:
                    s.last_used = max(s.last_used, last_used)
                    if owner != self.replica:
                        s.model_owner = owner
            if s is None or now - s.last_used > self.idle_s or now - s.created > self.max_age_s:
                self._sessions.pop(sid, None)
                self._mem_only.discard(sid)
                expired = s is not None
                s = None
            else:
                touch = row is not None and now - row[2] >= SESSION_TOUCH_S
                s.last_used = now
        if s is None:
            if expired:
                self._write("DELETE FROM sessions WHERE id_sha256 = ?", (self._sid_key(sid),))
            raise AuthError("session unknown or expired: log in again", 401)
        if touch:
            self._write("UPDATE sessions SET last_used = ? WHERE id_sha256 = ?",
                        (now, self._sid_key(sid)))
        return s

    # ----------------------------------------------------------------- the hook
    def study_of(self, series_uid: str) -> str | None:
        return self.placement(series_uid, None)[0]

    def placement(self, series: str | None, study: str | None) -> tuple[str | None, str | None]:
        """(Study Instance UID, Patient ID) of a series — its own study, whatever study a
        request named beside it — or of a study; None where the catalogue does not know."""
        try:
            if series:
                row = self.db.one(
                    "SELECT st.StudyInstanceUID, p.PatientID FROM series se"
                    " JOIN study st ON se.study_pk = st.pk JOIN patient p ON st.patient_pk = p.pk"
                    " WHERE se.SeriesInstanceUID = ?", (series,))
                if row:
                    return row[0], row[1]
            if study:
                row = self.db.one("SELECT p.PatientID FROM study st JOIN patient p"
                                  " ON st.patient_pk = p.pk WHERE st.StudyInstanceUID = ?",
                                  (study,))
                return study, (row[0] if row else None)
        except OperationalError:               # an authority without a catalogue
            pass
        return study, None

    def _rules_of(self, user: str) -> tuple[list[Rule], list[str]]:
        groups = self.groups_of(user)
        return self.rules([user] + [f"@{g}" for g in groups]), groups

    def grant_for(self, user: str, series: str | None = None, study: str | None = None, *,
                  scopes: Iterable[str | None] | None = None) -> Grant:
        """The user's grant on a series (or a study): rules — series, its study, its
        patient, ``*`` — then the status matrix. With ``scopes`` (finest first; a slide:
        its UID, ``exam:<accession>``, ``patient:<ID>``) the grant on what they name;
        such a target has no diagnosis status."""
        rules, groups = self._rules_of(user)
        if scopes is not None:
            return decide(rules, user, groups, scopes=scopes)
        study, patient = self.placement(series, study)
        grant = decide(rules, user, groups, series, study, patient)
        if study and self.status_of is not None:
            grant.status = int(self.status_of(study))
            if self.policy is not None:
                # whoever may diagnose also gets the policy's diagnosing versions
                diagnosing = grant.actions is None or "diagnose" in grant.actions
                grant.status_versions = self.policy().allowed_versions(grant.status, diagnosing)
        return grant

    def grants_for(self, user: str, targets: Iterable[Iterable[str | None]]) -> list[Grant]:
        """The user's grants on many scoped targets (e.g. every slide of a listing), with
        the rules read once."""
        rules, groups = self._rules_of(user)
        return [decide(rules, user, groups, scopes=t) for t in targets]

    def authorize(self, sid: str | None, action: str, resource: str | None = None, *,
                  study: str | None = None,
                  scopes: "Iterable[str | None] | Callable[[], Iterable[str | None]] | None" = None,
                  target: "Callable[[], Any] | Any | None" = None
                  ) -> tuple[Session, Grant]:
        """The single authorisation point: every API request calls this with what it
        wants to do (``browse``, ``metadata``, ``fetch``, ``retrieve``, ``diagnose``;
        ``logout`` and ``session`` need only a valid session) and on what (a series UID as
        ``resource``, or a ``study``; or, for targets that are not DICOM series such as
        slides, their ``scopes`` finest first — a callable is called only once the session
        is known to be valid, so that looking the target up never answers a stranger).

        ``target`` (a :class:`~server.targets.Target`, or a callable giving it once
        the session is valid) is the object the request will actually serve, every path
        element resolved against its parent: the grant is the one on that object (its
        series, its study, or a slide's scopes), and when it is a part of a series (an
        instance, a frame) its images must all be among the images the grant allows."""
        s = self.session(sid)
        if action in ("logout", "session"):       # about the session itself, no data
            return s, Grant()
        if not self.user_exists(s.user):
            self.logout(s.id)
            raise AuthError("this user no longer exists: log in again", 401)
        if callable(target):
            try:
                target = target()
            except Exception as e:            # a 404/400 of the path: say who asked
                e.session = s
                raise
        if target is not None:
            if target.scopes is not None:
                scopes = target.scopes
            elif target.series is not None or target.study is not None:
                resource, study, scopes = target.series, target.study, None
        if callable(scopes):
            scopes = scopes()
        grant = self.grant_for(s.user, resource, study, scopes=scopes)
        if grant.actions is not None and action not in grant.actions:
            raise AuthError(f"your account may not {ACTION_WORDS.get(action, action)}", 403,
                            session=s, denied=["action"], allowed_actions=sorted(grant.actions))
        images = getattr(target, "images", None)
        if images is not None and grant.images is not None and not set(images) <= grant.images:
            raise AuthError(f"beyond your rights: image(s) {format_ranges(set(images) - grant.images)} "
                            f"of this series are not among those you may see", 403, session=s,
                            denied=["images"],
                            allowed_images=format_ranges(grant.images))
        return s, grant

    # ----------------------------------------------------------------- audit
    def audit(self, *, user: str | None, action: str, resource: str | None, outcome: str,
              status: int | None = None, detail: dict | None = None, session: str | None = None,
              peer: str | None = None) -> None:
        """Append one row to the audit log (who, what, when, from where, outcome): queued
        for the writer thread (:class:`AuditWriter`), which commits it within a batch."""
        self.audit_writer.put(
            (self.clock(), user, session, peer, action, resource, outcome, status,
             json.dumps(detail, separators=(",", ":"), default=str) if detail else None))

    def health(self) -> dict:
        """The audit writer's state, for ``/api/health``."""
        return self.audit_writer.stats()

    def audit_rows(self, *, user: str | None = None, action: str | None = None,
                   resource: str | None = None, since: float | None = None,
                   until: float | None = None, limit: int | None = 200) -> list[dict]:
        """Audit rows, newest first (rows still queued are written first)."""
        self.audit_writer.flush()
        where, params = [], []
        for col, v in (('"user"', user), ("action", action)):
            if v is not None:
                where.append(f"{col} = ?")
                params.append(v)
        if resource is not None:
            where.append("(resource = ? OR detail LIKE ?)")
            params += [resource, f"%{resource}%"]
        if since is not None:
            where.append("at >= ?")
            params.append(since)
        if until is not None:
            where.append("at < ?")
            params.append(until)
        sql = f"SELECT {', '.join(_AUDIT_SQL)} FROM audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY at DESC, id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        out = []
        for row in self.db.all(sql, params):
            d = dict(zip(AUDIT_COLS, row))
            d["detail"] = json.loads(d["detail"]) if d["detail"] else None
            out.append(d)
        return out
