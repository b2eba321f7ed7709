"""DICOM networking against real peers: dcmtk's command-line tools and pynetdicom.

The project's SCP (server/dimse.py) runs in this process on a free loopback port;
dcmtk tools run as subprocesses with the store's AE directory filled by the command line
(``medview-server ae add``). Waits follow events (a port accepting, a process ending).
"""
from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from server import sample
from server.cli import main as cli_main
from server.dimse import (DimseServer, Pacs, Peers, match_value, wait_for_port)
from server.store import Store

REPO = Path(__file__).resolve().parents[1]

# Real files in several transfer syntaxes (distinct SOP Instance UIDs).
REAL_FILES = ["CT_small.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm",
              "SC_rgb_rle.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "image_dfl.dcm",
              "SC_rgb_jpeg_dcmtk.dcm"]
TOOL_TIMEOUT = 120


def ensure_peers(*packages: str) -> None:
    r = subprocess.run(["bash", str(REPO / "scripts/apt-ensure.sh"), *packages],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"cannot install {packages}: {r.stderr}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*cmd: str, ok: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                       timeout=TOOL_TIMEOUT, cwd=cwd)
    if ok:
        assert r.returncode == 0, f"{cmd[0]} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


def wait_until(cond, timeout: float = 60.0) -> bool:
    """Poll ``cond`` until it holds (the SCP audits after answering the peer)."""
    import time
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real")
    for name in REAL_FILES:
        p = sample.find_test_file(name)
        if p is None:
            pytest.skip(f"pydicom test file {name} not installed")
        shutil.copy(p, out / name)
    return out


@pytest.fixture(scope="module")
def scp(tmp_path_factory):
    """An empty store with the SCP on a free port; TESTER may call, DEST is a C-MOVE
    destination (a dcmtk storescp started by the test that needs it)."""
    ensure_peers("dcmtk")
    root = tmp_path_factory.mktemp("dimse")
    store_dir = root / "store"
    Store(store_dir).close()
    dest_port = free_port()
    assert cli_main(["ae", "add", "TESTER", "--host", "127.0.0.1", "--port", "104",
                     "--store", str(store_dir)]) == 0
    assert cli_main(["ae", "add", "DEST", "--host", "127.0.0.1", "--port", str(dest_port),
                     "--store", str(store_dir)]) == 0
    store = Store(store_dir)
    srv = DimseServer(store, port=0, ae_title="MEDVIEW").start()
    wait_for_port("127.0.0.1", srv.port)
    srv.dest_port = dest_port
    srv.root = root
    yield srv
    srv.stop()
    store.close()


def storescu_config(folder: Path, out: Path) -> list[str]:
    """A storescu profile proposing, for each file, its SOP class with its own transfer
    syntax (storescu otherwise proposes uncompressed syntaxes only)."""
    pairs = sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID))
                    for d in (pydicom.dcmread(p, stop_before_pixels=True)
                              for p in folder.iterdir())})
    tss = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for n, ts in enumerate(tss):
        lines += [f"[TS{n}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Files]"]
    for n, (sop, ts) in enumerate(pairs, 1):
        lines.append(f"PresentationContext{n} = {sop}\\TS{tss.index(ts)}")
    lines += ["[[Profiles]]", "[Files]", "PresentationContexts = Files"]
    out.write_text("\n".join(lines) + "\n")
    return ["--config-file", str(out), "Files"]


def _scu(scp, *args, files: tuple[str, ...] = ()):
    return ["-aet", "TESTER", "-aec", "MEDVIEW", *args, "127.0.0.1", str(scp.port), *files]


def test_matching_rules():
    assert match_value("PatientName", "PN", "doe*", "DOE^JOHN")
    assert not match_value("PatientName", "PN", "smith*", "DOE^JOHN")
    assert match_value("PatientID", "LO", "A?C", "ABC")
    assert not match_value("PatientID", "LO", "abc", "ABC")          # LO: case-sensitive
    assert match_value("StudyDate", "DA", "20200101-20201231", "20200615")
    assert not match_value("StudyDate", "DA", "20200101-20201231", "20210101")
    assert match_value("StudyDate", "DA", "-20200101", "19991231")
    assert match_value("StudyDate", "DA", "20200101-", "20240101")
    assert match_value("StudyTime", "TM", "1000-1200", "113000.5")
    assert not match_value("StudyTime", "TM", "1000-1200", "123000")
    assert match_value("StudyInstanceUID", "UI", "1.2\\1.3", "1.3")
    assert not match_value("StudyInstanceUID", "UI", "1.2\\1.3", "1.30")
    assert match_value("ModalitiesInStudy", "CS", "MR", ["CT", "MR"])
    assert match_value("Modality", "CS", "", None)                     # universal


def test_echo_and_calling_ae_check(scp):
    run("echoscu", *_scu(scp))
    r = run("echoscu", "-aet", "STRANGER", "-aec", "MEDVIEW", "127.0.0.1", str(scp.port),
            ok=False)
    assert r.returncode != 0 and "Rejected" in (r.stdout + r.stderr)
    assert wait_until(lambda: any(
        r["user"] == "STRANGER" and r["outcome"] == "denied"
        for r in scp.auth.audit_rows(action="dimse-associate")))
    assert any(r["user"] == "TESTER" and r["outcome"] == "ok"
               for r in scp.auth.audit_rows(action="dimse-associate"))
    assert scp.auth.audit_rows(action="dimse-echo", user="TESTER")


def test_storescu_folder_goes_through_ingest(scp, real_dir):
    r = run("storescu", *_scu(scp, *storescu_config(real_dir, scp.root / "storescu.cfg"),
                                        "+sd", files=(str(real_dir),)), ok=False)
    cat = scp.store.catalogue
    for name in REAL_FILES:
        src = pydicom.dcmread(real_dir / name)
        inst = cat.find_instance(str(src.SOPInstanceUID))
        assert inst is not None, f"{name} not stored:\n{r.stdout}\n{r.stderr}"
        got = pydicom.dcmread(scp.store.abspath(inst["original_relpath"]))
        # what arrived is what was sent: same transfer syntax and pixel data element
        assert got.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID, name
        assert got[0x7FE00010].value == src[0x7FE00010].value, name
    assert r.returncode == 0, r.stderr
    rows = scp.auth.audit_rows(action="dimse-store")
    assert sum(1 for x in rows if x["outcome"] == "ok") >= len(REAL_FILES)


def _find(scp, tmp_path, model: str, *keys: str) -> list[pydicom.Dataset]:
    out = tmp_path / f"find{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    args = [model, "-X", "-od", str(out)]
    for k in keys:
        args += ["-k", k]
    run("findscu", *_scu(scp, *args))
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_findscu_levels_and_matching(scp, real_dir, tmp_path):
    if scp.store.catalogue.find_instance(str(pydicom.dcmread(real_dir / "CT_small.dcm")
                                             .SOPInstanceUID)) is None:
        run("storescu", *_scu(scp, *storescu_config(real_dir, scp.root / "storescu.cfg"),
                                        "+sd", files=(str(real_dir),)), ok=False)
    ct = pydicom.dcmread(real_dir / "CT_small.dcm")
    cat = scp.store.catalogue
    n_studies = len(cat.query_studies())

    rsp = _find(scp, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "StudyInstanceUID",
                "PatientName", "StudyDate", "ModalitiesInStudy", "NumberOfStudyRelatedInstances")
    assert len(rsp) == n_studies
    assert {str(d.StudyInstanceUID) for d in rsp} == {
        s["StudyInstanceUID"] for s in cat.query_studies()}

    # wildcard on the patient name (PN: case-insensitive here), returned filled in
    rsp = _find(scp, tmp_path, "-S", "QueryRetrieveLevel=STUDY",
                f"PatientName={str(ct.PatientName)[:3].lower()}*", "StudyInstanceUID")
    assert str(ct.StudyInstanceUID) in {str(d.StudyInstanceUID) for d in rsp}
    # date range around the CT's study date, and one that excludes it
    d = str(ct.StudyDate)
    rsp = _find(scp, tmp_path, "-S", "QueryRetrieveLevel=STUDY", f"StudyDate={d}-{d}",
                "StudyInstanceUID")
    assert str(ct.StudyInstanceUID) in {str(x.StudyInstanceUID) for x in rsp}
    rsp = _find(scp, tmp_path, "-S", "QueryRetrieveLevel=STUDY", "StudyDate=-19000101",
                "StudyInstanceUID")
    assert rsp == []
    # UID list matching
    uids = [s["StudyInstanceUID"] for s in cat.query_studies()][:2]
    rsp = _find(scp, tmp_path, "-S", "QueryRetrieveLevel=STUDY",
                "StudyInstanceUID=" + "\\".join(uids))
    assert sorted(str(x.StudyInstanceUID) for x in rsp) == sorted(uids)
    # patient root, PATIENT level
    rsp = _find(scp, tmp_path, "-P", "QueryRetrieveLevel=PATIENT", f"PatientID={ct.PatientID}",
                "PatientName", "NumberOfPatientRelatedStudies")
    assert len(rsp) == 1 and str(rsp[0].PatientName) == str(ct.PatientName)
    assert int(rsp[0].NumberOfPatientRelatedStudies) >= 1
    # SERIES and IMAGE levels under the CT's study
    rsp = _find(scp, tmp_path, "-S", "QueryRetrieveLevel=SERIES",
                f"StudyInstanceUID={ct.StudyInstanceUID}", "SeriesInstanceUID", "Modality")
    assert [str(x.SeriesInstanceUID) for x in rsp] == [str(ct.SeriesInstanceUID)]
    assert rsp[0].Modality == "CT"
    rsp = _find(scp, tmp_path, "-S", "QueryRetrieveLevel=IMAGE",
                f"StudyInstanceUID={ct.StudyInstanceUID}",
                f"SeriesInstanceUID={ct.SeriesInstanceUID}", "SOPInstanceUID", "InstanceNumber")
    assert [str(x.SOPInstanceUID) for x in rsp] == [str(ct.SOPInstanceUID)]
    # Study Root has no PATIENT level: a failure status, not a crash
    r = run("findscu", *_scu(scp, "-S", "-k", "QueryRetrieveLevel=PATIENT", "-k",
                             "PatientID"), ok=False)
    assert "Pending" not in r.stdout + r.stderr


def test_movescu_to_storescp_and_getscu(scp, real_dir, tmp_path):
    if scp.store.catalogue.find_instance(str(pydicom.dcmread(real_dir / "JPEG2000.dcm")
                                             .SOPInstanceUID)) is None:
        run("storescu", *_scu(scp, *storescu_config(real_dir, scp.root / "storescu.cfg"),
                                        "+sd", files=(str(real_dir),)), ok=False)
    j2k = pydicom.dcmread(real_dir / "JPEG2000.dcm")
    study = str(j2k.StudyInstanceUID)
    expected = {i["SOPInstanceUID"] for i in scp.store.catalogue.query_instances(
        StudyInstanceUID=study)}
    rx = tmp_path / "rx"
    rx.mkdir()
    dest = subprocess.Popen(["storescp", "-aet", "DEST", "+xa", "-od", str(rx),
                             str(scp.dest_port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", scp.dest_port)
        run("movescu", *_scu(scp, "-S", "-aem", "DEST", "-k", "QueryRetrieveLevel=STUDY",
                         "-k", f"StudyInstanceUID={study}"))
        # an unknown destination is refused with the standard status
        r = run("movescu", *_scu(scp, "-S", "-aem", "NOWHERE", "-k",
                                 "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"),
                ok=False)
        assert "MoveDestinationUnknown" in r.stdout + r.stderr or "a801" in (
            r.stdout + r.stderr).lower()
    finally:
        dest.terminate()
        dest.wait(timeout=30)
    got = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in rx.iterdir()}
    assert set(got) == expected
    for sop, p in got.items():
        inst = scp.store.catalogue.find_instance(sop)
        orig = pydicom.dcmread(scp.store.abspath(inst["original_relpath"]))
        back = pydicom.dcmread(p)
        # storescp +xa accepted the stored (JPEG 2000) syntax: the same pixel data bytes
        assert back.file_meta.TransferSyntaxUID == orig.file_meta.TransferSyntaxUID
        assert back[0x7FE00010].value == orig[0x7FE00010].value

    # C-GET: getscu proposes uncompressed syntaxes only, so the server decompresses
    out = tmp_path / "get"
    out.mkdir()
    run("getscu", *_scu(scp, "-S", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                        "-k", f"StudyInstanceUID={study}"))
    files = list(out.iterdir())
    assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in files} == expected
    for p in files:
        back = pydicom.dcmread(p)
        inst = scp.store.catalogue.find_instance(str(back.SOPInstanceUID))
        orig = pydicom.dcmread(scp.store.abspath(inst["original_relpath"]))
        assert np.array_equal(back.pixel_array, orig.pixel_array)
    assert wait_until(lambda: {"dimse-move", "dimse-get", "dimse-find", "dimse-store"} <= {
        r["action"] for r in scp.auth.audit_rows(user="TESTER")})
    assert any(r["outcome"] == "denied" for r in scp.auth.audit_rows(action="dimse-move"))


def test_pynetdicom_scu_query_and_retrieve(scp, real_dir, tmp_path):
    """The project's own SCU (``pacs``) against the project's SCP, by C-GET and C-MOVE."""
    if scp.store.catalogue.find_instance(str(pydicom.dcmread(real_dir / "CT_small.dcm")
                                             .SOPInstanceUID)) is None:
        run("storescu", *_scu(scp, *storescu_config(real_dir, scp.root / "storescu.cfg"),
                                        "+sd", files=(str(real_dir),)), ok=False)
    ct = pydicom.dcmread(real_dir / "CT_small.dcm")
    local = tmp_path / "local"
    assert cli_main(["pacs", "add", "self", "--host", "127.0.0.1", "--port", str(scp.port),
                     "--ae", "MEDVIEW", "--store", str(local)]) == 2    # no store yet
    Store(local).close()
    assert cli_main(["pacs", "add", "self", "--host", "127.0.0.1", "--port", str(scp.port),
                     "--ae", "MEDVIEW", "--store", str(local)]) == 0
    with Store(local) as st:
        peer = Peers(st.catalogue).get_pacs("self")
    pacs = Pacs(peer, ae_title="TESTER")
    pacs.echo()
    rows = pacs.find_studies(patient=str(ct.PatientID))
    assert [r["StudyInstanceUID"] for r in rows] == [str(ct.StudyInstanceUID)]
    assert cli_main(["pacs", "retrieve", "self", "--study", str(ct.StudyInstanceUID),
                     "--ae-title", "TESTER", "--via", "get", "--quiet",
                     "--store", str(local)]) == 0
    with Store(local) as st:
        assert st.catalogue.find_instance(str(ct.SOPInstanceUID)) is not None

    # C-MOVE: the SCP moves to our own title; a temporary SCP of ours receives
    local2 = tmp_path / "local2"
    port = free_port()
    with Store(local2) as st:
        Peers(st.catalogue).add_pacs("self", "127.0.0.1", scp.port, "MEDVIEW")
        scp.peers.add_destination("MOVEME", "127.0.0.1", port)
        seen = []
        counts = Pacs(Peers(st.catalogue).get_pacs("self"), ae_title="MOVEME").retrieve(
            str(ct.StudyInstanceUID), st, via="move", listen_port=port,
            progress=lambda d, t: seen.append((d, t)))
        assert counts["completed"] == 1 and counts["imported"] == 1, counts
        assert st.catalogue.find_instance(str(ct.SOPInstanceUID)) is not None
    scp.peers.remove_destination("MOVEME")


# --------------------------------------------------------------------------- Orthanc
class Orthanc:
    """A throwaway Orthanc (Debian's binary, our own config): HTTP on loopback with
    RemoteAccessAllowed false. Orthanc 1.10 has no setting for the DICOM listener's
    address (it binds every interface), so only the AE titles configured here, from
    127.0.0.1, may use it (DicomAlwaysAllow* false, DicomCheckModalityHost true)."""

    def __init__(self, root: Path, modalities: dict[str, tuple[str, int]]):
        import json
        self.root = root
        self.http_port, self.dicom_port = free_port(), free_port()
        cfg = {
            "Name": "medview-test", "StorageDirectory": str(root / "db"),
            "IndexDirectory": str(root / "db"), "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomServerEnabled": True, "DicomAet": "ORTHANC", "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True, "DicomCheckModalityHost": True,
            "DicomAlwaysAllowEcho": False, "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowFind": False, "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False, "Plugins": [], "HttpCompressionEnabled": False,
            "DicomModalities": {name: [ae, "127.0.0.1", port]
                                for name, (ae, port) in modalities.items()},
            "LogExportedResources": False, "StorageCompression": False,
        }
        (root / "orthanc.json").write_text(json.dumps(cfg))
        self.proc = subprocess.Popen(["Orthanc", str(root / "orthanc.json")],
                                     stdout=(root / "orthanc.log").open("wb"),
                                     stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.http_port}"
        wait_until(self._up, timeout=120)
        assert self._up(), (root / "orthanc.log").read_text()[-2000:]
        wait_for_port("127.0.0.1", self.dicom_port)

    def _up(self) -> bool:
        import requests
        if self.proc.poll() is not None:
            return False
        try:
            return requests.get(self.url + "/system", timeout=2).ok
        except requests.RequestException:
            return False

    def rest(self, method: str, path: str, **kw):
        import requests
        r = requests.request(method, self.url + path, timeout=120, **kw)
        assert r.ok, f"{method} {path}: {r.status_code} {r.text[:500]}"
        return r.json() if r.content else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def orthanc(scp, tmp_path_factory):
    ensure_peers("orthanc")
    root = tmp_path_factory.mktemp("orthanc")
    move_port = free_port()
    o = Orthanc(root, {"medview": ("MEDVIEW", scp.port), "tester": ("TESTER", 104),
                       "mvget": ("MVGET", 104), "mvmove": ("MVMOVE", move_port)})
    o.move_port = move_port
    # a study that only Orthanc holds
    files = sample.make_sample_ct(root / "ct", slices=3, size=64, seed=11)
    for f in files:
        o.rest("POST", "/instances", data=Path(f).read_bytes())
    o.files = files
    scp.peers.add_destination("ORTHANC", "127.0.0.1", o.dicom_port)
    yield o
    o.stop()
    scp.peers.remove_destination("ORTHANC")


def test_orthanc_sends_a_study_by_c_store(scp, orthanc):
    study = str(pydicom.dcmread(orthanc.files[0]).StudyInstanceUID)
    (oid,) = [s for s in orthanc.rest("GET", "/studies")
              if orthanc.rest("GET", f"/studies/{s}")["MainDicomTags"]["StudyInstanceUID"]
              == study]
    job = orthanc.rest("POST", "/modalities/medview/store", json={"Resources": [oid],
                                                                  "Synchronous": True})
    assert job is not None
    got = scp.store.catalogue.query_instances(StudyInstanceUID=study)
    assert len(got) == len(orthanc.files)
    for f in orthanc.files:
        src = pydicom.dcmread(f)
        inst = scp.store.catalogue.find_instance(str(src.SOPInstanceUID))
        back = pydicom.dcmread(scp.store.abspath(inst["original_relpath"]))
        assert np.array_equal(back.pixel_array, src.pixel_array)
    assert any(r["outcome"] == "ok" for r in scp.auth.audit_rows(user="ORTHANC",
                                                                   action="dimse-store"))
    # Orthanc queries us (C-FIND) through its REST API
    answers = orthanc.rest("POST", "/modalities/medview/query", json={
        "Level": "Study", "Query": {"StudyInstanceUID": study}})
    assert answers["ID"]


@pytest.mark.parametrize("via", ["get", "move"])
def test_project_retrieves_from_orthanc(scp, orthanc, tmp_path, via):
    study = str(pydicom.dcmread(orthanc.files[0]).StudyInstanceUID)
    local = tmp_path / "store"
    with Store(local) as st:
        peers = Peers(st.catalogue)
        peers.add_pacs("orthanc", "127.0.0.1", orthanc.dicom_port, "ORTHANC")
        title = "MVGET" if via == "get" else "MVMOVE"
        pacs = Pacs(peers.get_pacs("orthanc"), ae_title=title)
        pacs.echo()
        rows = pacs.find_studies(patient=str(pydicom.dcmread(orthanc.files[0]).PatientID))
        assert study in {r["StudyInstanceUID"] for r in rows}
        seen = []
        if via == "get":
            counts = pacs.retrieve(study, st, via=via, progress=lambda d, t: seen.append((d, t)))
            assert counts["completed"] == len(orthanc.files) and counts["failed"] == 0, counts
            assert counts["imported"] == len(orthanc.files)
        else:                                   # the command line, with its own listener
            assert cli_main(["pacs", "retrieve", "orthanc", "--study", study, "--via", "move",
                             "--listen-port", str(orthanc.move_port), "--ae-title", "MVMOVE",
                             "--quiet", "--store", str(local)]) == 0
        for f in orthanc.files:
            src = pydicom.dcmread(f)
            inst = st.catalogue.find_instance(str(src.SOPInstanceUID))
            assert inst is not None
            back = pydicom.dcmread(st.abspath(inst["original_relpath"]))
            assert np.array_equal(back.pixel_array, src.pixel_array)
        if via == "get":
            assert seen and seen[-1][0] == len(orthanc.files)


def test_orthanc_moves_from_us_and_unknown_destination(scp, orthanc, real_dir):
    """Orthanc as the C-MOVE destination of our SCP (movescu asks us to move to it)."""
    ct = pydicom.dcmread(real_dir / "CT_small.dcm")
    if scp.store.catalogue.find_instance(str(ct.SOPInstanceUID)) is None:
        run("storescu", *_scu(scp, *storescu_config(real_dir, scp.root / "storescu.cfg"),
                              "+sd", files=(str(real_dir),)), ok=False)
    run("movescu", *_scu(scp, "-S", "-aem", "ORTHANC", "-k", "QueryRetrieveLevel=STUDY",
                         "-k", f"StudyInstanceUID={ct.StudyInstanceUID}"))
    found = orthanc.rest("POST", "/tools/find", json={
        "Level": "Instance", "Query": {"SOPInstanceUID": str(ct.SOPInstanceUID)}})
    assert len(found) == 1


def test_bundled_server_dicom_listener(tmp_path):
    """The desktop's embedded server switches its DICOM listener on and off."""
    from server.embedded import EmbeddedServer
    ensure_peers("dcmtk")
    Store(tmp_path / "s").close()
    srv = EmbeddedServer(str(tmp_path / "s")).start()
    try:
        Peers(srv.store.catalogue).add_destination("TESTER", "127.0.0.1", 104)
        port = free_port()
        srv.set_dicom(port, "DESKTOP")
        wait_for_port("127.0.0.1", port)
        run("echoscu", "-aet", "TESTER", "-aec", "DESKTOP", "127.0.0.1", str(port))
        srv.set_dicom(0)
        r = run("echoscu", "-aet", "TESTER", "-aec", "DESKTOP", "127.0.0.1", str(port), ok=False)
        assert r.returncode != 0
    finally:
        srv.stop()


def test_cli_peers_query_and_association_limit(scp, real_dir, tmp_path, capsys):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ct = pydicom.dcmread(real_dir / "CT_small.dcm")
    if scp.store.catalogue.find_instance(str(ct.SOPInstanceUID)) is None:
        run("storescu", *_scu(scp, *storescu_config(real_dir, scp.root / "storescu.cfg"),
                              "+sd", files=(str(real_dir),)), ok=False)
    local = tmp_path / "local"
    Store(local).close()
    st = str(local)
    assert cli_main(["ae", "add", "BAD\\TITLE", "--host", "h", "--port", "1", "--store", st]) == 2
    assert cli_main(["ae", "add", "ONE", "--host", "127.0.0.1", "--port", "1", "--store", st]) == 0
    assert cli_main(["ae", "allow-any", "on", "--store", st]) == 0
    capsys.readouterr()
    assert cli_main(["ae", "list", "--store", st]) == 0
    out = capsys.readouterr().out
    assert "ONE" in out and "any" in out
    assert cli_main(["ae", "remove", "ONE", "--store", st]) == 0
    assert cli_main(["ae", "remove", "ONE", "--store", st]) == 1
    assert cli_main(["pacs", "add", "self", "--host", "127.0.0.1", "--port", str(scp.port),
                     "--ae", "MEDVIEW", "--store", st]) == 0
    capsys.readouterr()
    assert cli_main(["pacs", "query", "self", "--ae-title", "TESTER", "--patient",
                     str(ct.PatientID), "--modality", "CT", "--store", st]) == 0
    out = capsys.readouterr().out
    assert str(ct.StudyInstanceUID) in out and out.strip().endswith("1 studies")
    assert cli_main(["pacs", "echo", "nope", "--store", st]) == 1

    # association limit: with the limit reached, the next association is rejected
    limited = DimseServer(scp.store, port=0, max_associations=1).start()
    try:
        ae = AE(ae_title="TESTER")
        ae.add_requested_context(Verification)
        first = ae.associate("127.0.0.1", limited.port, ae_title="MEDVIEW")
        assert first.is_established
        second = ae.associate("127.0.0.1", limited.port, ae_title="MEDVIEW")
        assert not second.is_established
        first.release()
    finally:
        limited.stop()


def test_pynetdicom_c_store_htj2k(scp, tmp_path):
    """An HTJ2K lossless instance (1.2.840.10008.1.2.4.201) sent by pynetdicom goes
    through the ingest bit-exactly."""
    import imagecodecs
    from pydicom.encaps import encapsulate
    from pynetdicom import AE

    ds = pydicom.dcmread(sample.make_sample_ct(tmp_path / "ct", slices=1, size=64, seed=5)[0])
    arr = ds.pixel_array
    ds.PixelData = encapsulate([imagecodecs.htj2k_encode(arr)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"
    path = tmp_path / "ht.dcm"
    ds.save_as(path, enforce_file_format=True)
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="TESTER")
    ae.add_requested_context(ds.SOPClassUID, "1.2.840.10008.1.2.4.201")
    a = ae.associate("127.0.0.1", scp.port, ae_title="MEDVIEW")
    assert a.is_established
    try:
        st = a.send_c_store(ds)
    finally:
        a.release()
    assert st.Status == 0
    inst = scp.store.catalogue.find_instance(str(ds.SOPInstanceUID))
    assert inst["TransferSyntaxUID"] == "1.2.840.10008.1.2.4.201"
    back = pydicom.dcmread(scp.store.abspath(inst["original_relpath"]))
    assert np.array_equal(back.pixel_array, arr)
