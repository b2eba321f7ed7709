"""Catalogue tests: schema, transactions, QIDO-style queries, series image order.

Most tests fill the catalogue directly through ``add_instance`` with synthetic rows (fast
and fully controlled); one checks the rows that a real ingest produces.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading

import pytest

from server.catalogue import (SERIES_IMAGE_KEYS, Catalogue, CatalogueError,
                                   DuplicateInstanceError, QueryError)
from server.dbutil import IntegrityError, ddl_for
from server.ingest import ingest_paths
from server.sample import find_test_file
from server.store import Store


def _sha(*parts) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def _instance(patient, study, series, sop, *, number=None, frames=1, ipp=None, **extra):
    """An instance record as ingest builds it (patient/study/series given as dicts)."""
    d = {
        **patient, **study, **series,
        "SOPInstanceUID": sop, "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
        "InstanceNumber": number, "NumberOfFrames": frames, "Rows": 64, "Columns": 64,
        "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2",
        "BitsAllocated": 16, "BitsStored": 12, "PixelRepresentation": 0,
        "ImagePositionPatient": ipp, "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
        "PixelSpacing": [0.5, 0.5], "SliceThickness": 1.0, "SpacingBetweenSlices": None,
        "RescaleSlope": 1.0, "RescaleIntercept": -1024.0, "RescaleType": "HU",
        "WindowCenter": 40.0, "WindowWidth": 400.0,
        "TransferSyntaxUID": "1.2.840.10008.1.2.1",
        "original_relpath": f"originals/xx/{_sha(sop)}.dcm", "original_sha256": _sha(sop),
        "original_size": 1000, "signed": False, "bits_stored": 12,
        "header_json": json.dumps({"00080018": {"vr": "UI", "Value": [sop]}}),
    }
    d.update(extra)
    return d


def _frames(sop, n=1, positions=None):
    return [{"frame": k, "codestream_relpath": f"j2k/s/{sop}.{k}.j2k",
             "codestream_sha256": _sha(sop, k, "cs"), "codestream_size": 100 + k,
             "index_relpath": f"j2k/s/{sop}.{k}.idx.json", "index_sha256": _sha(sop, k, "idx"),
             "index_size": 50, "offset": 0, "numres": 2, "nlayers": 4,
             "ImagePositionPatient": positions[k - 1] if positions else None}
            for k in range(1, n + 1)]


def _patient(pid, name, **kw):
    return {"PatientID": pid, "PatientName": name, "PatientBirthDate": kw.get("birth"),
            "PatientSex": kw.get("sex")}


def _study(uid, date, accession=None, desc=None):
    return {"StudyInstanceUID": uid, "StudyDate": date, "StudyTime": "101010",
            "StudyDescription": desc, "AccessionNumber": accession}


def _series(uid, modality, number=1, desc=None, body=None):
    return {"SeriesInstanceUID": uid, "Modality": modality, "SeriesNumber": number,
            "SeriesDescription": desc, "BodyPartExamined": body}


@pytest.fixture
def ingest_catalogue(tmp_path):
    """A catalogue with 4 patients, 5 studies, 7 series of known shape."""
    cat = Catalogue(tmp_path / "cat.sqlite")
    doe_j = _patient("P1", "DOE^JOHN", birth="19600101", sex="M")
    doe_a = _patient("P2", "Doe^Jane")
    smith = _patient("P3", "SMITH^ANNA")
    odd = _patient("P4", "PER%CENT_NAME")
    s1 = _study("1.1", "20230105", "ACC1", "CT CHEST")
    s2 = _study("1.2", "20240110", "ACC2", "MR HEAD")
    s3 = _study("1.3", "20240301", "ACC3", "PET-CT")
    s4 = _study("1.4", "20221231", "ACC4", "XR")
    s5 = _study("1.5", None, "ACC5")
    # Study 1: CT series of 3 instances (one without InstanceNumber) + a 2-series scout.
    se11 = _series("1.1.1", "CT", 2, "Axial", "CHEST")
    for sop, num in (("1.1.1.3", 3), ("1.1.1.1", 1), ("1.1.1.9", None), ("1.1.1.2", 1)):
        cat.add_instance(_instance(doe_j, s1, se11, sop, number=num,
                                   ipp=[0, 0, -float(num or 99)]), _frames(sop))
    se12 = _series("1.1.2", "CT", 1, "Scout")
    cat.add_instance(_instance(doe_j, s1, se12, "1.1.2.1", number=1), _frames("1.1.2.1"))
    # Study 2: MR enhanced multi-frame (4 frames, per-frame positions).
    se21 = _series("1.2.1", "MR", 1, "T1 enhanced", "HEAD")
    pos = [[0, 0, float(z)] for z in (0, 5, 10, 15)]
    cat.add_instance(_instance(doe_a, s2, se21, "1.2.1.1", number=1, frames=4,
                               ipp=[0, 0, 0]), _frames("1.2.1.1", 4, pos))
    # Study 3: PET-CT, two modalities.
    se31 = _series("1.3.1", "CT", 1)
    se32 = _series("1.3.2", "PT", 2)
    cat.add_instance(_instance(smith, s3, se31, "1.3.1.1", number=1), _frames("1.3.1.1"))
    cat.add_instance(_instance(smith, s3, se32, "1.3.2.1", number=1), _frames("1.3.2.1"))
    cat.add_instance(_instance(smith, s3, se32, "1.3.2.2", number=2), _frames("1.3.2.2"))
    # Study 4 (older, same patient as study 1) and study 5 without a date.
    cat.add_instance(_instance(doe_j, s4, _series("1.4.1", "CR"), "1.4.1.1", number=1),
                     _frames("1.4.1.1"))
    cat.add_instance(_instance(odd, s5, _series("1.5.1", "OT"), "1.5.1.1"), _frames("1.5.1.1"))
    yield cat
    cat.close()


def _uids(rows, key="StudyInstanceUID"):
    return [r[key] for r in rows]


def test_schema_and_pragmas(tmp_path):
    cat = Catalogue(tmp_path / "c.sqlite")
    assert cat.schema_version == 2
    conn = sqlite3.connect(tmp_path / "c.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"schema_version", "settings", "patient", "study", "series", "instance",
            "frame"} <= tables
    conn.close()
    assert cat._one("PRAGMA foreign_keys")[0] == 1
    cat.set_setting("k", "v1")
    cat.set_setting("k", "v2")
    assert cat.get_setting("k") == "v2" and cat.get_setting("nope", "d") == "d"
    cat.close()
    assert Catalogue(tmp_path / "c.sqlite").get_setting("k") == "v2"   # reopen: no re-create


def test_counts_and_levels(ingest_catalogue):
    assert ingest_catalogue.counts() == {"patients": 4, "studies": 5, "series": 7,
                                         "instances": 11, "frames": 14}


def test_query_studies_all_sorted_newest_first(ingest_catalogue):
    rows = ingest_catalogue.query_studies()
    assert _uids(rows) == ["1.3", "1.2", "1.1", "1.4", "1.5"]
    s1 = rows[2]
    assert s1["PatientName"] == "DOE^JOHN" and s1["PatientID"] == "P1"
    assert s1["PatientBirthDate"] == "19600101" and s1["PatientSex"] == "M"
    assert s1["StudyDate"] == "20230105" and s1["AccessionNumber"] == "ACC1"
    assert s1["StudyDescription"] == "CT CHEST"
    assert s1["ModalitiesInStudy"] == ["CT"]
    assert s1["NumberOfStudyRelatedSeries"] == 2
    assert s1["NumberOfStudyRelatedInstances"] == 5
    assert rows[0]["ModalitiesInStudy"] == ["CT", "PT"]


@pytest.mark.parametrize("pattern,expected", [
    ("DOE^JOHN", ["1.1", "1.4"]),
    ("doe^john", ["1.1", "1.4"]),          # case-insensitive
    ("doe*", ["1.2", "1.1", "1.4"]),
    ("D?E^J*", ["1.2", "1.1", "1.4"]),
    ("*ANNA", ["1.3"]),
    ("*^JA?E", ["1.2"]),
    ("DOE", []),                            # no implicit wildcard
    ("PER%CENT_NAME", ["1.5"]),             # SQL wildcards are literals
    ("PER%*", ["1.5"]),
    ("%", []),
    ("_OE*", []),
    ("*", ["1.3", "1.2", "1.1", "1.4", "1.5"]),
])
def test_patient_name_wildcards(ingest_catalogue, pattern, expected):
    assert _uids(ingest_catalogue.query_studies(PatientName=pattern)) == expected


@pytest.mark.parametrize("dates,expected", [
    ("20240110", ["1.2"]),
    ("20240101-", ["1.3", "1.2"]),
    ("-20230105", ["1.1", "1.4"]),
    ("20230101-20240201", ["1.2", "1.1"]),
    ("20221231-20221231", ["1.4"]),
    ("19000101-19001231", []),
])
def test_study_date_ranges(ingest_catalogue, dates, expected):
    assert _uids(ingest_catalogue.query_studies(StudyDate=dates)) == expected


@pytest.mark.parametrize("bad", ["2024", "2024-01-01", "abc-", "-", "20240101-2024"])
def test_bad_dates_rejected(ingest_catalogue, bad):
    with pytest.raises(QueryError):
        ingest_catalogue.query_studies(StudyDate=bad)


def test_other_study_filters(ingest_catalogue):
    q = ingest_catalogue.query_studies
    assert _uids(q(ModalitiesInStudy="MR")) == ["1.2"]
    assert _uids(q(ModalitiesInStudy="CT")) == ["1.3", "1.1"]
    assert _uids(q(ModalitiesInStudy="PT,CR")) == ["1.3", "1.4"]
    assert _uids(q(ModalitiesInStudy=["MR", "CR"])) == ["1.2", "1.4"]
    assert _uids(q(PatientID="P1")) == ["1.1", "1.4"]
    assert _uids(q(AccessionNumber="ACC3")) == ["1.3"]
    assert _uids(q(StudyInstanceUID="1.2")) == ["1.2"]
    assert _uids(q(StudyInstanceUID="1.2,1.4")) == ["1.2", "1.4"]
    assert _uids(q(StudyInstanceUID=["1.4", "1.5"])) == ["1.4", "1.5"]
    assert _uids(q(PatientName="DOE*", ModalitiesInStudy="CT", StudyDate="20230101-")) \
        == ["1.1"]
    assert _uids(q(StudyDescription="*head*")) == ["1.2"]
    # paging
    assert _uids(q(limit=2)) == ["1.3", "1.2"]
    assert _uids(q(limit=2, offset=2)) == ["1.1", "1.4"]
    assert _uids(q(offset=4)) == ["1.5"]
    assert q(limit=0) == []
    with pytest.raises(QueryError):
        q(limit=-1)


def test_query_series(ingest_catalogue):
    rows = ingest_catalogue.query_series(StudyInstanceUID="1.1")
    assert _uids(rows, "SeriesInstanceUID") == ["1.1.2", "1.1.1"]      # by SeriesNumber
    axial = rows[1]
    assert axial["Modality"] == "CT" and axial["SeriesNumber"] == 2
    assert axial["SeriesDescription"] == "Axial" and axial["BodyPartExamined"] == "CHEST"
    assert axial["NumberOfSeriesRelatedInstances"] == 4 and axial["NumberOfImages"] == 4
    assert axial["StudyInstanceUID"] == "1.1" and axial["PatientName"] == "DOE^JOHN"
    mr = ingest_catalogue.query_series(Modality="MR")
    assert len(mr) == 1 and mr[0]["NumberOfSeriesRelatedInstances"] == 1
    assert mr[0]["NumberOfImages"] == 4
    assert len(ingest_catalogue.query_series(Modality="CT")) == 3
    assert _uids(ingest_catalogue.query_series(SeriesInstanceUID="1.3.2"),
                 "SeriesInstanceUID") == ["1.3.2"]
    assert len(ingest_catalogue.query_series()) == 7
    assert len(ingest_catalogue.query_series(limit=3)) == 3
    assert ingest_catalogue.get_series("1.3.2")["NumberOfImages"] == 2
    assert ingest_catalogue.get_series("nope") is None


def test_query_instances(ingest_catalogue):
    rows = ingest_catalogue.query_instances(SeriesInstanceUID="1.1.1")
    assert _uids(rows, "SOPInstanceUID") == ["1.1.1.1", "1.1.1.2", "1.1.1.3", "1.1.1.9"]
    r = rows[0]
    assert r["StudyInstanceUID"] == "1.1" and r["Modality"] == "CT"
    assert r["PixelSpacing"] == [0.5, 0.5] and r["ImageOrientationPatient"] == [1, 0, 0, 0, 1, 0]
    assert r["signed"] is False
    assert len(ingest_catalogue.query_instances(StudyInstanceUID="1.3")) == 3
    assert _uids(ingest_catalogue.query_instances(SOPInstanceUID="1.2.1.1"),
                 "SOPInstanceUID") == ["1.2.1.1"]


def test_series_images_order_and_keys(ingest_catalogue):
    imgs = ingest_catalogue.series_images("1.1.1")
    # InstanceNumber, then SOP Instance UID, missing InstanceNumber last.
    assert [(i["index"], i["SOPInstanceUID"]) for i in imgs] == [
        (0, "1.1.1.1"), (1, "1.1.1.2"), (2, "1.1.1.3"), (3, "1.1.1.9")]
    for im in imgs:
        assert tuple(im) == SERIES_IMAGE_KEYS
    first = imgs[0]
    assert first["frame"] == 1 and first["offset"] == 0 and first["signed"] is False
    assert first["codestream_relpath"] == "j2k/s/1.1.1.1.1.j2k"
    assert first["ImagePositionPatient"] == [0.0, 0.0, -1.0]
    assert first["RescaleIntercept"] == -1024.0 and first["WindowWidth"] == 400.0
    assert (first["numres"], first["nlayers"], first["bits_stored"]) == (2, 4, 12)

    mf = ingest_catalogue.series_images("1.2.1")
    assert [i["frame"] for i in mf] == [1, 2, 3, 4]
    assert [i["index"] for i in mf] == [0, 1, 2, 3]
    assert [i["ImagePositionPatient"][2] for i in mf] == [0, 5, 10, 15]   # per-frame
    assert ingest_catalogue.series_images("nope") == []


def test_lookups(ingest_catalogue):
    assert ingest_catalogue.instance_header("1.3.2.2") == {
        "00080018": {"vr": "UI", "Value": ["1.3.2.2"]}}
    assert ingest_catalogue.instance_header("nope") is None
    st = ingest_catalogue.get_study("1.3")
    assert st["NumberOfStudyRelatedSeries"] == 2 and st["NumberOfStudyRelatedInstances"] == 3
    assert ingest_catalogue.get_study("nope") is None
    assert ingest_catalogue.has_original(_sha("1.3.2.2"))
    assert not ingest_catalogue.has_original(_sha("x"))
    assert ingest_catalogue.find_instance("1.4.1.1")["Modality"] == "CR"


def test_add_instance_is_one_transaction(ingest_catalogue):
    cat = ingest_catalogue
    before = cat.counts()
    p = _patient("P9", "NEW^PATIENT")
    bad_frames = _frames("9.9.9.1", 2)
    bad_frames[1]["frame"] = 1                       # violates UNIQUE(instance, frame)
    with pytest.raises(IntegrityError):
        cat.add_instance(_instance(p, _study("9.9", "20200101"), _series("9.9.9", "CT"),
                                   "9.9.9.1", frames=2), bad_frames)
    assert cat.counts() == before                    # no patient, study, series or row left
    with pytest.raises(DuplicateInstanceError) as e:
        cat.add_instance(_instance(p, _study("9.9", "20200101"), _series("9.9.9", "CT"),
                                   "1.3.2.2"), _frames("1.3.2.2"))
    assert e.value.original_sha256 == _sha("1.3.2.2")
    assert cat.counts() == before


def test_delete_study(ingest_catalogue):
    files = ingest_catalogue.delete_study("1.3")
    assert len(files) == 9 and any(f.startswith("originals/") for f in files)
    assert ingest_catalogue.get_study("1.3") is None
    c = ingest_catalogue.counts()
    assert (c["patients"], c["studies"], c["instances"]) == (3, 4, 8)
    assert ingest_catalogue.delete_study("1.3") == []


def test_threads_read_while_writing(tmp_path):
    cat = Catalogue(tmp_path / "c.sqlite")
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader():
        try:
            while not stop.is_set():
                for st in cat.query_studies():
                    cat.series_images(st["StudyInstanceUID"] + ".1")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    p = _patient("T", "THREAD^TEST")
    for k in range(40):
        sop = f"7.{k}.1.1"
        cat.add_instance(_instance(p, _study(f"7.{k}", "20200101"), _series(f"7.{k}.1", "CT"),
                                   sop, number=1), _frames(sop))
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert cat.counts()["instances"] == 40
    assert len(cat.series_images("7.3.1")) == 1
    # the readers have ended: the next thread to connect closes their connections
    held = list(cat.db._conns)
    assert len(held) == 4
    t = threading.Thread(target=cat.counts)
    t.start()
    t.join()
    assert [th for th, _c in cat.db._conns] == [threading.current_thread(), t]
    for th, c in held:
        if th is not threading.current_thread():
            with pytest.raises(sqlite3.ProgrammingError):
                c.execute("SELECT 1")
    cat.close()
    with pytest.raises(CatalogueError, match="closed"):
        cat.counts()


def test_rows_from_a_real_ingest(tmp_path):
    paths = [find_test_file(n) for n in ("CT_small.dcm", "emri_small.dcm", "US1_UNCR.dcm",
                                         "eCT_Supplemental.dcm")]
    if None in paths:
        pytest.skip("pydicom test files not installed")
    store = Store(tmp_path / "store")
    report = ingest_paths(paths, store)
    assert len(report.imported) == 4
    cat = store.catalogue
    ct = cat.query_studies(PatientName="CompressedSamples^CT1")[0]
    assert ct["PatientName"] == "CompressedSamples^CT1"
    assert ct["StudyDate"] == "20040119"
    ser = cat.query_series(StudyInstanceUID=ct["StudyInstanceUID"])[0]
    img = cat.series_images(ser["SeriesInstanceUID"])[0]
    assert img["signed"] is True and img["PixelRepresentation"] == 1
    assert img["offset"] > 0 and img["bits_stored"] == 16
    assert img["RescaleIntercept"] == -1024.0 and img["RescaleSlope"] == 1.0
    assert img["PixelSpacing"] == pytest.approx([0.661468, 0.661468])
    assert img["ImagePositionPatient"] == pytest.approx([-158.135803, -179.035797, -75.7])
    assert img["WindowCenter"] is None or isinstance(img["WindowCenter"], float)
    us = cat.query_studies(ModalitiesInStudy="US")[0]
    us_img = cat.series_images(cat.query_series(StudyInstanceUID=us["StudyInstanceUID"])[0]
                               ["SeriesInstanceUID"])[0]
    assert us_img["PhotometricInterpretation"] == "RGB" and us_img["SamplesPerPixel"] == 3
    mr = cat.query_series(Modality="MR")[0]
    assert mr["NumberOfImages"] == 10 and mr["NumberOfSeriesRelatedInstances"] == 1
    mr_imgs = cat.series_images(mr["SeriesInstanceUID"])
    assert [i["frame"] for i in mr_imgs] == list(range(1, 11))
    header = cat.instance_header(mr_imgs[0]["SOPInstanceUID"])
    assert header["00080060"]["Value"] == ["MR"]
    # Enhanced CT: geometry from the functional groups, positions per frame.
    ect = cat.query_studies(PatientName="Perfusion^MCA Stroke")[0]
    ect_imgs = cat.series_images(cat.query_series(StudyInstanceUID=ect["StudyInstanceUID"])
                                 [0]["SeriesInstanceUID"])
    assert [i["ImagePositionPatient"] for i in ect_imgs] == [[99.5, -301.5, -159.0],
                                                             [99.5, -301.5, -149.0]]
    assert ect_imgs[0]["PixelSpacing"] == pytest.approx([0.388672, 0.388672])
    assert ect_imgs[0]["ImageOrientationPatient"] == [-1, 0, 0, 0, 1, 0]
    assert ect_imgs[0]["RescaleIntercept"] == -1024.0
    store.close()


def test_version_1_catalogue_migrates_and_keeps_its_rows(tmp_path):
    """A store made before the quarantine (schema 1) opens: the flags column and the
    quarantine table are added, the rows stay."""
    from server import catalogue as catmod

    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    for stmt in catmod._DDL:
        conn.execute(ddl_for("sqlite", stmt))     # version 1: no geometry_flags yet
    conn.execute("INSERT INTO schema_version (version) VALUES (1)")
    cols = {r[1] for r in conn.execute("PRAGMA table_info(instance)")}
    assert "geometry_flags" not in cols
    conn.commit()
    conn.close()
    cat = Catalogue(path)
    assert cat.schema_version == 2
    cat.add_instance(_instance(_patient("P9", "Old^Store"), _study("9.1", "20200101"),
                               _series("9.1.1", "CT"), "9.1.1.1"), _frames("9.1.1.1"))
    assert cat.delete_instance("9.1.1.1") == ["originals/xx/" + _sha("9.1.1.1") + ".dcm",
                                              "j2k/s/9.1.1.1.1.j2k", "j2k/s/9.1.1.1.1.idx.json"]
    assert cat.counts() == {"patients": 0, "studies": 0, "series": 0, "instances": 0,
                            "frames": 0}
    cat.add_instance(_instance(_patient("P9", "Old^Store"), _study("9.1", "20200101"),
                               _series("9.1.1", "CT"), "9.1.1.1"), _frames("9.1.1.1"))
    rows = cat.series_images("9.1.1")
    assert rows and rows[0]["geometry_flags"] == [] and rows[0]["conflict"] is False
    cat.close()
    assert Catalogue(path).schema_version == 2
