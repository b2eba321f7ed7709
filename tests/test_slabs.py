"""Thick to thin (P10): the slice-axis transform, the slab route, bit-exact reconstruction."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from server.fsck import fsck

from codestream import slabs
from waits import WAIT_MS


# ---------------------------------------------------------------------------- transform
@pytest.mark.parametrize("n", [2, 3, 5, 8, 13, 64, 65])
@pytest.mark.parametrize("dtype,lo,hi", [(np.uint16, 0, 4095), (np.int16, -32768, 32767), (np.uint8, 0, 255)])
def test_transform_is_bit_exact(n, dtype, lo, hi):
    rng = np.random.default_rng(n)
    x = rng.integers(lo, hi + 1, (n, 5, 7)).astype(dtype)
    for levels in range(0, slabs.default_levels(n, min_slabs=1, max_levels=6) + 1):
        p = slabs.forward(x, levels)
        assert p.band_count() == n                     # as many images as slices
        np.testing.assert_array_equal(slabs.inverse(p), x)


def test_slabs_are_floor_averages_and_spans():
    x = np.array([[10], [13], [20], [21], [7]], np.int32)[:, :, None]     # 5 slices of 1x1
    p = slabs.forward(x, 2)
    l1 = slabs.inverse(p, 1)[:, 0, 0]
    assert list(l1) == [11, 20, 7]                     # floor((10+13)/2), floor(41/2), carried
    assert list(p.highs[0][:, 0, 0]) == [-3, -1]
    assert [slabs.slab_span(5, 1, i) for i in range(3)] == [(0, 2), (2, 4), (4, 5)]
    assert [slabs.slab_span(5, 2, i) for i in range(2)] == [(0, 4), (4, 5)]
    assert slabs.counts(5, 2) == ([5, 3, 2], [2, 1])
    with pytest.raises(IndexError):
        slabs.slab_span(5, 2, 2)


def test_detail_range_and_refusals():
    x = np.array([[[0]], [[4095]]], np.uint16)
    p = slabs.forward(x, 1)
    assert p.highs[0].min() == -4095
    assert slabs.band_bits(0, 4095, 1) == (12, 13)
    with pytest.raises(slabs.SlabError):
        slabs.forward(np.zeros((2, 2, 2), np.float32), 1)
    with pytest.raises(slabs.SlabError):
        slabs.forward(np.zeros((2, 2, 2), np.int16), 3)


def test_isotropic_reduce():
    # 0.7 mm pixels, 2.5 mm slices: thin slices at reduce 2 (2.8 mm), slabs of 4 at 4
    assert slabs.isotropic_reduce(0, 2.5, 0.7, 6) == 2
    assert slabs.isotropic_reduce(2, 2.5, 0.7, 6) == 4
    assert slabs.isotropic_reduce(3, 2.5, 0.7, 4) == 3           # capped by numres


# ---------------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def slab_server(tmp_path_factory):
    from server.embedded import EmbeddedServer
    from server.ingest import ingest_paths
    from server.sample import make_sample_ct
    from server.store import Store

    root = tmp_path_factory.mktemp("slabs")
    files = make_sample_ct(root / "dicom", slices=24, size=256, seed=21)
    with Store(root / "store") as st:
        assert len(ingest_paths(files, st).imported) == 24
    srv = EmbeddedServer(str(root / "store")).start()
    yield srv, files
    srv.stop()


def _session(srv):
    from client.session import Session
    return Session(srv.url)


def test_slab_route_offers_the_pyramid(slab_server):
    srv, files = slab_server
    from client.slabs import SlabSeries

    s = _session(srv)
    try:
        uid = s.series()[0]["SeriesInstanceUID"]
        ss = SlabSeries(s, None, uid)
        pyr = ss.pyramid
        assert pyr["count"] == 24 and ss.depth == slabs.default_levels(24) == 2
        # sorted along the normal: z decreases with the instance number
        z = [float(pydicom.dcmread(files[c]).ImagePositionPatient[2]) for c in ss.order]
        assert z == sorted(z)
        assert len(ss.images) == 24
        assert [im["band"] for im in ss.images[:6]] == ["low"] * 6
        # the whole pyramid is about as large as the plain series
        assert 0.85 < pyr["total_bytes"] / pyr["series_bytes"] < 1.15
        # unknown series and bad target: clear errors
        from client.session import ServerError
        with pytest.raises(ServerError, match="unknown series"):
            s.get_json("/api/series/1.2.3/slabs")
        with pytest.raises(ServerError, match="target"):
            s.request("GET", f"/jpip/slabs/{uid}", params={"target": "1.2.3"})
    finally:
        s.logout()


def test_thick_first_then_thin_bit_exact_nothing_twice(slab_server):
    srv, files = slab_server
    from client.series import Callbacks
    from client.slabs import SlabSeries

    truth = None
    s = _session(srv)
    try:
        uid = s.series()[0]["SeriesInstanceUID"]
        ss = SlabSeries(s, None, uid)
        truth = np.stack([pydicom.dcmread(files[c]).pixel_array for c in ss.order]).astype(np.int32)
        sent = 0
        for level in range(ss.depth, -1, -1):
            recs = []
            reduce = 0 if level == 0 else 2
            t = ss.transfer(comps=ss.comps_for_level(level), reduce=reduce,
                            callbacks=Callbacks(on_recommend=recs.append))
            end = t.run()
            sent += end["bytes_sent"]
            assert recs and recs[-1]["action"] == "render"
            lv = ss.reconstruct(level, reduce=reduce)
            assert lv.slabs.shape[0] == slabs.counts(24, ss.depth)[0][level]
            # each slab approximates the mean of the thin slices it covers
            thin = truth[:, ::4, ::4][..., :lv.slabs.shape[1], :lv.slabs.shape[2]]
            for slab, (a, b) in zip(lv.slabs, lv.spans):
                mean = thin[a:b].mean(axis=0)
                if level:
                    assert np.median(np.abs(slab - mean)) < 40      # HU-level agreement
        assert (lv.slabs == truth).all()                         # thin, full: bit-exact
        # thick then thinner: the whole pyramid once, no more
        assert 0.98 * ss.pyramid["total_bytes"] <= sent <= ss.pyramid["total_bytes"]
        # nothing is sent twice: asking again transfers nothing
        again = ss.transfer().run()
        assert again["bytes_sent"] == 0
    finally:
        s.logout()


def test_slab_volume_loader_goes_thick_to_thin(slab_server):
    srv, files = slab_server
    from client.slabs import SlabSeries
    from client.volume_loader import SlabVolumeLoader

    s = _session(srv)
    try:
        uid = s.series()[0]["SeriesInstanceUID"]
        loader = SlabVolumeLoader(SlabSeries(s, None, uid))
        levels = [st.level for st in loader.plan]
        assert levels == list(range(loader.slab_series.depth, -1, -1))
        events = list(loader.run())
    finally:
        s.logout()
    seen_levels = [e.stage.level for e in events if e.update]
    assert seen_levels[0] == levels[0] and seen_levels[-1] == 0
    assert seen_levels == sorted(seen_levels, reverse=True)
    assert events[-1].final and events[-1].update.complete
    vol = loader.volume
    truth = {int(pydicom.dcmread(f).InstanceNumber) - 1: pydicom.dcmread(f).pixel_array for f in files}
    for image, slot in list(zip(loader.slab_series.order, loader.thin_slots))[:5]:
        np.testing.assert_array_equal(vol.modality_array()[slot], truth[image].astype(np.float32) - 1024)


def test_cached_pyramid_is_reused_and_checked(slab_server, tmp_path):
    srv, _ = slab_server
    cat = srv.app.state.server.slabs
    uid = next(iter(cat._built))
    built = cat._built[uid]
    fp = built.layout["pyramid"]["fingerprint"]
    assert cat._load(uid, fp) is not None                       # the manifest on disk is valid
    assert cat._load(uid, "0" * 64) is None                     # another source: rebuild
    assert fsck(srv.store).consistent                          # the cache is not catalogued


def test_mpr_window_loads_thick_to_thin(slab_server, qtbot):
    """The MPR window, thick_to_thin: the pyramid is fetched on the loader's thread and
    the panes redraw at each level, thick slabs first (P10, P11)."""
    import os

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from viewer.mprlayout import describe_series, open_series

    srv, files = slab_server
    s = _session(srv)
    try:
        uid = s.series()[0]["SeriesInstanceUID"]
        win = open_series(s, uid, series=describe_series(s, uid), thick_to_thin=True,
                          show=False, sync=True, vr=False, show_errors=False)
        qtbot.addWidget(win)
        win.resize(500, 400)
        win.show()
        qtbot.waitUntil(lambda: bool(win.load_events) and win.load_events[-1].final, timeout=WAIT_MS)
        levels = [e.stage.level for e in win.load_events]
        assert levels[0] > 0 and levels[-1] == 0
        vol = win.mpr.volume
        first = pydicom.dcmread(files[0])
        slot = win.runner.loader.plain_slots[int(first.InstanceNumber) - 1]
        np.testing.assert_array_equal(vol.modality_array()[slot], first.pixel_array.astype(np.float32) - 1024)
        assert win.mpr.views["axial"].values() is not None
        win.close()
    finally:
        s.logout()


def test_user_rights_apply_to_the_slab_route(slab_server):
    """P7 on the slab target: the layer limit holds, and per-image rights allow only the
    slabs made of allowed images (a slab mixes every image of its span)."""
    from client.session import ServerError, Session
    from server.rights import Rule

    srv, _ = slab_server
    auth = srv.app.state.server.auth
    auth.add_user("slabs-two-layers", "a long password")
    auth.set_rule(Rule("slabs-two-layers", "*", max_layers=2))
    auth.add_user("slabs-some-images", "a long password")
    auth.set_rule(Rule("slabs-some-images", "*", images={0, 1, 2}))
    s = Session(srv.url, "slabs-two-layers", "a long password")
    try:
        uid = s.series()[0]["SeriesInstanceUID"]
        with pytest.raises(ServerError) as err:
            s.request("GET", f"/jpip/slabs/{uid}", params={"layers": 4, "comps": "0"})
        assert err.value.status == 403
        ok = s.request("GET", f"/jpip/slabs/{uid}", params={"layers": 2, "comps": "0"})
        assert ok.status_code == 200
    finally:
        s.logout()
    s = Session(srv.url, "slabs-some-images", "a long password")
    try:
        # the thickest slab mixes every image: refused; a band of allowed images only
        # is sent (server.slabs.slab_grant)
        with pytest.raises(ServerError, match="not among those you may load") as err:
            s.request("GET", f"/jpip/slabs/{uid}", params={"comps": "0"})
        assert err.value.status == 403
        lay = s.request("GET", f"/api/series/{uid}/slabs").json()
        order = lay["pyramid"]["order"]
        for im in lay["images"]:
            assert {order[t] for t in range(*im["span"])} <= {0, 1, 2}
        if lay["images"]:
            comp = lay["images"][0]["index"]
            assert s.request("GET", f"/jpip/slabs/{uid}",
                             params={"comps": str(comp), "layers": 1}).status_code == 200
    finally:
        s.logout()
