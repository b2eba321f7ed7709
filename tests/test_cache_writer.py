"""Cache writes off the receiving thread (issue 15): queued in order on the cache's
writer thread, bounded, drained before a transfer returns; a failing cache never loses
the transfer."""
from __future__ import annotations

import numpy as np

from client import Callbacks, PacketCache, SeriesData, Session
from codestream.encode import decode_full
from codestream.jpp import MAIN_HEADER, PRECINCT, TILE_HEADER
from server.store import Store


def test_queued_writes_land_in_order_and_none_is_dropped(tmp_path):
    cache = PacketCache(tmp_path / "c.sqlite")
    cache.WRITE_QUEUE = 2                       # the caller waits beyond 2 pending writes
    for n in range(1, 41):                      # a growing prefix of one bin, per image
        for image in ("a", "b", "c"):
            cache.put_later("ns", image, {(MAIN_HEADER, 0): b"m", (PRECINCT, 7): bytes(n)})
    cache.drain()
    rows = {image: cache._guard("read", lambda con, i=image: cache._load_rows(con, "ns", i), [])
            for image in ("a", "b", "c")}
    for image, got in rows.items():
        assert dict(((c, b), d) for c, b, d in got) == {(MAIN_HEADER, 0): b"m",
                                                        (PRECINCT, 7): bytes(40)}
    cache.close()


def test_reads_see_queued_writes(tmp_path):
    cache = PacketCache(tmp_path / "c.sqlite")
    cache.put_later("ns", "x", {(MAIN_HEADER, 0): b"m", (TILE_HEADER, 0): b"t"})
    assert cache.images("ns") == ["x"]          # the read waited for the write
    cache.put_later("ns", "y", {(MAIN_HEADER, 0): b"m", (TILE_HEADER, 0): b"t"})
    cache.forget("ns", "y")                     # and a forget is not undone by it
    assert cache.images("ns") == ["x"]
    cache.close()


def test_cache_holds_the_transfer_when_it_returns(server, ct_series_uid, tmp_path):
    cache = PacketCache(tmp_path / "p.sqlite")
    sd = SeriesData(Session(server.url), cache, ct_series_uid)
    sd.transfer().run()
    other = PacketCache(tmp_path / "p.sqlite")  # another reader of the file, at once
    sd2 = SeriesData(Session(server.url), other, ct_series_uid)
    assert [sd2.levels(c) for c in range(len(sd2))] == [(4, 2)] * len(sd2)
    other.close()
    cache.close()


def test_cache_failing_mid_transfer_loses_nothing(server, ct_store, ct_series_uid, tmp_path):
    cache = PacketCache(tmp_path / "p.sqlite")
    sd = SeriesData(Session(server.url), cache, ct_series_uid)

    def on_image(p):
        cache.close()                           # every later write fails (skipped)

    end = sd.transfer(order="image", callbacks=Callbacks(on_image=on_image)).run()
    assert end["reason"] == "complete"
    assert [sd.levels(c) for c in range(len(sd))] == [(4, 2)] * len(sd)
    with Store(ct_store) as st:
        for csn in (0, len(sd) - 1):
            row = st.catalogue.series_images(ct_series_uid)[csn]
            cs = st.read_verified(row["codestream_relpath"], row["codestream_sha256"])
            np.testing.assert_array_equal(sd.decode(csn).pixels,
                                          decode_full(cs, row["offset"], bool(row["signed"])))
