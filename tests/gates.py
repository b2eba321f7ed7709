"""Jobs for concurrency tests: they hold their worker until a gate opens and count how
many of them ran at the same time."""
from __future__ import annotations

import threading

from waits import WAIT_S


class Gated:
    """``fn(*_)`` (a pool or SR job): marks ``first``, waits for ``gate``, returns True;
    ``peak`` is the most that ran at once."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.first = threading.Event()
        self.peak = 0
        self._now = 0
        self._lock = threading.Lock()

    def __call__(self, *_args) -> bool:
        with self._lock:
            self._now += 1
            self.peak = max(self.peak, self._now)
        self.first.set()
        self.gate.wait(WAIT_S)
        with self._lock:
            self._now -= 1
        return True
