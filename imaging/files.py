"""Durable files: atomic writes (temp file, fsync, rename, fsync of the folder) and
checksums. The one implementation used by the server's store, the slide store, the
client's caches and the tools; pure standard library, so every layer may use it."""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

TMP_MARK = ".tmp-"


def sha256_file(path: Path, chunk: int = 1 << 20) -> tuple[str, int]:
    """(SHA-256 hex, size) of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def fsync_dir(path: Path) -> None:
    """Make a rename/creation in ``path`` durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file_atomic(target: Path, data: bytes, *, sync_dir: bool = True,
                      sync_file: bool = True) -> None:
    """Write ``data`` to ``target`` atomically and durably: a temp file in the same
    folder (named with TMP_MARK, so fsck recognises leftovers), fsync, rename, fsync of
    the folder. A crash leaves the old file or the new one, never a mix.

    ``sync_file=False`` (a batch: :func:`make_durable` afterwards, before anything refers
    to the file) leaves the fsync out: until then a crash may leave the new name with
    incomplete content, so only a batch writing names nothing refers to yet may do it."""
    tmp = target.with_name(f".{target.name}{TMP_MARK}{uuid.uuid4().hex}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            if sync_file:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    if sync_dir:                # a batch may make its names durable once per folder
        fsync_dir(target.parent)



def write_atomic(path: Path, data: bytes, *, sync_dir: bool = True) -> str:
    """:func:`write_file_atomic`, creating the folder first; returns the SHA-256 hex."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, data, sync_dir=sync_dir)
    return hashlib.sha256(data).hexdigest()


def fsync_dirs(dirs) -> None:
    """:func:`fsync_dir` of each folder once (the names written by a batch)."""
    for d in set(map(Path, dirs)):
        fsync_dir(d)


def _syncfs(path: Path) -> bool:
    """Linux ``syncfs``: everything written to the file system holding ``path`` is on
    disk when it returns (True), or False where it is not available or failed."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return fn(fd) == 0
    finally:
        os.close(fd)


def make_durable(files, dirs, root: Path) -> None:
    """Make a batch of :func:`write_file_atomic` writes (``sync_file=False,
    sync_dir=False``) durable: one ``syncfs`` of the file system under ``root`` (every
    file's content and every rename at once), or, where that is not available, an fsync
    of each file and then of each folder. Raises OSError if a file cannot be synced."""
    if _syncfs(Path(root)):
        return
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dirs(dirs)


def is_temp_name(name: str) -> bool:
    """A temporary file left by :func:`write_file_atomic` (an interrupted write)."""
    return name.startswith(".") and TMP_MARK in name


def ensure_dir(d: Path, dirs: set | None = None) -> None:
    """``d`` and its missing parents created, each new directory entry made durable now,
    or, with ``dirs`` (a batch's folders: :func:`make_durable` later), left to the batch:
    the folders holding the new entries are added to ``dirs``."""
    d = Path(d)
    if d.is_dir():
        return
    missing = []
    p = d
    while not p.exists():
        missing.append(p)
        p = p.parent
    d.mkdir(parents=True, exist_ok=True)
    for m in reversed(missing):
        if dirs is not None:
            dirs.add(m.parent)
        else:
            fsync_dir(m.parent)
