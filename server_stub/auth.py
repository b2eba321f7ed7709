"""Users, groups, sessions, rights, the audit log, and the one authorisation function
every request passes through.

Users live in the catalogue database (table ``users``), passwords as salted scrypt
hashes. The embedded desktop mode uses the built-in user ``local``, which logs in
without a password only from a loopback address (as PostgreSQL's ``trust`` for local
connections); from anywhere else it is refused.

* Groups: table ``groups`` and ``user_groups``.
* Rights rules: table ``rights`` (see :mod:`server_stub.rights` for what a rule holds, its
  scopes — series, study, patient, slide, exam, ``*`` — and how rules combine).
* Sessions: in memory; they end on logout, after ``idle_s`` without a request, after
  ``max_age_s`` in any case, and when their user is removed.
* Failed log-ins are rate-limited per user name and per client address: after
  ``max_failures`` failures within ``failure_window_s`` seconds, further attempts are
  refused (HTTP 429, with ``retry_after``) until the window has passed, even with the
  right password.
* Audit: table ``audit``, one row per request (who, from where, what, on which
  resource, the outcome, and for packet requests what was actually sent);
  ``medview-server audit`` reads it.

:meth:`Authority.authorize` is the single decision point: it checks the session and the
action and returns the user's :class:`~server_stub.rights.Grant` on the series or study
named, which carries the diagnosis status and the versions the status matrix allows. The
packet planner enforces the grant.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .dbutil import Db
from .packets import CacheModel
from .rights import (ACTION_WORDS, ACTIONS, EXAM_PREFIX, PATIENT_PREFIX, Grant, Rule, decide,
                     format_ranges, parse_ranges)

__all__ = ["LOCAL_USER", "AuthError", "Authority", "Grant", "Session", "hash_password",
           "verify_password", "is_loopback"]

LOCAL_USER = "local"
SESSION_IDLE_S = 12 * 3600
SESSION_MAX_S = 24 * 3600

_DDL = [
    "CREATE TABLE IF NOT EXISTS users ("
    " name TEXT PRIMARY KEY, password_hash TEXT, created REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS groups (name TEXT PRIMARY KEY, created REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS user_groups ("
    " user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,"
    " grp TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,"
    " PRIMARY KEY (user, grp))",
    "CREATE TABLE IF NOT EXISTS rights ("
    " id INTEGER PRIMARY KEY, subject TEXT NOT NULL, scope TEXT NOT NULL DEFAULT '*',"
    " max_layers INTEGER, max_reduce_min INTEGER, regions TEXT, images TEXT,"
    " versions TEXT, actions TEXT, created REAL NOT NULL, UNIQUE (subject, scope))",
    "CREATE TABLE IF NOT EXISTS audit ("
    " id INTEGER PRIMARY KEY, at REAL NOT NULL, user TEXT, session TEXT, peer TEXT,"
    " action TEXT NOT NULL, resource TEXT, outcome TEXT NOT NULL, http_status INTEGER,"
    " detail TEXT)",
    "CREATE INDEX IF NOT EXISTS audit_at ON audit (at)",
    "CREATE INDEX IF NOT EXISTS audit_user ON audit (user, at)",
]
AUDIT_COLS = ("id", "at", "user", "session", "peer", "action", "resource", "outcome",
              "http_status", "detail")


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


class Authority:
    """Users, groups, rights, sessions and audit, over the catalogue database.

    ``status_of(study_uid) -> int`` and ``policy() -> SitePolicy`` (both optional) give
    the diagnosis status and the status matrix; without them grants carry no status.
    """

    def __init__(self, db_path: str, *, status_of: Callable[[str], int] | None = None,
                 policy: Callable[[], Any] | None = None, clock: Callable[[], float] = time.time,
                 idle_s: float = SESSION_IDLE_S, max_age_s: float = SESSION_MAX_S,
                 max_failures: int = 5, failure_window_s: float = 300.0) -> None:
        self._db_path = db_path
        self.db = Db(db_path, _DDL)
        self.status_of = status_of
        self.policy = policy
        self.clock = clock
        self.idle_s, self.max_age_s = idle_s, max_age_s
        self.max_failures, self.failure_window_s = max_failures, failure_window_s
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._failures: dict[tuple[str, str], list[float]] = {}
        with self.db.transaction():
            self.db.execute("INSERT OR IGNORE INTO users(name, password_hash, created) "
                            "VALUES (?,?,?)", (LOCAL_USER, None, time.time()))

    def close(self) -> None:
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
            self.db.execute("DELETE FROM user_groups WHERE user = ?", (name,))
            self.db.execute("DELETE FROM rights WHERE subject = ?", (name,))
            gone = self.db.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount > 0
        with self._lock:
            for sid in [k for k, s in self._sessions.items() if s.user == name]:
                del self._sessions[sid]
        return gone

    def set_groups(self, name: str, groups: Iterable[str]) -> None:
        groups = [g.lstrip("@") for g in groups if g.strip()]
        for g in groups:
            _subject_ok(g)
        with self.db.transaction():
            if self.db.one("SELECT 1 FROM users WHERE name = ?", (name,)) is None:
                raise KeyError(f"no user {name!r}")
            self.db.execute("DELETE FROM user_groups WHERE user = ?", (name,))
            for g in groups:
                self.db.execute("INSERT OR IGNORE INTO groups(name, created) VALUES (?,?)",
                                (g, time.time()))
                self.db.execute("INSERT OR IGNORE INTO user_groups(user, grp) VALUES (?,?)",
                                (name, g))

    def groups_of(self, name: str) -> list[str]:
        return [r[0] for r in self.db.all(
            "SELECT grp FROM user_groups WHERE user = ? ORDER BY grp", (name,))]

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
                self.db.execute("INSERT OR IGNORE INTO groups(name, created) VALUES (?,?)",
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
    def _recent_failures(self, key: tuple[str, str], now: float) -> list[float]:
        recent = [t for t in self._failures.get(key, []) if now - t < self.failure_window_s]
        if recent:
            self._failures[key] = recent
        else:
            self._failures.pop(key, None)
        return recent

    def login(self, name: str, password: str | None, peer: str | None) -> Session:
        now = self.clock()
        keys = [("user", name), ("peer", peer or "?")]
        with self._lock:
            for key in keys:
                recent = self._recent_failures(key, now)
                if len(recent) >= self.max_failures:
                    wait = math.ceil(recent[-self.max_failures] + self.failure_window_s - now)
                    who = "this user" if key[0] == "user" else "this address"
                    raise AuthError(f"too many failed log-ins for {who}: try again in "
                                    f"{max(wait, 1)} s", 429, retry_after=max(wait, 1))
        row = self.db.one("SELECT password_hash FROM users WHERE name = ?", (name,))
        ok = False
        if row is None:                 # as slow as a wrong password: names stay secret
            verify_password(password or "", self._dummy_hash())
        elif row[0] is None:
            ok = name == LOCAL_USER and is_loopback(peer)
        else:
            ok = verify_password(password or "", row[0])
        with self._lock:
            if not ok:
                for key in keys:
                    self._failures.setdefault(key, []).append(now)
                raise AuthError("unknown user or wrong password", 401)
            self._failures.pop(("user", name), None)
            s = Session(secrets.token_urlsafe(24), name, now, now, peer=peer)
            self._sessions[s.id] = s
        return s

    _dummy: str | None = None

    @classmethod
    def _dummy_hash(cls) -> str:
        if cls._dummy is None:
            cls._dummy = hash_password(secrets.token_hex(8))
        return cls._dummy

    def logout(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)

    def session(self, sid: str | None) -> Session:
        if not sid:
            raise AuthError("a session is required: log in first (POST /api/login)", 401)
        now = self.clock()
        with self._lock:
            s = self._sessions.get(sid)
            if s is None or now - s.last_used > self.idle_s or now - s.created > self.max_age_s:
                self._sessions.pop(sid, None)
                raise AuthError("session unknown or expired: log in again", 401)
            s.last_used = now
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
        except sqlite3.OperationalError:       # an authority without a catalogue
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
                  scopes: "Iterable[str | None] | Callable[[], Iterable[str | None]] | None" = None
                  ) -> tuple[Session, Grant]:
        """The single authorisation point: every API request calls this with what it
        wants to do (``browse``, ``metadata``, ``fetch``, ``retrieve``, ``diagnose``;
        ``logout`` and ``session`` need only a valid session) and on what (a series UID as
        ``resource``, or a ``study``; or, for targets that are not DICOM series such as
        slides, their ``scopes`` finest first — a callable is called only once the session
        is known to be valid, so that looking the target up never answers a stranger)."""
        s = self.session(sid)
        if action in ("logout", "session"):       # about the session itself, no data
            return s, Grant()
        if not self.user_exists(s.user):
            self.logout(s.id)
            raise AuthError("this user no longer exists: log in again", 401)
        if callable(scopes):
            scopes = scopes()
        grant = self.grant_for(s.user, resource, study, scopes=scopes)
        if grant.actions is not None and action not in grant.actions:
            raise AuthError(f"your account may not {ACTION_WORDS.get(action, action)}", 403,
                            session=s, denied=["action"], allowed_actions=sorted(grant.actions))
        return s, grant

    # ----------------------------------------------------------------- audit
    def audit(self, *, user: str | None, action: str, resource: str | None, outcome: str,
              status: int | None = None, detail: dict | None = None, session: str | None = None,
              peer: str | None = None) -> None:
        """Append one row to the audit log (who, what, when, from where, outcome)."""
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO audit(at, user, session, peer, action, resource, outcome,"
                " http_status, detail) VALUES (?,?,?,?,?,?,?,?,?)",
                (self.clock(), user, session, peer, action, resource, outcome, status,
                 json.dumps(detail, separators=(",", ":"), default=str) if detail else None))

    def audit_rows(self, *, user: str | None = None, action: str | None = None,
                   resource: str | None = None, since: float | None = None,
                   until: float | None = None, limit: int | None = 200) -> list[dict]:
        """Audit rows, newest first."""
        where, params = [], []
        for col, v in (("user", user), ("action", action)):
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
        sql = f"SELECT {', '.join(AUDIT_COLS)} FROM audit"
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
