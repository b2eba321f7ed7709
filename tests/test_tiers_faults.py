"""Crash safety of tiered storage: kill -9 in the middle of a migration and in the middle
of a recall, at every dangerous step and at a random moment. Nothing is lost, the
catalogue always points at complete data, a resumed migration finishes, fsck is clean."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from client import SeriesData, Session, TransferError
from codestream.encode import decode_full
from server.policy import load_policy
from server.store import Store
from server.tiers import Tiers
from server.versions import VersionTable
from server.fsck import fsck
from tests.policyutil import copy_store, series_uid
from tests.test_server_process import _free_port, _serve
from waits import WAIT_S


@pytest.fixture(scope="module")
def reference(ct_store):
    with Store(ct_store) as st:
        uid = series_uid(ct_store)
        rows = st.catalogue.series_images(uid)
        cs = {r["SOPInstanceUID"]: st.read_verified(r["codestream_relpath"], r["codestream_sha256"])
              for r in rows}
        orig = {r["SOPInstanceUID"]: st.read_verified(
            *(lambda i: (i["original_relpath"], i["original_sha256"]))(
                st.catalogue.find_instance(r["SOPInstanceUID"]))) for r in rows}
        pixels = {r["index"]: decode_full(cs[r["SOPInstanceUID"]], r["offset"], True) for r in rows}
    return {"uid": uid, "cs": cs, "orig": orig, "pixels": pixels}


def migrate_process(store, fault: str | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("MEDVIEW_FAULTS", None)
    if fault:
        env["MEDVIEW_FAULTS"] = fault
    return subprocess.Popen([sys.executable, "-m", "server.cli", "migrate", "--store",
                             str(store), "--days", "0", "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def tiers_of(st):
    vt = VersionTable(st, load_policy)
    return Tiers(st, versions=vt.get, settings=lambda: load_policy().storage), vt


def assert_nothing_lost(store, reference) -> None:
    """Every codestream and every original can be read back bit for bit (recalling what
    must be), through the catalogue alone."""
    with Store(store) as st:
        tiers, vt = tiers_of(st)
        try:
            for row in st.catalogue.series_images(reference["uid"]):
                assert tiers.read_codestream(row) == reference["cs"][row["SOPInstanceUID"]]
                inst = st.catalogue.find_instance(row["SOPInstanceUID"])
                assert tiers.read_original(inst) == reference["orig"][row["SOPInstanceUID"]]
        finally:
            tiers.close()
            vt.close()


def resume_and_check(store, reference, leftover: str | None = None) -> None:
    """fsck right after the crash (the catalogue points at good data; ``leftover``: the
    suffix of the one unreferenced file the interrupted step leaves), resume, check."""
    with Store(store) as st:
        rep = fsck(st)
        assert rep.consistent, rep.format()         # the catalogue points at good data
        if leftover is not None:
            assert len(rep.orphans) == 1 and rep.orphans[0].endswith(leftover), rep.format()
        tiers, vt = tiers_of(st)
        report = tiers.migrate(days=0)              # resumable: carries on
        tiers.close()
        vt.close()
        assert report.ok, report.errors
        final = fsck(st, repair=True)                # a kill inside a write: a temp file
        assert final.consistent and all(o.rsplit("/", 1)[-1].startswith(".") for o in
                                        set(final.orphans)), final.format()
        assert fsck(st).clean
        tiers, vt = tiers_of(st)
        s = tiers.summary()
        tiers.close()
        vt.close()
        assert s["frames"]["archived"]["count"] == 12 and s["originals"]["archived"]["count"] == 12
    assert_nothing_lost(store, reference)
    with Store(store) as st:
        assert fsck(st).clean


@pytest.mark.parametrize("fault, leftover", [
    ("migrate.tail-copied=3", ".tail"),             # in the archive, not yet catalogued
    ("migrate.head-written=5", None),               # a tail and a head, not catalogued
    ("migrate.committed=7", ".j2k"),                # catalogued; the whole file not deleted
    ("migrate.original-copied=2", ".dcm"),          # original copied, not catalogued
    ("migrate.original-committed=9", ".dcm")])      # catalogued, hot copy not deleted
def test_kill_during_migration(ct_store, reference, tmp_path, fault, leftover):
    store = copy_store(ct_store, tmp_path / "store")
    proc = migrate_process(store, fault)
    proc.wait(WAIT_S)
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()
    resume_and_check(store, reference, leftover)


def test_kill_at_a_random_moment_of_migration(ct_store, reference, tmp_path):
    store = copy_store(ct_store, tmp_path / "store")
    proc = migrate_process(store)
    deadline = time.monotonic() + WAIT_S
    tails = store / "archive" / "j2k" / reference["uid"]
    while time.monotonic() < deadline and proc.poll() is None:
        if tails.is_dir() and len(list(tails.iterdir())) >= 4:
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the migration ended before the kill"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(WAIT_S)
    resume_and_check(store, reference)


@pytest.mark.parametrize("fault, leftover", [
    ("recall.written=3", ".j2k"),                   # rebuilt in hot, not yet catalogued
    ("recall.committed=2", ".head")])               # catalogued, the head not deleted
def test_kill_during_recall(ct_store, reference, tmp_path, fault, leftover):
    """The server dies (kill -9) while it recalls; the client gets a clear error; the
    restarted server recalls again and delivers everything bit-exact."""
    store = copy_store(ct_store, tmp_path / "store")
    proc = migrate_process(store)
    assert proc.wait(WAIT_S) == 0
    port = _free_port()
    os.environ["MEDVIEW_FAULTS"] = fault
    try:
        proc, url = _serve(store, port)
    finally:
        del os.environ["MEDVIEW_FAULTS"]
    try:
        sd = SeriesData(Session(url), None, reference["uid"])
        with pytest.raises(TransferError):
            sd.transfer().run()
        proc.wait(WAIT_S)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    with Store(store) as st:
        rep = fsck(st)
        assert rep.consistent, rep.format()
        assert len(rep.orphans) == 1 and rep.orphans[0].endswith(leftover), rep.format()
    proc, url = _serve(store, port)
    try:
        sd = SeriesData(Session(url), None, reference["uid"])
        t = sd.transfer()
        t.run()
        for c in range(12):
            np.testing.assert_array_equal(sd.decode(c).pixels, reference["pixels"][c])
    finally:
        proc.terminate()
        proc.wait(WAIT_S)
    resume_and_check(store, reference)


def test_recall_while_another_process_migrates(ct_store, reference, tmp_path):
    """The server recalls while `medview-server migrate` (another process) archives the
    same images again and again: their steps are serialised, nothing is lost."""
    import threading

    store = copy_store(ct_store, tmp_path / "store")
    assert migrate_process(store).wait(WAIT_S) == 0
    port = _free_port()
    proc, url = _serve(store, port)
    stop = threading.Event()
    errors: list[BaseException] = []
    fetched = [0]

    def reader():
        while not stop.is_set():
            try:
                sd = SeriesData(Session(url), None, reference["uid"])
                sd.transfer().run()
                for c in (0, 5, 11):
                    np.testing.assert_array_equal(sd.decode(c).pixels, reference["pixels"][c])
                fetched[0] += 1
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return

    th = threading.Thread(target=reader)
    th.start()
    try:
        for _ in range(4):
            m = migrate_process(store)
            assert m.wait(WAIT_S) == 0, m.stdout.read().decode()
    finally:
        stop.set()
        th.join(WAIT_S)
        proc.terminate()
        proc.wait(WAIT_S)
    assert not errors, errors
    assert fetched[0] >= 1
    resume_and_check(store, reference)
