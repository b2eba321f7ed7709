"""Users, sessions and the one authorisation function every request passes through.

Users live in the catalogue database (table ``users``), passwords as salted scrypt
hashes. The embedded desktop mode uses the built-in user ``local``, which logs in
without a password only from a loopback address (as PostgreSQL's ``trust`` for local
connections); from anywhere else it is refused.

:meth:`Authority.authorize` is the single decision point. Today it checks the session;
rights (maximum resolution, layers, regions, images per user/group) plug in there and
come back as a :class:`Grant` the packet planner enforces.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field

from .packets import CacheModel

LOCAL_USER = "local"
SESSION_IDLE_S = 12 * 3600


class AuthError(Exception):
    def __init__(self, message: str, status: int = 401, **extra):
        super().__init__(message)
        self.status = status
        self.extra = extra


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
class Grant:
    """What a user may fetch of a target; None = no limit."""

    max_layers: int | None = None
    max_reduce_min: int | None = None     # smallest allowed reduce (0 = full resolution)
    regions: list[tuple[int, int, int, int]] | None = None
    images: set[int] | None = None


@dataclass
class Session:
    id: str
    user: str
    created: float
    last_used: float
    model: dict[str, CacheModel] = field(default_factory=dict)   # per target

    def model_for(self, target: str) -> CacheModel:
        return self.model.setdefault(target, CacheModel())


class Authority:
    def __init__(self, db_path: str) -> None:
        self._db_path = db_path
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        with self._connect() as con:
            con.execute("CREATE TABLE IF NOT EXISTS users ("
                        " name TEXT PRIMARY KEY, password_hash TEXT, created REAL NOT NULL)")
            con.execute("INSERT OR IGNORE INTO users(name, password_hash, created) VALUES (?,?,?)",
                        (LOCAL_USER, None, time.time()))

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self._db_path, timeout=30)
        con.execute("PRAGMA journal_mode=WAL")
        return con

    # ----------------------------------------------------------------- users
    def add_user(self, name: str, password: str) -> None:
        with self._connect() as con:
            con.execute("INSERT OR REPLACE INTO users(name, password_hash, created) VALUES (?,?,?)",
                        (name, hash_password(password), time.time()))

    def login(self, name: str, password: str | None, peer: str | None) -> Session:
        with self._connect() as con:
            row = con.execute("SELECT password_hash FROM users WHERE name = ?", (name,)).fetchone()
        ok = False
        if row is not None:
            if row[0] is None:
                ok = name == LOCAL_USER and is_loopback(peer)
            else:
                ok = verify_password(password or "", row[0])
        if not ok:
            raise AuthError("unknown user or wrong password", 401)
        now = time.time()
        s = Session(secrets.token_urlsafe(24), name, now, now)
        with self._lock:
            self._sessions[s.id] = s
        return s

    def logout(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)

    def session(self, sid: str | None) -> Session:
        if not sid:
            raise AuthError("a session is required: log in first (POST /api/login)", 401)
        now = time.time()
        with self._lock:
            s = self._sessions.get(sid)
            if s is None or now - s.last_used > SESSION_IDLE_S:
                self._sessions.pop(sid, None)
                raise AuthError("session unknown or expired: log in again", 401)
            s.last_used = now
            return s

    # ----------------------------------------------------------------- the hook
    def authorize(self, sid: str | None, action: str, resource: str | None = None) -> tuple[Session, Grant]:
        """The single authorisation point: every API request calls this with what it
        wants to do (``browse``, ``fetch``, ``metadata``, ``logout``) and on what."""
        s = self.session(sid)
        return s, Grant()
