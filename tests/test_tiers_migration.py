"""Tiered storage (SPEC V7): the lossless layers and the originals move to the archive,
the lossy layers stay hot and are served without the archive, a request that needs more
recalls transparently (the client sees "recalling"), nothing is ever lost."""
from __future__ import annotations

import threading

import os
import shutil

import numpy as np
import pytest

from server.database import database_of
import requests

from client import Callbacks, SeriesData, Session, TransferError
from codestream.encode import decode_full
from server.cli import main as cli
from server.embedded import EmbeddedServer
from server.policy import load_policy
from server.store import Store
from server.tiers import Tiers
from server.versions import VersionTable
from server.fsck import fsck
from tests.policyutil import copy_store, series_uid, study_uid
from waits import WAIT_S


@pytest.fixture(scope="module")
def reference(ct_store):
    """Codestreams and originals as ingested (from the shared, never migrated store)."""
    with Store(ct_store) as st:
        uid = series_uid(ct_store)
        rows = st.catalogue.series_images(uid)
        cs = {r["index"]: st.read_verified(r["codestream_relpath"], r["codestream_sha256"]) for r in rows}
        orig = {}
        for r in rows:
            inst = st.catalogue.find_instance(r["SOPInstanceUID"])
            orig[inst["SOPInstanceUID"]] = st.read_verified(inst["original_relpath"],
                                                            inst["original_sha256"])
        pixels = {r["index"]: decode_full(cs[r["index"]], r["offset"], True) for r in rows}
    return {"cs": cs, "orig": orig, "pixels": pixels, "uid": uid}


def tiers_of(st: Store) -> tuple[Tiers, VersionTable]:
    vt = VersionTable(st, load_policy)
    return Tiers(st, versions=vt.get, settings=lambda: load_policy().storage), vt


def test_migrate_keeps_lossy_layers_hot(ct_store, reference, tmp_path, capsys):
    store = copy_store(ct_store, tmp_path / "store")
    uid = reference["uid"]
    assert cli(["migrate", "--store", str(store), "--dry-run"]) == 0      # 30 days: nothing
    assert "0 instances would be migrated" in capsys.readouterr().out
    assert cli(["migrate", "--store", str(store), "--days", "0", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "12 codestreams and 12 originals archived" in out
    hot = sorted(os.listdir(store / "j2k" / uid))
    assert not [f for f in hot if f.endswith(".j2k")] and len([f for f in hot if f.endswith(".head")]) == 12
    arch = store / "archive"
    assert len(list((arch / "j2k" / uid).glob("*.tail"))) == 12
    assert len(list((arch / "originals").rglob("*.dcm"))) == 12
    assert not list((store / "originals").rglob("*.dcm"))
    with Store(store) as st:
        rep = fsck(st)
        assert rep.clean and rep.checked == 12 * 2 + 12 + 12, rep.format()   # idx+head, tails, originals
        tiers, vt = tiers_of(st)
        summary = tiers.summary()
        # split by layers, not copies: head + tail is exactly the codestream
        f = summary["frames"]["archived"]
        assert f["count"] == 12
        assert f["head_bytes"] + f["tail_bytes"] == sum(len(c) for c in reference["cs"].values())
        v2 = vt.get(uid).get("V2")
        assert f["head_bytes"] == pytest.approx(v2.bytes, rel=0.02)
        tiers.close()
        vt.close()
    # running again finds nothing more to do
    assert cli(["migrate", "--store", str(store), "--days", "0", "--quiet"]) == 0
    assert "0 codestreams and 0 originals archived" in capsys.readouterr().out


def test_lossy_from_hot_lossless_recalled(ct_store, reference, tmp_path):
    store = copy_store(ct_store, tmp_path / "store")
    uid = reference["uid"]
    arch, away = tmp_path / "nas", tmp_path / "nas-unplugged"
    # a configured archive directory must exist (an unmounted disk is an error)
    assert cli(["migrate", "--store", str(store), "--days", "0", "--quiet",
                "--archive", str(arch)]) == 1
    arch.mkdir()
    assert cli(["migrate", "--store", str(store), "--days", "0", "--quiet",
                "--archive", str(arch)]) == 0
    srv = EmbeddedServer(str(store)).start()
    try:
        s = Session(srv.url)
        sd = SeriesData(s, None, uid)
        assert {im["hot_layers"] for im in sd.images} == {2}
        # the archive is gone: the lossy version (V2 = 2 layers) still comes, from hot
        shutil.move(arch, away)
        events = []
        sd.listeners.append(lambda kind, msg: events.append(kind))
        t = sd.transfer(layers=2)
        t.run()
        assert t.announce["recall"] == [] and not events
        assert all(sd.levels(c) == (2, 2) for c in range(12))
        # more than that needs the archive: a clear error, nothing half-sent
        t = sd.transfer(comps=[0, 1])
        with pytest.raises(TransferError, match="archive could not deliver"):
            t.run()
        assert t.announce["recall"] == [0, 1] and events == ["recalling"]
        shutil.move(away, arch)
        # transparent recall: the client is told, then gets everything, bit-exact
        seen = []
        t = sd.transfer(callbacks=Callbacks(on_recalling=lambda m: seen.append(m["type"])))
        t.run()
        assert seen == ["recalling", "recalled"] and not t.recalling
        for c in range(12):
            np.testing.assert_array_equal(sd.decode(c).pixels, reference["pixels"][c])
        # the original comes back through WADO too, bit for bit
        study = study_uid(store)
        sop = s.instances(study, uid)[4]["SOPInstanceUID"]
        r = requests.get(f"{srv.url}/dicomweb/studies/{study}/series/{uid}/instances/{sop}",
                         headers={"Authorization": f"Bearer {s.id}"})
        assert r.status_code == 200 and r.content == reference["orig"][sop]
        # a second session gets the recalled codestreams straight from hot
        t = SeriesData(Session(srv.url), None, uid).transfer(comps=[3])
        t.run()
        assert t.announce["recall"] == []
    finally:
        if away.exists():
            shutil.move(away, arch)
        srv.stop()
    with Store(store) as st:
        assert fsck(st).clean
        tiers, vt = tiers_of(st)
        assert tiers.summary()["frames"]["recalled"]["count"] == 12
        assert tiers.summary()["originals"]["recalled"]["count"] == 1
        # recalled data ages again: re-archiving needs no new copy, only a check
        rep = tiers.migrate(days=0)
        assert rep.ok and rep.frames_archived == 12 and rep.originals_archived == 1
        assert rep.bytes_archived == 0
        tiers.close()
        vt.close()
        assert fsck(st).clean


def test_min_status_and_age(ct_store, tmp_path):
    store = copy_store(ct_store, tmp_path / "store")
    with Store(store) as st:
        tiers, vt = tiers_of(st)
        tiers.status_of = lambda study: 1
        assert tiers.migrate(days=0, min_status=2).frames_archived == 0
        assert tiers.migrate(days=1).frames_archived == 0                 # ingested just now
        assert tiers.migrate(days=0, keep_hot="V3", min_status=1).frames_archived == 12
        assert tiers.summary()["frames"]["archived"]["count"] == 12
        row = st.catalogue.series_images(series_uid(store))[0]
        (pk, t), = [v for k, v in tiers.frame_states(series_uid(store)).items()
                    if k == (row["SOPInstanceUID"], row["frame"])]
        assert t.hot_layers == 1
        tiers.close()
        vt.close()
        # a damaged archive object is found by fsck
        tail = next((store / "archive").rglob("*.tail"))
        tail.write_bytes(tail.read_bytes()[:-1] + b"\x00")
        rep = fsck(st)
        assert [d[0] for d in rep.damaged] == ["archive:" + tail.relative_to(store / "archive").as_posix()]


def test_migration_job_inside_the_server(ct_store, tmp_path):
    """`medview-server serve` runs the migration on a schedule (here: at once), under the
    job's lease: of two servers sharing the store, one runs it."""
    from server.jobs import JobScheduler, Leases, MigrationJob
    from server.policy import StorageSettings

    store = copy_store(ct_store, tmp_path / "store")
    with Store(store) as st:
        vt = VersionTable(st, load_policy)
        settings = lambda: StorageSettings(migrate_after_days=0, schedule_hours=1)  # noqa: E731
        tiers = Tiers(st, versions=vt.get, settings=settings)
        other = Leases(database_of(store), holder="replica-2")
        assert other.acquire("migration")          # another replica is migrating now
        job = MigrationJob(tiers, first_delay=0)
        sched = JobScheduler([job], leases=Leases(database_of(store)))
        assert sched.step() == {}                  # skipped: it runs elsewhere
        assert job.wait(job.clock()) > 3000        # and this one tries next period
        other.release("migration")
        job._next = job.clock()                    # due again
        done = threading.Event()
        sched.jobs[0].run = (lambda run: lambda stop: (r := run(stop), done.set())[0])(job.run)
        sched.start()
        assert done.wait(WAIT_S)
        sched.stop()
        other.close()
        report = sched.last_report["migration"]
        assert report.ok and report.frames_archived == 12
        tiers.close()
        vt.close()
        assert fsck(st).clean
