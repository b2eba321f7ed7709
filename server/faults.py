"""Fault injection for crash-safety tests: ``kill -9`` at a named point.

Production code calls :func:`point` at the moments a crash is most dangerous (between
copying and committing, between committing and deleting...). Nothing happens unless the
environment variable ``MEDVIEW_FAULTS`` names the point, as ``name=N`` (comma separated):
then the N-th time the process reaches that point it sends itself SIGKILL, exactly as a
power cut or ``kill -9`` would stop it (no cleanup, no flush, no atexit).

Points: ``migrate.tail-copied``, ``migrate.head-written``, ``migrate.committed``,
``migrate.original-copied``, ``migrate.original-committed``, ``recall.written``,
``recall.committed``, ``recall.original-written``, ``objects.put`` (before a store
file goes to a remote object store), ``objects.put-sent`` (the S3 PUT done, not yet
checked), ``ingest.worker`` (an ingest worker process, before it decodes a file).

Damage, too: :func:`damage` returns the bytes it is given with some of them changed the
N-th time a named point is reached (``ingest.codestream-unverified``: a codestream whose
lossless layer is left to the verifier, changed just before it is written, as a bad disk
or a bug between encoding and verification would: :mod:`server.verify` must catch it).

A full disk, too: with ``disk-full`` in ``MEDVIEW_FAULTS`` (or after
:func:`set_disk_full`), every database write transaction and every store file write
fails with ``ENOSPC`` (:func:`check_disk`, called at those two write points) and
:func:`free_bytes` reports no free space — what a full file system does, without needing
one. The tests also use a real small file system where ``mount`` is allowed.
"""
from __future__ import annotations

import errno
import os
import signal
import threading

_counts: dict[str, int] = {}
_lock = threading.Lock()


def _plan() -> dict[str, int]:
    out = {}
    for part in os.environ.get("MEDVIEW_FAULTS", "").split(","):
        name, _, n = part.strip().partition("=")
        if name:
            out[name] = int(n or 1)
    return out


def point(name: str) -> None:
    """Die here (SIGKILL) if ``MEDVIEW_FAULTS`` asks for it."""
    if "MEDVIEW_FAULTS" not in os.environ:
        return
    want = _plan().get(name)
    if want is None:
        return
    with _lock:
        _counts[name] = _counts.get(name, 0) + 1
        hit = _counts[name] == want
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)


def damage(name: str, data: bytes) -> bytes:
    """``data``, or a copy with 32 bytes before its last two changed if ``MEDVIEW_FAULTS``
    names this point and this is its N-th time (a JPEG 2000 codestream keeps its EOC
    marker, so the damage is in the data of its last packets)."""
    if "MEDVIEW_FAULTS" not in os.environ:
        return data
    want = _plan().get(name)
    if want is None:
        return data
    with _lock:
        _counts[name] = _counts.get(name, 0) + 1
        hit = _counts[name] == want
    if not hit or len(data) < 40:
        return data
    b = bytearray(data)
    for i in range(len(b) - 34, len(b) - 2):
        v = b[i] ^ 0x5A
        b[i] = 0 if v == 0xFF else v
    return bytes(b)


def reset() -> None:
    """Forget how often each point was reached (tests, between two cases)."""
    with _lock:
        _counts.clear()


_disk_full: bool | None = None            # None: as MEDVIEW_FAULTS says


def set_disk_full(full: bool | None) -> None:
    """Simulate a full disk in this process (None: back to ``MEDVIEW_FAULTS``)."""
    global _disk_full
    _disk_full = full


def disk_full() -> bool:
    if _disk_full is not None:
        return _disk_full
    return "MEDVIEW_FAULTS" in os.environ and "disk-full" in _plan()


def check_disk(where: str) -> None:
    """Raise ``OSError(ENOSPC)`` at a write point while a full disk is simulated."""
    if disk_full():
        raise OSError(errno.ENOSPC, f"No space left on device (simulated at {where})")


def free_bytes(path) -> int:
    """Free bytes for unprivileged writers on the file system of ``path`` (0 while a
    full disk is simulated)."""
    if disk_full():
        return 0
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
