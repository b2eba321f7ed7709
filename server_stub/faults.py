"""Fault injection for crash-safety tests: ``kill -9`` at a named point.

Production code calls :func:`point` at the moments a crash is most dangerous (between
copying and committing, between committing and deleting...). Nothing happens unless the
environment variable ``MEDVIEW_FAULTS`` names the point, as ``name=N`` (comma separated):
then the N-th time the process reaches that point it sends itself SIGKILL, exactly as a
power cut or ``kill -9`` would stop it (no cleanup, no flush, no atexit).

Points: ``migrate.tail-copied``, ``migrate.head-written``, ``migrate.committed``,
``migrate.original-copied``, ``migrate.original-committed``, ``recall.written``,
``recall.committed``, ``recall.original-written``.
"""
from __future__ import annotations

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
