"""The HTTP API (Starlette, served by uvicorn).

Routes
------
``POST /api/login``                      ``{"username", "password"}`` → ``{"session"}``
``POST /api/logout``
``GET  /api/health``
``/dicomweb/...``                       DICOMweb (PS3.18): QIDO-RS, WADO-RS (retrieve,
                                          metadata, frames, bulk data, rendered,
                                          thumbnail), STOW-RS: see
                                          :mod:`server.dicomweb`
``GET  /api/series/{series}/images``     per-image geometry, rescale, window, codestream
                                          facts: what a viewer needs to lay out a series
``GET|POST /jpip``                       packet requests (see :mod:`server.packets`);
                                          POST carries ``{"model": ...}``, the client's
                                          declaration of what its cache holds.

Policy routes (versions, diagnosis status and records, session context): see
:mod:`server.policy_routes`.

DICOMweb: :mod:`server.dicomweb`. The session id travels as ``Authorization: Bearer <id>`` or as the
JPIP ``cid`` field. Every route calls :meth:`Authority.authorize` first, with the object
it is about — every path element (and the JPIP ``target``) resolved against its parent by
:func:`server.targets.resolve` (404 outside it), a slide by its scopes — so the grant
is the one on the object actually served; it is enforced by the packet planner (for
slides by the same check in slide terms), by the image ranges for an instance or frame,
and by the whole-file routes (original DICOM, whole codestream, a slide's label/macro),
which need an unlimited grant. Inputs are checked by :mod:`server.inputs` (400
naming the field, never 500). Every request is written to the audit log, whatever its
outcome (packet requests when their stream ends, with what was actually sent).
``GET /api/openapi.json`` describes the API (:mod:`server.openapi`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import OrderedDict

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware

from codestream.databins import databins_from_ranges, split_databins
from codestream.index import PacketIndex

from . import (dicomweb, packet_routes, peers, policy_routes, session_routes, slab_routes,
               slide_routes)
from .guard import make_guard
from .openapi import openapi_route
from .admission import Admission, Gates, Limits
from .responses import (GZIP_MIN_BYTES, accepts_gzip, error, json_response,  # noqa: F401
                        storage_full_error)
from .auth import Authority
from .diagnosis import DiagnosisRecords
from .packets import ImageSource
from .policy import PolicySource
from .dbutil import StorageFull
from .store import Store, StoreIntegrityError
from .jobs import JobScheduler, Leases, MigrationJob, VerifyJob
from .series_facts import SeriesFacts
from .tiers import Tiers
from .verify import layers_served
from .versions import VersionTable

log = logging.getLogger("medview.server")

from .version import VERSION  # noqa: E402,F401 (the API answers it)


class _LRU:
    """A small thread-safe LRU with a byte budget."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._d: OrderedDict = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key, value, size: int) -> None:
        with self._lock:
            if key in self._d:
                return
            self._d[key] = (value, size)
            self._size += size
            while self._size > self.budget and len(self._d) > 1:
                _, (_, s) = self._d.popitem(last=False)
                self._size -= s


class Server:
    """State shared by the routes: the store, the authority and small caches."""

    def __init__(self, store: Store, authority: Authority | None = None,
                 cache_bytes: int = 256 << 20, policy: PolicySource | None = None) -> None:
        self.store = store
        self.catalogue = store.catalogue
        db = store.database
        self.policy = policy or PolicySource(store.root)
        self.diagnosis = DiagnosisRecords(db)
        self.auth = authority or Authority(db)
        if self.auth.status_of is None:
            self.auth.status_of = self.diagnosis.status
        if self.auth.policy is None:
            self.auth.policy = self.policy.get
        self._indexes = _LRU(64 << 20)
        self._bytes = _LRU(cache_bytes)
        self.facts = SeriesFacts(self.catalogue)       # per series, kept per generation
        self.versions = VersionTable(store, self.policy.get, index_of=self._index,
                                     facts=self.facts)
        self.tiers = Tiers(store, versions=self.versions.get, status_of=self.diagnosis.status,
                           settings=lambda: self.policy.get().storage)

    def _index(self, row: dict) -> PacketIndex:
        key = row["index_sha256"]
        v = self._indexes.get(key)
        if v is None:
            raw = self.store.read_verified(row["index_relpath"], row["index_sha256"])
            v = PacketIndex.from_json(raw)
            self._indexes.put(key, v, len(raw))
        else:
            v = v[0]
        return v

    def _cached(self, sha: str, read) -> bytes:
        v = self._bytes.get(sha)
        if v is not None:
            return v[0]
        data = read()
        self._bytes.put(sha, data, len(data))
        return data

    def _loader(self, row: dict):
        """The whole codestream (recalled from the archive if it was migrated meanwhile)."""
        return lambda: self._cached(row["codestream_sha256"],
                                    lambda: self.tiers.read_codestream(row))

    def _part_loader(self, row: dict):
        """For a remote object store: the packets a request needs as HTTP range reads at
        the index's offsets, unless the whole codestream is at hand (memory, the local
        read cache) or the request wants most of it (then one whole, checked read)."""
        if not self.store.objects.remote:
            return None

        def load(layers: int, res: int):
            ix = self._index(row)
            sha = row["codestream_sha256"]
            v = self._bytes.get(sha)
            data = v[0] if v is not None else (
                self.store.cache.get(sha) if self.store.cache is not None else None)
            if data is None and 2 * ix.bytes_at(layers, res) < ix.total_bytes:
                rel = row["codestream_relpath"]
                try:
                    return databins_from_ranges(
                        ix, lambda a, b: self.store.read_range(rel, a, b), layers, res)
                except StoreIntegrityError as e:
                    if e.problem != "file is missing":     # migrated meanwhile: below
                        raise
            if data is None:
                data = self._loader(row)()
            return split_databins(data, ix)
        return load

    def _head_loader(self, row: dict, tier):
        """The hot part of an archived codestream (the whole one if recalled meanwhile)."""
        def load() -> bytes:
            v = self._bytes.get(tier.head_sha256) or self._bytes.get(row["codestream_sha256"])
            if v is not None:
                return v[0]
            data = self.tiers.read_head(row, tier)
            key = tier.head_sha256 if len(data) == tier.head_size else row["codestream_sha256"]
            self._bytes.put(key, data, len(data))
            return data
        return load

    def _recaller(self, row: dict, frame_pk: int):
        return lambda: self._cached(row["codestream_sha256"],
                                    lambda: self.tiers.recall_frame(row, frame_pk))

    def sources(self, series_uid: str) -> list[ImageSource]:
        """The packet sources of a series, built once per generation (shared: read-only)."""
        return self.facts.kept(series_uid, "sources", lambda: self._sources(series_uid))

    def _sources(self, series_uid: str) -> list[ImageSource]:
        rows = self.facts.images(series_uid)
        states = self.tiers.frame_states(series_uid) if rows else {}
        out = []
        for r in rows:
            key = f"{r['SOPInstanceUID']}/{r['frame']}"
            pk, tier = states.get((r["SOPInstanceUID"], r["frame"]), (None, None))
            if tier is not None and tier.state == "archived":
                out.append(ImageSource(r["index"], key, self._index(r), self._head_loader(r, tier),
                                       hot_layers=tier.hot_layers, recall=self._recaller(r, pk)))
            else:
                out.append(ImageSource(r["index"], key, self._index(r), self._loader(r),
                                       load_part=self._part_loader(r)))
            state = r.get("lossless_state") or "verified"
            if state != "verified":      # the lossless layer is not served unverified
                out[-1].lossless_state = state
                out[-1].served_layers = layers_served(state, out[-1].index.nlayers)
        return out

    def close(self) -> None:
        for part in (self.versions, self.tiers, self.diagnosis, self.auth,
                     getattr(self, "slides", None)):
            if part is not None:
                part.close()


def create_app(store: Store, authority: Authority | None = None, *,
               policy: PolicySource | None = None, schedule: bool = False,
               allow_local: bool = False, trusted_proxies=(),
               proxy_header: str = "x-forwarded-for",
               admission: Limits | None = None) -> Starlette:
    """The application. ``schedule`` starts the migration job (tiered storage) inside
    the server, every ``[storage] schedule_hours`` of the site policy. ``allow_local``
    lets the password-less ``local`` user log in from loopback (the desktop's bundled
    server); ``trusted_proxies`` (CIDR blocks) are the proxies whose ``proxy_header``
    names the client (:mod:`server.peers`). A store whose disk is full is served
    read-only (:meth:`Store.open_for_serving`). ``admission``: the limits of
    :mod:`server.admission` (503 + Retry-After beyond them)."""
    store.open_for_serving()
    srv = Server(store, authority, policy=policy)
    gates = Gates(admission)        # 503 + Retry-After beyond them (server.admission)
    if allow_local:
        srv.auth.allow_local = True
    srv.gates = gates
    guarded = make_guard(srv)
    scheduler = background_jobs(srv, store) if schedule else None
    srv.jobs = scheduler

    # the app only assembles: one module per resource, each behind the one guard
    routes = session_routes.routes(srv, guarded)         # log-in, log-out, health
    routes += packet_routes.routes(srv, guarded)         # series image list, /jpip
    routes += policy_routes.routes(srv, guarded)        # issue 5: versions, diagnosis
    routes += dicomweb.routes(srv, guarded)             # PS3.18 QIDO / WADO / STOW-RS
    slab_routes.register_routes(routes, srv, guarded)   # thick-to-thin slab pyramids (issue 4)
    slide_routes.register_routes(routes, srv, guarded,  # whole-slide pyramids (issue 6)
                                 jobs=scheduler)
    routes.append(openapi_route(VERSION))    # /api/openapi.json, from this table

    not_found, unhandled = error_handlers(srv)

    async def storage_full(request, exc):
        return storage_full_error(exc)

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found,
                                                       StorageFull: storage_full,
                                                       Exception: unhandled},
                    middleware=[Middleware(Admission, gates=gates)],
                    lifespan=lifespan(srv, store, scheduler))
    app.state.server = srv
    app.state.admission = gates
    app.state.trusted_proxies = peers.parse_networks(trusted_proxies)
    app.state.proxy_header = proxy_header.lower()
    return app


def background_jobs(srv: Server, store: Store) -> JobScheduler | None:
    """The background jobs (series and slide tiering, the verification of lossless layers
    stored unverified), each under its lease in the catalogue database so that one
    process of several runs it; none on a read-only store."""
    if store.read_only is not None:
        return None
    first = float(os.environ.get("MEDVIEW_JOB_FIRST_DELAY_S", "60"))
    return JobScheduler([MigrationJob(srv.tiers, first_delay=first), VerifyJob(store)],
                        leases=Leases(store.database))


def error_handlers(srv: Server):
    """The app's handlers of what no guarded route answered: (no such route or method,
    anything unhandled), both in JSON and audited."""
    async def not_found(request, exc):
        """No such route (404) or method (405): answered in JSON, and audited."""
        status = getattr(exc, "status_code", 404)
        try:
            await run_in_threadpool(
                srv.auth.audit, user=None, action="request", resource=None, outcome="error",
                status=status, peer=request.client.host if request.client else None,
                detail={"method": request.method, "path": request.url.path})
        except Exception:  # noqa: BLE001 - the answer still goes out
            log.exception("audit of a %d failed", status)
        return error(status, getattr(exc, "detail", "not found"))

    async def unhandled(request, exc):
        """Anything a route did not handle (guarded routes handle their own): a JSON 500
        without details, and an audit row."""
        log.error("unhandled error in %s %s", request.method, request.url.path,
                  exc_info=(type(exc), exc, exc.__traceback__))
        try:
            await run_in_threadpool(
                srv.auth.audit, user=None, action="request", resource=None, outcome="error",
                status=500, peer=peers.peer_of(request),
                detail={"method": request.method, "path": request.url.path,
                        "error": f"unhandled {type(exc).__name__}"})
        except Exception:  # noqa: BLE001
            log.exception("audit of an unhandled error failed")
        return error(500, "internal server error (logged and audited)")

    return not_found, unhandled


def lifespan(srv: Server, store: Store, scheduler: JobScheduler | None):
    """The app's lifespan: the background jobs run while it serves; a store whose disk
    is full is watched until there is room again (then read-write); the server closes
    at the end."""
    space_back = threading.Event()

    def watch_space() -> None:
        """Read-only on a full disk: back to read-write once there is room again."""
        while not space_back.wait(2.0):
            if store.try_leave_read_only():
                log.warning("the store's disk has room again: read-write")
                return

    @contextlib.asynccontextmanager
    async def serving(app):
        if scheduler is not None:
            scheduler.start()
        watcher = None
        if store.read_only is not None:
            watcher = threading.Thread(target=watch_space, name="medview-space", daemon=True)
            watcher.start()
        try:
            yield
        finally:
            space_back.set()
            if watcher is not None:
                watcher.join(10)
            if scheduler is not None:
                scheduler.stop()
            srv.close()

    return serving


def run(store_dir: str, host: str = "127.0.0.1", port: int = 8042, log_level: str = "info",
        policy_path: str | None = None, *, allow_local: bool = False, trusted_proxies=(),
        proxy_header: str = "x-forwarded-for", workers: int = 1,
        max_streams: int | None = None) -> None:
    """Serve until interrupted (blocking), with the scheduled migration job. uvicorn's
    own proxy-header handling is off: :mod:`server.peers` decides who the client
    is, from ``trusted_proxies`` only.

    ``workers`` > 1 runs that many server processes on the one port (uvicorn's workers;
    the kernel spreads the connections): sessions, login throttling, series facts and
    job leases live in the database, so any process serves any request, and Python's
    interpreter lock stops being the ceiling. Each process builds its app from the same
    settings (:func:`app_from_environment`). Admission control's limits are the
    machine's (``max_streams`` packet streams at once, default 2 per core), each process
    taking its share (:meth:`~server.admission.Limits.for_workers`)."""
    import json

    import uvicorn

    settings = {"store": str(store_dir), "policy": policy_path, "allow_local": allow_local,
                "trusted_proxies": [str(n) for n in trusted_proxies],
                "proxy_header": proxy_header, "workers": workers, "max_streams": max_streams}
    if workers > 1:
        os.environ[_SERVE_ENV] = json.dumps(settings)
        log.warning("medview-server %s serving %s on http://%s:%d with %d worker processes",
                    VERSION, store_dir, host, port, workers)
        uvicorn.run("server.app:app_from_environment", factory=True, host=host, port=port,
                    workers=workers, log_level=log_level, access_log=False,
                    proxy_headers=False)
        return
    app = _app_from(settings)
    store = app.state.server.store
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            proxy_headers=False)
    log.warning("medview-server %s serving %s on http://%s:%d%s", VERSION, store_dir, host,
                port, f" READ-ONLY ({store.read_only})" if store.read_only else "")
    uvicorn.Server(config).run()


_SERVE_ENV = "MEDVIEW_SERVE_SETTINGS"


def _app_from(settings: dict) -> Starlette:
    store = Store(settings["store"])
    return create_app(store, policy=PolicySource(store.root, settings.get("policy")),
                      schedule=True, allow_local=bool(settings.get("allow_local")),
                      trusted_proxies=tuple(settings.get("trusted_proxies") or ()),
                      proxy_header=settings.get("proxy_header") or "x-forwarded-for",
                      admission=Limits.for_workers(int(settings.get("workers") or 1),
                                                   settings.get("max_streams")))


def app_from_environment() -> Starlette:
    """The app of one worker process of ``serve --workers N`` (settings from the parent)."""
    import json

    return _app_from(json.loads(os.environ[_SERVE_ENV]))
