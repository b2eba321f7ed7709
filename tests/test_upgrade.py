"""`medview-server upgrade`: a store made before the one catalogue (slides in their own
``slides/slides.sqlite`` with a patient table of their own) is moved into the store's
catalogue without losing a row, under the radiology patients."""
from __future__ import annotations

import hashlib
import shutil
import sqlite3

import numpy as np
import pydicom
import pytest

from server.database import database_of
from server.dbutil import Db
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from client.slides import LocalSlide
from imaging.tilesource import ArraySource
from server.cli import main
from server.ingest import ingest_paths
from server.slide_catalogue import LEGACY_DDL, CatalogueError, upgrade_slide_catalogue
from server.slide_pyramid import build_pyramid
from server.slide_store import SlideStore
from server.store import Store


def _radiology(root, tmp_path, patient_id="P1", name="Doe^Jane"):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientID, ds.PatientName = patient_id, name
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    f = tmp_path / "ct.dcm"
    ds.save_as(f)
    with Store(root) as st:
        ingest_paths([f], st)
        return st.catalogue


def _legacy_store(root, rgb):
    """The slide part of a store as the earlier version left it."""
    slides = root / "slides"
    res = build_pyramid(ArraySource(rgb, mpp=0.5), slides / "recent", slide_uid="S1",
                        tile_size=128, workers=1)
    con = sqlite3.connect(slides / "slides.sqlite")
    for stmt in LEGACY_DDL:
        con.execute(stmt)
    con.executemany("INSERT INTO patient(pk, patient_id, name, status, discharged_at)"
                    " VALUES (?,?,?,?,?)",
                    [(1, "P1", "Doe^Jane", "inpatient", None),
                     (2, "P2", None, "discharged", "2026-01-02T03:04:05Z")])
    con.executemany("INSERT INTO exam(pk, patient_pk, accession, exam_date, description)"
                    " VALUES (?,?,?,?,?)", [(1, 1, "A1", "20260101", "biopsy"),
                                            (2, 2, "A2", None, None)])
    g = res.manifest
    con.execute("INSERT INTO slide(pk, slide_uid, exam_pk, label, stain, state, tier, path,"
                " acquired_at, ingested_at, width, height, levels, tile_size, mpp, bytes,"
                " manifest_sha256, source, qc_status, qc) VALUES"
                " (1,'S1',1,'L','H&E','high','recent','S1',NULL,'2026-01-01T00:00:00Z',"
                " ?,?,?,128,0.5,?,?,'array','unchecked',NULL)",
                [rgb.shape[1], rgb.shape[0], len(g["levels"]), res.bytes,
                 hashlib.sha256((res.path / "manifest.json").read_bytes()).hexdigest()])
    con.execute("INSERT INTO tier_move(slide_pk, from_tier, to_tier, state, started_at,"
                " finished_at) VALUES (1,'mid','recent','done','2026-01-01T00:00:00Z',"
                " '2026-01-01T00:01:00Z')")
    con.execute("INSERT INTO temp_tile(slide_pk, key, path, sha256, size, created_at)"
                " VALUES (1, 'k', 'S1/k.png', ?, 3, '2026-01-01T00:00:00Z')", ["1" * 64])
    con.execute("INSERT INTO station(pk, name, cache_dir) VALUES (1, 'ws1', '/tmp/ws1')")
    con.execute("INSERT INTO assignment(station_pk, exam_pk, assigned_at) VALUES"
                " (1, 1, '2026-01-01T00:00:00Z')")
    con.commit()
    con.close()


@pytest.fixture
def rgb():
    rng = np.random.default_rng(3)
    return rng.integers(0, 255, (300, 260, 3), dtype=np.uint8)


def test_upgrade_moves_every_row_under_the_radiology_patients(tmp_path, rgb, capsys):
    root = tmp_path / "store"
    _radiology(root, tmp_path)
    _legacy_store(root, rgb)

    assert main(["upgrade", "--store", str(root)]) == 0
    out = capsys.readouterr().out
    assert "2 patient, 2 exam, 1 slide, 1 tier_move, 1 temp_tile, 1 station, 1 assignment" in out
    assert not (root / "slides" / "slides.sqlite").exists()
    assert (root / "slides" / "slides.sqlite.migrated").is_file()      # kept, not deleted

    con = Db(database_of(root))          # the store's database, either engine
    # the slide's patient is the radiology patient: one row for P1, its study and exam
    p1 = con.execute("SELECT pk, status FROM patient WHERE PatientID = 'P1'").fetchall()
    assert len(p1) == 1 and p1[0][1] == "inpatient"
    assert con.execute("SELECT patient_pk FROM study").fetchone()[0] == p1[0][0]
    assert con.execute("SELECT patient_pk FROM exam WHERE accession = 'A1'").fetchone()[0] \
        == p1[0][0]
    assert con.execute("SELECT status, discharged_at FROM patient WHERE PatientID = 'P2'"
                       ).fetchone() == ("discharged", "2026-01-02T03:04:05Z")
    con.close()

    with SlideStore.for_image_store(root) as st:
        row = st.catalogue.slide("S1")
        assert (row["patient_id"], row["patient_name"], row["accession"]) == \
            ("P1", "Doe^Jane", "A1")
        assert [m["to_tier"] for m in st.catalogue.moves(row["pk"])] == ["recent"]
        assert st.catalogue.temp_tile(row["pk"], "k")["size"] == 3
        assert [a["accession"] for a in st.catalogue.assignments("ws1")] == ["A1"]
        # the pyramid reads through the upgraded catalogue, bit for bit
        tile = LocalSlide.from_store(st, "S1").tile(0, 0)
        assert np.array_equal(tile, rgb[:128, :128])

    assert main(["upgrade", "--store", str(root)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_opening_an_old_store_upgrades_it(tmp_path, rgb):
    root = tmp_path / "store"
    Store(root).close()
    _legacy_store(root, rgb)
    with SlideStore.for_image_store(root) as st:
        assert [s["slide_uid"] for s in st.catalogue.slides(patient_id="P1")] == ["S1"]
        assert {p["patient_id"] for p in st.catalogue.patients()} == {"P1", "P2"}


def test_a_conflict_changes_nothing(tmp_path, rgb):
    """An accession that the catalogue already has for another patient: refused, the old
    file stays where it was, no row is half-moved."""
    root = tmp_path / "store"
    Store(root).close()
    with SlideStore.for_image_store(root) as st:
        st.catalogue.ensure_exam("OTHER", "A1")
    _legacy_store(root, rgb)
    legacy = root / "slides" / "slides.sqlite"
    before = legacy.read_bytes()
    with pytest.raises(CatalogueError, match="A1"):
        upgrade_slide_catalogue(root / "slides", database_of(root))
    assert legacy.read_bytes() == before
    con = Db(database_of(root))          # the store's database, either engine
    assert con.execute("SELECT COUNT(*) FROM slide").fetchone()[0] == 0
    assert con.execute("SELECT COUNT(*) FROM patient WHERE PatientID = 'P2'").fetchone()[0] == 0
    con.close()
    assert main(["upgrade", "--store", str(root)]) == 1


def test_radiology_and_pathology_share_patients(tmp_path):
    """A slide ingested for a radiology patient's ID joins that patient; two radiology
    patients under one ID with different names make the ID ambiguous (refused, not
    guessed)."""
    root = tmp_path / "store"
    _radiology(root, tmp_path, "P9", "Roe^Ann")
    with SlideStore.for_image_store(root) as st:
        st.catalogue.ensure_exam("P9", "E1")
        assert st.catalogue.patient("P9")["name"] == "Roe^Ann"
    (tmp_path / "b").mkdir()
    _radiology(root, tmp_path / "b", "P9", "Roe^Anne")
    with SlideStore.for_image_store(root) as st:
        with pytest.raises(CatalogueError, match="several patients"):
            st.catalogue.ensure_patient("P9")
        assert st.catalogue.ensure_patient("P9", "Roe^Anne") != \
            st.catalogue.ensure_patient("P9", "Roe^Ann")
    shutil.rmtree(tmp_path / "b")


def test_deleting_the_last_study_keeps_a_patient_with_pathology_exams(tmp_path):
    root = tmp_path / "store"
    _radiology(root, tmp_path, "P7", "Poe^Al")
    with SlideStore.for_image_store(root) as st:
        st.catalogue.ensure_exam("P7", "E7")
    with Store(root) as store:
        (study,) = [s["StudyInstanceUID"] for s in store.catalogue.query_studies()]
        store.delete_study(study)
        assert store.catalogue.query_studies() == []
    with SlideStore.for_image_store(root) as st:
        assert st.catalogue.patient("P7")["name"] == "Poe^Al"
        assert st.catalogue.ensure_exam("P7", "E7")
