"""``medview-server serve --workers N``: several server processes on one port share
sessions (and the rest of their state) through the database, so a session made by one
process is honoured by every other; admission control's limits are the machine's, each
process taking its share; a process that finds another one streamed to the session since
forgets its own cache model, so a client that dropped data meanwhile loses nothing."""
from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import sys
import time

import pytest
import requests

from codestream.framing import CONTROL, PacketStreamReader
from policyutil import copy_store_tree
from waits import WAIT_S


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Workers:
    def __init__(self, url: str, port: int) -> None:
        self.url, self.port = url, port

    def on(self, replica: str | None = None, avoid: str | None = None
           ) -> tuple[http.client.HTTPConnection, str]:
        """A keep-alive connection served by ``replica`` (or by any but ``avoid``): new
        connections until the kernel hands one to such a process; its replica id."""
        deadline = time.monotonic() + WAIT_S
        while True:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT_S)
            c.request("GET", "/api/health")
            got = json.loads(c.getresponse().read())["replica"]
            if (replica is None or got == replica) and got != avoid:
                return c, got
            c.close()
            assert time.monotonic() < deadline, f"no connection to {replica or 'another'}"


@pytest.fixture(scope="module")
def two_workers(ct_store, tmp_path_factory):
    """``serve --workers 2 --max-streams 3`` on a copy of the CT store."""
    tmp = tmp_path_factory.mktemp("workers")
    store = copy_store_tree(ct_store, tmp / "store")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--store", str(store),
                             "--port", str(port), "--workers", "2", "--max-streams", "3",
                             "--allow-local", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:                                      # up: answers its health route
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                requests.get(f"{url}/api/health", timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.1)
        yield _Workers(url, port)
    finally:
        proc.terminate()
        try:
            proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp / "store", ignore_errors=True)


def test_two_worker_processes_share_sessions(two_workers):
    url = two_workers.url
    sid = requests.post(f"{url}/api/login", json={"username": "local"},
                        timeout=30).json()["session"]
    auth = {"Authorization": f"Bearer {sid}", "Connection": "close"}
    replicas: dict[str, dict] = {}
    deadline = time.monotonic() + WAIT_S
    while len(replicas) < 2:
        # a new connection each time: the kernel hands it to either process
        h = requests.get(f"{url}/api/health", headers={"Connection": "close"},
                         timeout=30).json()
        replicas[h["replica"]] = h["admission"]
        r = requests.get(f"{url}/dicomweb/studies", headers=auth, timeout=30)
        assert r.status_code == 200, r.text          # the session, whoever answers
        assert time.monotonic() < deadline, f"one process answered everything: {replicas}"
    # the machine's 3 streams at once and 24 small requests, half each (rounded up)
    assert [(a["streams"]["limit"], a["small"]["limit"]) for a in replicas.values()] \
        == [(2, 12), (2, 12)]
    # every process honours the session and the logout made through one of them
    requests.post(f"{url}/api/logout", headers=auth, timeout=30)
    for _ in range(6):
        r = requests.get(f"{url}/dicomweb/studies", headers=auth, timeout=30)
        assert r.status_code == 401


def _stream(conn: http.client.HTTPConnection, sid: str, query: str,
            declare: dict | None = None) -> set[tuple]:
    """One framed packet request on ``conn`` (``query``: path and query): the JPP
    messages it brought, as (class, image, bin, offset, bytes) — what a client's cache
    would hold of them."""
    h = {"Authorization": f"Bearer {sid}"}
    if declare is None:
        conn.request("GET", f"{query}&framing=mv", headers=h)
    else:
        h["Content-Type"] = "application/json"
        conn.request("POST", f"{query}&framing=mv", headers=h,
                     body=json.dumps({"model": declare}).encode())
    r = conn.getresponse()
    assert r.status == 200, r.read()[:300]
    reader, got, end = PacketStreamReader(), set(), None
    while chunk := r.read(1 << 16):
        for kind, payload in reader.feed(chunk):
            if kind == CONTROL:
                end = payload if payload.get("type") == "end" else end
            else:
                got |= {(m.cls, m.csn, m.bin_id, m.offset, m.data) for m in payload}
    assert end is not None and end["reason"] == "complete", end
    return got


def _login(url: str) -> str:
    return requests.post(f"{url}/api/login", json={"username": "local"},
                         timeout=30).json()["session"]


@pytest.mark.parametrize("route", ["series", "slabs"])
def test_a_client_that_dropped_its_cache_gets_everything_from_the_other_process(
        two_workers, ct_series_uid, route):
    """Process B streams layer 1 to the session; the client drops its cache and says so
    to process A (its declared model is empty) while fetching one image; B, asked next
    for the whole series (or its slab pyramid), must not plan against its own stale
    model (which believes the client holds layer 1 of every image): what the client got
    after dropping its cache is the whole target."""
    url = two_workers.url
    t = (f"/jpip?target={ct_series_uid}" if route == "series"
         else f"/jpip/slabs/{ct_series_uid}?target={ct_series_uid}")
    full = _stream(two_workers.on()[0], _login(url), t)          # a fresh session: all
    sid = _login(url)
    cb, b = two_workers.on()
    first = _stream(cb, sid, f"{t}&layers=1")
    assert first and first < full
    ca, _ = two_workers.on(avoid=b)
    held = _stream(ca, sid, f"{t}&comps=0&layers=1", declare={})
    cb, _ = two_workers.on(replica=b)
    held |= _stream(cb, sid, t)
    assert held == full


def _jpp(conn: http.client.HTTPConnection, sid: str, query: str):
    """A bare JPP-stream request on ``conn``: (status, messages, response headers)."""
    from codestream.jpp import parse_all

    conn.request("GET", f"/jpip?{query}&type=jpp-stream",
                 headers={"Authorization": f"Bearer {sid}"})
    r = conn.getresponse()
    body = r.read()
    return r.status, (parse_all(body) if r.status == 200 else body), r.headers


def test_a_jpip_channel_opened_on_one_process_is_served_by_the_other(
        two_workers, ct_series_uid):
    """A JPIP client's channel (cnew) opened on process B, then used on process A (its
    connection was closed and the kernel handed the new one to A): A serves it — what B
    sent on it is not known there, so it comes again, nothing is lost — and keeps its
    model from then on; a channel closed (cclose) stays closed."""
    from codestream.jpp import EorMessage

    sid, q = _login(two_workers.url), f"target={ct_series_uid}&comps=0"
    cb, b = two_workers.on()
    st, first, h = _jpp(cb, sid, f"{q}&layers=1&cnew=http&tid=0")
    assert st == 200
    cid = dict(kv.split("=", 1) for kv in h["JPIP-cnew"].split(","))["cid"]
    data = [m for m in first if not isinstance(m, EorMessage)]
    assert data
    ca, _ = two_workers.on(avoid=b)
    st, again, _ = _jpp(ca, sid, f"{q}&layers=1&cid={cid}")
    assert st == 200, again
    assert [m for m in again if not isinstance(m, EorMessage)] == data     # sent again
    st, more, _ = _jpp(ca, sid, f"{q}&layers=1&cid={cid}")
    assert st == 200 and all(isinstance(m, EorMessage) for m in more)     # A's model now
    st, _, _ = _jpp(ca, sid, f"{q}&layers=1&cid={cid}&cclose={cid}")
    assert st == 200
    st, body, _ = _jpp(ca, sid, f"{q}&layers=1&cid={cid}")
    assert st == 404, body
