"""Super-resolution: the shipped generator loads offline and returns the right size for
any tile size; numpy layers are right; jobs pre-empt by priority; generated tiles are
marked."""
from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from imaging import sr
from client.srqueue import BACKGROUND, NEAR, VIEW, SRQueue, SRTileService
from gates import Gated
from waits import WAIT_S


@pytest.fixture()
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*a, **k):
        raise AssertionError("the generator tried to use the network")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    sr._CACHE.clear()
    yield


@pytest.mark.parametrize("scale", [2, 4])
def test_generator_loads_offline_and_keeps_any_size(offline, scale):
    g = sr.load_generator(scale)
    assert g.scale == scale and g.meta.get("generated") is True
    assert sr.weights_path(scale).stat().st_size < 2_500_000        # small, shipped
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (7, 13), (37, 53), (64, 64), (129, 96)]:
        x = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        y = g.upscale(x)
        assert y.shape == (h * scale, w * scale, 3) and y.dtype == np.uint8


@pytest.mark.parametrize("which", ["ihc", "he"])
@pytest.mark.parametrize("scale", [2, 4])
def test_generator_beats_bicubic_on_held_out_tissue(scale, which):
    """Real tissue never seen in training (two slides, two stains): the generator's mean
    PSNR is above bicubic's and it wins on most tiles (bench/sr.py reports the margins)."""
    from imaging.srdata import heldout_tiles, psnr

    g = sr.load_generator(scale)
    gains = []
    for hr in heldout_tiles(which=which):
        lr = (sr.area_downscale(hr, scale) + 0.5).astype(np.uint8)
        bic = (np.clip(sr.bicubic_upscale(lr.astype(np.float32) / 255, scale), 0, 1) * 255
               + 0.5).astype(np.uint8)
        gains.append(psnr(hr, g.upscale(lr), scale) - psnr(hr, bic, scale))
    assert np.mean(gains) > 0
    assert sum(gn > 0 for gn in gains) >= 0.75 * len(gains)


def test_numpy_layers_match_reference():
    from scipy.signal import correlate2d

    rng = np.random.default_rng(1)
    x = rng.random((9, 11, 2)).astype(np.float32)
    w = rng.random((3, 2, 3, 3)).astype(np.float32)
    b = rng.random(3).astype(np.float32)
    got = sr._conv3x3(x, w, b)
    ref = np.stack([sum(correlate2d(x[:, :, i], w[o, i], mode="same") for i in range(2)) + b[o]
                    for o in range(3)], axis=2)
    assert np.allclose(got, ref, atol=1e-5)
    assert np.allclose(sr._conv3x3(x, w, b, stride=2), ref[::2, ::2], atol=1e-5)
    # pixel shuffle: channel c*r*r + i*r + j goes to (h*r + i, w*r + j)
    t = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8)   # C=2, r=2
    ps = sr._pixel_shuffle(t, 2)
    assert ps.shape == (4, 6, 2) and ps[1, 3, 1] == t[0, 1, 4 + 1 * 2 + 1]
    # bicubic keeps constants and is exact on the sample grid's mean
    assert np.allclose(sr.bicubic_upscale(np.full((5, 4, 3), 0.3, np.float32), 4), 0.3, atol=1e-6)


def test_inference_stops_between_layers():
    g = sr.load_generator(4)
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(sr.SRCancelled):
        g.upscale(np.zeros((32, 32, 3), np.uint8), stop)


@pytest.mark.parametrize("scale", [2, 4])
def test_onnxruntime_path_equals_the_numpy_path(offline, scale):
    """The faster path (imaging.sr_ort: the same layers and weights on ONNX Runtime)
    gives the numpy path's result to float rounding, odd sizes included, offline, and
    still stops between layers."""
    from imaging.sr_ort import available
    from imaging.srdata import heldout_tiles

    assert available()                  # a dependency (pyproject): the default backend
    assert sr.default_backend() == "onnxruntime"
    gn = sr.load_generator(scale, backend="numpy")
    go = sr.load_generator(scale, backend="onnxruntime")
    assert go.backend == "onnxruntime" and gn is not go
    tissue = heldout_tiles(which="he")[0]
    for x in (tissue[:37, :53], tissue[:64, :64]):
        a, b = gn.upscale(x), go.upscale(x)
        assert a.shape == b.shape == (x.shape[0] * scale, x.shape[1] * scale, 3)
        d = np.abs(a.astype(np.int16) - b.astype(np.int16))
        assert d.max() <= 1 and (d > 0).mean() < 1e-3
    calls = []
    with pytest.raises(sr.SRCancelled):
        go.upscale(np.zeros((32, 32, 3), np.uint8), lambda: calls.append(1) or len(calls) > 1)


def test_backend_can_be_chosen(monkeypatch):
    monkeypatch.setenv("MEDVIEW_SR_BACKEND", "numpy")
    assert sr.default_backend() == "numpy"
    assert sr.load_generator(4).backend == "numpy"
    with pytest.raises(ValueError):
        sr.load_generator(4, backend="numpy").use_backend("cuda")
    sr.load_generator(4, backend="numpy").use_backend("numpy")


def _busy(order, name, started=None, steps=60):
    def fn(should_stop):
        order.append(("start", name))
        if started is not None:
            started.set()
        for _ in range(steps):
            if should_stop():
                raise sr.SRCancelled()
            time.sleep(0.005)
        order.append(("done", name))
        return name
    return fn


def test_view_jobs_preempt_background_work():
    q = SRQueue(workers=1)
    try:
        order: list = []
        started = threading.Event()
        bg = [q.submit(("bg", 0), _busy(order, "bg0", started), BACKGROUND)]
        bg += [q.submit(("bg", i), _busy(order, f"bg{i}"), BACKGROUND) for i in range(1, 4)]
        assert started.wait(WAIT_S)
        view = q.submit(("view", 0), _busy(order, "view", steps=5), VIEW)
        assert view.future.result(timeout=WAIT_S) == "view"
        for j in bg:
            assert j.future.result(timeout=WAIT_S).startswith("bg")
        done = [n for k, n in order if k == "done"]
        # the view job finished first; the pre-empted job was redone, nothing was lost
        assert done[0] == "view" and sorted(done[1:]) == ["bg0", "bg1", "bg2", "bg3"]
        assert bg[0].preemptions == 1 and ("preempted", ("bg", 0)) in q.log
        assert done[1] == "bg0"                      # back first in its class
    finally:
        q.shutdown()


def test_queued_job_is_raised_not_duplicated_and_retargeted():
    q = SRQueue(workers=1)
    try:
        order: list = []
        gate = threading.Event()

        def blocker(should_stop):
            gate.wait(WAIT_S)
            return "blocker"

        q.submit("blocker", blocker, VIEW)
        a = q.submit("a", _busy(order, "a", steps=1), BACKGROUND)
        b = q.submit("b", _busy(order, "b", steps=1), BACKGROUND)
        c = q.submit("c", _busy(order, "c", steps=1), BACKGROUND)
        assert q.submit("c", _busy(order, "c2", steps=1), NEAR) is c      # raised, same job
        q.retarget(view={"b"}, near=set())          # the pathologist looks at b now
        gate.set()
        for j in (a, b, c):
            j.future.result(timeout=WAIT_S)
        assert [n for k, n in order if k == "start"] == ["b", "a", "c"]
    finally:
        q.shutdown()


def test_sr_jobs_run_in_the_worker_pool_in_the_class_of_their_priority():
    from client import pool as wp

    pool = wp.WorkerPool(2, name="onepool")
    q = SRQueue(workers=1, worker_pool=pool)
    try:
        seen = []

        def probe(name):
            def fn(should_stop):
                seen.append((name, threading.current_thread().name,
                             {c: pool.running(c) for c in wp.CLASSES}))
                return name
            return fn

        for key, prio in (("v", VIEW), ("n", NEAR), ("b", BACKGROUND)):
            assert q.submit(key, probe(key), prio).future.result(WAIT_S) == key
        for (name, thread, running), cls in zip(seen, (wp.VISIBLE, wp.PREFETCH, wp.BACKGROUND)):
            assert thread.startswith("onepool-"), (name, thread)
            assert running[cls] == 1 and sum(running.values()) == 1, (name, running)
        assert not [t.name for t in threading.enumerate() if t.name.startswith("sr-worker")]
    finally:
        q.shutdown()
        pool.shutdown()


def test_sr_jobs_obey_the_pool_cap():
    from client import pool as wp

    pool = wp.WorkerPool(3, caps={wp.INTERACTION: 3, wp.VISIBLE: 3, wp.PREFETCH: 3,
                                  wp.BACKGROUND: 1})
    q = SRQueue(workers=3, worker_pool=pool)        # the queue would run three at once
    try:
        bg = Gated()
        jobs = [q.submit(("bg", i), bg, BACKGROUND) for i in range(3)]
        assert bg.first.wait(WAIT_S)
        # workers are free (this runs), yet the background cap holds the other SR jobs
        assert pool.submit(lambda tok: "ok", wp.INTERACTION).future.result(WAIT_S) == "ok"
        assert pool.running(wp.BACKGROUND) == 1
        bg.gate.set()
        assert all(j.future.result(WAIT_S) for j in jobs)
        assert bg.peak == 1
    finally:
        q.shutdown()
        pool.shutdown()


def test_pool_cancel_stops_running_and_queued_sr_jobs():
    from concurrent.futures import CancelledError

    from client import pool as wp

    pool = wp.WorkerPool(2, caps={wp.INTERACTION: 2, wp.VISIBLE: 1, wp.PREFETCH: 1,
                                  wp.BACKGROUND: 1})
    q = SRQueue(workers=2, worker_pool=pool)
    try:
        order: list = []
        started = threading.Event()
        running = q.submit("a", _busy(order, "a", started, steps=100000), VIEW)
        assert started.wait(WAIT_S)
        queued = q.submit("b", _busy(order, "b"), VIEW)      # its lane waits: VISIBLE cap
        # the window turns away: its jobs in the one pool are cancelled
        assert pool.cancel_where(lambda j: j.tag is q) == 2
        for job in (running, queued):
            with pytest.raises(CancelledError):
                job.future.result(WAIT_S)
        assert q.wait_idle(WAIT_S)
        assert ("start", "b") not in order and ("done", "a") not in order
        # the queue still works afterwards
        assert q.submit("c", lambda stop: "c", VIEW).future.result(WAIT_S) == "c"
    finally:
        q.shutdown()
        pool.shutdown()


def test_sr_tiles_are_generated_marked_and_cached(tmp_path):
    from imaging.slide_sample import make_ihc_slide
    from client.srqueue import SRTileCache, read_png_with_text

    img = make_ihc_slide(300, 200, seed=5)[0]

    def read(x, y, w, h):
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(0, x), max(0, y), min(300, x + w), min(200, y + h)
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = img[y0:y1, x0:x1]
        return out

    cache = SRTileCache(tmp_path, slide_uid="s1")
    svc = SRTileService(read, width=300, height=200, tile=128, cache=cache)
    try:
        assert svc.grid(4) == (10, 7)
        t = svc.request(4, 1, 1, VIEW).future.result(timeout=WAIT_S)
        assert t.generated and t.pixels.shape == (128, 128, 3) and t.label.startswith("SR x4")
        files = [p for p in (tmp_path / "s1").iterdir() if p.suffix == ".png"]
        assert len(files) == 1          # and its checksum beside it (no catalogue here)
        assert (tmp_path / "s1" / (files[0].name + ".sha256")).is_file()
        _px, text = read_png_with_text(files[0].read_bytes())
        assert "generated, not scanned" in text["MedView-Generated"]
        # a fresh service finds it in the temporary tier, still flagged
        svc2 = SRTileService(read, width=300, height=200, tile=128, cache=cache)
        again = svc2.compute(4, 1, 1)
        assert again.generated and np.array_equal(again.pixels, t.pixels)
        svc2.close()
    finally:
        svc.close()
