"""Users, groups, sessions, failed-log-in limits and the audit log; the `medview-server
user` and `audit` commands."""
from __future__ import annotations

import io
import json

import pytest

from server.database import database_of
import requests

from client import ServerError, Session
from server.auth import AuthError, Authority
from server.cli import main as cli
from server.embedded import EmbeddedServer
from server.store import Store
from tests.policyutil import copy_store, fetch, series_uid
from waits import wait_for


@pytest.fixture(scope="module")
def ustore(ct_store, tmp_path_factory):
    return copy_store(ct_store, tmp_path_factory.mktemp("users") / "store")


def run_cli(monkeypatch, capsys, *argv, stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = cli([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_user_commands(ustore, monkeypatch, capsys):
    rc, out, _ = run_cli(monkeypatch, capsys, "user", "add", "carol", "--store", ustore,
                         "--group", "radiologist", "--password-stdin", stdin="s3cret-pass\n")
    assert rc == 0 and "carol added" in out
    rc, _, err = run_cli(monkeypatch, capsys, "user", "add", "dave", "--store", ustore,
                         "--password-stdin", stdin="short\n")
    assert rc != 0
    rc, out, _ = run_cli(monkeypatch, capsys, "user", "grant", "@radiologist", "--store", ustore,
                         "--max-layers", "3", "--images", "0-5", "--region", "0,0,128,128")
    assert rc == 0 and '"max_layers": 3' in out
    rc, out, _ = run_cli(monkeypatch, capsys, "user", "grant", "carol", "--store", ustore,
                         "--series", "1.2.3", "--max-reduce-min", "1", "--actions", "fetch,browse")
    assert rc == 0
    rc, out, _ = run_cli(monkeypatch, capsys, "user", "list", "--store", ustore)
    assert "carol" in out and "radiologist" in out and "loopback only" in out
    assert "@radiologist" in out and "max_layers=3" in out and "images=0-5" in out
    assert "scope 1.2.3" in out and "actions=browse,fetch" in out
    rc, _, err = run_cli(monkeypatch, capsys, "user", "grant", "nobody", "--store", ustore,
                         "--max-layers", "1")
    assert rc == 1 and "no user" in err
    rc, _, err = run_cli(monkeypatch, capsys, "user", "grant", "carol", "--store", ustore,
                         "--actions", "fly")
    assert rc == 2 and "unknown action" in err
    with Store(ustore):
        auth = Authority(database_of(ustore))
        g = auth.grant_for("carol", "1.2.3")
        assert g.max_reduce_min == 1 and g.actions == {"fetch", "browse"}
        g = auth.grant_for("carol", "9.9")
        assert g.max_layers == 3 and g.images == set(range(6)) and g.regions == [(0, 0, 128, 128)]
        auth.close()
    rc, out, _ = run_cli(monkeypatch, capsys, "user", "passwd", "carol", "--store", ustore,
                         "--password-stdin", stdin="another-pass\n")
    assert rc == 0
    rc, out, _ = run_cli(monkeypatch, capsys, "user", "groups", "carol", "referrer", "--store", ustore)
    assert rc == 0 and "referrer" in out
    rc, out, _ = run_cli(monkeypatch, capsys, "user", "grant", "carol", "--store", ustore,
                         "--series", "1.2.3", "--revoke")
    assert rc == 0 and "removed" in out
    rc, out, _ = run_cli(monkeypatch, capsys, "user", "remove", "carol", "--store", ustore)
    assert rc == 0
    rc, _, err = run_cli(monkeypatch, capsys, "user", "remove", "carol", "--store", ustore)
    assert rc == 1


def test_failed_logins_are_rate_limited(tmp_path):
    now = [1000.0]
    auth = Authority(str(tmp_path / "a.sqlite"), clock=lambda: now[0], max_failures=3,
                     failure_window_s=60)
    auth.add_user("erin", "right password")
    for _ in range(3):
        with pytest.raises(AuthError) as e:
            auth.login("erin", "wrong", "10.0.0.5")
        assert e.value.status == 401
    with pytest.raises(AuthError) as e:                     # even the right password waits
        auth.login("erin", "right password", "10.0.0.6")
    assert e.value.status == 429 and 0 < e.value.extra["retry_after"] <= 60
    auth.add_user("frank", "his password")                  # another user from that address
    assert auth.login("frank", "his password", "10.0.0.5").user == "frank"
    now[0] += 61
    assert auth.login("erin", "right password", "10.0.0.6").user == "erin"
    auth.close()


def test_sessions_expire_and_end(tmp_path):
    now = [0.0]
    auth = Authority(str(tmp_path / "a.sqlite"), clock=lambda: now[0], idle_s=100, max_age_s=300)
    auth.add_user("gina", "right password")
    s = auth.login("gina", "right password", "10.0.0.1")
    for _ in range(3):                                      # used every 90 s: stays alive...
        now[0] += 90
        auth.authorize(s.id, "browse")
    now[0] += 90                                            # ...but not past its maximum age
    with pytest.raises(AuthError) as e:
        auth.authorize(s.id, "browse")
    assert e.value.status == 401
    s = auth.login("gina", "right password", "10.0.0.1")
    now[0] += 101                                           # idle too long
    with pytest.raises(AuthError):
        auth.authorize(s.id, "browse")
    s = auth.login("gina", "right password", "10.0.0.1")
    auth.logout(s.id)                                       # closed
    with pytest.raises(AuthError):
        auth.authorize(s.id, "browse")
    s = auth.login("gina", "right password", "10.0.0.1")
    auth.remove_user("gina")                                # removed: its sessions end
    with pytest.raises(AuthError):
        auth.authorize(s.id, "browse")
    with pytest.raises(AuthError):                          # local only where allowed...
        auth.login("local", None, "127.0.0.1")
    auth.allow_local = True
    with pytest.raises(AuthError):                          # ...and only from loopback
        auth.login("local", None, "10.0.0.1")
    assert auth.login("local", None, "127.0.0.1").user == "local"
    auth.close()


def test_http_login_limits_and_audit(ustore, monkeypatch, capsys):
    srv = EmbeddedServer(str(ustore)).start()
    try:
        auth = srv.app.state.server.auth
        auth.max_failures = 2
        auth.add_user("hank", "right password")
        for _ in range(2):
            with pytest.raises(ServerError) as e:
                Session(srv.url, "hank", "wrong")
            assert e.value.status == 401
        with pytest.raises(ServerError) as e:
            Session(srv.url, "hank", "right password")
        assert e.value.status == 429 and e.value.body["retry_after"] > 0
        auth._failures.clear()
        s = Session(srv.url, "hank", "right password")
        uid = series_uid(ustore)
        r = fetch(srv.url, s.id, target=uid, layers=1, comps="0-1")
        assert r.status == 200
        end = r.controls[-1]
        s.series()
        requests.get(f"{srv.url}/dicomweb/studies", headers={"Authorization": "Bearer forged"})
        # the audit row of a stream is written when the stream ends: wait for it
        rows = wait_for(lambda: auth.audit_rows(user="hank", action="fetch"),
                        what="the audit row of the stream")
    finally:
        srv.stop()
    (row,) = rows
    assert row["resource"] == uid and row["outcome"] == "ok"
    assert row["detail"]["bytes_sent"] == end["bytes_sent"] > 0
    assert row["detail"]["query"]["layers"] == "1" and row["peer"] == "127.0.0.1"
    rc, out, _ = run_cli(monkeypatch, capsys, "audit", "--store", ustore, "--user", "hank")
    lines = out.splitlines()
    assert rc == 0 and any("login" in ln and "denied" in ln for ln in lines)
    assert any("fetch" in ln and f"{end['bytes_sent']} bytes sent" in ln for ln in lines)
    assert any("browse" in ln and "ok" in ln for ln in lines)
    rc, out, _ = run_cli(monkeypatch, capsys, "audit", "--store", ustore, "--json",
                         "--action", "browse", "--limit", "50")
    rows = [json.loads(ln) for ln in out.splitlines()]
    assert any(r["outcome"] == "denied" and r["http_status"] == 401 for r in rows)
    rc, out, _ = run_cli(monkeypatch, capsys, "audit", "--store", ustore, "--resource", uid,
                         "--since", "2000-01-01")
    assert rc == 0 and "fetch" in out
