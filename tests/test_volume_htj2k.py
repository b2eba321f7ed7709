"""HTJ2K where it wins (SPEC H1): the full-quality stage of a whole-volume load through
each frame's HTJ2K copy (WADO-RS) gives the lossless J2K volume bit for bit; the choice
follows the measured link and what the cache holds; a failing route falls back."""
from __future__ import annotations

import numpy as np

from client.frames import RATES, choose_full_load


def _images(n=100, side=512, layer_bytes=(10_000, 26_000, 65_000, 200_000)):
    """The bench's series (100 x 512², 4 layers, 20 MB), as series_images lists it."""
    return [{"Rows": side, "Columns": side, "total_bytes": layer_bytes[-1],
             "layer_bytes": list(layer_bytes)} for _ in range(n)]


MBIT = 1e6 / 8


def _after_first_preview(n=100):
    """What the loader holds when it chooses (the interleaved plan's first preview:
    every 4th slice, 1/4 of each side, 1 layer) and the preview still ahead for the
    layers (all slices, 1/4, 1 layer), which the copies' route leaves out."""
    held = [4_000 if i % 4 == 0 else 0 for i in range(n)]
    return held, [(list(range(n)), 2, 1)]


def test_choice_follows_link_and_cache():
    """The bench's case: the copies sooner on loopback, 100 and 10 Mbit/s (the layers'
    decode follows the last byte; the copies decode as they arrive and skip the further
    preview); the layers on a slow link, and where the cache holds most of them."""
    ims = _images()
    held, previews = _after_first_preview()
    for link in (1e9, 100 * MBIT, 10 * MBIT):             # loopback, 100, 10 Mbit/s
        c = choose_full_load(ims, held, link, previews=previews, cores=2)
        assert c.route == "htj2k" and c.htj2k_seconds < c.j2k_seconds, (link, c)
        assert c.previews_left_out == 1 and "preview" in c.reason
    # 2 Mbit/s: the copies' 6 % more bytes outweigh the layers' decode tail
    c = choose_full_load(ims, held, 2 * MBIT, previews=previews, cores=2)
    assert c.route == "j2k" and c.previews_left_out == 0
    # what the cache holds shifts it towards the layers
    most = [int(0.9 * 200_000)] * len(ims)
    for link in (10 * MBIT, 50 * MBIT):
        c = choose_full_load(ims, most, link, previews=previews, cores=2)
        assert c.route == "j2k" and c.j2k_bytes == (200_000 - 180_000) * len(ims), (link, c)
    # all held: only the decode is left, sooner than fetching the copies at 100 Mbit/s;
    # not when other work leaves the decodes a quarter of the cores (the copies' decode
    # runs while they arrive, the layers' after)
    assert choose_full_load(ims, [200_000] * len(ims), 100 * MBIT, cores=2).route == "j2k"
    busy = choose_full_load(ims, [200_000] * len(ims), 100 * MBIT, cores=2, share=0.25)
    assert busy.route == "htj2k" and "0.5 cores" in busy.reason
    # no measurement: the transport (its bytes stay in the cache)
    assert choose_full_load(ims, held, None).route == "j2k"
    assert RATES["htj2k_cpu_s_per_px"] * 512 * 512 < RATES["j2k_cpu_s_per_byte"] * 200_000


def test_the_previews_left_out_count_for_the_copies():
    """Between 5.5 and 7 Mbit/s the copies' extra bytes cost about what the layers'
    decode tail does: the preview the layers still run (a request, two renders of every
    slice) decides; its bytes count once (they are part of what the cache lacks)."""
    ims = _images()
    held, previews = _after_first_preview()
    for mbit in (5.5, 6, 7):
        bare = choose_full_load(ims, held, mbit * MBIT, cores=2)
        ahead = choose_full_load(ims, held, mbit * MBIT, previews=previews, cores=2)
        assert bare.route == "j2k" and ahead.route == "htj2k", mbit
        assert ahead.htj2k_seconds == bare.htj2k_seconds
        assert ahead.j2k_bytes == bare.j2k_bytes
        extra = ahead.j2k_seconds - bare.j2k_seconds
        per_render = 100 * RATES["preview_apply_cpu_s"] / 2
        assert 2 * per_render < extra < 2 * per_render + 0.1


def test_the_layers_decode_as_the_loader_does():
    """The full stage through the layers, as the loader runs it: a render of every image
    at each layer's end, the latest recommendation winning while a decode runs, the
    last decode after the last byte. One image, 1 s a decode, 100 B/s, layers ending at
    100, 200, 300 and 1000 bytes."""
    ims = [{"Rows": 4, "Columns": 4, "total_bytes": 1000, "layer_bytes": [100, 200, 300, 1000]}]
    unit = {"j2k_cpu_s_per_px": 0.0, "j2k_cpu_s_per_byte": 0.0, "htj2k_cpu_s_per_px": 0.0,
            "request_s": 0.0, "apply_cpu_s": 1.0}
    c = choose_full_load(ims, [0], 100.0, cores=1, rates=unit)
    assert c.j2k_seconds == 11.0            # 1 -> 2, 2 -> 3, 3 -> 4, then 10 -> 11
    slow = choose_full_load(ims, [0], 100.0, cores=1, rates={**unit, "apply_cpu_s": 5.0})
    assert slow.j2k_seconds == 16.0         # 1 -> 6, layer 3 (2 waits, dropped) -> 11, 4 -> 16
    held = choose_full_load(ims, [300], 100.0, cores=1, rates=unit)
    assert held.j2k_seconds == 8.0          # layers 1-3 held: one decode at once, then 7 -> 8
    # the copies: the transfer (1060 B) and the decodes overlap, the last decode after
    assert c.htj2k_seconds == 10.6 + 1.0
    # a ratio measured on the probe frame replaces the default
    assert choose_full_load(ims, [0], 100.0, htj2k_ratio=1.5, cores=1, rates=unit).htj2k_bytes == 1500


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
    # the full stage's events say its route (the previews' do not)
    assert ev_b[-1].route == "htj2k" and ev_b[-1].why == "HTJ2K copies asked for"
    assert not ev_b[0].route and not ev_a[-1].route       # J2K asked for: no choice made
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
        # the choice counts the preview the copies leave out
        assert got.full_choice.previews_left_out == 1 and "preview" in got.full_choice.reason
        assert events[-1].route == "htj2k" and events[-1].why == got.full_choice.reason
        # a slow link measured (50 kbit/s: the copies' extra bytes outweigh the layers'
        # decode and preview, also on the busiest machine — the decodes' share of the
        # cores is at least 5 %, client.frames): the layers
        slow, slow_events, *_ = _load(srv.url, uid, "auto", link_bytes_s=50e3 / 8)
        assert slow.full_choice.route == "j2k"
        assert slow_events[-1].route == "j2k" and "J2K layers sooner" in slow_events[-1].why
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
        assert events[-1].route == "j2k" and events[-1].why.startswith("HTJ2K copies failed")
        np.testing.assert_array_equal(got.volume.data, ref.volume.data)
    finally:
        srv.stop()
