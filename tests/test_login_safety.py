"""Logins, proxies and the local user (issue 10, section 2): forwarding headers believed
from trusted proxies only, failed log-ins throttled per user name and per address with
growing delays that never block another user's correct log-in, and the password-less
``local`` user only in the desktop's bundled server (or ``serve --allow-local``), from a
direct loopback peer."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import requests
from starlette.datastructures import Headers

from server.auth import AuthError, Authority
from server.embedded import EmbeddedServer
from server.peers import client_address, parse_networks
from tests.policyutil import copy_store
from tests.test_server_process import _free_port

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def lstore(ct_store, tmp_path_factory):
    return copy_store(ct_store, tmp_path_factory.mktemp("login") / "store")


@pytest.fixture()
def srv(lstore):
    s = EmbeddedServer(str(lstore)).start()
    auth = s.app.state.server.auth
    for name in ("alice", "bob"):
        auth.add_user(name, PASSWORD)
    auth._failures.clear()
    yield s
    s.stop()


def login(url: str, name: str, password: str | None = None, **headers) -> requests.Response:
    return requests.post(f"{url}/api/login", json={"username": name, "password": password},
                         headers=headers, timeout=30)


# ------------------------------------------------------------------ the client address
def test_forwarding_headers_only_from_trusted_proxies():
    h = Headers({"x-forwarded-for": "6.6.6.6, 203.0.113.7, 10.0.0.2",
                 "forwarded": 'for=198.51.100.9;proto=https, for="[2001:db8::1]:4711"'})
    assert client_address("127.0.0.1", h) == "127.0.0.1"          # no proxy trusted
    nets = parse_networks(["10.0.0.0/24", "127.0.0.1"])
    assert client_address("192.0.2.1", h, nets) == "192.0.2.1"     # peer is no proxy
    # right to left, skipping trusted hops; the client's own entries (6.6.6.6) ignored
    assert client_address("127.0.0.1", h, nets) == "203.0.113.7"
    assert client_address("10.0.0.5", h, nets, "forwarded") == "2001:db8::1"
    bad = Headers({"x-forwarded-for": "nonsense"})
    assert client_address("10.0.0.5", bad, nets) == "10.0.0.5"     # garbage: the proxy
    with pytest.raises(ValueError, match="trusted-proxy"):
        parse_networks(["10.0.0.0/33"])


def test_rotating_x_forwarded_for_neither_escapes_the_limit_nor_forges_the_audit(srv):
    """Today each forged X-Forwarded-For counted as a new address (100 of 100 tries
    evaluated) and was written to the audit as the peer."""
    auth = srv.app.state.server.auth
    names = [f"sprayed{i}" for i in range(12)]
    for i, name in enumerate(names):           # a password spray, a new "address" each
        r = login(srv.url, name, "Winter2026!", **{"X-Forwarded-For": f"10.9.{i}.1"})
        assert r.status_code == 401
    evaluated = 0
    for i, name in enumerate(names):           # second round: the address is in its delay
        r = login(srv.url, name, "Summer2026!", **{"X-Forwarded-For": f"10.8.{i}.1"})
        assert r.status_code in (401, 429)
        evaluated += r.status_code == 401
    assert evaluated == 0
    assert int(r.headers["Retry-After"]) >= 1
    rows = auth.audit_rows(action="login", limit=None)
    assert rows and {r["peer"] for r in rows} == {"127.0.0.1"}


def test_trusted_proxy_names_the_client(lstore):
    s = EmbeddedServer(str(lstore), trusted_proxies=["127.0.0.1/32"]).start()
    try:
        auth = s.app.state.server.auth
        auth.add_user("carol", PASSWORD)
        assert login(s.url, "carol", PASSWORD,
                     **{"X-Forwarded-For": "6.6.6.6, 198.51.100.4"}).status_code == 200
        (row,) = auth.audit_rows(user="carol", action="login")
        assert row["peer"] == "198.51.100.4"
    finally:
        s.stop()


# ------------------------------------------------------------------ throttling
def test_delays_double_and_other_users_still_log_in(tmp_path):
    now = [1000.0]
    auth = Authority(str(tmp_path / "a.sqlite"), clock=lambda: now[0], max_failures=3,
                     address_failures=6, allow_local=True)
    for name in ("dora", "ed"):
        auth.add_user(name, PASSWORD)
    waits = []
    for _ in range(6):
        with pytest.raises(AuthError) as e:
            auth.login("dora", "wrong", "10.0.0.5")
        assert e.value.status == 401
        waits.append(e.value.extra.get("retry_after"))
        if waits[-1]:
            with pytest.raises(AuthError) as e:            # even the right password waits
                auth.login("dora", PASSWORD, "10.0.0.7")
            assert e.value.status == 429 and e.value.extra["retry_after"] == waits[-1]
            now[0] += waits[-1]
    assert waits == [None, None, 1, 2, 4, 8]
    assert auth.login("dora", PASSWORD, "10.0.0.7").user == "dora"     # after the delay
    # the address 10.0.0.5 is in its delay now (6 failures): its failed names wait, but
    # another user's correct password and the local user go through
    with pytest.raises(AuthError) as e:
        auth.login("nobody", "guess", "10.0.0.5")
    assert e.value.status == 401
    with pytest.raises(AuthError) as e:
        auth.login("nobody", "guess again", "10.0.0.5")
    assert e.value.status == 429
    assert auth.login("ed", PASSWORD, "10.0.0.5").user == "ed"
    assert auth.login("local", None, "127.0.0.1").user == "local"
    auth.close()


def test_a_locked_out_name_never_blocks_other_users_from_the_same_address(srv):
    """Today five wrong passwords from loopback blocked the desktop's local user and
    every other user for about five minutes."""
    codes = [login(srv.url, "alice", "wrong").status_code for _ in range(30)]
    assert codes[:5] == [401] * 5 and 429 in codes
    r = login(srv.url, "alice", PASSWORD)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert login(srv.url, "bob", PASSWORD).status_code == 200
    assert login(srv.url, "local").status_code == 200


# ------------------------------------------------------------------ the local user
def test_local_user_only_from_a_direct_loopback_peer(lstore):
    s = EmbeddedServer(str(lstore), allow_local=False).start()   # like `serve`
    try:
        r = login(s.url, "local")
        assert r.status_code == 401 and "--allow-local" in r.json()["error"]
    finally:
        s.stop()
    s = EmbeddedServer(str(lstore), trusted_proxies=["127.0.0.1/32"]).start()
    try:
        assert login(s.url, "local").status_code == 200
        for forged in ({"X-Forwarded-For": "127.0.0.1"}, {"Forwarded": "for=127.0.0.1"},
                       {"X-Forwarded-For": "10.1.2.3"}):
            r = login(s.url, "local", **forged)                  # never on a header
            assert r.status_code == 401, forged
    finally:
        s.stop()


def test_serve_refuses_local_unless_allowed(lstore):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--store", str(lstore), "--port",
         str(port), "--log-level", "warning", "--trusted-proxy", "127.0.0.1/32"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        r = None
        for _ in range(1200):                                    # until it listens
            try:
                r = requests.get(f"{url}/api/health", timeout=5)
                break
            except requests.ConnectionError:
                assert proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.05)
        assert r is not None and r.status_code == 200
        r = login(url, "local")
        assert r.status_code == 401 and "--allow-local" in r.json()["error"]
    finally:
        proc.terminate()
        proc.wait(30)
    rc = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--store",
                         str(lstore), "--trusted-proxy", "10.0.0.0/33"],
                        capture_output=True, text=True, timeout=60)
    assert rc.returncode == 2 and "trusted-proxy" in rc.stderr
