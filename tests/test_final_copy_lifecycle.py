"""Final copies (SPEC H1) are store objects like the others: made on every ingest path
when ``[codec] on_ingest`` is on, moved by tiering and recalled, checked by fsck, deleted
with their study."""
from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from server.fsck import fsck
from server.ingest import ingest_paths
from server.policy import load_policy
from server.policy_copies import PolicyCopies, convert_store, final_copy_row, summary
from server.store import Store
from server.tiers import Tiers
from server.versions import VersionTable

ON_INGEST = "[codec]\non_ingest = true\n"


def _copy(src, dst: Path, study: str | None = None) -> Path:
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.save_as(dst, enforce_file_format=True)
    return dst


def _store(tmp_path: Path, on_ingest: bool) -> Store:
    root = tmp_path / "store"
    root.mkdir()
    if on_ingest:
        (root / "policy.toml").write_text(ON_INGEST)
    return Store(root)


def _rows(store: Store) -> dict[str, dict]:
    pc = PolicyCopies(store)
    try:
        return {r["sop"]: r for r in pc.rows()}
    finally:
        pc.close()


def test_copies_made_by_the_one_ingest_path(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    mr = _copy(get_testdata_file("MR_small.dcm"), d / "mr.dcm")
    rgb = _copy(get_testdata_file("SC_rgb.dcm"), d / "rgb.dcm")
    # off (the default): no copies
    with Store(tmp_path / "off") as st:
        rep = ingest_paths([d], st, workers=1)
        assert len(rep.imported) == 2 and _rows(st) == {}
    # on: every instance imported gets its verified copy in the same call
    with _store(tmp_path, True) as st:
        log: list[str] = []
        rep = ingest_paths([d], st, workers=1, log=log.append)
        assert len(rep.imported) == 2
        rows = _rows(st)
        assert {r["codec"] for r in rows.values()} == {"jpegls", "jxl"}
        assert all(r["verified"] == "bit-exact" for r in rows.values())
        assert any(m.startswith("final copies:") for m in log)
        for f in (mr, rgb):
            sop = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
            assert st.check_file(rows[sop]["relpath"], rows[sop]["sha256"]) is None


def test_copies_made_on_stow(tmp_path):
    """STOW-RS goes through the same ingest path: the copy exists when it answers."""
    dicomweb_client = pytest.importorskip("dicomweb_client")
    from server.embedded import EmbeddedServer

    st = _store(tmp_path, True)
    st.close()
    f = _copy(get_testdata_file("MR_small.dcm"), tmp_path / "mr.dcm")
    srv = EmbeddedServer(str(st.root)).start()
    try:
        sid = requests.post(f"{srv.url}/api/login", json={"username": "local"}).json()["session"]
        client = dicomweb_client.api.DICOMwebClient(
            url=f"{srv.url}/dicomweb", headers={"Authorization": f"Bearer {sid}"})
        client.store_instances([pydicom.dcmread(f)])
        sop = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        row = final_copy_row(srv.app.state.server.catalogue.db, sop)
        assert row is not None and row["codec"] == "jpegls" and row["verified"] == "bit-exact"
    finally:
        srv.stop()


def test_copies_made_on_c_store(tmp_path):
    """DIMSE C-STORE (pynetdicom against the SCP) goes through the same ingest path."""
    from pynetdicom import AE

    from server.cli import main as cli_main
    from server.dimse import DimseServer, wait_for_port

    st = _store(tmp_path, True)
    assert cli_main(["ae", "add", "TESTER", "--host", "127.0.0.1", "--port", "104",
                     "--store", str(st.root)]) == 0
    srv = DimseServer(st, port=0, ae_title="MEDVIEW").start()
    try:
        wait_for_port("127.0.0.1", srv.port)
        ds = pydicom.dcmread(_copy(get_testdata_file("MR_small.dcm"), tmp_path / "mr.dcm"))
        ae = AE(ae_title="TESTER")
        ae.add_requested_context(ds.SOPClassUID, str(ds.file_meta.TransferSyntaxUID))
        a = ae.associate("127.0.0.1", srv.port, ae_title="MEDVIEW")
        assert a.is_established
        try:
            assert a.send_c_store(ds).Status == 0
        finally:
            a.release()
        row = final_copy_row(st.catalogue.db, str(ds.SOPInstanceUID))
        assert row is not None and row["verified"] == "bit-exact" and row["codec"] == "jpegls"
    finally:
        srv.stop()
        st.close()


def _two_studies(tmp_path) -> tuple[Store, dict[str, str]]:
    d = tmp_path / "in"
    d.mkdir()
    a = _copy(get_testdata_file("MR_small.dcm"), d / "a.dcm")
    b = _copy(get_testdata_file("SC_rgb.dcm"), d / "b.dcm")
    st = _store(tmp_path, True)
    rep = ingest_paths([d], st, workers=1)
    assert len(rep.imported) == 2
    sops = {n: pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
            for n, p in (("a", a), ("b", b))}
    return st, sops


def test_fsck_checks_copies_and_finds_stray_ones(tmp_path):
    st, sops = _two_studies(tmp_path)
    try:
        rows = _rows(st)
        rep = fsck(st)
        assert rep.clean, rep
        n_refs = len(st.catalogue.file_refs())
        assert rep.checked == n_refs
        assert {r["relpath"] for r in rows.values()} <= {x[0] for x in st.catalogue.file_refs()}
        # a stray file under final/ is an orphan (repair removes it); the copies are not
        stray = st.root / "final" / "x" / "stray.jpegls.dcm"
        stray.parent.mkdir(parents=True)
        stray.write_bytes(b"not ours")
        rep = fsck(st, repair=True)
        assert rep.orphans == ["final/x/stray.jpegls.dcm"] and not stray.exists()
        assert all(st.abspath(r["relpath"]).exists() for r in rows.values())
        # a damaged copy is reported as damaged, with its instance
        p = st.abspath(rows[sops["a"]]["relpath"])
        p.write_bytes(p.read_bytes()[:-4])
        rep = fsck(st)
        assert [(d[0], d[1]) for d in rep.damaged] == [(rows[sops["a"]]["relpath"], sops["a"])]
    finally:
        st.close()


def test_tiering_moves_and_recalls_copies(tmp_path):
    st, sops = _two_studies(tmp_path)
    try:
        before = {s: st.abspath(r["relpath"]).read_bytes() for s, r in _rows(st).items()}
        vt = VersionTable(st, load_policy)
        tiers = Tiers(st, versions=vt.get, settings=lambda: load_policy().storage)
        rep = tiers.migrate(days=0)
        assert rep.ok and rep.finals_archived == 2, rep.summary()
        rows = _rows(st)
        for r in rows.values():
            assert not st.abspath(r["relpath"]).exists()        # gone from the hot store
            assert tiers.final_present(r)
        assert fsck(st).clean
        assert summary(st.root)["damaged_copies"] == []
        assert convert_store(st).count("skipped") == 2          # archived = present
        # the copy is served from the archive (recalled, checked)
        for sop, r in rows.items():
            inst = st.catalogue.find_instance(sop)
            assert tiers.read_final(inst, r) == before[sop]
            assert st.abspath(r["relpath"]).read_bytes() == before[sop]
        assert fsck(st).clean
        # recalled copies old enough move again, without a second upload (the archive
        # object is checked instead)
        again = tiers.migrate(days=0)
        assert again.finals_archived == 2 and again.bytes_archived == 0, again.summary()
        assert not any(st.abspath(r["relpath"]).exists() for r in rows.values())
        assert tiers.migrate(days=0).finals_archived == 0
        assert fsck(st).clean
        tiers.close()
    finally:
        st.close()


def test_copies_go_with_their_study(tmp_path):
    st, sops = _two_studies(tmp_path)
    try:
        rows = _rows(st)
        study = st.catalogue.find_instance(sops["a"])["StudyInstanceUID"]
        assert rows[sops["a"]]["relpath"] in st.catalogue._study_files(study)
        st.delete_study(study)
        assert not st.abspath(rows[sops["a"]]["relpath"]).exists()
        assert st.abspath(rows[sops["b"]]["relpath"]).exists()
        assert set(_rows(st)) == {sops["b"]}
        assert fsck(st).clean
    finally:
        st.close()
