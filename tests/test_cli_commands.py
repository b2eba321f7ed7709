"""Command-line items of issue 11: `list` on both sides, `serve` on a busy port, `migrate`
with an archive that is not there. The commands run as subprocesses or through main(argv)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from policyutil import copy_store
from waits import WAIT_S

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def two_patients(ct_store, tmp_path_factory):
    """The CT store plus a 3-image series of a second patient."""
    from server.ingest import ingest_paths
    from server.sample import make_sample_ct
    from server.store import Store

    root = tmp_path_factory.mktemp("twopatients")
    store = copy_store(ct_store, root / "store")
    files = make_sample_ct(root / "dicom", slices=3, size=64, seed=11)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientID, ds.PatientName = "MV-0002", "SECOND^PATIENT"
        ds.save_as(f)
    with Store(store) as st:
        assert len(ingest_paths(files, st).imported) == 3
    return store


def _server_list(capsys, store, *argv) -> tuple[int, list[str], str]:
    from server.cli import main

    code = main(["list", *argv, "--store", str(store)])
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def _client_list(capsys, url, *argv) -> tuple[int, list[str], str]:
    from viewer.cli import main

    code = main(["list", "--server", url, *argv])
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def test_list_prints_the_uids_the_commands_need(two_patients, ct_series_uid, capsys):
    from server.store import Store

    code, lines, _ = _server_list(capsys, two_patients, "studies")
    assert code == 0 and lines[0].split("\t")[:3] == ["StudyInstanceUID", "PatientID", "PatientName"]
    rows = [ln.split("\t") for ln in lines[1:]]
    assert sorted(r[1] for r in rows) == ["MV-0001", "MV-0002"]
    # series of one patient, UID first
    code, lines, _ = _server_list(capsys, two_patients, "series", "--patient", "MV-0001")
    assert code == 0 and [ln.split("\t")[0] for ln in lines[1:]] == [ct_series_uid]
    assert lines[1].split("\t")[3] == "12"                              # images
    # instances of the series: image numbers 1..12 as the viewer and `snapshot --slice` count
    code, lines, _ = _server_list(capsys, two_patients, "instances", "--series", ct_series_uid,
                                  "--json")
    inst = [json.loads(ln) for ln in lines]
    with Store(two_patients) as st:
        images = st.catalogue.series_images(ct_series_uid)
    assert [i["SOPInstanceUID"] for i in inst] == [im["SOPInstanceUID"] for im in images]
    assert [i["Images"] for i in inst] == [str(n) for n in range(1, 13)]
    assert all(i["Frames"] == 1 and i["SeriesInstanceUID"] == ct_series_uid for i in inst)
    # wildcards, a study filter, nothing found, no store
    code, lines, _ = _server_list(capsys, two_patients, "series", "--patient", "MV-000*")
    assert len(lines) == 3
    code, lines, _ = _server_list(capsys, two_patients, "series", "--patient", "nobody")
    assert code == 0 and len(lines) == 1                                # the header only
    code, _, err = _server_list(capsys, two_patients.parent / "none", "studies")
    assert code == 2 and "no store" in err


def test_client_list_equals_the_store_list(two_patients, capsys):
    from server.embedded import EmbeddedServer

    srv = EmbeddedServer(str(two_patients)).start()
    try:
        cases = [("studies",), ("series",), ("instances",), ("studies", "--patient", "MV-0002"),
                 ("series", "--patient", "MV-0002"), ("instances", "--patient", "MV-0002"),
                 ("series", "--json")]
        _, lines, _ = _server_list(capsys, two_patients, "studies", "--patient", "MV-0001")
        study = lines[1].split("\t")[0]
        cases.append(("instances", "--study", study))
        for case in cases:
            s_code, s_lines, _ = _server_list(capsys, two_patients, *case)
            c_code, c_lines, c_err = _client_list(capsys, srv.url, *case)
            assert s_code == c_code == 0, (case, c_err)
            assert c_lines == s_lines, case
            assert len(s_lines) > 1, case
        assert len(_client_list(capsys, srv.url, "instances")[1]) == 1 + 12 + 3
        # the user's rights apply: browse without metadata lists series, not their images
        from server.rights import Rule

        auth = srv.app.state.server.auth
        auth.add_user("browser", "a long password")
        auth.set_rule(Rule("browser", "*", actions={"browse"}))
        who = ("--user", "browser", "--password", "a long password")
        code, lines, err = _client_list(capsys, srv.url, "series", *who)
        assert code == 0 and len(lines) == 3
        code, lines, err = _client_list(capsys, srv.url, "instances", *who)
        assert code == 0 and len(lines) == 1 and err.count("left out: series") == 2
    finally:
        srv.stop()


def test_client_list_imports_no_qt(two_patients):
    from server.embedded import EmbeddedServer

    srv = EmbeddedServer(str(two_patients)).start()
    try:
        code = ("import sys\nfrom viewer.cli import main\n"
                f"rc = main(['list', '--server', {srv.url!r}, 'series'])\n"
                "qt = sorted(m for m in sys.modules if m.startswith(('PySide6', 'shiboken6')))\n"
                "assert not qt, qt\nsys.exit(rc)\n")
        p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                           text=True, timeout=WAIT_S)
        assert p.returncode == 0, p.stderr
        assert len(p.stdout.splitlines()) == 3 and p.stdout.startswith("SeriesInstanceUID\t")
    finally:
        srv.stop()


def test_serve_on_a_busy_port_fails_first_with_a_clear_message(ct_store, tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        p = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--store",
                            str(ct_store), "--port", str(port)], cwd=REPO, capture_output=True,
                           text=True, timeout=WAIT_S)
    finally:
        busy.close()
    assert p.returncode == 1
    assert f"port {port} is already in use" in p.stderr
    assert "serving" not in p.stdout + p.stderr


def test_migrate_with_a_missing_archive_says_so_once(ct_store, tmp_path, capsys):
    from server.cli import main

    store = copy_store(ct_store, tmp_path / "store")
    before = sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file())
    missing = tmp_path / "not-mounted" / "archive"
    code = main(["migrate", "--store", str(store), "--days", "0", "--archive", str(missing)])
    out = capsys.readouterr()
    errors = [ln for ln in out.err.splitlines() if ln.strip()]
    assert code == 1 and len(errors) == 1, out.err
    assert str(missing) in errors[0] and "does not exist" in errors[0]
    assert "nothing was migrated" in errors[0]
    after = sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file()
                   if not p.name.startswith("catalogue.sqlite"))
    assert after == [p for p in before if not p.name.startswith("catalogue.sqlite")]
    assert not missing.exists()


def test_render_names_left_out_images_as_the_viewer_numbers_them(ct_store, ct_series_uid):
    from server.store import Store
    from client.volume_loader import usable_images

    with Store(ct_store) as st:
        images = st.catalogue.series_images(ct_series_uid)
    images[0] = dict(images[0], SamplesPerPixel=3)          # the first image: colour
    keep, notes = usable_images(images)
    assert keep == list(range(1, 12)) and notes == ["image 1: colour"]
