"""HTJ2K where it wins (SPEC H1): the full-quality stage of a whole-volume load through
each frame's HTJ2K copy (WADO-RS) gives the lossless J2K volume bit for bit; the choice
follows the measured link and what the cache holds; a failing route falls back."""
from __future__ import annotations

import numpy as np

from client.frames import RATES, choose_full_load


def _images(n=100, side=512, total=198_000):
    return [{"Rows": side, "Columns": side, "total_bytes": total} for _ in range(n)]


def test_choice_follows_link_and_cache():
    """The bench's case (100 x 512², 19.8 MB): HTJ2K sooner on loopback and 100 Mbit/s,
    the layers at 10 Mbit/s; what the cache holds shifts it towards the layers."""
    ims = _images()
    nothing = [0] * len(ims)
    assert choose_full_load(ims, nothing, 1e9).route == "htj2k"            # loopback
    c = choose_full_load(ims, nothing, 100e6 / 8)
    assert c.route == "htj2k" and c.htj2k_seconds < c.j2k_seconds
    assert choose_full_load(ims, nothing, 10e6 / 8).route == "j2k"
    # 50 Mbit/s: HTJ2K when nothing is held, the layers when the previews hold 90 %
    assert choose_full_load(ims, nothing, 50e6 / 8).route == "htj2k"
    held = [int(0.9 * 198_000)] * len(ims)
    c = choose_full_load(ims, held, 50e6 / 8)
    assert c.route == "j2k" and c.j2k_bytes == (198_000 - int(0.9 * 198_000)) * len(ims)
    # no measurement: the transport (its bytes stay in the cache)
    assert choose_full_load(ims, nothing, None).route == "j2k"
    assert RATES["htj2k_decode_px_s"] > RATES["j2k_decode_px_s"]


def _load(url, uid, route, **kw):
    from client.series import SeriesData
    from client.session import Session
    from client.volume_loader import VolumeLoader, load_all

    session = Session(url)
    paths = []
    request = session.request
    session.request = lambda method, path, **k: (paths.append(path), request(method, path, **k))[1]
    _load.paths = paths                 # the requests the last load made
    try:
        sd = SeriesData(session, None, uid)
        calls = []
        original = sd.transfer
        sd.transfer = lambda **k: (calls.append(k), original(**k))[1]
        progress = []
        loader = VolumeLoader(sd, full_route=route, on_progress=progress.append, **kw)
        events = []
        load_all(loader, events.append)
        return loader, events, calls, progress
    finally:
        session.logout()


def test_htj2k_volume_equals_the_lossless_j2k_volume(server, ct_series_uid):
    a, ev_a, calls_a, _ = _load(server.url, ct_series_uid, "j2k")
    b, ev_b, calls_b, prog = _load(server.url, ct_series_uid, "htj2k")
    assert ev_a[-1].final and ev_b[-1].final and ev_b[-1].update.complete
    # HTJ2K asked for: only the first preview stays (the whole volume comes sooner than
    # the further coarse previews would), and the last stage made no packet transfer
    assert len(a.plan) >= 3 and b.plan == [a.plan[0], a.plan[-1]]
    assert len(calls_b) == 1 and len(calls_a) == len(a.plan)
    assert calls_b and all(c.get("reduce") for c in calls_b)     # the previews: layered J2K
    assert b.volume.data.dtype == a.volume.data.dtype
    np.testing.assert_array_equal(b.volume.data, a.volume.data)
    assert b.volume.uniform_quality() == a.volume.uniform_quality()
    # progress went on while the copies arrived, never beyond what was asked
    tail = [p for p in prog if p.received > ev_b[-2].received]
    assert tail and all(p.received <= p.requested for p in tail)
    assert tail[-1].received == ev_b[-1].received
    # the copies came in one request (the series' Pixel Data resource), not one per frame
    assert [p for p in _load.paths if p.endswith("/pixeldata")] == [
        f"/dicomweb/studies/{b.series.info['StudyInstanceUID']}/series/{ct_series_uid}/pixeldata"]
    assert not [p for p in _load.paths if "/frames/" in p]


def test_auto_takes_htj2k_on_loopback_and_copies_are_used(ct_store, tmp_path):
    """A store with HTJ2K final copies: auto measures the loopback link on the previews
    and takes the copies; the volume is the lossless one."""
    from server.embedded import EmbeddedServer
    from server.policy_copies import convert_store
    from server.store import Store
    from tests.policyutil import copy_store, series_uid

    root = copy_store(ct_store, tmp_path / "store")
    (root / "policy.toml").write_text('[codec]\nsize_threshold = 200\n')   # 256² -> HTJ2K
    with Store(root) as st:
        rep = convert_store(st)
        assert rep.ok and {r.codec for r in rep.results} == {"htj2k"}, rep.summary()
        uid = series_uid(root)
    srv = EmbeddedServer(str(root)).start()
    try:
        ref, *_ = _load(srv.url, uid, "j2k")
        got, events, calls, _ = _load(srv.url, uid, "auto", link_bytes_s=1e9)
        assert got.full_choice is not None and got.full_choice.route == "htj2k"
        assert len(calls) == len(got.plan) - 1 == 1
        np.testing.assert_array_equal(got.volume.data, ref.volume.data)
        # no rate given: one HTJ2K frame timed decides; whichever route, the same volume
        probed, *_ = _load(srv.url, uid, "auto")
        assert probed.full_choice is not None and probed.full_choice.link_bytes_s > 0
        np.testing.assert_array_equal(probed.volume.data, ref.volume.data)
        # a slow link measured (10 Mbit/s): the layers
        slow, *_ = _load(srv.url, uid, "auto", link_bytes_s=10e6 / 8)
        assert slow.full_choice.route == "j2k"
        np.testing.assert_array_equal(slow.volume.data, ref.volume.data)
        # the frames come from the copies alone: without the originals, the same volume
        with Store(root) as st:
            for r in st.catalogue.series_images(uid):
                st.abspath(st.catalogue.find_instance(r["SOPInstanceUID"])["original_relpath"]).unlink()
        alone, _ev, calls, _ = _load(srv.url, uid, "htj2k")
        assert len(calls) == len(alone.plan) - 1        # no fallback to the layers
        np.testing.assert_array_equal(alone.volume.data, ref.volume.data)
    finally:
        srv.stop()


def test_a_failing_route_falls_back_to_the_layers(ct_store, tmp_path):
    """An original the server cannot read (so no frame can be made from it): the
    HTJ2K route fails before anything is applied, the transport loads the volume."""
    from server.embedded import EmbeddedServer
    from server.store import Store
    from tests.policyutil import copy_store, series_uid

    root = copy_store(ct_store, tmp_path / "store")
    uid = series_uid(root)
    srv = EmbeddedServer(str(root)).start()
    try:
        ref, *_ = _load(srv.url, uid, "j2k")
        with Store(root) as st:
            row = st.catalogue.series_images(uid)[5]
            inst = st.catalogue.find_instance(row["SOPInstanceUID"])
            st.abspath(inst["original_relpath"]).unlink()
        got, events, calls, _ = _load(srv.url, uid, "htj2k")
        assert len(calls) == len(got.plan)               # the last stage went by packets
        assert events[-1].final
        np.testing.assert_array_equal(got.volume.data, ref.volume.data)
    finally:
        srv.stop()
