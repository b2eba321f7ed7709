"""Pipelined transfers (issue 15): the next stage's request is sent while the previous
one streams (JPIP ``wait=yes``); nothing is sent twice, every image stays bit-exact, and
a broken stage leaves the series consistent."""
from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

from client import Callbacks, Cancelled, CancelToken, SeriesData, ServerError, Session, run_in_order
from codestream.encode import decode_full
from server.packets import CacheModel, ordered
from server.store import Store

LIMIT = 60.0          # generous bound for event waits on a loaded machine


def _assert_lossless(sd, ct_store, ct_series_uid, csns):
    with Store(ct_store) as st:
        rows = st.catalogue.series_images(ct_series_uid)
        for csn in csns:
            row = rows[csn]
            cs = st.read_verified(row["codestream_relpath"], row["codestream_sha256"])
            np.testing.assert_array_equal(sd.decode(csn).pixels,
                                          decode_full(cs, row["offset"], bool(row["signed"])))


# ------------------------------------------------------------------ server: ordering
def test_model_ordering_waits_for_release():
    m = CacheModel()
    assert m.wait_ordered(0)                        # nothing ahead
    release = m.begin_ordered()
    assert not m.wait_ordered(0)                    # a wait=yes stream is running
    done = threading.Event()
    t = threading.Thread(target=lambda: m.wait_ordered(LIMIT) and done.set())
    t.start()
    release()
    release()                                       # idempotent: counts once
    t.join(LIMIT)
    assert done.is_set() and m.wait_ordered(0)


def test_ordered_stream_releases_when_done_broken_or_never_started():
    m = CacheModel()
    gen = ordered(iter([b"a", b"b"]), m.begin_ordered())
    assert list(gen) == [b"a", b"b"] and m.wait_ordered(0)
    gen = ordered(iter([b"a", b"b"]), m.begin_ordered())
    assert next(gen) == b"a" and not m.wait_ordered(0)
    gen.close()                                     # the client went away mid-stream
    assert m.wait_ordered(0)
    gen = ordered(iter([b"a"]), m.begin_ordered())
    assert not m.wait_ordered(0)
    del gen                                         # answered, but never iterated
    gc.collect()
    assert m.wait_ordered(0)


def test_wait_field_is_checked(server, ct_series_uid):
    s = Session(server.url)
    with pytest.raises(ServerError) as e:
        s.request("GET", "/jpip", params={"target": ct_series_uid, "wait": "maybe"})
    assert e.value.status == 400


def test_request_after_wait_yes_is_planned_after_it_ended(server, ct_series_uid):
    """A second request, sent while a wait=yes stream is still unread, is answered only
    after that stream ended, and then announces just what it did not send."""
    s = Session(server.url)
    whole = Session(server.url).packet_stream({"target": ct_series_uid})
    total = int(whole.headers["X-Bytes-Announced"])     # everything, on a fresh session
    whole.close()
    first = s.packet_stream({"target": ct_series_uid, "layers": 2, "wait": "yes"})
    box = {}
    answered = threading.Event()

    def second():
        box["resp"] = s.packet_stream({"target": ct_series_uid})
        answered.set()

    th = threading.Thread(target=second)
    th.start()
    body = first.content                            # read the first to its end
    th.join(LIMIT)
    assert answered.is_set()
    a1 = int(first.headers["X-Bytes-Announced"])
    a2 = int(box["resp"].headers["X-Bytes-Announced"])
    box["resp"].close()
    assert body and 0 < a1 < total
    assert a1 + a2 == total                          # nothing announced twice


# ------------------------------------------------------------------ client: run_in_order
def test_pipelined_stages_are_exact_and_never_resent(server, ct_store, ct_series_uid):
    s = Session(server.url)
    sd = SeriesData(s, None, ct_series_uid)
    stages = [sd.transfer(layers=1, reduce=2), sd.transfer(layers=2, reduce=0), sd.transfer()]
    ends = run_in_order(stages)
    assert [e["reason"] for e in ends] == ["complete"] * 3
    assert [t.params.get("wait") for t in stages] == ["yes", "yes", None]
    assert [sd.levels(c) for c in range(len(sd))] == [(4, 2)] * len(sd)
    received = sum(t.received for t in stages)
    assert received == sum(t.requested for t in stages)
    total = sum(im["total_bytes"] for im in sd.images)
    assert 0.97 * total < received <= total          # each byte once (stale PLT/EOC aside)
    again = sd.transfer()
    again.run()
    assert again.requested == 0
    _assert_lossless(sd, ct_store, ct_series_uid, range(len(sd)))


def test_pipeline_broken_stage_closes_the_next_and_recovers(server, ct_store, ct_series_uid):
    s = Session(server.url)
    sd = SeriesData(s, None, ct_series_uid)
    first = {}
    token = CancelToken()

    def on_image(p):
        if not first:
            first["csn"] = p.csn
            token.cancel()                          # the run's token: the run stops

    # a small first stage: the next is asked at once (less than the pipelining lead left)
    stages = [sd.transfer(layers=1, reduce=1, order="image",
                          callbacks=Callbacks(on_image=on_image)),
              sd.transfer()]
    with pytest.raises(Cancelled):
        run_in_order(stages, token)
    assert first and sd.declare_needed
    assert stages[1].received == 0                  # the next was closed unread
    rest = sd.transfer()
    rest.run()
    assert [sd.levels(c) for c in range(len(sd))] == [(4, 2)] * len(sd)
    _assert_lossless(sd, ct_store, ct_series_uid, (0, len(sd) - 1))
