"""Slide viewer logic and pane (offscreen), and the headless render command."""
from __future__ import annotations


import numpy as np
import pytest

from imaging.pyramid import plan_levels
from imaging.slide_sample import make_ihc_slide
from imaging.tilesource import ArraySource
from imaging.viewport import CachedTile, TileCache, Viewport

from pathology_util import new_store
from waits import WAIT_MS, WAIT_S


# --------------------------------------------------------------------------- logic
def test_viewport_levels_and_prefetch_direction():
    levels = plan_levels(4096, 4096, 256)
    vp = Viewport(4096, 4096, levels, size=(800, 600))
    vp.fit()
    assert vp.level_for_scale() == 2          # 0.139 screen px per slide px: ds 4, not 8
    vp.scale, vp.centre = 1.0, (2048.0, 2048.0)
    assert vp.level_for_scale() == 0 and vp.sr_scale() is None
    vis = set(vp.visible_tiles(0))
    x, y, w, h = vp.rect()
    assert all(levels[0].tile_rect(t)[0] < x + w for t in vis)
    vp.velocity = (500.0, 0.0)                          # panning to the right
    ahead = vp.prefetch_tiles(0)
    assert ahead and not set(ahead) & vis
    assert all(levels[0].tile_rect(t)[0] + 256 > x + w for t in ahead)
    vp.velocity = (0.0, -500.0)                         # panning up
    assert all(levels[0].tile_rect(t)[1] < y for t in vp.prefetch_tiles(0))
    vp.scale = 3.5
    assert vp.sr_scale() == 4
    # zoom at the cursor keeps the point under it
    vp.scale = 1.0
    before = vp.to_slide(100, 100)
    vp.zoom_at(2.0, 100, 100)
    assert np.allclose(vp.to_slide(100, 100), before)


def test_tile_cache_never_evicts_pinned_and_never_downgrades():
    c = TileCache(budget=4 * 256 * 256 * 3)

    def tile(layers, full=False):
        return CachedTile(np.zeros((256, 256, 3), np.uint8), layers, full)

    c.put(("ov", 0), tile(4, True))
    c.pin({("ov", 0), (0, 1)})
    c.put((0, 1), tile(1))
    for i in range(2, 12):
        c.put((0, i), tile(4, True))
    assert ("ov", 0) in c and (0, 1) in c and c.size <= c.budget
    assert c.evicted >= 6
    assert not c.put((0, 1), tile(1))                   # not better: kept as it was
    assert c.put((0, 1), tile(4, True)) and c.get((0, 1)).complete
    assert not c.put((0, 1), tile(2))                   # a result never replaces a better one


# --------------------------------------------------------------------------- pane
@pytest.fixture(scope="module")
def slide_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewstore")
    img, assoc = make_ihc_slide(1280, 960, seed=6)
    st = new_store(root)
    high = st.ingest(ArraySource(img, mpp=0.5, associated=assoc), patient_id="P1",
                     accession="A1", tile_size=256, label="ihc high")
    low = st.ingest(ArraySource(img[::4, ::4].copy(), mpp=2.0), patient_id="P1",
                    accession="A1", tile_size=256, label="ihc low", run_qc=False)
    yield root, st, high, low, img
    st.close()


def _wait(qtbot, cond):
    """Tiles arrive through the dispatcher's queued calls: wait for the condition, the
    limit only bounds a hang (loaded machines are slow, never wrong)."""
    qtbot.waitUntil(cond, timeout=WAIT_MS)


def test_pane_loads_coarse_first_then_full(qtbot, slide_store):
    from client.slides import LocalSlide
    from viewer.slideview import open_slide_window

    _root, st, high, _low, img = slide_store
    prov = LocalSlide.from_store(st, high["pk"])
    pane = open_slide_window(prov)
    qtbot.addWidget(pane)
    pane.resize(900, 700)
    pane.show()
    v = pane.view
    assert v.mode == "high" and set(pane.assoc_buttons) == {"label", "macro"}
    ov = v._overview
    _wait(qtbot, lambda: all((ov, t) in v.cache for t in range(prov.levels[ov].count)))
    v.zoom_to(1.0, (450, 350), animate=False)
    lvl = v.level()
    assert lvl == 0
    vis = v.vp.visible_tiles(0)
    _wait(qtbot, lambda: all(v.cache.get((0, t)) is not None and v.cache.get((0, t)).complete
                             for t in vis))
    t = vis[0]
    tx, ty, tw, th = prov.levels[0].tile_rect(t)
    assert np.array_equal(v.cache.get((0, t)).pixels, img[ty:ty + th, tx:tx + tw])
    # panning right prefetches the tiles on the right
    v.vp.scale, v.vp.centre = 2.0, (250.0, 480.0)
    v.vp.velocity = (800.0, 0.0)
    ahead = v.vp.prefetch_tiles(0)
    x, y, w, h = v.vp.rect()
    assert ahead and all(prov.levels[0].tile_rect(t)[0] + 256 > x + w for t in ahead)
    v.refresh()
    _wait(qtbot, lambda: all((0, t) in v.cache for t in ahead))
    v.grab()                                        # paints without error
    pane.close()


def test_tiles_of_a_cancelled_prefetch_load_when_asked_again(slide_store):
    """A prefetch cancelled while queued left its tiles "in flight" for ever: asked for
    again (on screen now), they never loaded and the pane waited without end."""
    import threading

    from client.pool import INTERACTION, PREFETCH, WorkerPool
    from client.slides import LocalSlide
    from viewer.slideview import SlideTileLoader

    _root, st, high, _low, img = slide_store
    prov = LocalSlide.from_store(st, high["pk"])
    cache = TileCache(64 << 20)
    pool = WorkerPool(1)
    loader = SlideTileLoader(prov, cache, lambda: None, pool=pool)
    try:
        gate = threading.Event()
        busy = loader.pool.submit(lambda tok: gate.wait(WAIT_S), INTERACTION)  # the worker
        tiles = [0, 1, 2]
        loader.want(0, tiles, PREFETCH)                 # queued behind it
        loader.cancel_prefetch()                        # the view moved on
        gate.set()
        busy.future.result(WAIT_S)
        loader.want(0, tiles, INTERACTION)              # back on screen
        # one worker, priority order: this runs after the tiles' job
        loader.pool.submit(lambda tok: None, PREFETCH).future.result(WAIT_S)
        for t in tiles:
            c = cache.get((0, t))
            assert c is not None and c.complete, t
            tx, ty, tw, th = prov.levels[0].tile_rect(t)
            assert np.array_equal(c.pixels, img[ty:ty + th, tx:tx + tw])
    finally:
        loader.close()
        pool.shutdown()


def test_low_resolution_mode_super_resolves_and_marks(qtbot, slide_store):
    from client.slides import LocalSlide
    from viewer.slideview import SR_COLOUR, open_slide_window

    _root, st, _high, low, _img = slide_store
    prov = LocalSlide.from_store(st, low["pk"])
    pane = open_slide_window(prov)
    qtbot.addWidget(pane)
    pane.resize(600, 500)
    pane.show()
    v = pane.view
    assert v.mode == "low"                          # stored low: SR mode by default
    v.zoom_to(8.0, (300, 250), animate=False)      # few tiles to generate: a light test
    assert v.sr_active() == 4
    vis = v.sr_tiles_visible()
    assert 0 < len(vis) <= 16, len(vis)
    _wait(qtbot, lambda: all(("sr",) + k in v.cache for k in vis))
    assert all(v.cache.get(("sr",) + k).generated for k in vis)
    img = v.grab().toImage()
    # the banner (under the status line) and the tile frames are magenta: marked
    row = 8 + 22 + 10
    colours = {(img.pixelColor(x, row).red(), img.pixelColor(x, row).green(),
                img.pixelColor(x, row).blue()) for x in range(200, 400, 10)}
    assert (SR_COLOUR.red(), SR_COLOUR.green(), SR_COLOUR.blue()) in colours
    v.apply_mode("high")                             # high mode: no generated tiles
    assert v.sr_active() is None
    pane.close()


# --------------------------------------------------------------------------- render
def test_render_command(tmp_path, slide_store):
    from PIL import Image

    from commands.slide_render import main

    root, _st, high, low, img = slide_store
    out = tmp_path / "r.png"
    assert main(["--store", str(root), "--slide", str(high["pk"]), "--level", "0",
                 "--region", "100,200,300,150", "--out", str(out)]) == 0
    im = Image.open(out)
    assert np.array_equal(np.asarray(im.convert("RGB")), img[200:350, 100:400])
    assert "MedView-Generated" not in im.text and im.text["MedView-QC"] == "pass"
    out2 = tmp_path / "sr.png"
    assert main(["--store", str(root), "--slide", low["slide_uid"], "--level", "0",
                 "--region", "10,10,60,40", "--sr", "2", "--out", str(out2)]) == 0
    im2 = Image.open(out2)
    assert im2.size == (120, 80) and "generated" in im2.text["MedView-Generated"]
    px = np.asarray(im2.convert("RGB"))
    assert tuple(px[0, 60]) == (230, 0, 200)          # the magenta frame
    assert main(["--store", str(root), "--slide", "nope", "--out", str(out2)]) == 1
    # the hook medview uses: only "render --slide" is taken, options before it passed on
    from commands.slide_render import dispatch_slide_render

    assert dispatch_slide_render(["render", "--series", "1.2", "--view", "axial"]) is None
    assert dispatch_slide_render(["fetch", "--slide"]) is None
    out3 = tmp_path / "via-medview.png"
    assert dispatch_slide_render(["--store", str(root), "render", "--slide", str(high["pk"]),
                                  "--level", "2", "--out", str(out3)]) == 0
    assert Image.open(out3).size == (320, 240)
    assert main(["--store", str(root), "--slide", str(high["pk"]), "--level", "9",
                 "--out", str(out2)]) == 1
