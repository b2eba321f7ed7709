"""The patient-space volume: storage, memory, interleaved fill-and-replace, progressive
loading from the server driven by its recommendations."""
from __future__ import annotations

import numpy as np
import pytest

from imaging.volume import (NO_DATA, SliceGeometry, Storage, Volume, choose_storage, quality_key,
                           volume_for_slices)

IOP = (1, 0, 0, 0, 1, 0)


def _slices(n, size=16, step=2.0):
    return [SliceGeometry((0.0, 0.0, step * k), IOP, (0.5, 0.5), size, size, step) for k in range(n)]


def test_storage_is_exact_and_narrow():
    ct = choose_storage([(1.0, -1024.0)] * 3, (0, 4095))
    assert ct.dtype == np.int16 and (ct.scale, ct.offset) == (1.0, 0.0)
    assert choose_storage([(1.0, 0.0)], (0, 255)).dtype == np.uint8
    mr = choose_storage([(0.5, 3.25)], (0, 4095))              # one non-integer rescale
    assert mr.dtype == np.int16 and (mr.scale, mr.offset) == (0.5, 3.25)
    pet = choose_storage([(0.1, 0.0), (0.2, 0.0)], (0, 32767))   # per-slice rescale
    assert pet.dtype == np.int16 and "re-quantised" in pet.note


@pytest.mark.parametrize("rescales,rng,bpv", [
    ([(1.0, -1024.0)], (0, 4095), 2),
    ([(1.0, 0.0)], (0, 255), 1),
    ([(0.37, 5.0)], (-2000, 2000), 2),
    ([(0.1, 0.0), (0.2, 1.0)], (0, 32767), 2),
])
def test_memory_is_at_most_one_and_a_half_times_raw(rescales, rng, bpv):
    n = 20
    vol, _ = volume_for_slices(_slices(n, 64), (rescales * n)[:n], rng, raw_bytes_per_voxel=bpv)
    assert vol.memory_bytes() <= 1.5 * vol.raw_bytes()
    assert vol.data.base is None                 # one array, no per-slice copies
    assert vol.data.shape == (n, 64, 64)


def test_values_are_modality_units_through_the_storage():
    vol, slots = volume_for_slices(_slices(3), [(0.5, -10.0)] * 3, (0, 4095))
    vol.set_slice(slots[1], np.full((16, 16), 100, np.uint16), slope=0.5, intercept=-10.0)
    assert vol.modality_array()[1, 0, 0] == pytest.approx(40.0)
    st = Storage(np.dtype(np.int16), 0.01, 5.0)
    v2 = Volume(vol.geometry, st)
    v2.set_slice(0, np.full((16, 16), 12.34, np.float32))
    assert v2.modality_array()[0, 3, 3] == pytest.approx(12.34, abs=0.006)


def test_interleaved_fill_then_replace_and_never_worse():
    n = 9
    vol, slots = volume_for_slices(_slices(n), [(1.0, 0.0)] * n, (0, 4095))
    updates = []
    vol.subscribe(updates.append)
    coarse = quality_key(reduce=2, layers=1)
    with vol.batch("every 4th"):
        for k in (0, 4, 8):
            vol.set_slice(slots[k], np.full((4, 4), 100 * k, np.uint16), quality=coarse)
    assert len(updates) == 1 and updates[0].quality == NO_DATA and not updates[0].complete
    hu = vol.modality_array()
    # slots without data of their own are interpolated from their neighbours
    assert [hu[k, 0, 0] for k in range(n)] == pytest.approx([100 * k for k in range(n)])
    assert list(vol.filled_slots()) == [1, 2, 3, 5, 6, 7]
    # their own data replaces the interpolation
    vol.set_slice(slots[2], np.full((16, 16), 7, np.uint16), quality=coarse)
    hu = vol.modality_array()
    assert hu[2, 5, 5] == 7 and hu[1, 0, 0] == pytest.approx(3.5, abs=0.5)
    assert hu[3, 0, 0] == pytest.approx((7 + 400) / 2, abs=0.5)
    # a lower quality never replaces a higher one
    best = quality_key()
    assert vol.set_slice(slots[4], np.full((16, 16), 999, np.uint16), quality=best)
    assert not vol.set_slice(slots[4], np.full((16, 16), 1, np.uint16), quality=coarse)
    assert vol.modality_array()[4, 0, 0] == 999
    with vol.batch("rest"):
        for k in range(n):
            vol.set_slice(slots[k], np.full((16, 16), k, np.uint16), quality=best)
    assert updates[-1].complete and updates[-1].quality == best
    assert list(vol.filled_slots()) == []


def test_reduced_resolution_slices_are_upsampled_in_place():
    vol, slots = volume_for_slices(_slices(2, 8), [(1.0, 0.0)] * 2, (0, 4095))
    low = np.array([[0, 100], [200, 300]], np.uint16)           # reduce 2 of an 8x8 image
    vol.set_slice(slots[0], low, quality=quality_key(reduce=2))
    hu = vol.modality_array()[0]
    # pixel-area aligned: the corners keep the corner values, the middle is the mean
    assert hu[0, 0] == 0 and hu[7, 7] == 300
    assert hu[3:5, 3:5].mean() == pytest.approx(150, abs=1)


def test_quality_key_order():
    assert quality_key(0, 4) > quality_key(0, 3) > quality_key(1, 4)
    assert quality_key(3, 1, slab_level=0) > quality_key(0, 4, slab_level=1)


# ---------------------------------------------------------------------------- server
def test_interleaved_loading_from_the_server(server, ct_series_uid, ct_store):
    """Every 4th slice coarse, then all coarse, then full: the first volume has 3 own
    slices and interpolated ones; each update follows a server 'render' recommendation;
    the end is bit-exact."""
    from client.series import SeriesData
    from client.session import Session
    from codestream.encode import decode_full
    from server.store import Store
    from client.volume_loader import VolumeLoader

    session = Session(server.url)
    try:
        sd = SeriesData(session, None, ct_series_uid)
        recs = []
        loader = VolumeLoader(sd)
        original = sd.transfer

        def spy(**kw):                                  # record the recommendations
            cb = kw["callbacks"]
            inner = cb.on_recommend
            cb.on_recommend = lambda m: (recs.append(m), inner(m))
            return original(**kw)
        sd.transfer = spy
        assert [s.name for s in loader.plan][0].startswith("every 4th")
        events = list(loader.run())
    finally:
        session.logout()
    vol = loader.volume
    first = events[0]
    assert first.stage.comps is not None and len(first.stage.comps) == 4     # 0, 4, 8, 11
    renders = [r for r in recs if r["action"] == "render"]
    assert len(events) <= len(renders) + len(loader.plan)
    assert events[-1].final and events[-1].update.complete
    # progressive: qualities never go down, the first update had interpolated slots
    qs = [e.update.quality for e in events if e.update]
    assert qs == sorted(qs)
    # bit-exact at the end: compare with the stored codestreams decoded directly
    with Store(ct_store) as st:
        rows = st.catalogue.series_images(ct_series_uid)
        for r in rows[:3]:
            px = decode_full(st.read_verified(r["codestream_relpath"], r["codestream_sha256"]),
                             r["offset"], bool(r["signed"]), bits_stored=r["bits_stored"])
            slot = loader.slots[r["index"]]
            np.testing.assert_array_equal(vol.modality_array()[slot], px.astype(np.float32) - 1024)


def test_first_update_fills_from_neighbours(server, ct_series_uid):
    from client.series import SeriesData
    from client.session import Session
    from client.volume_loader import LoadStage, VolumeLoader

    session = Session(server.url)
    try:
        sd = SeriesData(session, None, ct_series_uid)
        loader = VolumeLoader(sd, plan=[])
        comps = loader.comps
        loader.plan = [LoadStage("sparse", tuple(comps[::4]), 2, 1),
                       LoadStage("rest", None, 0, None)]
        it = loader.run()
        ev = next(it)
        own = set(loader.volume.own_slots().tolist())
        assert own == {loader.slots[c] for c in comps[::4]}
        assert len(loader.volume.filled_slots()) == len(comps) - len(own)
        hu = loader.volume.modality_array()
        # a filled slot lies between its neighbours' values (linear interpolation)
        z = sorted(loader.volume.filled_slots())[0]
        a, b = max(o for o in own if o < z), min(o for o in own if o > z)
        lo, hi = np.minimum(hu[a], hu[b]), np.maximum(hu[a], hu[b])
        assert np.all((hu[z] >= lo - 1) & (hu[z] <= hi + 1))
        rest = list(it)
        assert rest[-1].final
        assert len(loader.volume.filled_slots()) == 0
        assert ev.reduce >= 2 and rest[-1].reduce == 0
    finally:
        session.logout()


def test_cancel_stops_the_loader(server, ct_series_uid):
    from client.series import SeriesData
    from client.session import Session
    from client.volume_loader import VolumeLoader

    session = Session(server.url)
    try:
        loader = VolumeLoader(SeriesData(session, None, ct_series_uid))
        it = loader.run()
        next(it)
        loader.cancel()
        rest = list(it)
        assert not rest or not rest[-1].final
    finally:
        session.logout()
