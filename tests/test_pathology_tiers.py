"""Slide tiers: moves lose nothing (copy, verify, commit, delete) even when the process is
killed at any step; the policy; the idle-time scheduler; the temporary tier purged at
discharge; gather one patient; distribute to reading stations."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imaging.slide_sample import make_ihc_slide
from server.jobs import JobScheduler, SlideTierJob
from server.slide_tiers import SlideTiers, TierMoveError
from imaging.tilesource import ArraySource

from pathology_util import new_store, today_minus
from waits import WAIT_S

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slide_img():
    return make_ihc_slide(512, 384, seed=4)[0]


def _ingest(st, img, patient="P1", accession="A1", acquired=None, status=None):
    return st.ingest(ArraySource(img, mpp=0.5), patient_id=patient, accession=accession,
                     tile_size=256, run_qc=False, acquired_at=acquired, patient_status=status)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def _tier_dirs(st, uid: str) -> list[str]:
    out = []
    for t in ("recent", "mid", "long"):
        root = st.config.tier_root(t)
        if root.is_dir():
            out += [f"{t}/{p.name}" for p in root.iterdir() if uid in p.name]
    return sorted(out)


def test_move_copies_verifies_then_deletes(tmp_path, slide_img):
    st = new_store(tmp_path)
    row = _ingest(st, slide_img)
    before = _digest(st.slide_dir(row))
    new = SlideTiers(st).move(row["pk"], "mid")
    assert new["tier"] == "mid"
    assert _tier_dirs(st, row["slide_uid"]) == [f"mid/{row['slide_uid']}"]
    assert _digest(st.slide_dir(new)) == before
    _r, s = st.open(row["pk"])
    assert np.array_equal(s.read_region(0, 0, 0, 512, 384), slide_img)
    (m,) = st.catalogue.moves(row["pk"])
    assert (m["from_tier"], m["to_tier"], m["state"]) == ("recent", "mid", "done")
    st.close()


@pytest.mark.parametrize("point", ["slide-move.copied", "slide-move.renamed",
                                   "slide-move.committed"])
def test_killed_mid_move_loses_nothing(tmp_path, slide_img, point):
    st = new_store(tmp_path)
    row = _ingest(st, slide_img)
    before = _digest(st.slide_dir(row))
    st.close()
    code = ("import sys; from server.slide_store import SlideStore; from server.slide_tiers import "
            "SlideTiers; st = SlideStore(sys.argv[1]); SlideTiers(st).move(sys.argv[2], 'long')")
    env = dict(os.environ, MEDVIEW_FAULTS=f"{point}=1")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "slides"), row["slide_uid"]],
                       cwd=REPO, env=env, capture_output=True, timeout=WAIT_S)
    assert r.returncode == -9, r.stderr.decode()[-2000:]          # SIGKILL at the point
    st = new_store(tmp_path)
    cur = st.slide(row["pk"])
    # whatever the catalogue says, the data is there and complete
    assert st.open(row["pk"])[1].verify() == []
    recovered = SlideTiers(st).recover()
    assert recovered == [row["slide_uid"]]
    cur = st.slide(row["pk"])
    expected = "long" if point == "slide-move.committed" else "recent"
    assert cur["tier"] == expected
    assert _tier_dirs(st, row["slide_uid"]) == [f"{expected}/{row['slide_uid']}"]
    assert _digest(st.slide_dir(cur)) == before
    assert st.catalogue.open_moves() == []
    # and the move can simply be run again
    again = SlideTiers(st).move(row["pk"], "long")
    assert again["tier"] == "long" and _digest(st.slide_dir(again)) == before
    assert st.fsck()["orphans"] == [] and st.fsck()["damaged"] == {}
    st.close()


def test_a_copy_that_does_not_verify_is_refused(tmp_path, slide_img):
    st = new_store(tmp_path)
    row = _ingest(st, slide_img)
    before = _digest(st.slide_dir(row))
    tiers = SlideTiers(st)

    def corrupt(point, folder):
        if point == "copied":
            f = next(p for p in folder.iterdir() if p.name.startswith("level-0"))
            data = bytearray(f.read_bytes())
            data[100] ^= 0xFF
            f.write_bytes(bytes(data))

    tiers.fault = corrupt
    with pytest.raises(TierMoveError, match="does not verify"):
        tiers.move(row["pk"], "mid")
    assert st.slide(row["pk"])["tier"] == "recent"
    assert _tier_dirs(st, row["slide_uid"]) == [f"recent/{row['slide_uid']}"]
    assert _digest(st.slide_dir(row)) == before
    assert st.catalogue.moves(row["pk"])[-1]["state"] == "failed"
    # an exception after the commit (before the delete): recovery deletes the old copy
    def boom(point, folder):
        if point == "committed":
            raise RuntimeError("power cut")

    tiers.fault = boom
    with pytest.raises(RuntimeError):
        tiers.move(row["pk"], "mid")
    assert len(_tier_dirs(st, row["slide_uid"])) == 2
    tiers.fault = None
    tiers.recover()
    assert _tier_dirs(st, row["slide_uid"]) == [f"mid/{row['slide_uid']}"]
    assert _digest(st.slide_dir(st.slide(row["pk"]))) == before
    st.close()


def test_policy_and_idle_scheduler(tmp_path, slide_img):
    st = new_store(tmp_path)
    young = _ingest(st, slide_img, "P1", "A1", today_minus(5))
    mid = _ingest(st, slide_img, "P2", "A2", today_minus(100))
    old = _ingest(st, slide_img, "P3", "A3", today_minus(800))
    inpatient = _ingest(st, slide_img, "P4", "A4", today_minus(800), status="inpatient")
    # ingest already puts each slide in its tier
    assert [st.slide(r["pk"])["tier"] for r in (young, mid, old, inpatient)] == \
        ["recent", "mid", "long", "recent"]
    # the patient leaves hospital: the slide is due for the long tier
    st.catalogue.set_patient_status("P4", "outpatient")
    tiers = SlideTiers(st)
    assert [(r["slide_uid"], t) for r, t in tiers.plan()] == [(inpatient["slide_uid"], "long")]
    now = [0.0]
    sched = JobScheduler([SlideTierJob(tiers, idle_seconds=60, clock=lambda: now[0])],
                         clock=lambda: now[0])
    assert sched.step() == {}                       # somebody was just working
    now[0] = 30.0
    st.open(young["pk"])                            # activity postpones the work
    now[0] = 80.0
    assert sched.step() == {}
    now[0] = 200.0
    rep = sched.step()["slide-tiers"]
    assert rep.moved == [(inpatient["slide_uid"], "recent", "long")]
    assert st.slide(inpatient["pk"])["tier"] == "long"
    assert tiers.plan() == []
    st.close()


def test_temp_tier_is_marked_and_purged_at_discharge(tmp_path, slide_img):
    from client.srqueue import GeneratedTile, SRTileCache, read_png_with_text

    st = new_store(tmp_path)
    row = _ingest(st, slide_img)
    cache = SRTileCache(st.config.tier_root("temp"), st.catalogue, row["pk"], row["slide_uid"])
    px = np.zeros((64, 64, 3), np.uint8)
    cache.put(GeneratedTile(px, 4, (4, 0, 0)))
    f = st.config.tier_root("temp") / row["slide_uid"] / cache.name((4, 0, 0))
    _img, text = read_png_with_text(f.read_bytes())
    assert "generated" in text["MedView-Generated"] and "x4" in text["MedView-Generated"]
    hit = cache.get((4, 0, 0), 4)
    assert hit is not None and hit.generated
    assert len(st.catalogue.temp_tiles([row["pk"]])) == 1
    # a cached file that was altered is not served (checksum in the catalogue)
    good = f.read_bytes()
    f.write_bytes(good[:-20] + bytes(20))
    assert cache.get((4, 0, 0), 4) is None
    f.write_bytes(good)
    tiers = SlideTiers(st)
    assert tiers.run_once().purged_tiles == 0       # patient still in care: kept
    st.catalogue.set_patient_status("P1", "discharged")
    rep = tiers.run_once()
    assert rep.purged_tiles == 1
    assert not f.exists() and st.catalogue.temp_tiles([row["pk"]]) == []
    assert st.open(row["pk"])[1].verify() == []      # scanned data untouched
    st.close()


def test_gather_and_distribute(tmp_path, slide_img):
    from server.slide_organise import distribute, gather_patient
    from client.slides import LocalSlide

    st = new_store(tmp_path / "store")
    a = _ingest(st, slide_img, "P1", "A1")
    b = _ingest(st, slide_img, "P1", "A2", today_minus(400))      # another exam, long tier
    _ingest(st, slide_img, "P2", "B1")
    idx = gather_patient(st, "P1", tmp_path / "out")
    assert sorted(s["slide_uid"] for s in idx["slides"]) == sorted([a["slide_uid"], b["slide_uid"]])
    for s in idx["slides"]:
        folder = tmp_path / "out" / "P1" / s["folder"]
        assert LocalSlide.from_folder(folder).stored.verify() == []
    st.catalogue.add_station("ws-1", str(tmp_path / "ws1"))
    st.catalogue.assign("A2", "ws-1")
    done = distribute(st)
    assert done[0]["slides"] == [{"slide_uid": b["slide_uid"], "copy": "copied"}]
    local = LocalSlide.from_folder(tmp_path / "ws1" / b["slide_uid"])
    assert np.array_equal(local.read_level(0, 0, 0, 512, 384), slide_img)
    assert distribute(st) == []                      # nothing pending any more
    assert st.catalogue.assignments("ws-1")[0]["distributed_at"]
    st.close()
