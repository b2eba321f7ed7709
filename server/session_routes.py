"""Log-in, log-out and health: the routes about the session and the server itself."""
from __future__ import annotations

import logging

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from . import peers
from .version import VERSION
from .responses import error
from .auth import AuthError, is_loopback
from .inputs import InputError, parse_json, read_body
from .dbutil import read_only_reason

log = logging.getLogger("medview.server")


def routes(srv, guarded) -> list[Route]:
    async def login(request: Request):
        peer = peers.peer_of(request)
        direct = (request.client is not None and is_loopback(request.client.host)
                  and not peers.has_forwarding(request.headers))
        try:
            body = parse_json(await read_body(request, 64 << 10), object_only=True)
        except InputError as e:
            await run_in_threadpool(srv.auth.audit, user=None, action="login", resource=None,
                                    outcome="error", status=e.status, peer=peer,
                                    detail={"error": str(e)})
            return error(e.status, 'login body must be JSON: {"username": ..., "password": ...}'
                         f" ({e})", field=e.field)
        name, password = body.get("username"), body.get("password")
        bad = None
        if not isinstance(name, str) or not name or len(name) > 256 or "\x00" in name:
            bad = ("username", "username is required (a string of at most 256 characters)")
        elif password is not None and (not isinstance(password, str) or len(password) > 1024):
            bad = ("password", "password must be a string of at most 1024 characters")
        if bad is not None:
            await run_in_threadpool(srv.auth.audit, user=None, action="login", resource=None,
                                    outcome="error", status=400, peer=peer,
                                    detail={"error": bad[1]})
            return error(400, bad[1], field=bad[0])
        try:
            s = await run_in_threadpool(srv.auth.login, name, password, peer,
                                        direct_loopback=direct)
        except AuthError as e:
            await run_in_threadpool(srv.auth.audit, user=name, action="login", resource=None,
                                    outcome="denied", status=e.status, peer=peer,
                                    detail={"error": str(e)})
            headers = ({"Retry-After": str(e.extra["retry_after"])}
                       if "retry_after" in e.extra else None)
            return JSONResponse({"error": str(e), "status": e.status, **e.extra},
                                status_code=e.status, headers=headers)
        await run_in_threadpool(srv.auth.audit, user=s.user, session=s.serial, action="login",
                                resource=None, outcome="ok", status=200, peer=peer)
        return JSONResponse({"session": s.id, "user": s.user})

    login.medview = {"action": None, "public": True, "body_required": True, "body": {
        "type": "object", "required": ["username"],
        "properties": {"username": {"type": "string"}, "password": {"type": "string"}}}}

    @guarded("logout")
    def logout(request: Request):
        srv.auth.logout(request.state.session.id)
        return JSONResponse({"ok": True})

    async def health(request: Request):
        """``ok``, or ``degraded`` with why: the store is read-only (its disk was full at
        start), audit rows wait in memory because writes fail, or final copies failed their
        verification (an alarm: :mod:`server.policy_copies`)."""
        from .policy_copies import conversion_health
        from .verify import lossless_health

        audit = srv.auth.health()
        read_only = read_only_reason(srv.auth.db.path)
        conv = await run_in_threadpool(conversion_health, srv.catalogue)
        lossless = await run_in_threadpool(lossless_health, srv.catalogue)
        problems = []
        if read_only:
            problems.append(f"read-only: {read_only}")
        if audit["failing"] or audit["dropped"]:
            problems.append(f"audit rows held in memory: {audit['pending']}, not written: "
                            f"{audit['dropped']} ({audit['failing'] or 'writes work again'})")
        if lossless["failed"]:
            problems.append(f"instances whose lossless verification failed (not served): "
                            f"{lossless['failed']}")
        if conv["failed"]:
            problems.append(f"final copies that failed verification: {conv['failed']}")
        return JSONResponse({"status": "degraded" if problems else "ok", "version": VERSION,
                             "read_only": read_only is not None, "problems": problems,
                             "audit": audit, "conversion": conv, "lossless": lossless,
                             "admission": srv.gates.stats() if srv.gates is not None else None,
                             "jobs": srv.jobs.stats() if srv.jobs is not None else None,
                             "replica": srv.auth.replica})

    health.medview = {"action": None, "public": True}

    return [
        Route("/api/login", login, methods=["POST"]),
        Route("/api/logout", logout, methods=["POST"]),
        Route("/api/health", health),
    ]
