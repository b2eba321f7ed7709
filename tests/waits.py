"""Limits for the waits in tests.

Waits follow events: a signal, a condition polled, a thread or process joined, a future's
result. The limit only bounds a hang; it is never what a test measures, so it is generous
(a loaded 2-core machine running the whole suite must never reach it).
``MEDVIEW_TEST_WAIT_S`` overrides it (seconds).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable

WAIT_S = float(os.environ.get("MEDVIEW_TEST_WAIT_S", "300"))
WAIT_MS = int(WAIT_S * 1000)


def wait_for(cond: Callable[[], object], timeout: float = WAIT_S, what: str = "condition",
             interval: float = 0.01):
    """Poll ``cond`` until it is true (returns its value); AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Clock:
    """A clock the test moves by hand (``advance``), for code that takes a ``clock``
    callable: what a test checks then never depends on how fast the machine is."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.t

    def advance(self, s: float) -> None:
        with self.lock:
            self.t += s
