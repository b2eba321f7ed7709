"""The image store and the archive on a real S3 server (SeaweedFS, started once per test
session on loopback with throwaway data): ingest, /jpip served bit-exact from S3 (whole
reads and range reads), fsck finds missing and damaged objects, tier moves to an S3
archive, and a kill -9 of an ingest during its uploads loses nothing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from client import SeriesData, Session
from codestream.encode import decode_full
from server.cli import main as cli
from server.embedded import EmbeddedServer
from server.fsck import fsck
from server.objects import ObjectError, ObjectMissing, S3Objects
from server.store import Store
import seaweed
from waits import WAIT_S

ROOT = Path(__file__).resolve().parents[1]


bucket = seaweed.bucket_name      # the SeaweedFS server itself: the ``s3`` fixture (conftest)


@pytest.fixture(scope="module")
def dicom_files(tmp_path_factory):
    from server.sample import make_sample_ct
    return make_sample_ct(tmp_path_factory.mktemp("dicom"), slices=6, size=128, seed=7)


def ingest_to_s3(files, store: Path, url: str, endpoint: str) -> None:
    assert cli(["ingest", *map(str, files), "--store", str(store), "--objects", url,
                "--s3-endpoint", endpoint, "--quiet"]) == 0


def reference(store: Path) -> dict:
    with Store(store) as st:
        (s,) = st.catalogue.query_series()
        uid = s["SeriesInstanceUID"]
        rows = st.catalogue.series_images(uid)
        cs = {r["index"]: st.read_verified(r["codestream_relpath"], r["codestream_sha256"])
              for r in rows}
        px = {r["index"]: decode_full(cs[r["index"]], r["offset"], True) for r in rows}
        return {"uid": uid, "cs": cs, "pixels": px, "rows": rows}


def test_object_store_basics(s3):
    o = S3Objects(s3.client(), bucket(), "pre/fix")
    o.ensure_bucket()
    data = os.urandom(70_000)
    o.put("j2k/1.2/3.1.j2k", data)
    assert o.get("j2k/1.2/3.1.j2k") == data
    assert o.get_range("j2k/1.2/3.1.j2k", 1000, 1500) == data[1000:1500]
    assert o.head("j2k/1.2/3.1.j2k")["size"] == len(data)
    assert list(o.keys()) == ["j2k/1.2/3.1.j2k"] and list(o.keys("originals")) == []
    with pytest.raises(ObjectMissing):
        o.get("j2k/nothing")
    with pytest.raises(ObjectError):
        o.put("../escape", b"x")
    assert o.delete("j2k/1.2/3.1.j2k") and not o.exists("j2k/1.2/3.1.j2k")
    # wrong credentials are refused, not ignored
    from server.objects import s3_client
    bad = S3Objects(s3_client(s3.endpoint, access_key="nobody", secret_key="wrong", attempts=1),
                    o.bucket, "pre/fix")
    with pytest.raises(ObjectError):
        bad.put("x", b"x")


def test_ingest_serve_fsck_on_s3(s3, dicom_files, tmp_path):
    store = tmp_path / "store"
    b = bucket()
    ingest_to_s3(dicom_files, store, f"s3://{b}/site", s3.endpoint)
    # nothing of the data on the local disk: it is all in the bucket
    assert not list(store.rglob("*.j2k")) and not list(store.rglob("*.dcm"))
    keys = list(S3Objects(s3.client(), b, "site").keys())
    assert len([k for k in keys if k.endswith(".j2k")]) == 6
    assert len([k for k in keys if k.startswith("originals/")]) == 6
    ref = reference(store)
    with Store(store) as st:
        assert st.objects.remote and fsck(st).clean
    # served bit-exact from S3, by a server that was told nothing (objects.json)
    for cache in ("0", str(1 << 30)):
        os.environ["MEDVIEW_READ_CACHE_BYTES"] = cache
        try:
            srv = EmbeddedServer(str(store)).start()
        finally:
            os.environ.pop("MEDVIEW_READ_CACHE_BYTES")
        try:
            sd = SeriesData(Session(srv.url), None, ref["uid"])
            t = sd.transfer(layers=1, reduce=2)         # a small first pass: range reads
            t.run()
            assert (srv.store.range_reads > 0) == (cache == "0")   # else the cache has it
            t = sd.transfer()                          # then the rest
            t.run()
            for c in range(6):
                np.testing.assert_array_equal(sd.decode(c).pixels, ref["pixels"][c])
        finally:
            srv.stop()
    # fsck finds a missing and a damaged object
    o = S3Objects(s3.client(), b, "site")
    rows = ref["rows"]
    gone, bad = rows[1]["codestream_relpath"], rows[2]["codestream_relpath"]
    o.delete(gone)
    o.put(bad, ref["cs"][2][:-1] + b"\x00")
    o.put("j2k/orphan.j2k", b"orphan")
    with Store(store) as st:
        rep = fsck(st)
        assert [m[0] for m in rep.missing] == [gone]
        assert [d[0] for d in rep.damaged] == [bad]
        assert rep.orphans == ["j2k/orphan.j2k"]
        rep = fsck(st, repair=True)
        assert rep.removed == ["j2k/orphan.j2k"] and not o.exists("j2k/orphan.j2k")


def test_tier_move_to_s3_archive(s3, dicom_files, tmp_path):
    from server.policy import load_policy
    from server.tiers import Tiers
    from server.versions import VersionTable

    store = tmp_path / "store"
    hot, arch = bucket(), bucket()
    ingest_to_s3(dicom_files, store, f"s3://{hot}/hot", s3.endpoint)
    ref = reference(store)
    S3Objects(s3.client(), arch).ensure_bucket()
    assert cli(["migrate", "--store", str(store), "--days", "0", "--quiet",
                "--archive", f"s3://{arch}/archive"]) == 0
    akeys = list(S3Objects(s3.client(), arch, "archive").keys())
    assert len([k for k in akeys if k.endswith(".tail")]) == 6
    assert len([k for k in akeys if k.endswith(".dcm")]) == 6
    hkeys = list(S3Objects(s3.client(), hot, "hot").keys())
    assert not [k for k in hkeys if k.endswith(".j2k") or k.endswith(".dcm")]
    with Store(store) as st:
        rep = fsck(st)
        assert rep.clean and rep.checked == 6 * 4, rep.format()
        vt = VersionTable(st, load_policy)
        tiers = Tiers(st, versions=vt.get, settings=lambda: load_policy().storage)
        for row in st.catalogue.series_images(ref["uid"])[:2]:   # recall, bit-exact
            assert tiers.read_codestream(row) == ref["cs"][row["index"]]
        tiers.close()
        vt.close()
        assert fsck(st).clean


@pytest.mark.parametrize("point", ["objects.put=8", "objects.put-sent=11"])
def test_kill_9_during_upload_loses_nothing(s3, dicom_files, tmp_path, point):
    """An ingest killed (SIGKILL) in the middle of its uploads — before a PUT, or after a
    PUT and before its check: every catalogued row has its object, whole; what the kill
    left behind is at worst orphans; the ingest run again completes the series."""
    store = tmp_path / "store"
    Store(store, f"s3://{bucket()}/k", endpoint=s3.endpoint).close()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MEDVIEW_FAULTS": point}
    proc = subprocess.run([sys.executable, "-m", "server.cli", "ingest",
                           *map(str, dicom_files), "--store", str(store), "--quiet"],
                          env=env, cwd=ROOT, timeout=WAIT_S * 4)
    assert proc.returncode == -signal.SIGKILL
    with Store(store) as st:
        rep = fsck(st)
        assert rep.consistent, rep.format()           # never a row without its object
        assert 0 < len(st.catalogue.file_refs()) < 6 * 3 or not st.catalogue.file_refs()
        fsck(st, repair=True)
        assert fsck(st).clean
    assert cli(["ingest", *map(str, dicom_files), "--store", str(store), "--quiet"]) == 0
    with Store(store) as st:
        rep = fsck(st)
        assert rep.clean and rep.checked == 6 * 3, rep.format()
