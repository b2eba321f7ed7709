"""Background jobs of the server: one scheduler, one lease per job across every server
process that shares the catalogue.

Three jobs exist today: :class:`VerifyJob` (lossless layers stored unverified, checked
by :mod:`server.verify`) and two moves between storage tiers whose rules are data of the
site policy and the slide store's tier settings:

- :class:`MigrationJob`: old lossless layers and originals of series to the archive
  (:meth:`server.tiers.Tiers.migrate`), every ``[storage] schedule_hours`` (0 = off);
- :class:`SlideTierJob`: slides between the recent / mid / long tiers and the purge of
  generated tiles (:meth:`server.slide_tiers.SlideTiers.run_once`), one slide at a time,
  only while nobody has used the slides for ``idle_seconds``.

:class:`JobScheduler` runs them on one daemon thread. Before a job runs it takes the job's
lease in the catalogue database (:class:`Leases`, table ``job_lease``): several server
processes (``serve --workers``, replicas behind a balancer) may all schedule the same job;
one runs it, the others skip that turn. The holder renews the lease between two steps of
its work (through the ``should_stop`` callback every job already polls) and gives it up
when it finishes; a holder that died simply lets the lease expire (``ttl``), and the next
scheduler takes it over.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Callable, Protocol

from .dbutil import Db

log = logging.getLogger("medview.jobs")

_DDL = ["CREATE TABLE IF NOT EXISTS job_lease ("
        " name TEXT PRIMARY KEY,"
        " holder TEXT,"
        " expires_at REAL NOT NULL DEFAULT 0,"
        " taken_at REAL)"]
# step 2: the last finished run of each job, by any process: a periodic job that another
# replica has just run is not run again in the same period
_DDL_2 = ["CREATE TABLE IF NOT EXISTS job_run ("
          " name TEXT PRIMARY KEY, finished_at REAL NOT NULL, holder TEXT,"
          " runs INTEGER NOT NULL DEFAULT 0)"]


class Leases:
    """Named leases with expiry in the catalogue database (portable SQL: one conditional
    UPDATE decides who holds a lease)."""

    def __init__(self, db_path, *, holder: str | None = None, ttl: float = 600.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = Db(db_path, component="jobs", migrations={1: _DDL, 2: _DDL_2})
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.ttl = ttl
        self.clock = clock

    def acquire(self, name: str) -> bool:
        """Take (or renew) the lease ``name``: True if this holder has it now."""
        now = self.clock()
        with self.db.transaction():
            self.db.execute("INSERT INTO job_lease(name, holder, expires_at) "
                            "VALUES (?, NULL, 0) ON CONFLICT DO NOTHING", [name])
            cur = self.db.execute(
                "UPDATE job_lease SET holder = ?, expires_at = ?, taken_at = ? "
                "WHERE name = ? AND (holder = ? OR holder IS NULL OR expires_at < ?)",
                [self.holder, now + self.ttl, now, name, self.holder, now])
            return cur.rowcount == 1

    def release(self, name: str) -> None:
        with self.db.transaction():
            self.db.execute("UPDATE job_lease SET holder = NULL, expires_at = 0 "
                            "WHERE name = ? AND holder = ?", [name, self.holder])

    def record_run(self, name: str) -> None:
        """A run of ``name`` has finished (counted across the cluster)."""
        with self.db.transaction():
            self.db.execute("INSERT INTO job_run (name, finished_at, holder, runs) "
                            "VALUES (?, ?, ?, 1) ON CONFLICT(name) DO UPDATE SET "
                            "finished_at = excluded.finished_at, holder = excluded.holder, "
                            "runs = job_run.runs + 1", [name, self.clock(), self.holder])

    def last_run(self, name: str) -> tuple[float, str, int] | None:
        """(finished at, by whom, runs so far) of the job's last run by any process."""
        row = self.db.one("SELECT finished_at, holder, runs FROM job_run WHERE name = ?",
                          [name])
        return (row[0], row[1], row[2]) if row else None

    def holder_of(self, name: str) -> str | None:
        row = self.db.one("SELECT holder, expires_at FROM job_lease WHERE name = ?", [name])
        if row is None or row[0] is None or row[1] < self.clock():
            return None
        return row[0]

    def close(self) -> None:
        self.db.close()


class BackgroundJob(Protocol):
    name: str

    def wait(self, now: float) -> float | None:
        """Seconds until the job should run (0 or less: now); None: not scheduled."""

    def run(self, should_stop: Callable[[], bool]):
        """Do the work, polling ``should_stop`` between steps; returns a report."""


class MigrationJob:
    """Series tiering: :meth:`Tiers.migrate` every ``schedule_hours`` of the site policy,
    the first time ``first_delay`` seconds after start."""

    name = "migration"

    def __init__(self, tiers, *, first_delay: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.tiers = tiers
        self.clock = clock
        self._next = clock() + first_delay

    def wait(self, now: float) -> float | None:
        hours = self.tiers.settings().schedule_hours if self.tiers.settings else 0
        if hours <= 0:
            return None
        return self._next - now

    def run(self, should_stop):
        hours = self.tiers.settings().schedule_hours if self.tiers.settings else 0
        self._next = self.clock() + max(hours, 0.01) * 3600
        report = self.tiers.migrate(should_stop=should_stop)
        log.warning("scheduled migration: %s", report.summary())
        return report

    def skipped(self) -> None:
        """Another process holds the lease: try again at the next period."""
        hours = self.tiers.settings().schedule_hours if self.tiers.settings else 0
        self._next = self.clock() + max(hours, 0.01) * 3600

    def period_s(self) -> float | None:
        hours = self.tiers.settings().schedule_hours if self.tiers.settings else 0
        return hours * 3600 if hours > 0 else None


class SlideTierJob:
    """Slide tiering: one move at a time, only after ``idle_seconds`` without slide
    activity (the slide routes call :meth:`touch`, through ``SlideStore.activity``), and
    stopping between two moves as soon as someone works again."""

    name = "slide-tiers"

    def __init__(self, tiers, *, idle_seconds: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.tiers = tiers
        self.idle_seconds = (tiers.store.config.idle_seconds if idle_seconds is None
                             else idle_seconds)
        self.clock = clock
        self._last = clock()
        self._quiet_until = 0.0
        tiers.store.activity = self.touch

    def touch(self) -> None:
        """Someone is working: postpone tier work."""
        self._last = self.clock()

    def idle(self) -> bool:
        return self.clock() - self._last >= self.idle_seconds

    def wait(self, now: float) -> float | None:
        return max(self._last + self.idle_seconds, self._quiet_until) - now

    def run(self, should_stop):
        rep = self.tiers.run_once(max_moves=1,
                                  should_stop=lambda: should_stop() or not self.idle())
        if not rep.moved and not rep.failed:        # nothing to do: look again later
            self._quiet_until = self.clock() + self.idle_seconds
        return rep

    def skipped(self) -> None:
        self._quiet_until = self.clock() + self.idle_seconds


class VerifyJob:
    """Lossless layers stored unverified (``ingest --no-verify``): every ``period`` seconds,
    if some instance's lossless layer is pending, :func:`server.verify.verify_pending`
    decodes and compares them (on the scheduler's thread, one frame at a time, so that
    serving keeps the other cores); until then they are served without their last layer."""

    name = "verify"

    def __init__(self, store, *, period: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.period = period
        self.clock = clock
        self._next = clock()

    def _pending(self) -> bool:
        return self.store.catalogue.db.one(
            "SELECT 1 FROM instance WHERE lossless_state = 'pending' LIMIT 1") is not None

    def wait(self, now: float) -> float | None:
        if now < self._next:
            return self._next - now
        if self._pending():
            return 0
        self._next = now + self.period
        return self.period

    def run(self, should_stop):
        from .verify import verify_pending

        report = verify_pending(self.store, workers=1, should_stop=should_stop)
        self._next = self.clock() + self.period
        (log.error if report.failed else log.info)("lossless verification: %s",
                                                   report.summary())
        return report

    def skipped(self) -> None:
        self._next = self.clock() + self.period


class JobScheduler:
    """Runs due jobs, each under its lease, on one daemon thread (or by :meth:`step`)."""

    def __init__(self, jobs=(), *, leases: Leases | None = None, poll: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.jobs: list = list(jobs)
        self.leases = leases
        self.poll = poll
        self.clock = clock
        self.last_report: dict[str, object] = {}
        self.runs: dict[str, int] = {}
        self.decided: dict[str, int] = {}     # due turns decided (run here, or not)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, job) -> None:
        with self._lock:
            self.jobs.append(job)

    def job(self, name: str):
        return next((j for j in self.jobs if j.name == name), None)

    def step(self) -> dict[str, object]:
        """Run every job that is due now (under its lease); returns their reports."""
        out = {}
        with self._lock:
            jobs = list(self.jobs)
        for job in jobs:
            if self._stop.is_set():
                break
            wait = job.wait(self.clock())
            if wait is None or wait > 0:
                continue
            self.decided[job.name] = self.decided.get(job.name, 0) + 1
            if self.leases is not None and not self.leases.acquire(job.name):
                log.info("job %s runs elsewhere (%s)", job.name,
                         self.leases.holder_of(job.name))
                job.skipped()
                continue
            period = getattr(job, "period_s", None)
            period = period() if period is not None else None
            last = self.leases.last_run(job.name) if self.leases is not None and period else None
            if last is not None and self.leases.clock() - last[0] < period:
                log.info("job %s ran %.0f s ago (%s): not again this period", job.name,
                         self.leases.clock() - last[0], last[1])
                self.leases.release(job.name)
                job.skipped()
                continue
            ok = False
            try:
                report = job.run(self._should_stop_for(job.name))
                ok = True
            except Exception:  # noqa: BLE001 - the job must survive and try again later
                log.exception("background job %s failed", job.name)
                job.skipped()
                continue
            finally:
                if self.leases is not None:
                    if ok and period:            # recorded before the lease is given up
                        self.leases.record_run(job.name)
                    self.leases.release(job.name)
            self.last_report[job.name] = report
            self.runs[job.name] = self.runs.get(job.name, 0) + 1
            out[job.name] = report
        return out

    def stats(self) -> dict[str, dict[str, int]]:
        """Per job: turns that came due in this process, and runs it made."""
        names = [j.name for j in list(self.jobs)]
        return {n: {"decided": self.decided.get(n, 0), "runs": self.runs.get(n, 0)}
                for n in names}

    def _should_stop_for(self, name: str) -> Callable[[], bool]:
        def should_stop() -> bool:
            if self._stop.is_set():
                return True
            # renew between two steps; a lost lease (expired while we were stuck) stops us
            return self.leases is not None and not self.leases.acquire(name)
        return should_stop

    def start(self) -> "JobScheduler":
        self._thread = threading.Thread(target=self._run, name="medview-jobs", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.leases is not None:
            self.leases.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # noqa: BLE001 - keep the scheduler alive, log the cause
                log.exception("job scheduler step failed")
            waits = [w for j in list(self.jobs) if (w := j.wait(self.clock())) is not None]
            self._stop.wait(min([self.poll] + [max(w, 0.01) for w in waits]))
