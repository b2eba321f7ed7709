"""What the desktop app connects to and owns, without Qt: the bundled server, the
session, the packet cache, the worker pool, local import.

Every method that touches the network or the disk blocks: the window calls them through
:class:`viewer.workers.Task`. :meth:`Backend.close` stops exactly what the backend
started (a server given to :meth:`Backend.adopt_server` with ``own=False`` stays up).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from client.cache import PacketCache
from client.pool import (BACKGROUND, INTERACTION, PREFETCH, VISIBLE, WorkerPool,
                         install_default_pool)
from client.session import DEFAULT_USER, Session
from imaging.memory import MemoryBudget

from client.series_loader import SeriesRegistry

log = logging.getLogger("medview.services")

__all__ = ["Backend", "ImportOutcome", "ImportDisabled", "POOL_CAPS"]

POOL_WORKERS = 8
LOGOUT_TIMEOUT_S = 2.0       # closing: how long the logout may wait for the server
POOL_CAPS = {INTERACTION: 8, VISIBLE: 2, PREFETCH: 2, BACKGROUND: 1}
"""Work the user does not look at never takes more than 5 of the 8 workers: what the user
looks at always finds a free one (its transfer and its decodes run side by side), and few
Python threads compete with the UI thread for the interpreter. BACKGROUND is one worker:
the super-resolution of tiles off screen (as the SR queue's own thread did before)."""


class ImportDisabled(RuntimeError):
    """Local import needs the bundled server's store."""


@dataclass
class ImportOutcome:
    """Result of :meth:`Backend.import_paths`: the ingest report and what it means."""

    report: object                       # server.ingest.IngestReport
    total: int                           # files found
    cancelled: bool = False
    studies: list[str] = field(default_factory=list)   # studies with imported files
    series: list[str] = field(default_factory=list)

    @property
    def processed(self) -> int:
        r = self.report
        return len(r.imported) + len(r.duplicates) + len(r.skipped)


def default_memory_budget() -> int:
    """A quarter of the physical memory (512 MB at least, 8 GB at most)."""
    import os

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 4 << 30
    return int(min(max(total // 4, 512 << 20), 8 << 30))


class Backend:
    """The app's connection: server (bundled or remote), session, cache, pool."""

    def __init__(self, cache_path: str | Path | None = None, cache_limit: int = 2 << 30,
                 workers: int = POOL_WORKERS, memory_budget: int | None = None,
                 sr_dir: str | Path | None = None) -> None:
        self.cache_path = Path(cache_path) if cache_path else None
        # generated (super-resolved) tiles of a remote server's slides: beside the packet
        # cache unless given (no packet cache: kept in memory only)
        self.sr_dir = (Path(sr_dir) if sr_dir else
                       self.cache_path.parent / "sr" if self.cache_path else None)
        self.sr_limit = 1 << 30          # bytes of generated tiles kept (client side)
        self.cache_limit = cache_limit
        caps = dict(POOL_CAPS)
        caps[INTERACTION] = workers
        # one worker pool and one memory budget for the whole app: series images, slide
        # tiles and volumes (a quarter of the machine's memory by default, 512 MB at least).
        # The pool is the process's default too: stack, MPR, VR, slides and SR all run in it
        self.pool = WorkerPool(workers, caps)
        install_default_pool(self.pool)
        self.memory = MemoryBudget(memory_budget or default_memory_budget())
        self.cache: PacketCache | None = None
        self.session: Session | None = None
        self.registry: SeriesRegistry | None = None
        self.server = None                # an EmbeddedServer, when there is one
        self.own_server = False
        self.store_dir: Path | None = None
        self.closed = False
        self.shut_down = threading.Event()   # set when closing finished
        self.shutdown_step = "running"

    # ------------------------------------------------------------------ connecting
    @property
    def url(self) -> str | None:
        return self.session.base_url if self.session else None

    @property
    def connected(self) -> bool:
        return self.session is not None and self.session.id is not None

    @property
    def can_import(self) -> bool:
        """Import goes into the bundled server's store, and only while the app is
        connected to that server (a remote server has its own store)."""
        return (self.server is not None and self.session is not None
                and self.session.base_url == self.server.url.rstrip("/"))

    def open_cache(self) -> PacketCache | None:
        """Open the packet cache (file I/O: call from a worker)."""
        if self.cache is None and self.cache_path is not None:
            self.cache = PacketCache(self.cache_path, self.cache_limit)
        return self.cache

    def start_bundled(self, store_dir: str | Path, log_fn: Callable[[str], None] = lambda m: None,
                      *, sample: bool = True, sample_slices: int = 64, sample_size: int = 512,
                      dicom_port: int = 0, ae_title: str = "MEDVIEW") -> str:
        """Create the sample study on first run, start the bundled server on a free
        loopback port and log in as the local user. Returns the server URL."""
        from server.embedded import EmbeddedServer
        from server.sample import ensure_sample_store
        from server.store import Store

        store_dir = Path(store_dir)
        if sample:
            log_fn("Checking the local store (the sample study is created on first run)…")
            ensure_sample_store(store_dir, log=log_fn, slices=sample_slices,
                                size=sample_size).close()
        else:
            Store(store_dir).close()
        log_fn("Starting the bundled image server…")
        server = EmbeddedServer(str(store_dir)).start()
        self.adopt_server(server, own=True)
        if dicom_port:
            try:
                self.set_dicom(dicom_port, ae_title)
            except (OSError, ValueError) as e:     # port taken: the viewer works without it
                log_fn(f"DICOM listener not started on port {dicom_port}: {e}")
        self.login(server.url, DEFAULT_USER, None)
        return server.url

    def set_dicom(self, port: int, ae_title: str = "MEDVIEW") -> None:
        """Start, move or stop (port 0) the bundled server's DICOM listener (a worker
        calls this: it binds a socket)."""
        if self.server is None or not self.own_server:
            raise RuntimeError("the DICOM listener belongs to the bundled server, and this "
                               "window is connected to another server")
        self.server.set_dicom(port, ae_title)

    def adopt_server(self, server, *, own: bool = False) -> None:
        """Use an already running :class:`~server.embedded.EmbeddedServer` (its
        store receives local imports); ``own``: stop it on :meth:`close`."""
        self.server = server
        self.own_server = own
        self.store_dir = Path(server.store.root)

    def login(self, url: str, user: str = DEFAULT_USER, password: str | None = None) -> Session:
        """Log in (network: call from a worker); replaces the previous session."""
        self.open_cache()
        session = Session(url, user or DEFAULT_USER, password)
        old, self.session = self.session, session
        self.registry = SeriesRegistry(session, self.cache)
        if old is not None:
            old.logout()
        return session

    # ------------------------------------------------------------------ catalogue
    def studies(self, queries: list[dict]) -> list[dict]:
        """Studies matching any of the QIDO queries (deduplicated, newest first)."""
        seen: dict[str, dict] = {}
        for q in queries or [{}]:
            for row in self.session.studies(**q):
                seen.setdefault(row["StudyInstanceUID"], row)
        return sorted(seen.values(), key=lambda r: (r.get("StudyDate") or "", r.get("StudyTime") or ""),
                      reverse=True)

    def series_of(self, study_uids: list[str]) -> dict[str, list[dict]]:
        return {uid: self.session.series(uid) for uid in study_uids}

    # ------------------------------------------------------------------ remote PACS, export
    def _own_store(self):
        if not self.can_import or self.server is None:
            raise RuntimeError("remote PACS and export use the bundled server's store; this "
                               "window is connected to another server")
        return self.server.store

    def pacs_names(self) -> list[str]:
        """The PACS configured in the bundled store (``medview-server pacs add``); none
        when connected to another server (file I/O: call from a worker)."""
        if not self.can_import or self.server is None:
            return []
        from server.dimse import Peers
        return sorted(Peers(self.server.store.catalogue).pacs())

    def _pacs(self, name: str, ae_title: str):
        from server.dimse import Pacs, Peers
        return Pacs(Peers(self._own_store().catalogue).get_pacs(name), ae_title=ae_title)

    def pacs_studies(self, name: str, queries: list[dict], ae_title: str = "MEDVIEW") -> list[dict]:
        """Studies of a PACS matching any of the C-FIND queries (network: a worker)."""
        pacs = self._pacs(name, ae_title)
        seen: dict[str, dict] = {}
        for q in queries or [{}]:
            for row in pacs.find_studies(**q):
                if row.get("StudyInstanceUID"):
                    seen.setdefault(row["StudyInstanceUID"], row)
        return sorted(seen.values(), key=lambda r: (r.get("StudyDate") or "", r.get("StudyTime") or ""),
                      reverse=True)

    def pacs_retrieve(self, name: str, study_uid: str, *, ae_title: str = "MEDVIEW",
                      progress: Callable[[int, int], None] | None = None,
                      cancelled: Callable[[], bool] = lambda: False) -> dict:
        """C-GET a study from a PACS into the bundled store through the common ingest
        (network and CPU: a worker). Cancelling sends C-CANCEL; what arrived stays."""
        class _Flag:
            def is_set(self) -> bool:
                return cancelled()
        return self._pacs(name, ae_title).retrieve(study_uid, self._own_store(), via="get",
                                                   progress=progress, cancel=_Flag())

    def export_study(self, study_uid: str, out: str | Path, *, dicomdir: bool = True,
                     progress: Callable[[int, int], None] | None = None):
        """The study's original files (and a DICOMDIR) into a folder or a .zip (a worker)."""
        from server.export import export_study
        return export_study(self._own_store(), study_uid, out, dicomdir=dicomdir,
                            progress=progress)

    # ------------------------------------------------------------------ import
    def import_paths(self, paths: list[str | Path], *,
                     progress: Callable[[int, int], None] = lambda d, t: None,
                     log_fn: Callable[[str], None] | None = None,
                     cancelled: Callable[[], bool] = lambda: False,
                     batch: int = 8) -> ImportOutcome:
        """Import files and folders into the bundled server's store, ``batch`` files at a
        time so that a cancel takes effect between batches (files already imported stay,
        complete: the store writes each instance atomically)."""
        if not self.can_import:
            raise ImportDisabled(
                f"Import adds files to the bundled server's store; you are connected to "
                f"{self.url}, which has its own. Start medview without --server to import.")
        from server.ingest import IngestReport, ingest_paths, iter_files

        files = list(iter_files(paths))
        report = IngestReport()
        outcome = ImportOutcome(report, len(files))
        progress(0, len(files))
        for start in range(0, len(files), batch):
            if cancelled():
                outcome.cancelled = True
                break
            part = ingest_paths(files[start:start + batch], self.server.store, log=log_fn,
                                progress=lambda d, t, s=start: progress(s + d, len(files)))
            report.merge(part)
        for f in report.imported:
            if f.study_instance_uid not in outcome.studies:
                outcome.studies.append(f.study_instance_uid)
            if f.series_instance_uid not in outcome.series:
                outcome.series.append(f.series_instance_uid)
        return outcome

    # ------------------------------------------------------------------ slides (W3)
    def _own_slide_store(self):
        """The slide store of the bundled server, when this window is connected to it."""
        if not self.can_import or self.server is None:
            return None
        srv = self.server.app.state.server
        svc = getattr(srv, "slides", None)
        return svc.store if svc is not None else None

    def sr_cache_for(self, provider):
        """Where the generated tiles of ``provider``'s slide go (disk and catalogue: call
        from a worker): the bundled server's temporary tier (catalogued, purged at
        discharge), or for a remote server the client-side folder
        (:func:`client.srqueue.client_tile_cache`). None — memory only — for a slide
        the user sees only within limits, of a discharged patient, or without a place."""
        from client.srqueue import (SRTileCache, client_tile_cache, prune_client_tiles,
                                    purge_client_tiles)

        info = provider.info
        uid = info.get("slide_uid")
        if not uid or getattr(provider, "limited", None):
            return None
        store = self._own_slide_store()
        if store is not None:
            row = store.catalogue.slide(uid)
            if row is None or row["patient_status"] == "discharged":
                return None
            return SRTileCache(store.config.tier_root("temp"), store.catalogue, row["pk"],
                               row["slide_uid"])
        if self.sr_dir is None or self.session is None:
            return None
        if info.get("patient_status") == "discharged":
            purge_client_tiles(self.sr_dir, self.session.base_url, self.session.username, [info])
            return None
        try:
            cache = client_tile_cache(self.sr_dir, self.session.base_url,
                                      self.session.username, uid)
        except ValueError:
            return None
        freed = prune_client_tiles(self.sr_dir, self.sr_limit, {cache.dir})
        if freed:
            log.info("%d bytes of generated tiles pruned from %s", freed, self.sr_dir)
        return cache

    def list_slides(self) -> list[dict]:
        """The server's slides (network: a worker); the client-side generated tiles of
        discharged patients' slides are purged on the way."""
        from client.srqueue import purge_client_tiles

        rows = self.session.get_json("/api/slides")
        if self.sr_dir is not None and self._own_slide_store() is None:
            n = purge_client_tiles(self.sr_dir, self.session.base_url, self.session.username, rows)
            if n:
                log.info("%d generated tiles of discharged patients purged from %s", n,
                         self.sr_dir)
        return rows

    # ------------------------------------------------------------------ cache
    def cache_usage(self) -> tuple[int, int]:
        """(bytes, images) held by the packet cache (disk: call from a worker)."""
        cache = self.open_cache()
        return cache.usage() if cache else (0, 0)

    def clear_cache(self) -> None:
        cache = self.open_cache()
        if cache:
            cache.clear()

    def set_cache_limit(self, limit: int) -> int:
        """New size limit; evicts least recently used images now. Returns bytes freed."""
        self.cache_limit = int(limit)
        cache = self.open_cache()
        if cache is None:
            return 0
        cache.max_bytes = self.cache_limit
        return cache.evict()

    def evict_cache(self, keep_images: set[str] = frozenset()) -> int:
        """Bring the cache under its limit, never dropping images of ``keep_images``
        (cache keys of the series on screen). Returns bytes freed."""
        cache = self.cache
        if cache is None or self.session is None:
            return 0
        return cache.evict({(self.session.base_url, k) for k in keep_images})

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Stop what this backend started: pool, session, owned server, cache. Blocks on
        the network (logout) — the window calls :meth:`close_in_background` instead."""
        if self.closed:
            return
        self.closed = True
        self.pool.shutdown(wait=False)
        self._finish_close(join_workers=False)

    def close_in_background(self) -> threading.Event:
        """Start closing on a shutdown thread and return at once (the UI thread never
        waits on the logout or the server stopping). The pool stops taking jobs now; the
        thread logs out, lets the running jobs end (so none writes into a closed cache),
        stops the owned server and closes the cache, then sets :attr:`shut_down`."""
        if self.closed:
            return self.shut_down
        self.closed = True
        self.pool.shutdown(wait=False)           # queued jobs cancelled, running ones told
        threading.Thread(target=self._finish_close, kwargs={"join_workers": True},
                         name="medview-shutdown").start()
        return self.shut_down

    def wait_closed(self, timeout: float) -> bool:
        """Wait (not on the UI thread) until closing finished; False when it did not
        within ``timeout`` seconds (logged with what is still being stopped)."""
        if self.shut_down.wait(timeout):
            return True
        log.warning("closing did not finish within %.0f s (still at: %s)",
                    timeout, self.shutdown_step)
        return False

    def _finish_close(self, join_workers: bool) -> None:
        try:
            if self.session is not None:
                self.shutdown_step = f"logging out of {self.session.base_url}"
                self.session.timeout = LOGOUT_TIMEOUT_S   # a slow server must not hang it
                try:
                    self.session.logout()
                except Exception as e:  # noqa: BLE001 - the server may already be gone
                    log.warning("logout from %s failed (server did not answer): %s",
                                self.session.base_url, e)
            if join_workers:                # the logout also ends a running job's waits
                self.shutdown_step = "waiting for running jobs"
                self.pool.shutdown(wait=True)
            if self.server is not None and self.own_server:
                self.shutdown_step = "stopping the bundled server"
                self.server.stop()
            self.server = None
            if self.cache is not None:
                self.shutdown_step = "closing the packet cache"
                self.cache.close()
            self.shutdown_step = "done"
        finally:
            self.shut_down.set()
