"""Stateless replicas: sessions, login throttling and cache-model ownership are shared
through the database, so any server process on a store serves any request."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import requests

from client import SeriesData, Session
from server.auth import AuthError, Authority
from server.embedded import EmbeddedServer
from server.packets import CacheModel
from tests.policyutil import copy_store


def two(tmp_path, **kw):
    db = str(tmp_path / "a.sqlite")
    now = [1000.0]
    a = Authority(db, clock=lambda: now[0], **kw)
    b = Authority(db, clock=lambda: now[0], **kw)
    a.add_user("ann", "pw-ann-1")
    return a, b, now


def test_a_session_made_on_one_replica_works_on_another(tmp_path):
    a, b, now = two(tmp_path, idle_s=100)
    s = a.login("ann", "pw-ann-1", "10.0.0.5")
    assert b.session(s.id).user == "ann"
    # the table holds a hash of the session id, never the id (a credential)
    rows = a.db.all("SELECT id_sha256 FROM sessions")
    assert len(rows) == 1 and rows[0][0] != s.id and s.id not in rows[0][0]
    # use on B keeps it alive for A (idle time is shared)
    now[0] += 60
    b.session(s.id)
    now[0] += 60
    assert a.session(s.id).user == "ann"
    # logout on A ends it on B
    a.logout(s.id)
    with pytest.raises(AuthError):
        b.session(s.id)
    # removing the user on B ends their sessions on A
    s2 = a.login("ann", "pw-ann-1", "10.0.0.5")
    b.remove_user("ann")
    with pytest.raises(AuthError):
        a.session(s2.id)
    a.close()
    b.close()


def test_login_throttling_is_shared(tmp_path):
    a, b, now = two(tmp_path, max_failures=2)
    for auth in (a, b):                 # two failures, one on each replica
        with pytest.raises(AuthError) as e:
            auth.login("ann", "wrong", "10.0.0.9")
        assert e.value.status == 401
    # together they reach the limit: A refuses even the right password (with separate
    # counts, A would have seen one failure only)
    with pytest.raises(AuthError) as e:
        a.login("ann", "pw-ann-1", "10.0.0.9")
    assert e.value.status == 429 and e.value.extra.get("retry_after")
    now[0] += 3600                          # the window passes
    assert b.login("ann", "pw-ann-1", "10.0.0.9").user == "ann"
    a.close()
    b.close()


def _concurrently(n: int, work) -> None:
    """``work(i)`` in ``n`` threads released together; re-raises the first error."""
    start, errors = threading.Barrier(n), []

    def run(i):
        try:
            start.wait(timeout=60)
            work(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_concurrent_failures_on_several_replicas_are_all_counted(tmp_path, database):
    """Replicas failing the same log-in at once each add their failure (one atomic
    statement, no read-then-write): none is lost, on SQLite and on PostgreSQL."""
    where = database or str(tmp_path / "a.sqlite")
    now = [1000.0]
    replicas = [Authority(where, clock=lambda: now[0], max_failures=10_000)
                for _ in range(4)]
    try:
        replicas[0].add_user("ann", "pw-ann-1")
        per_thread = 40

        def fail(i):
            for _ in range(per_thread):
                replicas[i].throttle.fail(("user", "ann"), now[0])

        _concurrently(len(replicas), fail)
        got = replicas[0].db.one("SELECT failures FROM login_failures WHERE k = ?",
                                 ('["user","ann"]',))
        assert got == (len(replicas) * per_thread,)
        for auth in replicas:
            auth.throttle.forget(("user", "ann"))
            auth.max_failures = 3

        # through login(): 4 wrong passwords at once on 4 replicas, 3 free failures: the
        # 4th counted failure sets a delay, so even the right password is refused now
        def wrong(i):
            with pytest.raises(AuthError) as e:
                replicas[i].login("ann", "wrong", f"10.0.0.{i + 1}")
            assert e.value.status == 401

        _concurrently(len(replicas), wrong)
        assert replicas[0].throttle.records[("user", "ann")][0] == 4
        with pytest.raises(AuthError) as e:
            replicas[1].login("ann", "pw-ann-1", "10.0.0.9")
        assert e.value.status == 429
        now[0] += 3600                          # the window passes: counted afresh
        replicas[2].throttle.fail(("user", "ann"), now[0])
        assert replicas[3].throttle.records[("user", "ann")] == [1, now[0], now[0]]
        assert replicas[3].login("ann", "pw-ann-1", "10.0.0.9").user == "ann"
    finally:
        for auth in replicas:
            auth.close()


def test_a_stale_cache_model_is_forgotten(tmp_path):
    """The replica that streamed last owns the session's model; another replica's model
    of the same session is stale (the client may have dropped data meanwhile) and is
    forgotten before it is used again."""
    a, b, _now = two(tmp_path)
    sid = a.login("ann", "pw-ann-1", "10.0.0.5").id
    sa = a.session(sid)
    sa.claim_model()
    sa.model_for("t").declare({"k": {"h": 1, "b": {"0": 2}}})
    assert sa.model_for("t").snapshot("k")[0]
    sb = b.session(sid)
    sb.claim_model()                     # B streams to the session now
    assert sb.model == {}
    sa = a.session(sid)
    sa.claim_model()                     # back on A: its model is stale, forgotten
    assert sa.model == {} or not sa.model_for("t").snapshot("k")[0]
    # while A stays the owner, its model is kept
    sa.model_for("t").declare({"k": {"h": 1, "b": {}}})
    a.session(sid).claim_model()
    assert a.session(sid).model_for("t").snapshot("k")[0]
    assert isinstance(sa.model_for("t"), CacheModel)
    a.close()
    b.close()


def test_two_servers_on_one_store(ct_store, ct_series_uid, tmp_path):
    """Log in through one server, read through the other; the client declares what it
    holds when it moves, and ends with the same pixels."""
    from codestream.encode import decode_full
    from server.store import Store

    store = copy_store(ct_store, tmp_path / "store")
    with Store(store) as st:
        rows = st.catalogue.series_images(ct_series_uid)
        ref = {r["index"]: decode_full(st.read_verified(r["codestream_relpath"],
                                                        r["codestream_sha256"]),
                                       r["offset"], True) for r in rows}
    s1 = EmbeddedServer(str(store)).start()
    s2 = EmbeddedServer(str(store)).start()
    try:
        sess = Session(s1.url)
        sd = SeriesData(sess, None, ct_series_uid)
        sd.transfer(layers=1).run()
        r = requests.get(f"{s2.url}/api/me", headers={"Authorization": f"Bearer {sess.id}"})
        assert r.status_code == 200 and r.json()["user"] == sess.username
        # the same session, now through the second server: the client declares its cache
        sess.base_url = s2.url.rstrip("/")
        sd.declare_needed = True
        t = sd.transfer()
        t.run()
        for c, px in ref.items():
            np.testing.assert_array_equal(sd.decode(c).pixels, px)
        # nothing sent twice: what the first server sent is not sent again
        assert t.end["bytes_sent"] < t.total
        requests.post(f"{s1.url}/api/logout", headers={"Authorization": f"Bearer {sess.id}"})
        r = requests.get(f"{s2.url}/api/me", headers={"Authorization": f"Bearer {sess.id}"})
        assert r.status_code == 401
    finally:
        s1.stop()
        s2.stop()

