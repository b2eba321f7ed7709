"""What the client knows about its link and its computer (V8, H5), measured from its own
work, and the reporter that tells the server when it changes. No Qt.

:class:`LinkMeter` measures

* **throughput** over *active transfer time only*: the time the client waits for packet
  bytes while at least one transfer streams (several transfers at once count their union
  once; the time between transfers, and the client's own work between two reads, is not
  link time). A sliding window of the last ``window_bytes``; unknown (None) until
  ``min_bytes`` have been measured.
* **latency**: the time from sending a request to the response headers (``requests``'
  ``Response.elapsed``), the smallest of the last 16 (server work makes the others longer).

Caveat: bytes the kernel buffered while the client was busy arrive "instantly", so a
client that spends much time between reads over-estimates a slow link a little (by the
share of its own work in the transfer time).

:class:`ContextReporter` sends ``link_bps``, ``latency_ms``, ``memory_mb`` (memory free
now) and ``cpus`` with ``POST /api/session/context`` at session start and whenever one of
them changes materially (:meth:`ContextReporter.changed`), off the caller's thread.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator

log = logging.getLogger("medview.link")

__all__ = ["LinkMeter", "free_memory_mb", "machine_facts", "ContextReporter",
           "LINK_CHANGE", "MEMORY_CHANGE"]

LINK_CHANGE = 1.5
"""A link speed differing from the reported one by this factor (either way) is a change."""
MEMORY_CHANGE = 0.25
"""Free memory differing from the reported figure by this fraction is a change."""


class LinkMeter:
    """Throughput and latency of this client's own transfers (thread-safe)."""

    def __init__(self, window_bytes: int = 8 << 20, min_bytes: int = 64 << 10,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_bytes = window_bytes
        self.min_bytes = min_bytes
        self.clock = clock
        self._lock = threading.Lock()
        self._samples: deque[tuple[float, int]] = deque()     # (active seconds, bytes)
        self._win_s = 0.0
        self._win_b = 0
        self._active = 0
        self._since = 0.0
        self._latency: deque[float] = deque(maxlen=16)
        self.total_bytes = 0
        self.total_active_s = 0.0
        self.listeners: list[Callable[["LinkMeter"], None]] = []

    # ---------------------------------------------------------------- measuring
    def _enter(self) -> None:
        with self._lock:
            if self._active == 0:
                self._since = self.clock()
            self._active += 1

    def _leave(self, nbytes: int) -> None:
        with self._lock:
            self._active -= 1
            now = self.clock()
            self._add(now - self._since, nbytes)
            self._since = now                 # still active for the other streams

    def _add(self, seconds: float, nbytes: int) -> None:
        self._samples.append((seconds, nbytes))
        self._win_s += seconds
        self._win_b += nbytes
        self.total_active_s += seconds
        self.total_bytes += nbytes
        while len(self._samples) > 1 and self._win_b - self._samples[0][1] >= self.window_bytes:
            s, b = self._samples.popleft()
            self._win_s -= s
            self._win_b -= b

    def timed(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Yield ``chunks`` (a response body), counting the time spent waiting for each as
        active link time and its bytes; the listeners hear the meter when it ends."""
        it = iter(chunks)
        try:
            while True:
                self._enter()
                n = 0
                try:
                    chunk = next(it)
                    n = len(chunk)
                except StopIteration:
                    return
                finally:
                    self._leave(n)
                yield chunk
        finally:
            self._changed()

    def add(self, seconds: float, nbytes: int) -> None:
        """Count a transfer measured elsewhere (``seconds`` of active time)."""
        with self._lock:
            self._add(max(seconds, 0.0), int(nbytes))
        self._changed()

    def record_latency(self, seconds: float) -> None:
        with self._lock:
            self._latency.append(max(float(seconds), 0.0))

    def response_hook(self, resp, *_args, **_kw):
        """A ``requests`` response hook: the request's time to headers is latency."""
        elapsed = getattr(resp, "elapsed", None)
        if elapsed is not None:
            self.record_latency(elapsed.total_seconds())
        return resp

    def _changed(self) -> None:
        for fn in list(self.listeners):
            try:
                fn(self)
            except Exception:  # noqa: BLE001 - a listener bug must not break a transfer
                log.exception("link listener failed")

    # ---------------------------------------------------------------- figures
    @property
    def throughput_bps(self) -> float | None:
        """Bits per second over the window's active time; None until measurable."""
        with self._lock:
            if self._win_b < self.min_bytes:
                return None
            return self._win_b * 8 / max(self._win_s, 1e-6)

    @property
    def latency_ms(self) -> float | None:
        with self._lock:
            return min(self._latency) * 1000.0 if self._latency else None

    def snapshot(self) -> dict:
        return {k: v for k, v in (("link_bps", self.throughput_bps),
                                  ("latency_ms", self.latency_ms)) if v is not None}


def free_memory_mb() -> float | None:
    """Memory available to a new program now (Linux ``MemAvailable``), else physical."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2 ** 20
    except (ValueError, OSError, AttributeError):
        return None


def machine_facts() -> dict:
    out: dict[str, Any] = {"cpus": os.cpu_count() or 1}
    mem = free_memory_mb()
    if mem is not None:
        out["memory_mb"] = round(mem, 1)
    return out


def _background(fn: Callable[[], None]) -> None:
    threading.Thread(target=fn, name="context-report", daemon=True).start()


class ContextReporter:
    """Reports what ``version=auto`` weighs (V8) at session start and on material change.

    ``client`` is a :class:`client.policy.PolicyClient`; ``meter`` the session's
    :class:`LinkMeter` (the reporter listens to it). ``machine`` returns the computer's
    facts (``memory_mb``, ``cpus``). ``run`` runs the blocking call off the caller's
    thread (default: a short-lived thread). ``on_report(context)`` hears every context
    the server accepted (on that thread)."""

    def __init__(self, client, meter: LinkMeter, *, place: str | None = None,
                 machine: Callable[[], dict] = machine_facts,
                 run: Callable[[Callable[[], None]], None] = _background,
                 on_report: Callable[[dict], None] | None = None) -> None:
        self.client, self.meter, self.place = client, meter, place
        self.machine, self.run, self.on_report = machine, run, on_report
        self.sent: dict | None = None          # the last context the server accepted
        self.reports = 0
        self._lock = threading.Lock()
        self._busy = False
        meter.listeners.append(self._meter_changed)

    def close(self) -> None:
        try:
            self.meter.listeners.remove(self._meter_changed)
        except ValueError:
            pass

    def current(self) -> dict:
        ctx = dict(self.machine())
        ctx.update(self.meter.snapshot())
        if self.place:
            ctx["place"] = self.place
        return ctx

    def changed(self, ctx: dict | None = None) -> bool:
        """True when ``ctx`` (default: now) differs materially from what was sent: the
        link by a factor of :data:`LINK_CHANGE`, free memory by :data:`MEMORY_CHANGE`,
        the processor count or place at all, or a figure first known."""
        ctx = self.current() if ctx is None else ctx
        old = self.sent
        if old is None:
            return True
        for k in ("cpus", "place"):
            if ctx.get(k) != old.get(k):
                return True
        for k, test in (("link_bps", lambda a, b: max(a, b) / max(min(a, b), 1e-9) >= LINK_CHANGE),
                        ("memory_mb", lambda a, b: abs(a - b) >= MEMORY_CHANGE * max(b, 1e-9))):
            a, b = ctx.get(k), old.get(k)
            if a is None:
                continue
            if b is None or test(a, b):
                return True
        return False

    def report(self) -> dict:
        """Send the context now (blocking) and remember it."""
        ctx = self.current()
        body = {k: ctx.get(k) for k in ("link_bps", "latency_ms", "memory_mb", "cpus", "place")}
        accepted = self.client.set_context(**body)
        with self._lock:
            self.sent = ctx
            self.reports += 1
        if self.on_report is not None:
            self.on_report(accepted)
        return accepted

    def maybe_report(self) -> bool:
        """Report (off this thread) when the context changed materially; True if sent."""
        with self._lock:
            if self._busy or not self.changed():
                return False
            self._busy = True

        def job() -> None:
            try:
                self.report()
            except Exception as e:  # noqa: BLE001 - the next change tries again
                log.warning("could not report the client context: %s", e)
            finally:
                with self._lock:
                    self._busy = False
        self.run(job)
        return True

    def _meter_changed(self, _meter: LinkMeter) -> None:
        self.maybe_report()
