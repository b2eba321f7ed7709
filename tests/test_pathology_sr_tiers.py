"""W3: generated super-resolution tiles go to the temporary tier (bundled desktop) or to
the client-side folder (remote server), are read back in a later session — marked
generated, not computed again — and are purged when the patient is discharged."""
from __future__ import annotations

import numpy as np
import pytest

from client.slides import RemoteSlide
from client.srqueue import SRTileService, read_png_with_text
from imaging.slide_sample import make_ihc_slide
from imaging.tilesource import ArraySource
from server.embedded import EmbeddedServer
from server.slide_tiers import SlideTiers
from viewer.services import Backend

from pathology_util import new_store
from waits import WAIT_S

KEYS = [(4, 0, 0), (4, 1, 1), (2, 1, 0)]


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "store"
    st = new_store(root)
    img = make_ihc_slide(256, 192, seed=3)[0]
    row = st.ingest(ArraySource(img, mpp=2.0), patient_id="P1", accession="A1",
                    tile_size=128, run_qc=False, patient_status="inpatient")
    st.close()
    server = EmbeddedServer(str(root)).start()
    try:
        yield server, row
    finally:
        server.stop()


def _backend(tmp_path, server, name: str, bundled: bool) -> Backend:
    b = Backend(tmp_path / name / "packets.sqlite", workers=2)
    if bundled:
        b.adopt_server(server, own=False)
    b.login(server.url)
    return b


def _generate(backend: Backend, uid: str):
    """One viewer session's work: open the slide, generate KEYS through the service the
    viewer uses, with the cache the viewer gets. Returns (cache, tiles, level-0 reads)."""
    prov = RemoteSlide(backend.session, uid)
    cache = backend.sr_cache_for(prov)
    reads = []

    def read(x, y, w, h):
        reads.append((x, y, w, h))
        return prov.read_level(0, x, y, w, h)

    svc = SRTileService(read, width=prov.width, height=prov.height, tile=64, cache=cache)
    try:
        tiles = [svc.request(*k).future.result(timeout=WAIT_S) for k in KEYS]
    finally:
        svc.close()
    return cache, tiles, reads


def test_bundled_tiles_go_to_the_temp_tier_are_reused_and_purged(tmp_path, served):
    server, row = served
    uid = row["slide_uid"]
    b1 = _backend(tmp_path, server, "s1", bundled=True)
    try:
        cache, first, reads = _generate(b1, uid)
        assert cache is not None and cache.catalogued and cache.writes == len(KEYS)
        assert len(reads) == len(KEYS)
        store = b1._own_slide_store()
        temp = store.config.tier_root("temp") / uid
        assert cache.dir == temp
        files = sorted(p for p in temp.iterdir() if p.suffix == ".png")
        assert len(files) == len(KEYS)
        for f in files:
            assert "generated" in read_png_with_text(f.read_bytes())[1]["MedView-Generated"]
        assert len(store.catalogue.temp_tiles([row["pk"]])) == len(KEYS)
    finally:
        b1.close()
    # another session (a new login, a new service and queue): read back, not recomputed
    b2 = _backend(tmp_path, server, "s2", bundled=True)
    try:
        cache2, again, reads2 = _generate(b2, uid)
        assert reads2 == [] and cache2.hits == len(KEYS) and cache2.writes == 0
        for a, b in zip(first, again):
            assert b.generated and b.key == a.key and np.array_equal(a.pixels, b.pixels)
        # discharge: the tier job purges the generated tiles, the scanned slide stays
        store = b2._own_slide_store()
        assert SlideTiers(store).run_once().purged_tiles == 0       # still in care
        store.catalogue.set_patient_status("P1", "discharged")
        assert SlideTiers(store).run_once().purged_tiles == len(KEYS)
        assert not (store.config.tier_root("temp") / uid).exists()
        assert store.catalogue.temp_tiles([row["pk"]]) == []
        assert store.open(row["pk"])[1].verify() == []
        # nothing more goes to disk for a discharged patient
        assert b2.sr_cache_for(RemoteSlide(b2.session, uid)) is None
    finally:
        b2.close()


def test_remote_tiles_go_to_the_client_folder_are_reused_and_purged(tmp_path, served):
    server, row = served
    uid = row["slide_uid"]
    b1 = _backend(tmp_path, server, "c", bundled=False)      # as if the server were remote
    try:
        cache, first, reads = _generate(b1, uid)
        assert cache is not None and not cache.catalogued
        assert cache.dir.is_relative_to(tmp_path / "c" / "sr")
        assert len(reads) == len(KEYS) and cache.writes == len(KEYS)
        pngs = sorted(p for p in cache.dir.iterdir() if p.suffix == ".png")
        assert len(pngs) == len(KEYS)
        assert all((p.parent / (p.name + ".sha256")).is_file() for p in pngs)
        # the server's temp tier got nothing
        st = server.app.state.server.slides.store
        assert st.catalogue.temp_tiles([row["pk"]]) == []
    finally:
        b1.close()
    b2 = _backend(tmp_path, server, "c", bundled=False)      # same machine, next session
    try:
        cache2, again, reads2 = _generate(b2, uid)
        assert reads2 == [] and cache2.hits == len(KEYS)
        assert all(b.generated and np.array_equal(a.pixels, b.pixels)
                   for a, b in zip(first, again))
        # an altered tile is not served: regenerated from the scanned pixels
        victim = cache2.dir / cache2.name(KEYS[0])
        data = victim.read_bytes()
        victim.write_bytes(data[:-20] + bytes(20))
        assert cache2.get(KEYS[0], 4) is None
        # the same server and user find the same folder again
        assert b2.sr_cache_for(RemoteSlide(b2.session, uid)).dir == cache2.dir
        # discharged on the server: the client purges when it next lists the slides
        st = server.app.state.server.slides.store
        st.catalogue.set_patient_status("P1", "discharged")
        rows = b2.list_slides()
        assert [r["patient_status"] for r in rows if r["slide_uid"] == uid] == ["discharged"]
        assert not cache2.dir.exists()
        assert b2.sr_cache_for(RemoteSlide(b2.session, uid)) is None
    finally:
        b2.close()


def test_cache_folder_names_are_safe(tmp_path):
    from client.srqueue import SRTileCache, client_namespace, purge_client_tiles

    for bad in ("../x", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(ValueError):
            SRTileCache(tmp_path, slide_uid=bad)
    assert client_namespace("http://a/", "u") == client_namespace("http://a", "u")
    assert client_namespace("http://a", "u") != client_namespace("http://a", "v")
    (tmp_path / "keep").mkdir()
    assert purge_client_tiles(tmp_path, "http://a", "u",
                              [{"slide_uid": "../keep", "patient_status": "discharged"}]) == 0
    assert (tmp_path / "keep").is_dir()


def test_pane_passes_the_cache_to_the_service(qtbot, tmp_path):
    from client.slides import LocalSlide
    from client.srqueue import SRTileCache
    from viewer.slideview import open_slide_window

    st = new_store(tmp_path / "store")
    img = make_ihc_slide(256, 192, seed=3)[0]
    row = st.ingest(ArraySource(img, mpp=2.0), patient_id="P1", accession="A1",
                    tile_size=128, run_qc=False)
    cache = SRTileCache(st.config.tier_root("temp"), st.catalogue, row["pk"], row["slide_uid"])
    pane = open_slide_window(LocalSlide.from_store(st, row["pk"]), sr_cache=cache)
    qtbot.addWidget(pane)
    try:
        assert pane.view.sr.cache is cache
    finally:
        pane.close()
        st.close()


def test_tiles_of_other_weights_are_made_again(tmp_path):
    """A cached tile records the weights that made it (PNG text MedView-Generator): after
    the generator changes, the old tile is not served but generated anew."""
    from client.srqueue import GeneratedTile, SRTileCache
    from imaging.sr import load_generator

    img = make_ihc_slide(96, 96, seed=2)[0]
    reads = []

    def read(x, y, w, h):
        reads.append((x, y))
        out = np.full((h, w, 3), 255, np.uint8)
        x0, y0, x1, y1 = max(0, x), max(0, y), min(96, x + w), min(96, y + h)
        out[y0 - y:y1 - y, x0 - x:x1 - x] = img[y0:y1, x0:x1]
        return out

    cache = SRTileCache(tmp_path, slide_uid="s")
    stale = GeneratedTile(np.zeros((64, 64, 3), np.uint8), 4, (4, 0, 0))
    cache.put(stale, "0123456789abcdef")                 # made by other weights
    wid = load_generator(4).weights_id
    assert len(wid) == 16 and cache.get((4, 0, 0), 4, wid) is None
    svc = SRTileService(read, width=96, height=96, tile=64, cache=cache)
    try:
        t = svc.compute(4, 0, 0)
    finally:
        svc.close()
    assert reads and t.generated and t.pixels.any()
    again = cache.get((4, 0, 0), 4, wid)
    assert again is not None and np.array_equal(again.pixels, t.pixels)
    _px, text = read_png_with_text((cache.dir / cache.name((4, 0, 0))).read_bytes())
    assert text["MedView-Generator"] == wid


def test_client_folder_is_kept_under_its_limit(tmp_path):
    import os

    from client.srqueue import client_tile_cache, prune_client_tiles
    from client.srqueue import GeneratedTile

    caches = [client_tile_cache(tmp_path, "http://srv", "u", f"1.2.{i}") for i in range(3)]
    for i, c in enumerate(caches):
        c.put(GeneratedTile(np.random.default_rng(i).integers(0, 256, (64, 64, 3), np.uint8),
                            4, (4, 0, 0)))
        os.utime(c.dir, (1000 + i, 1000 + i))        # 0 oldest, 2 newest
    assert caches[0].get((4, 0, 0), 4) is not None   # used now: the most recent
    size = sum(f.stat().st_size for f in caches[1].dir.iterdir())
    freed = prune_client_tiles(tmp_path, 2 * size + 10, keep={caches[2].dir})
    assert freed >= size and not caches[1].dir.exists()
    assert caches[0].dir.exists() and caches[2].dir.exists()
    assert prune_client_tiles(tmp_path, 0, keep={c.dir for c in caches}) == 0
