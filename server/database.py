"""Where the database of a store is: the one place that says it.

A store's tables (catalogue, users and rights, audit, diagnosis records, versions, tiers,
slides, quarantine, policy copies, job leases) live in one database: by default the
SQLite file ``STORE/catalogue.sqlite`` (embedded, for the desktop), or a PostgreSQL
database named by a ``postgresql://`` URL — given as ``--database`` to ``medview-server``
(:func:`use_database`, for the life of the process), or by the environment variable
``MEDVIEW_DATABASE`` (whose ``{store}`` is replaced by a name derived from the store's
path, so that several stores can share one PostgreSQL database, each in its own schema:
``...?options=-csearch_path%3D{store}``).

A store whose database is PostgreSQL keeps a note of it (``STORE/database.url``, the URL
without a password); opening such a store without the URL is refused rather than
starting an empty SQLite catalogue beside it.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from .dbutil import is_postgres, redact

CATALOGUE_NAME = "catalogue.sqlite"
NOTE_NAME = "database.url"
ENV = "MEDVIEW_DATABASE"

_configured: dict[str, str] = {}
_lock = threading.Lock()


class DatabaseConfigError(Exception):
    """The store's database is not the one given (or none was given for a store whose
    catalogue is in PostgreSQL)."""


def use_database(store_root: str | Path, url: str | None) -> None:
    """From now on the store at ``store_root`` uses ``url`` (None: back to the default)."""
    key = str(Path(store_root).resolve())
    with _lock:
        if url:
            if not (is_postgres(url) or url.startswith("sqlite:")):
                raise DatabaseConfigError(f"--database {redact(url)}: expected "
                                          "postgresql://... (or sqlite:PATH)")
            _configured[key] = url
        else:
            _configured.pop(key, None)


def store_schema(store_root: str | Path) -> str:
    """A schema name for a store (what ``{store}`` stands for in MEDVIEW_DATABASE)."""
    digest = hashlib.sha256(str(Path(store_root).resolve()).encode()).hexdigest()
    return "s_" + digest[:20]


def database_of(store_root: str | Path) -> str:
    """The database of the store at ``store_root``: a path (SQLite) or a URL."""
    root = Path(store_root).resolve()
    url = _configured.get(str(root))
    if url is None:
        env = os.environ.get(ENV, "").strip()
        if env:
            url = env.replace("{store}", store_schema(root))
    if url is None:
        note = root / NOTE_NAME
        if note.is_file():
            raise DatabaseConfigError(
                f"the store {root} keeps its tables in {note.read_text().strip()}; "
                "give that URL (--database, or MEDVIEW_DATABASE)")
        return str(root / CATALOGUE_NAME)
    if url.startswith("sqlite:"):
        return str((root / url[len("sqlite:"):]).resolve())
    return url


def note_database(store_root: str | Path, url: str) -> None:
    """Record in the store directory that its tables live in the PostgreSQL ``url``."""
    if not is_postgres(url) or os.environ.get(ENV, "").strip():
        return                     # the environment names it every time: no note needed
    note = Path(store_root) / NOTE_NAME
    text = redact(url) + "\n"
    try:
        if note.is_file() and note.read_text() == text:
            return
        note.write_text(text)
    except OSError:          # a read-only store directory: the note is a help, not a must
        pass


def store_exists(store_root: str | Path) -> bool:
    """Whether a store (its catalogue) exists at ``store_root``."""
    where = database_of(store_root)
    if not is_postgres(where):
        return Path(where).is_file()
    from .dbutil import Db

    db = Db(where)
    try:
        return db.table_exists("schema_version")
    finally:
        db.close()

