"""Admission control: answer 503 with ``Retry-After`` instead of queueing into seconds.

Requests are split in two classes, each with its own gate, so that streaming sessions
never starve logins, QIDO or a tiny packet request:

* **streams** (bulk transfers): packet requests (``/jpip``, ``/jpip/slabs/...``,
  ``/jpip/slides/...``) except small ones (at most :data:`SMALL_COMPS` images named in
  ``comps``, or a ``len`` budget of at most :data:`SMALL_LEN` bytes); DICOMweb retrieval
  of studies, series, instances, frames and bulk data, and STOW-RS uploads;
* **small**: everything else — logins, QIDO, metadata, thumbnails and rendered
  instances or frames, the API (``/api/health`` is never gated).

A gate lets ``limit`` requests run at once (a stream counts until its last byte is
sent). Beyond that a request waits in line, first come first served, but only if the
expected wait — the requests ahead of it times the mean service time of the class (a
moving average of recent requests), divided by ``limit`` — fits the class's latency
``budget``; otherwise, or if its wait reaches the budget after all, it is answered at
once with **503** and ``Retry-After`` (whole seconds: the expected wait, at least 1, at
most 30). A refused request did nothing: it is not authorised, not audited, and the
client may simply repeat it (``client.session.Session`` does, with bounded backoff).
The refusals are counted (:meth:`Admission.stats`, in ``/api/health``).

The limits (:class:`Limits`) default to a few streams per core: streams are CPU-bound
Python, and more of them at once only share the same cores while small requests wait
for the interpreter lock behind them. They are the machine's: ``serve --workers N``
gives each of its N processes a share (:meth:`Limits.for_workers`, rounded up), so that
N processes together run about as many streams at once as one would, each gate counts
its own process only (a process does not see the other's line), and the kernel's spread
of connections decides which process a request waits in.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import parse_qs

log = logging.getLogger("medview.server")

SMALL_COMPS = 4            # a packet request naming at most this many images is small
SMALL_LEN = 256 << 10      # ... or asking for at most this many bytes
EXEMPT = ("/api/health",)
RETRY_MAX_S = 30


@dataclass
class Limits:
    """Concurrency and waiting budget per class (seconds)."""

    streams: int = max(2, 2 * (os.cpu_count() or 1))
    stream_budget: float = 2.0
    small: int = 24
    small_budget: float = 0.5

    @classmethod
    def for_workers(cls, workers: int, streams: int | None = None) -> "Limits":
        """The limits of one of ``workers`` server processes on this machine: its share
        (rounded up, at least 1) of the machine's ``streams`` (default 2 per core, at
        least 2) and of the small requests' limit; the budgets (waiting times) are not
        shared."""
        if workers < 1:
            raise ValueError("workers must be at least 1")
        machine = cls() if streams is None else cls(streams=streams)
        if machine.streams < 1:
            raise ValueError("the machine's streams must be at least 1")
        return cls(streams=max(1, math.ceil(machine.streams / workers)),
                   stream_budget=machine.stream_budget,
                   small=max(1, math.ceil(machine.small / workers)),
                   small_budget=machine.small_budget)


class Gate:
    """One class: at most ``limit`` at once, a line whose expected wait fits ``budget``.
    Runs on the event loop only (no locks needed)."""

    def __init__(self, name: str, limit: int, budget: float, service: float = 0.01) -> None:
        if limit < 1:
            raise ValueError(f"{name}: the limit must be at least 1")
        self.name, self.limit, self.budget = name, limit, budget
        self.inflight = 0
        self.waiters: deque[asyncio.Future] = deque()
        self.service = service             # moving average of a request's duration (s)
        self.admitted = 0
        self.refused = 0

    def expected_wait(self) -> float:
        return (len(self.waiters) + 1) * self.service / self.limit

    def _retry_after(self) -> int:
        return int(min(RETRY_MAX_S, max(1, math.ceil(self.expected_wait()))))

    async def enter(self) -> int | None:
        """None once admitted (the caller must :meth:`leave`), else the Retry-After."""
        if self.inflight < self.limit and not self.waiters:
            self.inflight += 1
            self.admitted += 1
            return None
        if self.expected_wait() > self.budget:
            self.refused += 1
            return self._retry_after()
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout=self.budget)
        except asyncio.TimeoutError:
            if fut.done():                   # handed a slot just as the budget ran out
                self.admitted += 1
                return None
            fut.cancel()
            self._drop(fut)
            self.refused += 1
            return self._retry_after()
        except BaseException:                # the client went away while waiting
            if fut.done() and not fut.cancelled():
                self._hand_over()            # the slot it was given goes to the next one
            else:
                fut.cancel()
                self._drop(fut)
            raise
        self.admitted += 1
        return None

    def _drop(self, fut: asyncio.Future) -> None:
        try:
            self.waiters.remove(fut)
        except ValueError:
            pass

    def _hand_over(self) -> None:
        """A slot is free: to the first one still waiting, else back to the pool."""
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(True)         # inflight unchanged: the slot changes hands
                return
        self.inflight -= 1

    def leave(self, seconds: float) -> None:
        self.service = 0.8 * self.service + 0.2 * seconds
        self._hand_over()

    def stats(self) -> dict:
        return {"limit": self.limit, "budget_s": self.budget, "in_flight": self.inflight,
                "waiting": len(self.waiters), "mean_s": round(self.service, 4),
                "admitted": self.admitted, "refused": self.refused}


_DICOMWEB_SMALL = {"studies", "series", "instances", "metadata", "thumbnail"}


def _dicomweb_bulk(path: str, method: str) -> bool:
    """A DICOMweb request that moves whole objects (retrieve, frames, bulk data, STOW)."""
    if method in ("POST", "PUT"):
        return True
    parts = path.rstrip("/").split("/")
    last = parts[-1]
    if last in _DICOMWEB_SMALL:
        return False
    if last == "rendered":     # an instance's or a frame's is small; a series' is not
        return "instances" not in parts
    return True


def is_stream(path: str, query_string: bytes, method: str = "GET") -> bool:
    """Whether a request belongs to the streams (bulk) class."""
    if path.startswith("/dicomweb/"):
        return _dicomweb_bulk(path, method.upper())
    if not (path == "/jpip" or path.startswith("/jpip/")):
        return False
    q = parse_qs(query_string.decode("latin-1"), keep_blank_values=True)
    ln = (q.get("len") or [""])[0]
    if ln.isdigit() and int(ln) <= SMALL_LEN:
        return False
    comps = (q.get("comps") or [None])[0]
    if comps:
        n = 0
        for part in comps.split(","):
            a, _, b = part.strip().partition("-")
            if not a.isdigit() or (b and not b.isdigit()):
                return True                  # malformed: the route says why
            n += (int(b) - int(a) + 1) if b else 1
            if n > SMALL_COMPS:
                return True
        return False
    return True


class Gates:
    """The two gates of a server (``app.state.admission``)."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits = limits or Limits()
        self.streams = Gate("streams", limits.streams, limits.stream_budget, service=0.1)
        self.small = Gate("small", limits.small, limits.small_budget)

    def stats(self) -> dict:
        return {"streams": self.streams.stats(), "small": self.small.stats()}


class Admission:
    """ASGI middleware: every HTTP request through its class's gate."""

    def __init__(self, app, gates: Gates) -> None:
        self.app = app
        self.streams, self.small = gates.streams, gates.small

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT:
            await self.app(scope, receive, send)
            return
        gate = self.streams if is_stream(scope["path"], scope.get("query_string", b""),
                                         scope.get("method", "GET")) else self.small
        retry = await gate.enter()
        if retry is not None:
            await _busy(send, gate, retry)
            return
        t = time.monotonic()
        try:
            await self.app(scope, receive, send)
        finally:
            gate.leave(time.monotonic() - t)


async def _busy(send, gate: Gate, retry: int) -> None:
    what = "packet streams" if gate.name == "streams" else "requests"
    body = json.dumps({"error": f"server busy: too many {what} in progress; retry after "
                                f"{retry} s", "status": 503, "retry_after": retry,
                       "busy": gate.name}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"retry-after", str(retry).encode())]})
    await send({"type": "http.response.body", "body": body})
