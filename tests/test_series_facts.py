"""Series facts kept per generation (issue 15): a request about one image does no work
proportional to the series' length, and every change to a series (ingest, deletion,
quarantine, migration, recall), also by another process, makes the server read it again."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from client import Session
from server import sample
from server.embedded import EmbeddedServer
from server.ingest import ingest_paths
from server.policy import load_policy
from server.sample import make_sample_ct
from server.series_facts import SeriesFacts
from server.store import Store
from server.tiers import Tiers
from server.versions import VersionTable
from tests.policyutil import copy_store, series_uid

ROOT = Path(__file__).resolve().parent.parent


def _testfile(name: str) -> Path:
    p = sample.find_test_file(name)
    if p is None:
        pytest.skip(f"test file {name} not installed")
    return p


def test_generation_rises_with_every_change(tmp_path):
    files = make_sample_ct(tmp_path / "dicom", slices=4, size=32, seed=11)
    with Store(tmp_path / "store") as st:
        cat = st.catalogue
        assert ingest_paths(files[:2], st, verify=False).imported
        uid = cat.query_series()[0]["SeriesInstanceUID"]
        study = cat.query_series()[0]["StudyInstanceUID"]
        seen = [cat.series_generation(uid)]
        assert seen[0] >= 1 and cat.series_generation("1.2.3.unknown") == 0

        def rose() -> bool:
            g = cat.series_generation(uid)
            ok = g > seen[-1]
            seen.append(g)
            return ok

        ingest_paths(files[2:3], st, verify=False)                   # an image added
        assert rose()
        cat.delete_instance(cat.series_images(uid)[0]["SOPInstanceUID"])   # one deleted
        assert rose() and len(cat.series_images(uid)) == 2
        tiers = Tiers(st, versions=VersionTable(st, load_policy).get,
                      settings=lambda: load_policy().storage)
        try:
            rep = tiers.migrate(days=0, min_status=0)                # frames archived
            assert rep.ok and rep.frames_archived == 2, rep
            assert rose()
            row = cat.series_images(uid)[0]
            tiers.recall_frame(row)                                  # one recalled
            assert rose()
        finally:
            tiers.close()
        st.delete_study(study)                                       # all gone
        assert rose()
        assert cat.series_images(uid) == []
        ingest_paths(files, st, verify=False)            # ingested again: never back to 0
        assert rose() and len(cat.series_images(uid)) == 4


def test_quarantine_entry_raises_the_generation(tmp_path):
    with Store(tmp_path / "store") as st:
        assert len(ingest_paths([_testfile("MR_small.dcm")], st).imported) == 1
        uid = st.catalogue.query_series()[0]["SeriesInstanceUID"]
        g = st.catalogue.series_generation(uid)
        assert not st.catalogue.series_images(uid)[0]["conflict"]
        assert len(ingest_paths([_testfile("MR_small_RLE.dcm")], st).quarantined) == 1
        assert st.catalogue.series_generation(uid) > g
        assert st.catalogue.series_images(uid)[0]["conflict"]


def test_facts_are_kept_until_the_generation_changes(tmp_path):
    files = make_sample_ct(tmp_path / "dicom", slices=3, size=32, seed=12)
    with Store(tmp_path / "store") as st:
        ingest_paths(files[:2], st, verify=False)
        uid = st.catalogue.query_series()[0]["SeriesInstanceUID"]
        facts = SeriesFacts(st.catalogue)
        first = facts.images(uid)
        assert facts.images(uid) is first and facts.builds == 1
        sop = first[1]["SOPInstanceUID"]
        assert facts.images_of(uid, sop) == [first[1]]
        assert facts.images_of(uid, sop, 2) == [] and facts.images_of(uid, "9.9") == []
        ingest_paths(files[2:], st, verify=False)
        assert len(facts.images(uid)) == 3
        assert facts.images_of(uid, files and st.catalogue.series_images(uid)[2]
                               ["SOPInstanceUID"])


def test_server_reads_a_series_once_and_again_after_another_process_ingests(ct_store,
                                                                               tmp_path):
    store = copy_store(ct_store, tmp_path / "store")
    uid = series_uid(store)
    srv = EmbeddedServer(str(store)).start()
    calls = []
    cat = srv.app.state.server.catalogue
    real = cat.series_images
    cat.series_images = lambda u: (calls.append(u), real(u))[1]
    try:
        s = Session(srv.url)
        tiny = {"target": uid, "comps": "0", "layers": "1", "reduce": "2"}
        assert s.packet_stream(tiny).content
        assert len(s.series_images(uid)["images"]) == 12
        n = len(calls)
        for _ in range(5):                      # nothing series-long per request now
            s.packet_stream(dict(tiny, comps="3")).content
            s.request("GET", f"/dicomweb/studies/{s.series_images(uid)['series']['StudyInstanceUID']}"
                             f"/series/{uid}/instances")
        assert len(calls) == n
        # another process ingests a 13th slice of the same series
        more = make_sample_ct(tmp_path / "more", slices=13, size=256, seed=3)[-1:]
        run = subprocess.run([sys.executable, "-m", "server.cli", "ingest", str(more[0]),
                              "--store", str(store), "--no-verify"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert len(s.series_images(uid)["images"]) == 13
        assert s.packet_stream(dict(tiny, comps="12")).status_code == 200
        assert len(calls) == n + 1
    finally:
        srv.stop()


def test_embedded_server_sockets_say_tcp(ct_store):
    """asyncio sets TCP_NODELAY only on sockets whose proto is TCP (accepted sockets
    inherit the listener's): without it every two-part response waited 40 ms for the
    client's delayed ACK."""
    import socket

    srv = EmbeddedServer(str(ct_store)).start()
    try:
        assert srv._sock.proto == socket.IPPROTO_TCP
        assert Session(srv.url).studies()
    finally:
        srv.stop()


def test_kept_facts_are_bounded(tmp_path):
    files = make_sample_ct(tmp_path / "dicom", slices=3, size=32, seed=13)
    with Store(tmp_path / "store") as st:
        ingest_paths(files, st, verify=False)
        uid = st.catalogue.query_series()[0]["SeriesInstanceUID"]
        facts = SeriesFacts(st.catalogue, max_items=4)
        facts.images(uid)                                   # 3 items
        facts.kept(uid, "other", lambda: [1, 2])            # 5 > 4: the oldest goes
        assert facts.builds == 2
        facts.images(uid)
        assert facts.builds == 3
        assert facts._items <= 4 or len(facts._memo) == 1
