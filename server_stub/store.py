"""The image store: files on disk, written atomically, verified by checksum.

Layout (see docs/ARCHITECTURE.md)::

    STORE/
      catalogue.sqlite                              SQLite, WAL, foreign keys on
      originals/ab/<sha256>.dcm                     original DICOM, bit for bit
      j2k/<series_uid>/<sop_uid>.<frame>.j2k        layered codestream
      j2k/<series_uid>/<sop_uid>.<frame>.idx.json   packet index

Crash safety rests on two rules:

1. every file is written to a temporary file in its final directory, flushed and
   fsynced, then renamed over the final name (``os.replace``, atomic on POSIX) and the
   directory is fsynced, so a file is either absent, or complete;
2. the catalogue row that refers to a file is committed only after the file is durable,
   and records its SHA-256 and size.

So a crash leaves at worst an *orphan* (a file no row refers to, or a temporary file),
never a row without its file. :func:`server_stub.fsck.fsck` finds both orphans and rows whose files
are missing or damaged; ``repair`` deletes orphans only (a row with a damaged file needs
a human, or a re-ingest of the original).

Paths handed around (and stored in the catalogue) are *relative* POSIX paths; use
:meth:`Store.abspath` to reach the file. UIDs are used as path components only when they
look like UIDs (digits and dots); anything else is hashed, so no UID can escape the store.

A full disk: a server started on a store whose disk has less than ``MIN_FREE_BYTES``
free, or whose catalogue cannot be opened for writing for lack of space, serves it
read-only (:meth:`Store.open_for_serving`): the catalogue is opened read-only, and every
write — a file, a catalogue row — raises :class:`~server_stub.dbutil.StorageFull`
(HTTP 507) instead of failing half-way. The server checks the free space every few
seconds and goes back to read-write once there is room (:meth:`try_leave_read_only`).
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from imaging.files import TMP_MARK, fsync_dir, sha256_file  # noqa: F401 (re-exported)
from imaging.files import write_file_atomic as _write_file_atomic

from . import faults
from .catalogue import Catalogue
from .database import CATALOGUE_NAME, database_of, note_database, use_database  # noqa: F401
from .dbutil import DatabaseError, StorageFull, is_disk_full, set_read_only

MIN_FREE_BYTES = 16 << 20        # below this much free space a server starts read-only

_fsync_dir = fsync_dir   # the name the server's modules use

ORIGINALS_DIR = "originals"
J2K_DIR = "j2k"

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class StoreError(Exception):
    """Base class for store errors."""


class StoreIntegrityError(StoreError):
    """A stored file is missing, or its content does not match the recorded checksum."""

    def __init__(self, relpath: str, problem: str):
        super().__init__(f"store integrity error: {relpath}: {problem}")
        self.relpath = relpath
        self.problem = problem


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def safe_component(uid: str) -> str:
    """A UID as a file-name component: itself if it is a well-formed UID, else a hash."""
    uid = (uid or "").strip()
    if _UID_RE.match(uid) and len(uid) <= 128:
        return uid
    return "x-" + hashlib.sha1(uid.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass
class FsckReport:
    """What :func:`server_stub.fsck.fsck` found.

    ``orphans``: files (relpaths) that no catalogue row refers to, temporary files
    included. ``missing`` / ``damaged``: (relpath, SOP Instance UID, problem) for rows whose
    file is absent, or whose size or SHA-256 does not match. ``removed``: orphans deleted by
    ``repair``.
    """

    checked: int = 0
    orphans: list[str] = field(default_factory=list)
    missing: list[tuple[str, str, str]] = field(default_factory=list)
    damaged: list[tuple[str, str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        """True when every catalogued file exists and matches (orphans are harmless)."""
        return not self.missing and not self.damaged

    @property
    def clean(self) -> bool:
        """Consistent, and no orphan left."""
        return self.consistent and len(self.orphans) == len(self.removed)

    def format(self) -> str:
        lines = [f"checked {self.checked} catalogued files"]
        for rel, sop, problem in self.missing:
            lines.append(f"MISSING  {rel} (instance {sop}): {problem}")
        for rel, sop, problem in self.damaged:
            lines.append(f"DAMAGED  {rel} (instance {sop}): {problem}")
        removed = set(self.removed)
        for rel in self.orphans:
            lines.append(f"{'REMOVED ' if rel in removed else 'ORPHAN  '} {rel}")
        lines.append(f"{len(self.missing)} missing, {len(self.damaged)} damaged, "
                     f"{len(self.orphans)} orphans ({len(self.removed)} removed)")
        return "\n".join(lines)


def write_file_atomic(target: Path, data: bytes, *, sync_dir: bool = True,
                      sync_file: bool = True) -> None:
    """:func:`imaging.files.write_file_atomic` for the store: the disk-full fault point
    first, and a full disk reported as :class:`~server_stub.dbutil.StorageFull` (507)."""
    try:
        faults.check_disk("file")
        _write_file_atomic(target, data, sync_dir=sync_dir, sync_file=sync_file)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"the store's disk is full: cannot write {target.name}") from e
        raise


@dataclass
class DurableBatch:
    """Files written by :meth:`Store.atomic_write` without their fsyncs, to be made
    durable at once (one ``syncfs``, or each fsynced) before anything refers to them."""

    root: Path
    files: list = field(default_factory=list)
    dirs: set = field(default_factory=set)

    def make_durable(self) -> None:
        from imaging.files import make_durable

        if self.files:
            try:
                faults.check_disk("file")
                make_durable(self.files, self.dirs, self.root)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise StorageFull("the store's disk is full") from e
                raise
        self.files, self.dirs = [], set()


class Store:
    """A store directory: originals, codestreams, packet indexes and the catalogue."""

    def __init__(self, root: str | Path, database: str | None = None):
        self.root = Path(root).resolve()
        if database:
            use_database(self.root, database)
        for d in (self.root, self.root / ORIGINALS_DIR, self.root / J2K_DIR):
            self._ensure_dir(d)
        self._catalogue: Catalogue | None = None
        self._cat_lock = threading.Lock()
        self.read_only: str | None = None        # why, when the store is read-only

    # ------------------------------------------------------------------ basics

    @property
    def database(self) -> str:
        """The store's database: the SQLite file path, or a PostgreSQL URL
        (:func:`server_stub.database.database_of`); every table of the store is there."""
        return database_of(self.root)

    @property
    def catalogue(self) -> Catalogue:
        """The store's catalogue (opened on first use, shared by all threads)."""
        with self._cat_lock:
            if self._catalogue is None:
                where = self.database
                self._catalogue = Catalogue(where)
                note_database(self.root, where)
            return self._catalogue

    def close(self) -> None:
        with self._cat_lock:
            if self._catalogue is not None:
                self._catalogue.close()
                self._catalogue = None
        if self.read_only is not None:       # a later Store on this path decides anew
            set_read_only(self.database, None)

    def free_bytes(self) -> int:
        """Free space on the store's file system (for unprivileged writers)."""
        return faults.free_bytes(self.root)

    def open_for_serving(self, min_free: int | None = None) -> str | None:
        """Open the catalogue for a server: read-write, or read-only when the disk is
        full (less than ``min_free`` bytes free, or the catalogue cannot be opened for
        writing for lack of space). Returns why the store is read-only, or None."""
        if self.read_only is not None:
            return self.read_only
        min_free = MIN_FREE_BYTES if min_free is None else min_free
        free = self.free_bytes()
        reason = None
        if free < min_free:
            reason = (f"the store's disk is full ({free // 1024} kB free, "
                      f"{min_free // 1024} kB needed to write)")
        else:
            try:
                self.catalogue
            except (DatabaseError, OSError, StorageFull) as e:
                if not is_disk_full(e):
                    raise
                reason = f"the store's disk is full (the catalogue cannot be written: {e})"
        if reason is not None:
            self.set_read_only(reason)
        return reason

    def try_leave_read_only(self, min_free: int | None = None) -> bool:
        """Back to read-write when the disk has room again (True: it is read-write)."""
        if self.read_only is None:
            return True
        min_free = MIN_FREE_BYTES if min_free is None else min_free
        if self.free_bytes() < min_free:
            return False
        self.read_only = None
        set_read_only(self.database, None)
        return True

    def set_read_only(self, reason: str) -> None:
        """From now on: the catalogue read-only, every write refused (StorageFull)."""
        self.read_only = None
        self.close()
        self.read_only = reason
        set_read_only(self.database, reason)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def abspath(self, relpath: str | Path) -> Path:
        """Absolute path of a store-relative path; refuses paths leaving the store."""
        rel = PurePosixPath(str(relpath).replace(os.sep, "/"))
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise StoreError(f"not a store-relative path: {relpath!r}")
        return self.root.joinpath(*rel.parts)

    def relpath(self, path: str | Path) -> str:
        """Store-relative POSIX path of an absolute path inside the store."""
        return Path(path).resolve().relative_to(self.root).as_posix()

    def _resolve(self, path: str | Path) -> Path:
        p = Path(path)
        if p.is_absolute():
            p = p.resolve()
            p.relative_to(self.root)   # raises ValueError when outside the store
            return p
        return self.abspath(path)

    @staticmethod
    def _ensure_dir(d: Path) -> None:
        if d.is_dir():
            return
        missing = []
        p = d
        while not p.exists():
            missing.append(p)
            p = p.parent
        d.mkdir(parents=True, exist_ok=True)
        for m in reversed(missing):     # make each new directory entry durable
            _fsync_dir(m.parent)

    # ------------------------------------------------------------------ writing

    def atomic_write(self, path: str | Path, data: bytes, *,
                     batch: "DurableBatch | None" = None) -> str:
        """Write ``data`` to ``path`` (store-relative or absolute inside the store)
        atomically and durably; returns its SHA-256 hex digest. With ``batch`` the
        fsyncs are left to :meth:`DurableBatch.make_durable`, which the caller must
        call before anything (a catalogue row) refers to the file."""
        if self.read_only is not None:
            raise StorageFull(f"the server is read-only: {self.read_only}")
        target = self._resolve(path)
        self._ensure_dir(target.parent)
        write_file_atomic(target, data, sync_dir=batch is None, sync_file=batch is None)
        if batch is not None:
            batch.files.append(target)
            batch.dirs.add(target.parent)
        return sha256_hex(data)

    @staticmethod
    def original_relpath(sha256: str) -> str:
        if not _SHA_RE.match(sha256):
            raise StoreError(f"not a SHA-256 hex digest: {sha256!r}")
        return f"{ORIGINALS_DIR}/{sha256[:2]}/{sha256}.dcm"

    def put_original(self, data: bytes, *, batch: "DurableBatch | None" = None) -> tuple[str, str]:
        """Store an original DICOM file, content addressed; returns (relpath, sha256).

        A no-op when the file is present with the right content; a damaged copy is
        rewritten.
        """
        sha = sha256_hex(data)
        rel = self.original_relpath(sha)
        p = self.abspath(rel)
        if p.is_file():
            try:
                have, size = sha256_file(p)
            except OSError:
                have, size = "", -1
            if have == sha and size == len(data):
                return rel, sha
        self.atomic_write(rel, data, batch=batch)
        return rel, sha

    @staticmethod
    def codestream_paths(series_uid: str, sop_uid: str, frame: int) -> tuple[str, str]:
        """(codestream relpath, packet-index relpath) of one frame (1-based)."""
        if int(frame) < 1:
            raise StoreError(f"frame numbers start at 1, got {frame}")
        base = f"{J2K_DIR}/{safe_component(series_uid)}/{safe_component(sop_uid)}.{int(frame)}"
        return f"{base}.j2k", f"{base}.idx.json"

    # ------------------------------------------------------------------ reading

    def read_verified(self, relpath: str, sha256: str, size: int | None = None) -> bytes:
        """Read a stored file and check it against its recorded SHA-256 (and size).

        Raises :class:`StoreIntegrityError` if it is missing, unreadable, or different.
        """
        p = self.abspath(relpath)
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise StoreIntegrityError(relpath, "file is missing") from None
        except OSError as e:
            raise StoreIntegrityError(relpath, f"cannot read file: {e}") from None
        if size is not None and len(data) != size:
            raise StoreIntegrityError(
                relpath, f"size is {len(data)} bytes, catalogue records {size} "
                         "(truncated or overwritten)")
        have = sha256_hex(data)
        if have != sha256:
            raise StoreIntegrityError(
                relpath, f"SHA-256 mismatch: file has {have}, catalogue records {sha256} "
                         f"({len(data)} bytes; damaged or truncated)")
        return data

    def check_file(self, relpath: str, sha256: str, size: int | None = None) -> str | None:
        """None if the file matches, else a description of the problem."""
        p = self.abspath(relpath)
        if not p.is_file():
            return "file is missing"
        try:
            have, n = sha256_file(p)
        except OSError as e:
            return f"cannot read file: {e}"
        if size is not None and n != size:
            return f"size is {n} bytes, catalogue records {size}"
        if have != sha256:
            return f"SHA-256 mismatch: file has {have}, catalogue records {sha256}"
        return None

    # ------------------------------------------------------------------ fsck

    def iter_files(self):
        """Every file under originals/, j2k/ and final/ (the final copies), as
        store-relative paths."""
        for top in (ORIGINALS_DIR, J2K_DIR, "final"):
            base = self.root / top
            for dirpath, _dirs, files in os.walk(base):
                for name in files:
                    yield (Path(dirpath) / name).relative_to(self.root).as_posix()

    def delete_study(self, study_uid: str) -> int:
        """Remove a study from the catalogue, then its files; returns files removed."""
        removed = 0
        for rel in self.catalogue.delete_study(study_uid):
            try:
                self.abspath(rel).unlink()
                removed += 1
            except FileNotFoundError:
                pass
        return removed
