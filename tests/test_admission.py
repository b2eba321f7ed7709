"""Admission control (issue 15): beyond its limits the server answers 503 with
Retry-After instead of queueing; streams and small requests have separate gates; the
client library waits as told, a bounded number of times, and says so."""
from __future__ import annotations

import asyncio
import socket
import threading

import pytest
import requests
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from client.session import ServerError, Session
from server.admission import Admission, Gate, Gates, Limits, is_stream
from tests.waits import wait_for


@pytest.mark.parametrize("path,query,stream", [
    ("/jpip", b"target=1.2&comps=0&layers=1", False),
    ("/jpip", b"target=1.2&comps=0-3", False),
    ("/jpip", b"target=1.2&comps=0-4", True),
    ("/jpip", b"target=1.2&comps=0,2,5-6", False),
    ("/jpip", b"target=1.2", True),
    ("/jpip", b"target=1.2&len=4000", False),
    ("/jpip", b"target=1.2&comps=x", True),
    ("/jpip/slides/abc", b"", True),
    ("/jpip/slabs/1.2", b"comps=1", False),
    ("/dicomweb/studies", b"", False),
    ("/api/login", b"", False),
    ("/api/series/1.2/images", b"", False),
])
def test_classes(path, query, stream):
    assert is_stream(path, query) is stream


S = "/dicomweb/studies/1.2"
SE = S + "/series/1.3"
INST = SE + "/instances/1.4"


@pytest.mark.parametrize("method,path,bulk", [
    ("GET", "/dicomweb/studies", False), ("GET", "/dicomweb/series", False),
    ("GET", SE + "/instances", False), ("GET", INST + "/metadata", False),
    ("GET", S + "/metadata", False), ("GET", INST + "/thumbnail", False),
    ("GET", INST + "/rendered", False), ("GET", INST + "/frames/1/rendered", False),
    ("GET", SE + "/rendered", True), ("GET", S + "/rendered", True),
    ("GET", S, True), ("GET", SE, True), ("GET", INST, True),
    ("GET", INST + "/frames/1", True), ("GET", INST + "/bulk/7FE00010", True),
    ("POST", "/dicomweb/studies", True), ("POST", S, True),
])
def test_dicomweb_classes(method, path, bulk):
    assert is_stream(path, b"", method) is bulk


def test_gate_admits_queues_hands_over_and_refuses():
    async def scenario():
        g = Gate("t", limit=1, budget=10.0, service=1.0)
        assert await g.enter() is None and g.inflight == 1
        waiting = asyncio.ensure_future(g.enter())        # expected wait 1 s: fits
        await asyncio.sleep(0)
        assert len(g.waiters) == 1 and not waiting.done()
        g.leave(1.0)                                       # the slot changes hands
        assert await waiting is None and g.inflight == 1 and not g.waiters
        tight = Gate("t", limit=1, budget=0.5, service=2.0)
        assert await tight.enter() is None
        retry = await tight.enter()                        # expected wait 2 s > 0.5
        assert retry == 2 and tight.refused == 1 and not tight.waiters
        # a waiter whose budget runs out is refused and leaves the line
        g2 = Gate("t", limit=1, budget=0.05, service=0.001)
        assert await g2.enter() is None
        assert await g2.enter() >= 1
        assert not g2.waiters and g2.inflight == 1
        g2.leave(0.001)
        assert g2.inflight == 0
        # a waiter that goes away (cancelled) leaves no slot behind
        g3 = Gate("t", limit=1, budget=10.0, service=0.001)
        assert await g3.enter() is None
        w = asyncio.ensure_future(g3.enter())
        await asyncio.sleep(0)
        w.cancel()
        with pytest.raises(asyncio.CancelledError):
            await w
        g3.leave(0.001)
        assert g3.inflight == 0 and not g3.waiters
    asyncio.run(scenario())


class _App:
    """A real uvicorn server running the admission middleware in front of a packet route
    that holds its stream open until released, and a small route."""

    def __init__(self, limits: Limits) -> None:
        self.release = threading.Event()
        self.started = threading.Event()

        def chunks():
            yield b"first"
            self.started.set()
            self.release.wait(60)
            yield b"last"

        async def jpip(request):
            return StreamingResponse(chunks())

        async def login(request):
            return JSONResponse({"session": "s1", "user": "local"})

        async def studies(request):
            return JSONResponse([])

        self.gates = Gates(limits)
        app = Starlette(routes=[Route("/jpip", jpip), Route("/api/login", login, methods=["POST"]),
                                Route("/dicomweb/studies", studies)],
                        middleware=[Middleware(Admission, gates=self.gates)])
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=lambda: self.server.run(sockets=[self.sock]),
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_for(lambda: self.server.started, what="server started")
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def _hold_stream(url: str):
    """A stream that has begun (its first chunk read) and is held open by the server."""
    r = requests.get(f"{url}/jpip?target=1.2", stream=True, timeout=30)
    assert r.status_code == 200
    rest = r.iter_content(None)
    assert next(rest) == b"first"
    r.rest = rest
    return r


def test_streams_beyond_the_limit_get_503_and_small_requests_still_pass():
    with _App(Limits(streams=1, stream_budget=0.0, small=4, small_budget=0.5)) as app:
        held = _hold_stream(app.url)
        wait_for(app.started.is_set, what="stream held")
        r = requests.get(f"{app.url}/jpip?target=1.2", timeout=30)
        assert r.status_code == 503
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["busy"] == "streams" and r.json()["retry_after"] >= 1
        # small requests, a tiny packet request among them, have their own gate
        assert requests.post(f"{app.url}/api/login", json={}, timeout=30).status_code == 200
        assert requests.get(f"{app.url}/dicomweb/studies", timeout=30).status_code == 200
        assert requests.get(f"{app.url}/jpip?target=1.2&comps=0&layers=1", stream=True,
                            timeout=30).status_code == 200
        app.release.set()
        assert b"".join(held.rest) == b"last"
        wait_for(lambda: app.gates.streams.inflight == 0, what="stream done")
        app.release.clear()
        app.started.clear()
        again = _hold_stream(app.url)                 # a slot again
        app.release.set()
        again.close()
        st = app.gates.stats()
        assert st["streams"]["refused"] == 1 and st["small"]["refused"] == 0


def test_client_waits_as_told_and_says_so():
    with _App(Limits(streams=1, stream_budget=0.0)) as app:
        s = Session(app.url)
        held = _hold_stream(app.url)
        wait_for(app.started.is_set, what="stream held")
        told = []

        def busy(pause, attempt):
            told.append((pause, attempt))
            app.release.set()                          # the other stream ends meanwhile

        s.on_busy = busy
        r = s.packet_stream({"target": "1.2"})
        assert r.status_code == 200 and r.content == b"firstlast"
        assert len(told) == 1 and told[0][1] == 1 and 1.0 <= told[0][0] <= 15.0
        held.close()


def test_client_gives_up_after_its_bound():
    with _App(Limits(streams=1, stream_budget=0.0)) as app:
        s = Session(app.url)
        s.busy_retries = 1
        held = _hold_stream(app.url)
        wait_for(app.started.is_set, what="stream held")
        told = []
        s.on_busy = lambda pause, attempt: told.append(attempt)
        with pytest.raises(ServerError) as e:
            s.packet_stream({"target": "1.2"})
        assert e.value.status == 503 and told == [1]
        s.busy_max_wait = 0.0                          # no waiting at all: at once
        told.clear()
        with pytest.raises(ServerError):
            s.request("GET", "/jpip", params={"target": "1.2"})
        assert told == []
        app.release.set()
        held.close()


def test_the_image_server_reports_its_gates(server):
    r = requests.get(f"{server.url}/api/health", timeout=30).json()
    assert set(r["admission"]) == {"streams", "small"}
    assert r["admission"]["small"]["limit"] >= 1


def test_worker_processes_share_the_machines_limits():
    """serve --workers N: each process takes its share (rounded up) of the machine's
    streams and small requests, so N processes run about as many at once as one would;
    the waiting budgets are not shared."""
    one = Limits()
    assert Limits.for_workers(1) == one
    two = Limits.for_workers(2, streams=8)
    assert (two.streams, two.small) == (4, (one.small + 1) // 2)
    assert (two.stream_budget, two.small_budget) == (one.stream_budget, one.small_budget)
    three = Limits.for_workers(3, streams=4)
    assert three.streams == 2                     # 4/3 rounded up: never less than asked
    assert Limits.for_workers(8, streams=2).streams == 1
    assert Limits.for_workers(2).streams == (one.streams + 1) // 2
    with pytest.raises(ValueError):
        Limits.for_workers(0)
    with pytest.raises(ValueError):
        Limits.for_workers(2, streams=0)
