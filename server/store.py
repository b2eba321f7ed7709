"""The image store: files on disk, written atomically, verified by checksum.

Layout (see docs/ARCHITECTURE.md)::

    STORE/
      catalogue.sqlite                              SQLite, WAL, foreign keys on
      catalogue.sqlite-writer                       empty: the writers' flock (dbutil)
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
never a row without its file. :func:`server.fsck.fsck` finds both orphans and rows whose files
are missing or damaged; ``repair`` deletes orphans only (a row with a damaged file needs
a human, or a re-ingest of the original).

Paths handed around (and stored in the catalogue) are *relative* POSIX paths; use
:meth:`Store.abspath` to reach the file. UIDs are used as path components only when they
look like UIDs (digits and dots); anything else is hashed, so no UID can escape the store.

A full disk: a server started on a store whose disk has less than ``MIN_FREE_BYTES``
free, or whose catalogue cannot be opened for writing for lack of space, serves it
read-only (:meth:`Store.open_for_serving`): the catalogue is opened read-only, and every
write — a file, a catalogue row — raises :class:`~server.dbutil.StorageFull`
(HTTP 507) instead of failing half-way. The server checks the free space every few
seconds and goes back to read-write once there is room (:meth:`try_leave_read_only`).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from imaging.files import TMP_MARK, fsync_dir, sha256_file  # noqa: F401 (re-exported)
from imaging.files import ensure_dir
from imaging.files import write_file_atomic as _write_file_atomic

from . import faults
from .catalogue import Catalogue
from .database import CATALOGUE_NAME, database_of, note_database, use_database  # noqa: F401
from .dbutil import DatabaseError, StorageFull, is_disk_full, set_read_only
from .objects import LocalObjects, ObjectError, ObjectMissing, ObjectStore, ReadCache, open_objects

MIN_FREE_BYTES = 16 << 20        # below this much free space a server starts read-only

_fsync_dir = fsync_dir   # the name the server's modules use

ORIGINALS_DIR = "originals"
J2K_DIR = "j2k"
OBJECTS_FILE = "objects.json"     # where the store's objects live, if not in STORE itself
READ_CACHE_DIR = "cache/objects"  # the local read cache of a remote object store
READ_CACHE_BYTES = 1 << 30

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
    """What :func:`server.fsck.fsck` found.

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
    first, and a full disk reported as :class:`~server.dbutil.StorageFull` (507)."""
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
    """A store directory: the catalogue, and the originals, codestreams and packet
    indexes — in the directory itself, or in an object store (:mod:`server.objects`,
    e.g. an S3 bucket) recorded in ``STORE/objects.json`` when the store is first opened
    with ``objects``. Every file operation on the store's data goes through
    :attr:`objects`; a remote object store is read through a local :class:`ReadCache`
    (by SHA-256, checked on every use)."""

    def __init__(self, root: str | Path, objects: "ObjectStore | str | None" = None, *,
                 endpoint: str | None = None, read_cache_bytes: int | None = None,
                 database: str | None = None):
        self.root = Path(root).resolve()
        self._ensure_dir(self.root)
        if database:
            use_database(self.root, database)
        self.objects: ObjectStore = self._open_objects(objects, endpoint)
        if not self.objects.remote:
            for d in (self.root / ORIGINALS_DIR, self.root / J2K_DIR):
                self._ensure_dir(d)
            self.cache: ReadCache | None = None
        else:
            budget = read_cache_bytes if read_cache_bytes is not None else int(
                os.environ.get("MEDVIEW_READ_CACHE_BYTES", READ_CACHE_BYTES))
            self.cache = ReadCache(self.root / READ_CACHE_DIR, budget) if budget > 0 else None
        self._catalogue: Catalogue | None = None
        self._cat_lock = threading.Lock()
        self.read_only: str | None = None        # why, when the store is read-only
        self.range_reads = 0                     # range reads made (statistics)

    def _open_objects(self, objects, endpoint: str | None) -> "ObjectStore":
        """The object store: given, else the one recorded in ``objects.json``, else the
        store directory. Recording it makes every later command (ingest, fsck, serve...)
        use it without being told; a store never silently changes where its data is."""
        rec_path = self.root / OBJECTS_FILE
        recorded = None
        if rec_path.is_file():
            try:
                recorded = json.loads(rec_path.read_text())
            except ValueError as e:
                raise StoreError(f"{rec_path} is not JSON: {e}") from None
        if objects is None and recorded is None:
            return LocalObjects(self.root, writer=write_file_atomic)
        if objects is None:
            url = recorded["url"]
            endpoint = endpoint or os.environ.get("MEDVIEW_S3_ENDPOINT") or recorded.get("endpoint")
            return open_objects(url, endpoint=endpoint)
        store = objects if not isinstance(objects, str) else open_objects(objects, endpoint=endpoint)
        if not store.remote and Path(store.url) == self.root:
            return LocalObjects(self.root, writer=write_file_atomic)
        if recorded is not None and recorded.get("url") != store.url:
            raise StoreError(f"the store {self.root} keeps its data in {recorded.get('url')}, "
                             f"not {store.url}")
        if recorded is None:
            ensure = getattr(store, "ensure_bucket", None)
            if ensure is not None:
                ensure()
            ep = endpoint or getattr(getattr(getattr(store, "client", None), "meta", None),
                                     "endpoint_url", None)
            _write_file_atomic(rec_path, json.dumps({"url": store.url, "endpoint": ep},
                                                    indent=1).encode())
        return store

    # ------------------------------------------------------------------ basics

    @property
    def database(self) -> str:
        """The store's database: the SQLite file path, or a PostgreSQL URL
        (:func:`server.database.database_of`); every table of the store is there."""
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

    _ensure_dir = staticmethod(ensure_dir)     # imaging.files: durable directory entries

    # ------------------------------------------------------------------ writing

    def key(self, path: str | Path) -> str:
        """The object key (store-relative POSIX path) of a path given either way."""
        p = Path(path)
        if p.is_absolute():
            return self.relpath(p)
        self.abspath(path)                   # refuses paths that leave the store
        return PurePosixPath(str(path).replace(os.sep, "/")).as_posix()

    def atomic_write(self, path: str | Path, data: bytes, *,
                     batch: "DurableBatch | None" = None) -> str:
        """Write ``data`` to ``path`` (store-relative or absolute inside the store)
        atomically and durably — in the object store, checked there before this returns
        — and return its SHA-256 hex digest. With ``batch`` (local disk only) the fsyncs
        are left to :meth:`DurableBatch.make_durable`, which the caller must call before
        anything (a catalogue row) refers to the file; an object store's PUT is durable
        by itself."""
        if self.read_only is not None:
            raise StorageFull(f"the server is read-only: {self.read_only}")
        sha = sha256_hex(data)
        if not self.objects.remote:
            target = self._resolve(path)
            # a batch makes new folders durable with its files (one syncfs)
            self._ensure_dir(target.parent, batch.dirs if batch is not None else None)
            write_file_atomic(target, data, sync_dir=batch is None, sync_file=batch is None)
            if batch is not None:
                batch.files.append(target)
                batch.dirs.add(target.parent)
            return sha
        key = self.key(path)
        faults.point("objects.put")
        try:
            self.objects.put(key, data)
        except ObjectError as e:
            raise StoreError(f"cannot store {key}: {e}") from e
        if self.cache is not None:
            self.cache.put(sha, data)
        return sha

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
        if self.check_file(rel, sha, len(data)) is None:
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

    def read_file(self, relpath: str) -> bytes:
        """A stored file's bytes, unchecked (for files that carry their own checks, such
        as a manifest); :class:`FileNotFoundError` if absent, OSError if unreadable."""
        if not self.objects.remote:
            return self.abspath(relpath).read_bytes()
        try:
            return self.objects.get(self.key(relpath))
        except ObjectMissing:
            raise FileNotFoundError(relpath) from None
        except ObjectError as e:
            raise OSError(str(e)) from None

    def read_range(self, relpath: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a stored file (an HTTP range read on S3). Not checked
        against the file's SHA-256 (only whole reads can be): the object was checked when
        it was written, and fsck checks it whole."""
        self.range_reads += 1
        try:
            data = self.objects.get_range(self.key(relpath), start, end)
        except ObjectMissing:
            raise StoreIntegrityError(relpath, "file is missing") from None
        except ObjectError as e:
            raise StoreIntegrityError(relpath, f"cannot read file: {e}") from None
        if len(data) != end - start:
            raise StoreIntegrityError(relpath, f"range {start}-{end} is beyond the end of the file")
        return data

    def read_verified(self, relpath: str, sha256: str, size: int | None = None) -> bytes:
        """Read a stored file and check it against its recorded SHA-256 (and size).

        Raises :class:`StoreIntegrityError` if it is missing, unreadable, or different.
        """
        if self.cache is not None:
            data = self.cache.get(sha256, size)
            if data is not None:
                return data
        try:
            data = self.read_file(relpath)
        except FileNotFoundError:
            raise StoreIntegrityError(relpath, "file is missing") from None
        except IsADirectoryError:
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
        if self.cache is not None:
            self.cache.put(sha256, data)
        return data

    def check_file(self, relpath: str, sha256: str, size: int | None = None) -> str | None:
        """None if the file matches, else a description of the problem (the object store
        is read, never the read cache)."""
        if not self.objects.remote:
            p = self.abspath(relpath)
            if not p.is_file():
                return "file is missing"
            try:
                have, n = sha256_file(p)
            except OSError as e:
                return f"cannot read file: {e}"
        else:
            try:
                data = self.objects.get(self.key(relpath))
            except ObjectMissing:
                return "file is missing"
            except ObjectError as e:
                return f"cannot read file: {e}"
            have, n = sha256_hex(data), len(data)
        if size is not None and n != size:
            return f"size is {n} bytes, catalogue records {size}"
        if have != sha256:
            return f"SHA-256 mismatch: file has {have}, catalogue records {sha256}"
        return None

    def exists(self, relpath: str) -> bool:
        """Whether a stored file is there (whatever its content)."""
        if not self.objects.remote:
            return self.abspath(relpath).is_file()
        try:
            return self.objects.exists(self.key(relpath))
        except ObjectError as e:
            raise StoreError(f"cannot reach {relpath}: {e}") from e

    def delete_file(self, relpath: str) -> bool:
        """Remove a stored file (durably); True if it was there."""
        try:
            return self.objects.delete(self.key(relpath))
        except ObjectError as e:
            raise StoreError(f"cannot delete {relpath}: {e}") from e

    # ------------------------------------------------------------------ fsck

    def iter_files(self):
        """Every file under originals/, j2k/ and final/ (the final copies), as
        store-relative paths."""
        for top in (ORIGINALS_DIR, J2K_DIR, "final"):
            if not self.objects.remote:
                base = self.root / top
                for dirpath, _dirs, files in os.walk(base):
                    for name in files:
                        yield (Path(dirpath) / name).relative_to(self.root).as_posix()
            else:
                yield from self.objects.keys(top)

    def delete_study(self, study_uid: str) -> int:
        """Remove a study from the catalogue, then its files; returns files removed."""
        removed = 0
        for rel in self.catalogue.delete_study(study_uid):
            removed += bool(self.delete_file(rel))
        return removed
