"""Issue 15: ingest in worker processes, the lossless layer verified after the commit.

An instance stored with ``verify=False`` has its lossless layer ``pending``: /jpip sends
its lossy layers only, WADO-RS does not hand out its stored codestream, until
server.verify has decoded the stored codestream and found the source samples' digest; a
mismatch (injected through the ``ingest.codestream-unverified`` fault point: bytes of
the codestream changed just before it is written) flags the instance and nothing of that
codestream is served. Both engines (SQLite and PostgreSQL)."""
from __future__ import annotations

import pydicom
import pytest
import requests

from client import Session
from codestream import framing
from codestream.encode import decode_full
from codestream.jpp import JppMessage, parse_all
from server import faults
from server.ingest import _executor, ingest_paths
from server.store import Store
from server.verify import lossless_health, reencode_failed, verify_pending


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory):
    from server.sample import make_sample_ct

    return make_sample_ct(tmp_path_factory.mktemp("ct") / "dicom", slices=4, size=128, seed=11)


def _stream(s: Session, series: str, **params) -> tuple[dict, int]:
    """The announcement of a whole-series stream (all layers asked) and the bytes sent."""
    r = s.request("GET", "/jpip", params={"target": series, **params})
    recs = list(framing.RecordReader().feed(r.content))
    ann = recs[0][1]
    assert ann["type"] == "announce" and recs[-1][1]["type"] == "end"
    jpp = b"".join(p for t, p in recs if t == framing.DATA)
    return ann, sum(len(m.data) for m in parse_all(jpp) if isinstance(m, JppMessage))


def _state(st: Store, sop: str) -> tuple[str, str | None]:
    return tuple(st.catalogue.db.one("SELECT lossless_state, lossless_detail FROM instance "
                                     "WHERE SOPInstanceUID = ?", [sop]))


def test_unverified_lossless_layer_is_never_served(tmp_path, database, ct_files):
    from server.embedded import EmbeddedServer

    st = Store(tmp_path / "store", database=database)
    rep = ingest_paths(ct_files, st, verify=False)
    assert len(rep.imported) == 4, rep.summary()
    series = rep.imported[0].series_instance_uid
    sops = [f.sop_instance_uid for f in rep.imported]
    assert all(_state(st, s)[0] == "pending" for s in sops)
    assert lossless_health(st.catalogue)["pending"] == 4
    srv = EmbeddedServer(str(tmp_path / "store")).start()
    try:
        s = Session(srv.url)
        ann, lossy = _stream(s, series)                # all layers asked, none named
        nl = ann["images"][0]["nlayers"]
        assert nl == 4
        assert [im["layers"] for im in ann["images"]] == [nl - 1] * 4
        assert {im["lossless_state"] for im in ann["images"]} == {"pending"}
        assert lossy == ann["bytes"] < sum(im["total_bytes"] for im in ann["images"])
        ann_l, _ = _stream(s, series, layers=nl)        # the lossless layer asked by name
        assert [im["layers"] for im in ann_l["images"]] == [nl - 1] * 4
        meta = s.series_images(series)["images"]
        assert {(m["lossless_state"], m["served_layers"]) for m in meta} == {("pending", nl - 1)}
        # WADO-RS does not hand out the stored (lossless) codestream either
        inst = f"{srv.url}/dicomweb/studies/{rep.imported[0].study_instance_uid}/series/" \
               f"{series}/instances/{sops[0]}/frames/1"
        r = requests.get(inst, headers={"Authorization": f"Bearer {s.id}",
                                        "Accept": "application/x-medview-codestream"})
        assert r.status_code == 409 and "not verified yet" in r.json()["error"]

        report = verify_pending(st)                    # the verifier: all equal
        assert sorted(report.verified) == sorted(sops) and not report.failed
        assert lossless_health(st.catalogue) == {"pending": 0, "failed": 0,
                                                 "failed_instances": []}
        ann, rest = _stream(s, series)          # this session: the last layer now
        assert [im["layers"] for im in ann["images"]] == [nl] * 4
        assert {im["lossless_state"] for im in ann["images"]} == {"verified"}
        assert 0 < rest == ann["bytes"]
        ann, whole = _stream(Session(srv.url), series)     # a new session: everything
        assert whole == ann["bytes"] == lossy + rest
        r = requests.get(inst, headers={"Authorization": f"Bearer {s.id}",
                                        "Accept": "application/x-medview-codestream"})
        assert r.status_code == 200
        back = decode_full(r.content, int(r.headers["X-MedView-Offset"]), False)
        src = pydicom.dcmread(rep.imported[0].path).pixel_array
        assert (back == src).all()
        assert verify_pending(st).summary() == "0 verified, 0 FAILED"     # nothing left
    finally:
        srv.stop()
        st.close()


def test_verification_mismatch_flags_the_instance(tmp_path, database, ct_files, monkeypatch):
    from server.embedded import EmbeddedServer

    faults.reset()
    monkeypatch.setenv("MEDVIEW_FAULTS", "ingest.codestream-unverified=2")
    st = Store(tmp_path / "store", database=database)
    try:
        rep = ingest_paths(ct_files, st, verify=False)
        monkeypatch.delenv("MEDVIEW_FAULTS")
        assert len(rep.imported) == 4, rep.summary()
        bad = rep.imported[1].sop_instance_uid       # the second codestream written
        series = rep.imported[0].series_instance_uid
        report = verify_pending(st)
        assert list(report.failed) == [bad], report.summary()
        assert len(report.verified) == 3
        state, detail = _state(st, bad)
        assert state == "failed" and "lossless verification failed: frame 1" in detail
        assert ("differs from the source samples" in detail or "does not decode" in detail)
        health = lossless_health(st.catalogue)
        assert health["failed"] == 1 and health["failed_instances"] == [bad]
        audit = st.catalogue.db.all("SELECT action, resource, outcome FROM audit "
                                    "WHERE action = 'verify'")
        assert [tuple(a) for a in audit] == [("verify", bad, "failed")]
        # a second run leaves the verdict alone
        assert verify_pending(st).summary() == "0 verified, 0 FAILED"
        srv = EmbeddedServer(str(tmp_path / "store")).start()
        try:
            s = Session(srv.url)
            ann, sent = _stream(s, series)
            by_key = {im["key"].split("/")[0]: im for im in ann["images"]}
            assert by_key[bad]["layers"] == 0 and by_key[bad]["lossless_state"] == "failed"
            assert all(im["layers"] == im["nlayers"] for k, im in by_key.items() if k != bad)
            assert not any(inc[0] == by_key[bad]["csn"] for inc in ann["increments"])
            assert sent == ann["bytes"]
            h = requests.get(f"{srv.url}/api/health").json()
            assert h["status"] == "degraded" and h["lossless"]["failed"] == 1
            assert any("lossless verification failed" in p for p in h["problems"])
            # encoded again from the original (proven first): served whole from then on
            assert reencode_failed(st) == {bad: "re-encoded and verified"}
            state, detail = _state(st, bad)
            assert state == "verified" and detail.startswith("re-encoded from the original")
            ann, sent = _stream(Session(srv.url), series)
            assert all(im["layers"] == im["nlayers"] for im in ann["images"])
            assert sent == ann["bytes"]
            assert requests.get(f"{srv.url}/api/health").json()["status"] == "ok"
            row = next(r for r in st.catalogue.series_images(series)
                       if r["SOPInstanceUID"] == bad)
            cs = st.read_verified(row["codestream_relpath"], row["codestream_sha256"])
            src = pydicom.dcmread(rep.imported[1].path).pixel_array
            assert (decode_full(cs, row["offset"], False) == src).all()
            from server.fsck import fsck
            check = fsck(st)                      # the old files gone, the new ones named
            assert check.clean, check.format()
        finally:
            srv.stop()
    finally:
        faults.reset()
        st.close()


def _files(st: Store) -> dict:
    """(SOP, frame) -> codestream bytes, index bytes and the frame's catalogue values."""
    out = {}
    for sop, frame, cs, cs_sha, idx, off, nres, nl, digest in st.catalogue.db.all(
            "SELECT i.SOPInstanceUID, f.frame_number, f.codestream_relpath, f.codestream_sha256,"
            " f.index_relpath, f.pixel_offset, f.numres, f.nlayers, f.pixel_sha256 FROM frame f"
            " JOIN instance i ON f.instance_pk = i.pk"):
        out[(sop, frame)] = (st.read_file(cs), st.read_file(idx), cs_sha, off, nres, nl, digest)
    return out


def test_process_pool_ingest_is_byte_identical_to_in_process(tmp_path, ct_files):
    import multiprocessing as mp

    from server.convert import pool_worth

    with _executor(2, len(ct_files), True) as pool:     # what ingest_paths uses below
        assert type(pool).__name__ == "ProcessPoolExecutor"
    # by default: processes where they fork (a single-threaded process), from 4 files;
    # from a forkserver (threaded server, viewer) only for many files; one file in-process
    assert pool_worth(4, mp.get_context("fork")) and not pool_worth(3, mp.get_context("fork"))
    assert not pool_worth(8, mp.get_context("forkserver"))
    assert pool_worth(64, mp.get_context("forkserver"))
    with _executor(2, 1, True) as one:
        assert type(one).__name__ == "_InProcess"
    with Store(tmp_path / "pool") as a, Store(tmp_path / "one") as b:
        ra = ingest_paths(ct_files, a, workers=2, processes=True)
        rb = ingest_paths(ct_files, b, workers=1)
        assert len(ra.imported) == len(rb.imported) == 4
        fa, fb = _files(a), _files(b)
        assert fa.keys() == fb.keys() and len(fa) == 4
        assert fa == fb
        assert {_state(a, s)[0] for s, _f in fa} == {"verified"}
        # again through the pool: every file a duplicate, nothing encoded twice
        again = ingest_paths(ct_files, a, workers=2, processes=True)
        assert len(again.duplicates) == 4 and not again.imported


def test_verify_job_and_command(tmp_path, ct_files, capsys):
    from server.cli import main
    from server.jobs import JobScheduler, VerifyJob

    with Store(tmp_path / "store") as st:
        rep = ingest_paths(ct_files[:2], st, verify=False)
        job = VerifyJob(st, period=3600)
        assert job.wait(job.clock()) == 0                  # pending: due now
        out = JobScheduler([job]).step()
        assert out["verify"].summary() == "2 verified, 0 FAILED"
        assert job.wait(job.clock()) > 0                   # nothing pending: not due
        assert {_state(st, f.sop_instance_uid)[0] for f in rep.imported} == {"verified"}
    assert main(["ingest", *map(str, ct_files[2:]), "--store", str(tmp_path / "store"),
                 "--no-verify", "--quiet"]) == 0
    assert "wait for the verification" in capsys.readouterr().out
    assert main(["verify", "--store", str(tmp_path / "store"), "--workers", "1"]) == 0
    assert "2 verified, 0 FAILED; in the store: 0 pending, 0 failed" in capsys.readouterr().out


def test_pixel_digest_is_of_the_values_not_the_dtype():
    import numpy as np

    from codestream.encode import EncodeError, pixel_digest

    a = np.arange(12, dtype=np.uint16).reshape(3, 4)
    assert pixel_digest(a) == pixel_digest(a.astype(np.uint8)) == pixel_digest(a.astype(">u2"))
    assert pixel_digest(a) != pixel_digest(a.reshape(4, 3))          # the shape counts
    b = a.copy()
    b[2, 3] += 1
    assert pixel_digest(a) != pixel_digest(b)
    s = (a.astype(np.int16) - 6)
    assert pixel_digest(s) == pixel_digest(s.astype(np.int8)) == pixel_digest(s.astype(np.int32))
    assert pixel_digest(np.asfortranarray(s)) == pixel_digest(s)
    with pytest.raises(EncodeError):
        pixel_digest(np.array([[70000]], dtype=np.int32))


def test_a_worker_process_that_dies_loses_nothing_silently(tmp_path, ct_files):
    """A worker killed (as a crashing decoder would kill it) while files are in flight:
    those files are reported skipped with the reason, nothing of them is stored, the
    others are stored; a second ingest takes the rest. (In a fresh single-threaded
    process, as the command line runs: its workers fork and see MEDVIEW_FAULTS.)"""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from server.fsck import fsck

    files = ct_files + [tmp_path / f"copy{i}.dcm" for i in range(4)]
    for i, f in enumerate(files[4:]):               # four more instances (other UIDs)
        ds = pydicom.dcmread(ct_files[i])
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(f)
    script = (
        "import json, sys\n"
        "from server.ingest import ingest_paths\n"
        "from server.store import Store\n"
        "with Store(sys.argv[1]) as st:\n"
        "    r = ingest_paths(sys.argv[2:], st, workers=2, processes=True)\n"
        "print(json.dumps({'imported': len(r.imported), 'dup': len(r.duplicates),"
        " 'skipped': [[s.reason, s.is_error] for s in r.skipped]}))\n")
    root = Path(__file__).resolve().parents[1]

    def run(faults_env: str | None) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "MEDVIEW_FAULTS"}
        if faults_env:
            env["MEDVIEW_FAULTS"] = faults_env
        out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "store"),
                              *map(str, files)], cwd=root, env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = run("ingest.worker=2")                  # each worker dies on its 2nd file
    died = [r for r, err in first["skipped"] if "worker process decoding it died" in r]
    assert died and all(err for _r, err in first["skipped"])
    assert first["imported"] + len(first["skipped"]) == len(files) == 8
    with Store(tmp_path / "store") as st:
        assert st.catalogue.counts()["instances"] == first["imported"]
        assert fsck(st).clean
    again = run(None)
    assert again["imported"] == len(died) and again["dup"] == first["imported"]
