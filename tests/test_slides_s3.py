"""Slide pyramids in the image store's S3 object store (a real SeaweedFS, the ``s3``
fixture): ingest uploads the pyramid, the HTTP slide routes serve it bit-exact to a local
store's (range reads and whole reads through the read cache), fsck finds a deleted or
damaged object and orphans, tier moves record the tier in place, and a kill -9 during
the upload leaves no row without its objects; a station's copy is downloaded."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import seaweed
from imaging.pyramid import MANIFEST
from imaging.slide_sample import make_ihc_slide
from imaging.tilesource import ArraySource
from server.objects import S3Objects
from server.slide_objects import SlideObjects
from server.slide_store import SlideStore
from server.store import Store
from waits import WAIT_S

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slide():
    return make_ihc_slide(512, 384, seed=4)


def s3_store(s3, root: Path) -> tuple[SlideStore, S3Objects]:
    b = seaweed.bucket_name()
    Store(root, f"s3://{b}/site", endpoint=s3.endpoint).close()
    return SlideStore.for_image_store(root), S3Objects(s3.client(), b, "site")


def ingest(st: SlideStore, slide, **kw) -> dict:
    img, assoc = slide
    return st.ingest(ArraySource(img, mpp=0.5, associated=assoc), patient_id="P1",
                     accession="A1", tile_size=256, **kw)


def read_all(url: str, uid: str, levels: int) -> tuple[list[np.ndarray], np.ndarray]:
    from client.session import Session
    from client.slides import RemoteSlide

    rs = RemoteSlide(Session(url), uid)
    out = []
    for lv in rs.info["levels"][:levels]:
        out.append(rs.read_level(lv["level"], 0, 0, lv["width"], lv["height"]))
    return out, rs.associated("label")


def test_ingest_serve_fsck_move_on_s3(s3, slide, tmp_path, monkeypatch):
    from server.embedded import EmbeddedServer
    from server.slide_tiers import SlideTiers

    # the reference: the same slide in a store on the local disk
    local_root = tmp_path / "local"
    Store(local_root).close()
    with SlideStore.for_image_store(local_root) as st:
        ingest(st, slide, run_qc=True)
    st, o = s3_store(s3, tmp_path / "s3")
    with st:
        assert st.objects is not None
        row = ingest(st, slide, run_qc=True)
        uid = row["slide_uid"]
    assert row["qc_status"] in ("pass", "flagged")
    keys = sorted(o.keys("slides"))
    assert keys == sorted(f"slides/{uid}/{n}" for n in
                          ("level-0.j2kp", "level-1.j2kp", "assoc-label.png",
                           "assoc-macro.png", MANIFEST)), keys
    # nothing of the pyramid on the local disk
    assert not [p for p in (tmp_path / "s3" / "slides").rglob("*")
                if p.suffix in (".j2kp", ".png", ".json") and p.name != "tiers.json"]
    # served through the HTTP slide routes, bit-exact to the local store: with range
    # reads (no level read whole) and with whole reads through the read cache
    with SlideStore.for_image_store(local_root) as ls:
        (lrow,) = ls.catalogue.slides()
        lsrv = EmbeddedServer(str(local_root)).start()
        try:
            want, want_label = read_all(lsrv.url, lrow["slide_uid"], 2)
        finally:
            lsrv.stop()
    for whole_max in (0, 1 << 20):
        monkeypatch.setattr(SlideObjects, "whole_read_max", whole_max)
        srv = EmbeddedServer(str(tmp_path / "s3")).start()
        try:
            got, label = read_all(srv.url, uid, 2)
            objs = srv.app.state.server.slides.store.objects
            assert (objs.range_reads > 0) == (whole_max == 0)
        finally:
            srv.stop()
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(label, want_label)
        np.testing.assert_array_equal(got[0], slide[0])          # lossless, bit-exact
    assert list((tmp_path / "s3" / "cache" / "objects").rglob("*"))   # the read cache
    # a tier move: the objects stay in the bucket, the tier is recorded
    with SlideStore.for_image_store(tmp_path / "s3") as st:
        moved = SlideTiers(st).move(uid, "long")
        assert moved["tier"] == "long" and sorted(o.keys("slides")) == keys
        assert st.fsck() == {"checked": 1, "damaged": {}, "orphans": [], "removed": []}
        _row, stored = st.open(uid)
        assert str(stored.path) == f"{o.url}/slides/{uid}" and stored.verify() == []
        # fsck: a deleted object, a damaged one, an orphan
        o.delete(f"slides/{uid}/level-1.j2kp")
        lv0 = o.get(f"slides/{uid}/level-0.j2kp")
        o.put(f"slides/{uid}/level-0.j2kp", lv0[:-1] + bytes([lv0[-1] ^ 1]))
        o.put("slides/orphan-uid/manifest.json", b"{}")
        rep = st.fsck()
        assert rep["damaged"] == {uid: ["level-0.j2kp: SHA-256 mismatch",
                                        "level-1.j2kp: missing"]}, rep
        assert rep["orphans"] == [f"{o.url}/slides/orphan-uid"]
        with pytest.raises(Exception, match="do not verify"):
            SlideTiers(st).move(uid, "mid")                  # refused, nothing changes
        assert st.slide(uid)["tier"] == "long"
        rep = st.fsck(repair=True)
        assert rep["removed"] == [f"{o.url}/slides/orphan-uid"]
        assert not list(o.keys("slides/orphan-uid"))


@pytest.mark.parametrize("point", ["objects.put=3", "objects.put-sent=3"])
def test_kill_9_during_slide_upload_loses_nothing(s3, slide, tmp_path, point):
    """An ingest killed (SIGKILL) during its uploads — before a PUT, or after the
    manifest's PUT and before its check: no row, the objects left behind are orphans
    that fsck lists and removes; the ingest run again completes."""
    root = tmp_path / "store"
    st, o = s3_store(s3, root)
    st.close()
    np.save(tmp_path / "img.npy", slide[0])
    code = ("import sys, numpy as np; from server.slide_store import SlideStore; "
            "from imaging.tilesource import ArraySource; "
            "st = SlideStore.for_image_store(sys.argv[1]); "
            "st.ingest(ArraySource(np.load(sys.argv[2]), mpp=0.5), patient_id='P1', "
            "accession='A1', tile_size=256, run_qc=False)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MEDVIEW_FAULTS": point}
    proc = subprocess.run([sys.executable, "-c", code, str(root), str(tmp_path / "img.npy")],
                          env=env, cwd=ROOT, timeout=WAIT_S * 4)
    assert proc.returncode == -signal.SIGKILL
    assert list(o.keys("slides"))                     # some objects were uploaded
    with SlideStore.for_image_store(root) as st:
        assert st.catalogue.slides() == []            # never a row without its objects
        rep = st.fsck()
        assert not rep["damaged"] and len(rep["orphans"]) >= 1
        st.fsck(repair=True)
        assert st.fsck() == {"checked": 0, "damaged": {}, "orphans": [], "removed": []}
        assert not list(o.keys("slides"))
        row = st.ingest(ArraySource(slide[0], mpp=0.5), patient_id="P1", accession="A1",
                        tile_size=256, run_qc=False)
        assert st.fsck()["damaged"] == {} and st.fsck()["checked"] == 1
        _r, stored = st.open(row["pk"])
        np.testing.assert_array_equal(stored.read_region(0, 0, 0, 512, 384), slide[0])
        # a reading station's copy comes down from the bucket, verified
        from client.slides import LocalSlide
        from server.slide_organise import distribute

        st.catalogue.add_station("ws-1", str(tmp_path / "ws1"))
        st.catalogue.assign("A1", "ws-1")
        assert distribute(st)[0]["slides"] == [{"slide_uid": row["slide_uid"], "copy": "copied"}]
        local = LocalSlide.from_folder(tmp_path / "ws1" / row["slide_uid"])
        assert local.stored.verify() == []
        np.testing.assert_array_equal(local.read_level(0, 0, 0, 512, 384), slide[0])
