"""Tiered storage: a hot store and an archive, split by quality layers (SPEC V7).

What moves
----------
After ``migrate_after_days`` the archive receives, per image, the *tail* of its
codestream — the packets of the quality layers beyond the site's ``keep_hot`` version
(by default V2), i.e. the part that makes the image lossless — and, per instance, the
original DICOM file. The hot store keeps the *head* (headers + the packets of the lossy
layers) and the packet index. Nothing is stored twice: head + tail is the codestream,
byte for byte (:mod:`codestream.layersplit`). Lossy versions are therefore still served
from the hot store; a request that needs more *recalls* the tail transparently.

Catalogue
---------
Two tables in the catalogue database say where everything is:

``frame_tier``     one row per image that has been migrated: state ``archived`` (head hot,
                   tail in the archive, whole codestream absent) or ``recalled`` (whole
                   codestream hot again, tail still in the archive), the head's and the
                   tail's checksums and sizes, the archive's URL and the number of layers
                   the head holds.
``original_tier``  one row per original DICOM file that has been migrated: ``archived``
                   (only in the archive) or ``recalled`` (in both).
``final_tier``     the same for final copies (:mod:`server.policy_copies`, SPEC H1),
                   which move with the originals; the row names the copy by its SHA-256.

No row: the file is only in the hot store, as ingested.

Crash safety
------------
Every step follows copy → verify → commit → delete:

* migrate a codestream: write the tail to the archive and read it back (SHA-256), write
  the head to the hot store (atomic, fsynced) and check it, commit the ``frame_tier`` row,
  then delete the whole codestream;
* migrate an original: copy it to the archive, read it back, commit, delete;
* recall a codestream: read head and tail, check both, join them and check the SHA-256
  of the whole codestream recorded at ingest, write it to the hot store atomically,
  commit ``recalled``, then delete the head.

A crash (``kill -9``) between any two steps leaves the catalogue pointing at complete,
verified data, plus at worst an unreferenced file that :meth:`Tiers.finish_pending`
(run at the start of every migration) or ``fsck --repair`` removes. Migration is
resumable: run it again and it carries on where it stopped.

The server recalls while a migration may run in another process. Every state change and
every deletion therefore happens inside a write transaction of the catalogue that first
re-reads the state (a recall also writes the rebuilt codestream inside it): SQLite's
write lock serialises them across processes, so no step deletes a file that another has
just made the only copy.

Archives
--------
:class:`ObjectArchive` implements the small :class:`Archive` interface over the same
object stores as the hot store (:mod:`server.objects`): a directory
(:func:`DirectoryArchive`, default ``STORE/archive``) or an S3 bucket
(:func:`S3Archive`, ``s3://bucket/prefix``). The URL of the archive is recorded in every tier row, so the
data can always be found again whatever the current configuration says.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Protocol

from codestream.index import PacketIndex
from codestream.layersplit import join_layers, split_by_layers

from . import faults
from .catalogue import GENERATION_TABLE, generation_trigger
from .dbutil import Db
from .objects import LocalObjects, ObjectError, ObjectMissing, ObjectStore, S3Objects, open_objects
from .store import (FsckReport, Store, StoreError, StoreIntegrityError, write_file_atomic,
                    sha256_hex)

log = logging.getLogger("medview.tiers")

ARCHIVE_DIR = "archive"
ARCHIVE_PREFIX = "archive:"          # how archive objects appear in an fsck report

_DDL = [
    "CREATE TABLE IF NOT EXISTS frame_tier ("
    " frame_pk INTEGER PRIMARY KEY REFERENCES frame(pk) ON DELETE CASCADE,"
    " state TEXT NOT NULL CHECK (state IN ('archived', 'recalled')),"
    " hot_layers INTEGER NOT NULL,"
    " head_relpath TEXT NOT NULL, head_sha256 TEXT NOT NULL, head_size INTEGER NOT NULL,"
    " archive TEXT NOT NULL, tail_key TEXT NOT NULL, tail_sha256 TEXT NOT NULL,"
    " tail_size INTEGER NOT NULL, migrated_at REAL NOT NULL, recalled_at REAL)",
    "CREATE TABLE IF NOT EXISTS original_tier ("
    " instance_pk INTEGER PRIMARY KEY REFERENCES instance(pk) ON DELETE CASCADE,"
    " state TEXT NOT NULL CHECK (state IN ('archived', 'recalled')),"
    " archive TEXT NOT NULL, archive_key TEXT NOT NULL,"
    " migrated_at REAL NOT NULL, recalled_at REAL)",
]
# migration step 3: final copies (server.policy_copies) move like originals; sha256
# names the copy the row is about (a newer copy under another policy has no tier row yet)
_FINAL_DDL = [
    "CREATE TABLE IF NOT EXISTS final_tier ("
    " instance_pk INTEGER PRIMARY KEY REFERENCES instance(pk) ON DELETE CASCADE,"
    " state TEXT NOT NULL CHECK (state IN ('archived', 'recalled')),"
    " sha256 TEXT NOT NULL, archive TEXT NOT NULL, archive_key TEXT NOT NULL,"
    " migrated_at REAL NOT NULL, recalled_at REAL)",
]
# a migration or a recall changes what a series serves: its generation goes up
# (server.catalogue; kept series facts are read again)
_SERIES_OF_FRAME = ("SELECT se.SeriesInstanceUID AS uid FROM frame f JOIN instance i "
                    "ON f.instance_pk = i.pk JOIN series se ON i.series_pk = se.pk "
                    "WHERE f.pk = {}")
_TRIGGERS = [                 # migration step 2 of the tiers' tables
    GENERATION_TABLE,
    generation_trigger("gen_frame_tier_insert", "AFTER INSERT", "frame_tier",
                       _SERIES_OF_FRAME.format("NEW.frame_pk")),
    generation_trigger("gen_frame_tier_update", "AFTER UPDATE", "frame_tier",
                       _SERIES_OF_FRAME.format("NEW.frame_pk")),
    generation_trigger("gen_frame_tier_delete", "BEFORE DELETE", "frame_tier",
                       _SERIES_OF_FRAME.format("OLD.frame_pk")),
]


class ArchiveError(StoreError):
    """The archive cannot be reached, or an object in it is missing or damaged."""


# --------------------------------------------------------------------------- archives
class Archive(Protocol):
    """Where the archived parts live. ``put`` returns only when the object is durable."""

    url: str

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...          # ArchiveError if missing
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def keys(self) -> Iterator[str]: ...


def _check_key(key: str) -> PurePosixPath:
    k = PurePosixPath(key)
    if k.is_absolute() or ".." in k.parts or not k.parts:
        raise ArchiveError(f"not an archive key: {key!r}")
    return k


class ObjectArchive:
    """An archive over an :class:`~server.objects.ObjectStore` (the same module the
    hot store uses): a directory (another disk, a NAS mount...) or an S3 bucket. Object
    store failures become :class:`ArchiveError`."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        self.url = objects.url

    def _call(self, what: str, key: str, fn):
        try:
            return fn()
        except ObjectMissing:
            raise ArchiveError(f"archive object {key} is missing ({self.url})") from None
        except ObjectError as e:
            raise ArchiveError(f"archive {self.url}: cannot {what} {key}: {e}") from e

    def put(self, key: str, data: bytes) -> None:
        _check_key(key)
        self._call("store", key, lambda: self.objects.put(key, data))

    def get(self, key: str) -> bytes:
        _check_key(key)
        return self._call("read", key, lambda: self.objects.get(key))

    def exists(self, key: str) -> bool:
        _check_key(key)
        return self._call("reach", key, lambda: self.objects.exists(key))

    def delete(self, key: str) -> None:
        _check_key(key)
        self._call("delete", key, lambda: self.objects.delete(key))

    def keys(self) -> Iterator[str]:
        try:
            yield from self.objects.keys()
        except ObjectError as e:
            raise ArchiveError(f"archive {self.url} cannot be listed: {e}") from e


def DirectoryArchive(root: str | Path, create: bool = False) -> ObjectArchive:  # noqa: N802
    """An archive in a directory. Writes are atomic and fsynced, like the hot store's.
    Only the default archive (``STORE/archive``) is created when missing; a configured
    directory must exist, so that an unmounted archive disk is an error, not an empty
    folder on the hot disk."""
    return ObjectArchive(LocalObjects(root, create=create, writer=write_file_atomic))


def S3Archive(client, bucket: str, prefix: str = "") -> ObjectArchive:  # noqa: N802
    """An archive in an S3-compatible object store (:class:`~server.objects.S3Objects`:
    Content-MD5 and SHA-256 metadata on every PUT, checked by a HEAD; the migration
    still reads every object back and checks its SHA-256 before it deletes anything)."""
    return ObjectArchive(S3Objects(client, bucket, prefix))


def open_archive(url: str, store_root: str | Path) -> Archive:
    """The archive at ``url``: "" (``STORE/archive``), a directory, or s3://bucket/prefix
    (needs boto3; endpoint from ``MEDVIEW_S3_ENDPOINT`` for S3-compatible servers)."""
    if not url:
        return DirectoryArchive(Path(store_root) / ARCHIVE_DIR, create=True)
    if Path(url).resolve() == (Path(store_root) / ARCHIVE_DIR).resolve():
        return DirectoryArchive(url, create=True)
    if url.startswith("s3://"):
        try:
            return ObjectArchive(open_objects(url))
        except ObjectError as e:
            raise ArchiveError(f"the archive {url}: {e}") from None
    return DirectoryArchive(url)


# --------------------------------------------------------------------------- state
@dataclass(frozen=True)
class FrameTier:
    frame_pk: int
    state: str
    hot_layers: int
    head_relpath: str
    head_sha256: str
    head_size: int
    archive: str
    tail_key: str
    tail_sha256: str
    tail_size: int
    migrated_at: float
    recalled_at: float | None


_FT_COLS = ("frame_pk", "state", "hot_layers", "head_relpath", "head_sha256", "head_size",
            "archive", "tail_key", "tail_sha256", "tail_size", "migrated_at", "recalled_at")


@dataclass
class MigrationReport:
    frames_archived: int = 0
    originals_archived: int = 0
    finals_archived: int = 0          # final copies (server.policy_copies)
    bytes_archived: int = 0           # tails + originals written to the archive
    bytes_freed: int = 0              # hot bytes released
    finished: int = 0                 # pending deletions completed (an earlier crash)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        finals = f" and {self.finals_archived} final copies" if self.finals_archived else ""
        return (f"{self.frames_archived} codestreams and {self.originals_archived} originals"
                f"{finals} archived, {self.bytes_archived} bytes to the archive, {self.bytes_freed} "
                f"bytes freed in the hot store, {self.finished} pending steps finished, "
                f"{len(self.errors)} errors")


def _iso_cutoff(now: float, days: float) -> str:
    return datetime.fromtimestamp(now - days * 86400, timezone.utc).isoformat(timespec="seconds")


class Tiers:
    """Where the parts of every image are, migration and recall.

    ``versions(series_uid) -> SeriesVersions`` gives the layer count of each version
    (used to find the ``keep_hot`` truncation point); ``status_of(study_uid) -> int`` the
    diagnosis status (for ``min_status``).
    """

    def __init__(self, store: Store, *, versions=None, status_of=None,
                 settings=None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        store.catalogue                   # its tables first (the foreign keys name them)
        # versioned: a table or column added later is a new step, never an edit of a step
        self.db = Db(store.database, component="tiers",
                     migrations={1: _DDL, 2: _TRIGGERS, 3: _FINAL_DDL})
        self.versions = versions
        self.status_of = status_of
        self.settings = settings          # () -> StorageSettings
        self.clock = clock
        self._archives: dict[str, Archive] = {}
        self._arch_lock = threading.Lock()
        self._locks: dict[tuple, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    # ---------------------------------------------------------------- helpers
    def archive(self, url: str | None = None) -> Archive:
        if url is None:
            url = self.settings().archive if self.settings else ""
        with self._arch_lock:
            a = self._archives.get(url)
            if a is None:
                a = self._archives[url] = open_archive(url, self.store.root)
                if url:                     # the same archive under its resolved name
                    self._archives.setdefault(a.url, a)
            return a

    def _archive_of(self, url: str) -> Archive:
        # rows record the resolved URL; the default directory is STORE/archive
        with self._arch_lock:
            a = self._archives.get(url)
        return a or self.archive(url)

    def _lock(self, key: tuple) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(key, threading.Lock())

    @staticmethod
    def head_relpath(codestream_relpath: str) -> str:
        return codestream_relpath.removesuffix(".j2k") + ".head"

    @staticmethod
    def tail_key(codestream_relpath: str) -> str:
        return codestream_relpath.removesuffix(".j2k") + ".tail"

    def _frame_tier(self, frame_pk: int) -> FrameTier | None:
        row = self.db.one(f"SELECT {', '.join(_FT_COLS)} FROM frame_tier WHERE frame_pk = ?",
                          (frame_pk,))
        return FrameTier(*row) if row else None

    def frame_states(self, series_uid: str) -> dict[tuple[str, int], tuple[int, FrameTier | None]]:
        """(SOP Instance UID, frame) -> (frame pk, tier row or None) for a series."""
        rows = self.db.all(
            "SELECT i.SOPInstanceUID, f.frame_number, f.pk, "
            + ", ".join(f"t.{c}" for c in _FT_COLS)
            + " FROM frame f JOIN instance i ON f.instance_pk = i.pk"
              " JOIN series se ON i.series_pk = se.pk"
              " LEFT JOIN frame_tier t ON t.frame_pk = f.pk WHERE se.SeriesInstanceUID = ?",
            (series_uid,))
        return {(r[0], r[1]): (r[2], FrameTier(*r[3:]) if r[3] is not None else None) for r in rows}

    def _frame_pk(self, sop: str, frame: int) -> int | None:
        row = self.db.one("SELECT f.pk FROM frame f JOIN instance i ON f.instance_pk = i.pk "
                          "WHERE i.SOPInstanceUID = ? AND f.frame_number = ?", (sop, frame))
        return row[0] if row else None

    def original_state(self, sop: str) -> tuple[int, str | None, str | None, str | None]:
        """(instance pk, state or None, archive url, archive key) of an instance."""
        row = self.db.one("SELECT i.pk, t.state, t.archive, t.archive_key FROM instance i "
                          "LEFT JOIN original_tier t ON t.instance_pk = i.pk "
                          "WHERE i.SOPInstanceUID = ?", (sop,))
        if row is None:
            raise StoreError(f"unknown instance {sop}")
        return row

    # ---------------------------------------------------------------- reading
    def read_codestream(self, row: dict) -> bytes:
        """The whole codestream of a ``series_images`` row, recalled if archived."""
        pk = self._frame_pk(row["SOPInstanceUID"], row["frame"])
        t = self._frame_tier(pk) if pk is not None else None
        if t is None or t.state == "recalled":
            try:
                return self.store.read_verified(row["codestream_relpath"], row["codestream_sha256"])
            except StoreIntegrityError as e:
                t = self._frame_tier(pk) if pk is not None else None
                if e.problem != "file is missing" or t is None or t.state != "archived":
                    raise
        return self.recall_frame(row, pk)

    def read_head(self, row: dict, t: FrameTier) -> bytes:
        """The hot part of an archived codestream; if it was recalled meanwhile, the whole
        codestream (callers tell them apart by length)."""
        try:
            return self.store.read_verified(t.head_relpath, t.head_sha256, t.head_size)
        except StoreIntegrityError as e:
            if e.problem != "file is missing":
                raise
            return self.read_codestream(row)

    def recall_frame(self, row: dict, frame_pk: int | None = None) -> bytes:
        """Bring an archived codestream back to the hot store; returns its bytes."""
        pk = frame_pk if frame_pk is not None else self._frame_pk(row["SOPInstanceUID"], row["frame"])
        with self._lock(("frame", pk)):
            t = self._frame_tier(pk)
            if t is None or t.state != "archived":
                return self.store.read_verified(row["codestream_relpath"], row["codestream_sha256"])
            index = PacketIndex.from_json(self.store.read_verified(row["index_relpath"],
                                                                   row["index_sha256"]))
            head = self.store.read_verified(t.head_relpath, t.head_sha256, t.head_size)
            tail = self._archive_of(t.archive).get(t.tail_key)
            if len(tail) != t.tail_size or sha256_hex(tail) != t.tail_sha256:
                raise ArchiveError(f"archive object {t.tail_key} is damaged (checksum mismatch)")
            cs = join_layers(head, tail, index, t.hot_layers)
            if sha256_hex(cs) != row["codestream_sha256"]:
                raise StoreIntegrityError(row["codestream_relpath"],
                                          "head + tail do not rebuild the ingested codestream")
            with self.db.transaction():          # serialised with every other process
                if self._state(pk) != "archived":
                    return self.store.read_verified(row["codestream_relpath"],
                                                    row["codestream_sha256"])
                self.store.atomic_write(row["codestream_relpath"], cs)
                faults.point("recall.written")
                self.db.execute("UPDATE frame_tier SET state = 'recalled', recalled_at = ? "
                                "WHERE frame_pk = ?", (self.clock(), pk))
            faults.point("recall.committed")
            self._delete_if(pk, "recalled", t.head_relpath)
            log.info("recalled %s from %s", row["codestream_relpath"], t.archive)
            return cs

    # Every state change and every deletion runs inside a write transaction of the
    # catalogue that first re-reads the state: SQLite's write lock serialises them with
    # the server and with a migration running in another process, so no step can delete
    # a file that another one has just made the only copy of.
    def _state(self, frame_pk: int) -> str | None:
        row = self.db.one("SELECT state FROM frame_tier WHERE frame_pk = ?", (frame_pk,))
        return row[0] if row else None

    def _original_state(self, instance_pk: int) -> str | None:
        row = self.db.one("SELECT state FROM original_tier WHERE instance_pk = ?", (instance_pk,))
        return row[0] if row else None

    def _delete_if(self, frame_pk: int, state: str, relpath: str) -> bool:
        """Delete a hot file if the frame is (still) in ``state``."""
        with self.db.transaction():
            if self._state(frame_pk) == state:
                return self.store.delete_file(relpath)
        return False

    def _delete_original_if_archived(self, instance_pk: int, relpath: str) -> bool:
        with self.db.transaction():
            if self._original_state(instance_pk) == "archived":
                return self.store.delete_file(relpath)
        return False

    def read_original(self, inst: dict) -> bytes:
        """The original DICOM file of an instance (``find_instance`` row), recalled if
        archived."""
        pk, state, url, key = self.original_state(inst["SOPInstanceUID"])
        if state != "archived":
            try:
                return self.store.read_verified(inst["original_relpath"], inst["original_sha256"])
            except StoreIntegrityError as e:
                pk, state, url, key = self.original_state(inst["SOPInstanceUID"])
                if e.problem != "file is missing" or state != "archived":
                    raise
        with self._lock(("original", pk)):
            data = self._archive_of(url).get(key)
            if sha256_hex(data) != inst["original_sha256"]:
                raise ArchiveError(f"archive object {key} is damaged (checksum mismatch)")
            with self.db.transaction():
                if self._original_state(pk) == "archived":
                    self.store.atomic_write(inst["original_relpath"], data)
                    faults.point("recall.original-written")
                    self.db.execute("UPDATE original_tier SET state = 'recalled', "
                                    "recalled_at = ? WHERE instance_pk = ?", (self.clock(), pk))
                    return data
            return self.store.read_verified(inst["original_relpath"], inst["original_sha256"])

    # ---------------------------------------------------------------- migration
    def finish_pending(self) -> int:
        """Complete the deletions a crash interrupted (each only after checking that the
        data it would remove is safe elsewhere); returns how many were done."""
        done = 0
        rows = self.db.all(
            "SELECT f.codestream_relpath, " + ", ".join(f"t.{c}" for c in _FT_COLS)
            + " FROM frame_tier t JOIN frame f ON t.frame_pk = f.pk")
        for r in rows:
            full, t = r[0], FrameTier(*r[1:])
            if t.state == "archived" and self.store.exists(full):
                if (self.store.check_file(t.head_relpath, t.head_sha256, t.head_size) is None
                        and self._archive_of(t.archive).exists(t.tail_key)):
                    done += self._delete_if(t.frame_pk, "archived", full)
            elif t.state == "recalled" and self.store.exists(t.head_relpath):
                done += self._delete_if(t.frame_pk, "recalled", t.head_relpath)
        for ipk, rel, url, key in self.db.all(
                "SELECT i.pk, i.original_relpath, t.archive, t.archive_key FROM original_tier t "
                "JOIN instance i ON t.instance_pk = i.pk WHERE t.state = 'archived'"):
            if self.store.exists(rel) and self._archive_of(url).exists(key):
                done += self._delete_original_if_archived(ipk, rel)
        for ipk, rel, sha, url, key in self._archived_finals():
            if self.store.exists(rel) and self._archive_of(url).exists(key):
                done += self._delete_final_if_archived(ipk, sha, rel)
        return done

    def candidates(self, days: float, min_status: int) -> list[dict]:
        """Instances old enough (ingested, or last recalled, ``days`` ago) whose study is at
        least at ``min_status``, with what is still hot."""
        now = self.clock()
        cutoff_iso, cutoff = _iso_cutoff(now, days), now - days * 86400
        rows = self.db.all(
            "SELECT i.pk, i.SOPInstanceUID, se.SeriesInstanceUID, st.StudyInstanceUID,"
            " i.ingested_at, i.original_relpath, i.original_sha256, i.original_size,"
            " ot.state, ot.recalled_at"
            " FROM instance i JOIN series se ON i.series_pk = se.pk"
            " JOIN study st ON se.study_pk = st.pk"
            " LEFT JOIN original_tier ot ON ot.instance_pk = i.pk"
            " WHERE i.ingested_at <= ? ORDER BY se.SeriesInstanceUID, i.pk", (cutoff_iso,))
        out = []
        status_cache: dict[str, int] = {}
        for (pk, sop, series, study, _ing, orel, osha, osize, ostate, orec) in rows:
            if self.status_of is not None and min_status > 1:
                if study not in status_cache:
                    status_cache[study] = int(self.status_of(study))
                if status_cache[study] < min_status:
                    continue
            frames = self.db.all(
                "SELECT f.pk, f.frame_number, f.codestream_relpath, f.codestream_sha256,"
                " f.codestream_size, f.index_relpath, f.index_sha256, t.state, t.recalled_at"
                " FROM frame f LEFT JOIN frame_tier t ON t.frame_pk = f.pk"
                " WHERE f.instance_pk = ? ORDER BY f.frame_number", (pk,))
            todo = [f for f in frames
                    if f[7] is None or (f[7] == "recalled" and (f[8] or 0) <= cutoff)]
            orig_todo = ostate is None or (ostate == "recalled" and (orec or 0) <= cutoff)
            if todo or orig_todo:
                out.append({"pk": pk, "sop": sop, "series": series, "study": study,
                            "original": (orel, osha, osize) if orig_todo else None,
                            "frames": todo})
        return out

    def migrate(self, *, days: float | None = None, archive: str | None = None,
                keep_hot: str | None = None, min_status: int | None = None,
                log_fn: Callable[[str], None] = lambda m: None,
                should_stop: Callable[[], bool] = lambda: False) -> MigrationReport:
        """Move what is old enough to the archive (see the module docstring)."""
        st = self.settings() if self.settings else None
        days = st.migrate_after_days if days is None else days
        keep_hot = (st.keep_hot if st else "V2") if keep_hot is None else keep_hot
        min_status = (st.min_status if st else 1) if min_status is None else min_status
        arch = self.archive(archive if archive is not None else (st.archive if st else ""))
        report = MigrationReport()
        report.finished = self.finish_pending()
        for inst in self.candidates(days, min_status):
            if should_stop():
                break
            try:
                self._migrate_instance(inst, arch, keep_hot, report)
            except (StoreError, OSError, ValueError) as e:
                msg = f"instance {inst['sop']}: {e}"
                log.error("migration: %s", msg)
                report.errors.append(msg)
            log_fn(f"{inst['sop']}: done")
        self._migrate_finals(days, min_status, arch, report, should_stop)
        return report

    def _keep_layers(self, series: str, keep_hot: str) -> int | None:
        if self.versions is None:
            raise StoreError("no version table: cannot find the keep_hot truncation point")
        sv = self.versions(series)
        if sv is None:
            return None
        v = sv.get(keep_hot)
        if v is None:
            raise StoreError(f"keep_hot version {keep_hot!r} is not defined")
        return None if v.lossless else v.layers

    def _migrate_instance(self, inst: dict, arch: Archive, keep_hot: str,
                          report: MigrationReport) -> None:
        keep = self._keep_layers(inst["series"], keep_hot) if inst["frames"] else None
        for (fpk, _fno, rel, sha, size, irel, isha, state, _rec) in inst["frames"]:
            if keep is None:
                report.skipped.append(f"{rel}: keep_hot is lossless, nothing to archive")
                continue
            with self._lock(("frame", fpk)):
                cs = self.store.read_verified(rel, sha, size)
                index = PacketIndex.from_json(self.store.read_verified(irel, isha))
                head, tail = split_by_layers(cs, index, keep)
                tkey, hrel = self.tail_key(rel), self.head_relpath(rel)
                tsha, hsha = sha256_hex(tail), sha256_hex(head)
                if state == "recalled":        # the tail is in the archive already: check it
                    t = self._frame_tier(fpk)
                    old = self._archive_of(t.archive)
                    got = old.get(t.tail_key)
                    if sha256_hex(got) != t.tail_sha256 or t.tail_sha256 != tsha:
                        raise ArchiveError(f"archive object {t.tail_key} is damaged")
                    url, tkey = t.archive, t.tail_key
                else:
                    arch.put(tkey, tail)
                    if sha256_hex(arch.get(tkey)) != tsha:
                        raise ArchiveError(f"archive copy of {tkey} does not verify")
                    url = arch.url
                    report.bytes_archived += len(tail)
                faults.point("migrate.tail-copied")
                self.store.atomic_write(hrel, head)
                problem = self.store.check_file(hrel, hsha, len(head))
                if problem:
                    raise StoreIntegrityError(hrel, problem)
                faults.point("migrate.head-written")
                with self.db.transaction():
                    if self._state(fpk) != state:
                        raise StoreError(f"{rel} changed tier meanwhile; left for the next run")
                    self.db.execute(
                        "INSERT INTO frame_tier (" + ", ".join(_FT_COLS) + ") VALUES "
                        "(?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(frame_pk) DO UPDATE SET "
                        "state = 'archived', hot_layers = excluded.hot_layers, "
                        "head_relpath = excluded.head_relpath, head_sha256 = excluded.head_sha256, "
                        "head_size = excluded.head_size, migrated_at = excluded.migrated_at, "
                        "recalled_at = NULL",
                        (fpk, "archived", keep, hrel, hsha, len(head), url, tkey, tsha,
                         len(tail), self.clock(), None))
                faults.point("migrate.committed")
                self._delete_if(fpk, "archived", rel)
                report.frames_archived += 1
                report.bytes_freed += len(cs) - len(head)
        if inst["original"] is not None:
            rel, sha, size = inst["original"]
            with self._lock(("original", inst["pk"])):
                data = self.store.read_verified(rel, sha, size)
                pk, state, url, key = self.original_state(inst["sop"])
                a, key = self._archive_copy(data, rel, sha, state, url, key, arch, report)
                faults.point("migrate.original-copied")
                with self.db.transaction():
                    if self._original_state(pk) != state:
                        raise StoreError(f"{rel} changed tier meanwhile; left for the next run")
                    self.db.execute(
                        "INSERT INTO original_tier (instance_pk, state, archive, archive_key,"
                        " migrated_at, recalled_at) VALUES (?,?,?,?,?,NULL) "
                        "ON CONFLICT(instance_pk) DO UPDATE SET state = 'archived',"
                        " migrated_at = excluded.migrated_at, recalled_at = NULL",
                        (pk, "archived", a.url, key, self.clock()))
                faults.point("migrate.original-committed")
                self._delete_original_if_archived(pk, rel)
                report.originals_archived += 1
                report.bytes_freed += len(data)

    def _archive_copy(self, data: bytes, rel: str, sha: str, state: str | None, url: str,
                      key: str, arch: Archive, report) -> tuple[Archive, str]:
        """The archive copy of a whole file (an original, a final copy), checked against its
        SHA-256: a recalled file's copy is still in its archive (checked, not sent again);
        else ``data`` goes to ``arch`` under the store-relative path and is read back."""
        if state == "recalled":
            a = self._archive_of(url)
            if sha256_hex(a.get(key)) != sha:
                raise ArchiveError(f"archive object {key} is damaged")
            return a, key
        arch.put(rel, data)
        if sha256_hex(arch.get(rel)) != sha:
            raise ArchiveError(f"archive copy of {rel} does not verify")
        report.bytes_archived += len(data)
        return arch, rel

    # ---------------------------------------------------------------- final copies
    def _final_state(self, instance_pk: int, sha256: str) -> tuple[str | None, str, str]:
        """(state or None, archive url, key) of the final copy with this SHA-256."""
        row = self.db.one("SELECT state, archive, archive_key FROM final_tier "
                          "WHERE instance_pk = ? AND sha256 = ?", (instance_pk, sha256))
        return (row[0], row[1], row[2]) if row else (None, "", "")

    def _archived_finals(self) -> list[tuple]:
        if not self.db.table_exists("policy_copy"):
            return []
        return self.db.all(
            "SELECT t.instance_pk, c.relpath, c.sha256, t.archive, t.archive_key"
            " FROM final_tier t JOIN policy_copy c ON c.instance_pk = t.instance_pk"
            " AND c.sha256 = t.sha256 WHERE t.state = 'archived'")

    def _delete_final_if_archived(self, instance_pk: int, sha256: str, relpath: str) -> bool:
        with self.db.transaction():
            if self._final_state(instance_pk, sha256)[0] == "archived":
                return self.store.delete_file(relpath)
        return False

    def final_present(self, copy: dict) -> bool:
        """True if a final copy (``policy_copy`` row) is intact: hot with its checksum,
        or archived (the archive copy was verified when it was made)."""
        if self.store.check_file(copy["relpath"], copy["sha256"], copy["size"]) is None:
            return True
        return self._final_state(copy["instance_pk"], copy["sha256"])[0] == "archived"

    def read_final(self, inst: dict, copy: dict) -> bytes:
        """The final copy (``policy_copy`` row) of an instance (``find_instance`` row),
        recalled from the archive if it was moved; a copy that is the original itself
        (kept as it arrived) is read as the original."""
        if copy["relpath"] == inst.get("original_relpath"):
            return self.read_original(inst)
        pk, sha = copy["instance_pk"], copy["sha256"]
        state, url, key = self._final_state(pk, sha)
        if state != "archived":
            try:
                return self.store.read_verified(copy["relpath"], sha, copy["size"])
            except StoreIntegrityError as e:
                state, url, key = self._final_state(pk, sha)
                if e.problem != "file is missing" or state != "archived":
                    raise
        with self._lock(("final", pk)):
            data = self._archive_of(url).get(key)
            if sha256_hex(data) != sha:
                raise ArchiveError(f"archive object {key} is damaged (checksum mismatch)")
            with self.db.transaction():
                if self._final_state(pk, sha)[0] == "archived":
                    self.store.atomic_write(copy["relpath"], data)
                    self.db.execute("UPDATE final_tier SET state = 'recalled', recalled_at = ?"
                                    " WHERE instance_pk = ?", (self.clock(), pk))
                    return data
            return self.store.read_verified(copy["relpath"], sha, copy["size"])

    def _migrate_finals(self, days: float, min_status: int, arch: Archive,
                        report: MigrationReport, should_stop: Callable[[], bool]) -> None:
        """Move the final copies old enough (the original's age) to the archive: copy,
        read back, commit, delete (as for originals)."""
        if not self.db.table_exists("policy_copy"):
            return
        now = self.clock()
        cutoff_iso, cutoff = _iso_cutoff(now, days), now - days * 86400
        rows = self.db.all(
            "SELECT c.instance_pk, c.sop, c.relpath, c.sha256, c.size, st.StudyInstanceUID,"
            " t.state, t.recalled_at, t.archive, t.archive_key"
            " FROM policy_copy c JOIN instance i ON c.instance_pk = i.pk"
            " JOIN series se ON i.series_pk = se.pk JOIN study st ON se.study_pk = st.pk"
            " LEFT JOIN final_tier t ON t.instance_pk = c.instance_pk AND t.sha256 = c.sha256"
            " WHERE c.relpath IS NOT NULL AND c.relpath <> i.original_relpath"
            " AND c.verified IN ('bit-exact', 'byte copy') AND i.ingested_at <= ?"
            " ORDER BY c.instance_pk", (cutoff_iso,))
        status_cache: dict[str, int] = {}
        for pk, sop, rel, sha, size, study, state, rec, url, key in rows:
            if should_stop():
                break
            if state == "archived" or (state == "recalled" and (rec or 0) > cutoff):
                continue
            if self.status_of is not None and min_status > 1:
                if study not in status_cache:
                    status_cache[study] = int(self.status_of(study))
                if status_cache[study] < min_status:
                    continue
            try:
                with self._lock(("final", pk)):
                    data = self.store.read_verified(rel, sha, size)
                    a, key = self._archive_copy(data, rel, sha, state, url, key, arch, report)
                    faults.point("migrate.final-copied")
                    with self.db.transaction():
                        if self._final_state(pk, sha)[0] != state:
                            raise StoreError(f"{rel} changed tier meanwhile; left for the next run")
                        self.db.execute(
                            "INSERT INTO final_tier (instance_pk, state, sha256, archive,"
                            " archive_key, migrated_at, recalled_at) VALUES (?,?,?,?,?,?,NULL)"
                            " ON CONFLICT(instance_pk) DO UPDATE SET state = 'archived',"
                            " sha256 = excluded.sha256, archive = excluded.archive,"
                            " archive_key = excluded.archive_key,"
                            " migrated_at = excluded.migrated_at, recalled_at = NULL",
                            (pk, "archived", sha, a.url, key, self.clock()))
                    faults.point("migrate.final-committed")
                    self._delete_final_if_archived(pk, sha, rel)
                    report.finals_archived += 1
                    report.bytes_freed += len(data)
            except (StoreError, OSError, ValueError) as e:
                msg = f"final copy of {sop}: {e}"
                log.error("migration: %s", msg)
                report.errors.append(msg)

    # ---------------------------------------------------------------- summary
    def summary(self) -> dict:
        """Counts and bytes per tier state."""
        f = self.db.all("SELECT state, COUNT(*), SUM(head_size), SUM(tail_size) FROM frame_tier "
                        "GROUP BY state")
        o = self.db.all("SELECT t.state, COUNT(*), SUM(i.original_size) FROM original_tier t "
                        "JOIN instance i ON t.instance_pk = i.pk GROUP BY t.state")
        return {"frames": {s: {"count": n, "head_bytes": h or 0, "tail_bytes": tb or 0}
                           for s, n, h, tb in f},
                "originals": {s: {"count": n, "bytes": b or 0} for s, n, b in o}}

    # ---------------------------------------------------------------- fsck
    def fsck(self, refs: list[tuple[str, str, int, str]], report: FsckReport, repair: bool
             ) -> list[tuple[str, str, int, str]]:
        """Adjust the hot-store references for tiered files (an archived codestream is
        its head; an archived original is not in the hot store), then check every
        archived object and list archive orphans (``repair`` deletes them)."""
        tiered = self.db.all(
            "SELECT f.codestream_relpath, i.SOPInstanceUID, " + ", ".join(f"t.{c}" for c in _FT_COLS)
            + " FROM frame_tier t JOIN frame f ON t.frame_pk = f.pk"
              " JOIN instance i ON f.instance_pk = i.pk")
        head_for = {}
        archive_refs: list[tuple[str, str, str, int, str]] = []   # url, key, sha, size, sop
        for r in tiered:
            full, sop, t = r[0], r[1], FrameTier(*r[2:])
            if t.state == "archived":
                head_for[full] = (t.head_relpath, t.head_sha256, t.head_size)
            archive_refs.append((t.archive, t.tail_key, t.tail_sha256, t.tail_size, sop))
        archived_orig = set()
        for rel, sha, size, sop, state, url, key in self.db.all(
                "SELECT i.original_relpath, i.original_sha256, i.original_size, i.SOPInstanceUID,"
                " t.state, t.archive, t.archive_key FROM original_tier t"
                " JOIN instance i ON t.instance_pk = i.pk"):
            if state == "archived":
                archived_orig.add(rel)
            archive_refs.append((url, key, sha, size, sop))
        if self.db.table_exists("policy_copy"):
            for rel, sha, size, sop, state, url, key in self.db.all(
                    "SELECT c.relpath, c.sha256, c.size, c.sop, t.state, t.archive,"
                    " t.archive_key FROM final_tier t JOIN policy_copy c"
                    " ON c.instance_pk = t.instance_pk AND c.sha256 = t.sha256"):
                if state == "archived":
                    archived_orig.add(rel)
                archive_refs.append((url, key, sha, size, sop))
        out = []
        for rel, sha, size, sop in refs:
            if rel in archived_orig:
                continue
            if rel in head_for:
                rel, sha, size = head_for[rel]
            out.append((rel, sha, size, sop))
        referenced: dict[str, set[str]] = {}
        for url, key, sha, size, sop in archive_refs:
            referenced.setdefault(url, set()).add(key)
            report.checked += 1
            name = f"{ARCHIVE_PREFIX}{key}"
            try:
                data = self._archive_of(url).get(key)
            except ArchiveError as e:
                report.missing.append((name, sop, str(e)))
                continue
            if len(data) != size or sha256_hex(data) != sha:
                report.damaged.append((name, sop, "size or SHA-256 does not match the catalogue"))
        for url, keys in referenced.items():
            try:
                a = self._archive_of(url)
                listing = list(a.keys())
            except ArchiveError as e:          # unreachable: its objects are reported above
                log.error("fsck cannot list the archive %s: %s", url, e)
                continue
            for key in listing:
                if key not in keys:
                    name = f"{ARCHIVE_PREFIX}{key}"
                    report.orphans.append(name)
                    if repair:
                        a.delete(key)
                        report.removed.append(name)
        return out


def tier_fsck(store: Store, refs, report: FsckReport, repair: bool):
    """The :func:`server.fsck.fsck` hook: a no-op for a store that never migrated."""
    db = Db(store.database)
    try:
        if not db.table_exists("frame_tier"):
            return refs
    finally:
        db.close()
    tiers = Tiers(store)
    try:
        return tiers.fsck(refs, report, repair)
    finally:
        tiers.close()
