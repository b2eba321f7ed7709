"""Series selection for MPR (SPEC M1–M3): a mixed folder, gaps, refusal, multi-frame."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from server.sample import make_sample_ct
from imaging.series_select import (MprRefused, ServerCatalogue, looks_like_dicom,
                                  read_candidates, select_series)


def _rewrite(src: Path, dst: Path, **changes) -> Path:
    ds = pydicom.dcmread(src)
    for k, v in changes.items():
        setattr(ds, k, v)
    if "SOPInstanceUID" in changes:
        ds.file_meta.MediaStorageSOPInstanceUID = changes["SOPInstanceUID"]
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """study/ct/ holds 14 slices of the series minus instance 6 (moved to study/) plus:
    another patient, another series of the same study, PNG/JPG files, a scout, an exact
    copy, a same-UID file with another modality, and a slice without a .dcm suffix."""
    root = tmp_path_factory.mktemp("mixed")
    gen = root / "gen"
    files = make_sample_ct(gen / "a", slices=14, size=64, seed=11)
    folder = root / "study" / "ct"
    folder.mkdir(parents=True)
    for p in files:
        shutil.copy(p, folder / p.name)
    # the gap: instance 6 lives one folder up
    (folder / "CT0006.dcm").rename(root / "study" / "CT0006.dcm")
    # a slice without suffix (found by its preamble)
    (folder / "CT0009.dcm").rename(folder / "IM0009")
    other_patient = make_sample_ct(gen / "b", slices=3, size=64, seed=12)
    for k, p in enumerate(other_patient):
        _rewrite(p, folder / f"OTHER{k}.dcm", PatientName="SOMEONE^ELSE")
    for k in range(3):
        _rewrite(files[k], folder / f"SER3_{k}.dcm", SeriesInstanceUID=generate_uid(entropy_srcs=["s3"]),
                 SeriesNumber=3, SOPInstanceUID=generate_uid(entropy_srcs=["s3", str(k)]))
    _rewrite(files[7], folder / "SCOUT.dcm", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
             ImageOrientationPatient=[0, 1, 0, 0, 0, -1], InstanceNumber=100,
             SOPInstanceUID=generate_uid(entropy_srcs=["scout"]))
    _rewrite(files[8], folder / "WRONGMOD.dcm", Modality="MR", InstanceNumber=200,
             SOPInstanceUID=generate_uid(entropy_srcs=["mr"]))
    shutil.copy(files[2], folder / "copy_of_CT0003.dcm")
    (folder / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    (folder / "scan.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    (folder / "notes.txt").write_text("not an image")
    return {"root": root, "folder": folder, "files": files}


def test_dicom_recognised_by_suffix_or_preamble(mixed):
    folder = mixed["folder"]
    assert looks_like_dicom(folder / "IM0009")
    assert looks_like_dicom(folder / "CT0001.dcm")
    assert not looks_like_dicom(folder / "photo.png")
    assert "not a DICOM file" in read_candidates(folder / "scan.jpg").reason


def test_mixed_folder_from_an_image(mixed):
    folder = mixed["folder"]
    sel = select_series(folder / "CT0004.dcm")
    assert sel.ok, sel.report()
    numbers = [c.instance_number for c in sel.kept]
    # every instance 1-14: the suffix-less one found, the gap recovered from the parent
    assert sorted(numbers) == list(range(1, 15))
    # sorted along the normal (z goes down as the instance number grows, so reversed)
    z = [c.position[2] for c in sel.kept]
    assert z == sorted(z)
    assert [c.instance_number for c in sel.recovered] == [6]
    assert sel.recovered[0].source == "parent folder"
    assert sel.missing == []
    reasons = {Path(s.name).name: s.reason for s in sel.skipped}
    assert "other patient" in reasons["OTHER0.dcm"]
    assert "other series" in reasons["SER3_1.dcm"]
    assert "localizer" in reasons["SCOUT.dcm"]
    assert "Modality MR" in reasons["WRONGMOD.dcm"]
    assert "exact duplicate" in reasons["copy_of_CT0003.dcm"] or "exact duplicate" in reasons["CT0003.dcm"]
    assert "not a DICOM file" in reasons["photo.png"]
    assert "not a DICOM file" in reasons["scan.jpg"]
    assert "not a DICOM file" in reasons["notes.txt"]
    report = sel.report()
    assert "kept 14" in report and "recovered from the parent folder" in report


def test_folder_picks_the_largest_series_and_builds_the_volume(mixed):
    sel = select_series(mixed["folder"])
    assert sel.ok and len(sel.kept) == 14
    assert sel.other_series                      # the 3-image series was seen
    vol = sel.build_volume()
    assert vol.shape == (14, 64, 64)
    assert vol.geometry.spacing == pytest.approx((0.7, 0.7, 2.5))
    # slot 0 is the lowest z = the last instance; values are HU (air around the body)
    src = pydicom.dcmread(mixed["files"][13])
    np.testing.assert_array_equal(vol.modality_array()[0], src.pixel_array.astype(np.float32) - 1024)


def test_gap_without_recovery_is_reported(mixed, tmp_path):
    folder = tmp_path / "only"
    folder.mkdir()
    for p in mixed["files"]:
        if p.name not in ("CT0006.dcm", "CT0007.dcm"):
            shutil.copy(p, folder / p.name)
    sel = select_series(folder, search_levels=0)
    assert sel.ok
    assert sel.missing == [6, 7]
    assert any("not found anywhere" in w for w in sel.warnings)
    assert any("gap" in w for w in sel.warnings)           # a hole in the positions
    vol = sel.build_volume()
    assert vol.shape[0] == 14 and len(vol.filled_slots()) == 2


class _FakeCatalogue:
    name = "catalogue"

    def __init__(self, files):
        self.files = files
        self.asked = None

    def find(self, ref, numbers):
        from imaging.series_select import _candidates_from_dataset

        self.asked = set(numbers)
        out = []
        for p in self.files:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            if int(ds.InstanceNumber) in numbers:
                out += _candidates_from_dataset(ds, None, self.name, p.read_bytes())
        return out


def test_gap_recovered_from_the_catalogue(mixed, tmp_path):
    folder = tmp_path / "cat"
    folder.mkdir()
    for p in mixed["files"]:
        if p.name != "CT0010.dcm":
            shutil.copy(p, folder / p.name)
    cat = _FakeCatalogue(mixed["files"])
    sel = select_series(folder, search_levels=0, catalogue=cat)
    assert cat.asked == {10}
    assert sel.ok and sel.missing == []
    assert [(c.instance_number, c.source) for c in sel.recovered] == [(10, "catalogue")]
    vol = sel.build_volume()                     # pixels come from the in-memory file
    assert len(vol.own_slots()) == 14


def test_refused_below_the_threshold(mixed, tmp_path):
    folder = tmp_path / "few"
    folder.mkdir()
    for p in mixed["files"][:6]:
        shutil.copy(p, folder / p.name)
    sel = select_series(folder, search_levels=0)
    assert not sel.ok
    assert "at least 10 images" in sel.refusal and "found 6" in sel.refusal
    with pytest.raises(MprRefused, match="at least 10"):
        sel.check()
    assert select_series(folder, search_levels=0, threshold=5).ok


def test_server_catalogue_recovers_from_the_image_server(server, tmp_path):
    from client.session import Session

    # the conftest store holds make_sample_ct(slices=12, size=256, seed=3): same UIDs
    files = make_sample_ct(tmp_path / "all", slices=12, size=256, seed=3)
    folder = tmp_path / "partial"
    folder.mkdir()
    for p in files:
        if p.name not in ("CT0004.dcm", "CT0005.dcm"):
            shutil.copy(p, folder / p.name)
    session = Session(server.url)
    try:
        sel = select_series(folder / "CT0001.dcm", search_levels=0, catalogue=ServerCatalogue(session))
    finally:
        session.logout()
    assert sel.ok and sel.missing == []
    assert sorted(c.instance_number for c in sel.recovered) == [4, 5]
    vol = sel.build_volume()
    assert len(vol.own_slots()) == 12


def _enhanced_ct(path: Path, frames=12, size=32, tilt_mm=0.0) -> Path:
    """An enhanced multi-frame CT with per-frame positions (and an optional tilt)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["enh"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = "ENH^ONE", "E1"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["enh-study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["enh-series"])
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 5, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = ds.Columns = size
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [1.0, 1.0]
    pm.SliceThickness = 2.0
    po = Dataset()
    po.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    pv = Dataset()
    pv.RescaleSlope, pv.RescaleIntercept, pv.RescaleType = 1, -1024, "HU"
    shared.PixelMeasuresSequence = Sequence([pm])
    shared.PlaneOrientationSequence = Sequence([po])
    shared.PixelValueTransformationSequence = Sequence([pv])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    pix = np.zeros((frames, size, size), np.uint16)
    for f in range(frames):
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [0.0, tilt_mm * f, 2.0 * (frames - 1 - f)]   # reversed order
        item.PlanePositionSequence = Sequence([pp])
        per.append(item)
        pix[f] = 1024 + 10 * f
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = pix.tobytes()
    ds["PixelData"].VR = "OW"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_enhanced_multiframe_gives_one_image_per_frame(tmp_path):
    path = _enhanced_ct(tmp_path / "enh" / "ENHANCED")        # no suffix: the preamble counts
    sel = select_series(path, search_levels=0)
    assert sel.ok, sel.report()
    assert len(sel.kept) == 12 and {c.frame for c in sel.kept} == set(range(12))
    vol = sel.build_volume()
    assert vol.geometry.spacing == pytest.approx((1.0, 1.0, 2.0))
    # frame 11 is the lowest z: slot 0 holds its value (10 * 11 HU)
    hu = vol.modality_array()
    assert hu[0, 5, 5] == pytest.approx(110.0)
    assert hu[-1, 5, 5] == pytest.approx(0.0)


def test_gantry_tilt_is_warned_and_kept(tmp_path):
    path = _enhanced_ct(tmp_path / "tilt" / "T.dcm", tilt_mm=0.5)
    sel = select_series(path, search_levels=0)
    assert sel.ok
    assert any("gantry tilt" in w for w in sel.warnings)
    vol = sel.build_volume()
    assert vol.geometry.tilt_degrees == pytest.approx(np.degrees(np.arctan(0.5 / 2.0)), abs=0.01)
