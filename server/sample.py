"""Sample data: a synthetic chest CT phantom, a few real images, a ready sample store.

:func:`make_sample_ct` writes a realistic, fully deterministic CT series with pydicom:
unsigned 12-bit stored values with RescaleIntercept -1024 (the most common CT form), an
elliptical body with skin/fat ring, muscle, lungs in the upper (superior) half, heart,
liver, kidneys, aorta, spine and ribs, Gaussian noise (sigma about 10 HU), and a few
spheres of known HU at known patient positions (:data:`SAMPLE_SPHERES`) for tests.
Geometry: axial slices, ImageOrientationPatient [1,0,0,0,1,0], PixelSpacing 0.7 mm,
SliceThickness = SpacingBetweenSlices = 2.5 mm, ImagePositionPatient z decreasing from
head to feet as InstanceNumber grows. UIDs come from ``pydicom.uid.generate_uid`` with
entropy sources derived from ``seed``, so a seed always gives the same UIDs.

:func:`sample_real_files` picks a handful of real images from pydicom's test files and
the ``pydicom-data`` package (module ``data_store``), never downloading anything.

:func:`ensure_sample_store` fills an empty store with both on first run and records that
in the catalogue's settings table (key :data:`SAMPLE_SETTING`), so that studies the user
deletes later are not added again. It also adds the sample slide once
(:func:`ensure_sample_slide`, key :data:`SAMPLE_SLIDE_SETTING`): the real Aperio H&E scan
shipped in ``resources/pathology/samples`` (CMU-1-Small-Region, OpenSlide test data, CC0),
ingested into the slide store like any slide, so File → Open slide has something to show.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .store import Store

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SAMPLE_SETTING = "sample_data_added"
SAMPLE_SLIDE_SETTING = "sample_slide_added"
SAMPLE_SLIDE = (Path(__file__).resolve().parent.parent / "resources" / "pathology" / "samples"
                / "CMU-1-Small-Region.svs")
SAMPLE_SLIDE_PATIENT = ("MV-PATH-0001", "SAMPLE^SKIN H&E", "MV-PATH-ACC-1")

PIXEL_SPACING = 0.7          # mm
SLICE_THICKNESS = 2.5        # mm
RESCALE_INTERCEPT = -1024.0
PATIENT_NAME = "PHANTOM^CT"
PATIENT_ID = "MV-0001"
STUDY_DATE = "20240115"

# Tissue values (HU) of the phantom, before noise.
AIR_HU = -1000
LUNG_HU = -850
FAT_HU = -100
MUSCLE_HU = 40
SOFT_TISSUE_HU = 40
LIVER_HU = 60
KIDNEY_HU = 30
BLOOD_HU = 45
CSF_HU = 10
CANCELLOUS_BONE_HU = 700
CORTICAL_BONE_HU = 1200
RIB_HU = 1000
NOISE_SIGMA_HU = 10.0


@dataclass(frozen=True)
class Sphere:
    """A sphere of uniform HU; ``center`` in patient coordinates (mm, LPS)."""

    name: str
    center: tuple[float, float, float]
    radius: float
    hu: float


def slice_z(index: int) -> float:
    """Patient z (mm) of slice ``index`` (0-based; InstanceNumber = index + 1)."""
    return -SLICE_THICKNESS * index


#: Spheres of known HU (placed for a 64-slice series; a shorter series shows fewer).
SAMPLE_SPHERES = (
    Sphere("lesion_right_lung", (-80.0, -20.0, slice_z(12)), 10.0, 200.0),
    Sphere("calcification", (70.0, -10.0, slice_z(20)), 6.0, 1000.0),
    Sphere("cyst_liver", (-60.0, 10.0, slice_z(44)), 12.0, 0.0),
    Sphere("hypervascular", (80.0, 40.0, slice_z(52)), 9.0, 150.0),
)


def _uid(seed: int, *parts: object) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["medview-sample-ct", str(seed)] + [str(p) for p in parts])


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float,
             ) -> np.ndarray:
    if ax <= 0 or ay <= 0:
        return np.zeros(x.shape, dtype=bool)
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


def _smooth(a: np.ndarray) -> np.ndarray:
    """Separable [1 2 1]/4 blur: soft, partial-volume-like edges."""
    p = np.pad(a, 1, mode="edge")
    a = (p[:-2, 1:-1] + 2 * p[1:-1, 1:-1] + p[2:, 1:-1]) / 4
    p = np.pad(a, 1, mode="edge")
    return (p[1:-1, :-2] + 2 * p[1:-1, 1:-1] + p[1:-1, 2:]) / 4


def phantom_slice_hu(index: int, slices: int, size: int) -> np.ndarray:
    """Noise-free HU image (float) of slice ``index`` of a ``slices``-slice series."""
    half = (size - 1) / 2.0
    coords = (np.arange(size) - half) * PIXEL_SPACING
    x, y = np.meshgrid(coords, coords)           # x: columns (patient left), y: rows (posterior)
    z = slice_z(index)
    t = index / max(1, slices - 1)               # 0 at the top (head side), 1 at the bottom
    img = np.full((size, size), float(AIR_HU))

    # Body outline with skin/fat ring and muscle inside.
    body_ax, body_ay = 165.0, 115.0
    img[_ellipse(x, y, 0, 0, body_ax, body_ay)] = FAT_HU
    img[_ellipse(x, y, 0, 0, body_ax - 12, body_ay - 10)] = MUSCLE_HU

    # Lungs in the superior half, shrinking towards the diaphragm.
    lung_scale = np.clip((0.62 - t) / 0.62, 0.0, 1.0) ** 0.5
    if lung_scale > 0:
        for sx in (-1, 1):
            img[_ellipse(x, y, sx * 72, -5, 50 * lung_scale, 78 * lung_scale)] = LUNG_HU
        # Ribs: small oval bony sections along an ellipse just inside the body wall.
        for k in range(10):
            a = np.pi * (0.10 + 0.80 * k / 9.0)
            for sx in (-1, 1):
                rx, ry = sx * 140 * np.sin(a), -96 * np.cos(a)
                img[_ellipse(x, y, rx, ry, 7, 4.5)] = RIB_HU

    # Mediastinal fat and the heart between the lungs (anterior, to the patient's left).
    heart_scale = np.clip(1.0 - abs(t - 0.32) / 0.26, 0.0, 1.0) ** 0.5
    if heart_scale > 0:
        img[_ellipse(x, y, 14, -22, 34 * heart_scale, 42 * heart_scale)] = FAT_HU
        img[_ellipse(x, y, 18, -25, 28 * heart_scale, 36 * heart_scale)] = BLOOD_HU

    # Abdomen: liver (patient right = -x), spleen, kidneys in the inferior part.
    liver_scale = np.clip((t - 0.40) / 0.25, 0.0, 1.0)
    if liver_scale > 0:
        img[_ellipse(x, y, -55, -5, 80 * liver_scale, 60 * liver_scale)] = LIVER_HU
        img[_ellipse(x, y, 95, 25, 30 * liver_scale, 40 * liver_scale)] = SOFT_TISSUE_HU + 5
    kidney_scale = np.clip((t - 0.62) / 0.2, 0.0, 1.0)
    if kidney_scale > 0:
        for sx in (-1, 1):
            img[_ellipse(x, y, sx * 72, 70, 22 * kidney_scale, 26 * kidney_scale)] = FAT_HU
            img[_ellipse(x, y, sx * 72, 70, 17 * kidney_scale, 21 * kidney_scale)] = KIDNEY_HU

    # Aorta, spine (cortical shell, cancellous core), spinal canal.
    img[_ellipse(x, y, 15, 50, 12, 12)] = BLOOD_HU
    img[_ellipse(x, y, 0, 78, 20, 18)] = CORTICAL_BONE_HU
    img[_ellipse(x, y, 0, 78, 16, 14)] = CANCELLOUS_BONE_HU
    img[_ellipse(x, y, 0, 106, 14, 10)] = CORTICAL_BONE_HU      # posterior arch
    img[_ellipse(x, y, 0, 103, 7, 6)] = CSF_HU                  # canal

    img = _smooth(img)

    # Spheres of known HU (sharp, uniform: exact values for tests).
    for s in SAMPLE_SPHERES:
        dz = z - s.center[2]
        if abs(dz) < s.radius:
            r = float(np.sqrt(s.radius ** 2 - dz ** 2))
            img[_ellipse(x, y, s.center[0], s.center[1], r, r)] = s.hu
    return img


def make_sample_ct(out_dir: str | Path, slices: int = 64, size: int = 512, seed: int = 0,
                   ) -> list[Path]:
    """Write a synthetic chest CT series (one file per slice) and return the paths."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    study_uid = _uid(seed, "study")
    series_uid = _uid(seed, "series")
    frame_uid = _uid(seed, "frame-of-reference")
    half = (size - 1) / 2.0
    x0 = y0 = -half * PIXEL_SPACING
    paths = []
    for i in range(slices):
        rng = np.random.default_rng([seed, i])
        hu = phantom_slice_hu(i, slices, size) + rng.normal(0.0, NOISE_SIGMA_HU, (size, size))
        stored = np.clip(np.rint(hu - RESCALE_INTERCEPT), 0, 4095).astype(np.uint16)
        sop_uid = _uid(seed, "instance", i)

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = STUDY_DATE
        ds.StudyTime = ds.SeriesTime = "093000"
        ds.ContentTime = f"0930{i % 60:02d}"
        ds.AccessionNumber = f"MVACC{seed:05d}"
        ds.Modality = "CT"
        ds.Manufacturer = "medview synthetic phantom"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT CHEST PHANTOM"
        ds.SeriesDescription = f"Axial {SLICE_THICKNESS} mm (synthetic)"
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = SLICE_THICKNESS
        ds.SpacingBetweenSlices = SLICE_THICKNESS
        ds.KVP = 120
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [round(x0, 4), round(y0, 4), slice_z(i)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = slice_z(i)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.PixelSpacing = [PIXEL_SPACING, PIXEL_SPACING]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.RescaleIntercept = RESCALE_INTERCEPT
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
        path = out / f"CT{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


#: Real images used for the sample store: (file name, what it shows). All have distinct
#: SOP Instance UIDs.
REAL_SAMPLE_FILES = (
    ("CT_small.dcm", "CT, signed 16-bit, explicit little endian"),
    ("MR_small.dcm", "MR, signed 16-bit"),
    ("emri_small.dcm", "MR multi-frame (10 frames), 12-bit"),
    ("693_J2KR.dcm", "CT 512x512 signed, JPEG 2000 lossless original"),
    ("RG3_J2KR.dcm", "CR 1760x1760 MONOCHROME1, 10-bit, JPEG 2000 lossless original"),
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", "US 8-bit, JPEG lossless original"),
    ("US1_UNCR.dcm", "US RGB 8-bit"),
    ("SC_rgb_jpeg_dcmtk.dcm", "RGB, YBR_FULL JPEG baseline original"),
    ("OBXXXX1A.dcm", "US PALETTE COLOR"),
)


def find_test_file(name: str) -> Path | None:
    """Locate a pydicom / pydicom-data test file locally (never downloads)."""
    try:
        from pydicom.data import get_testdata_file

        p = get_testdata_file(name, download=False)
    except Exception:  # noqa: BLE001 - missing package or data
        p = None
    if p is None:
        try:
            import data_store  # the pydicom-data package

            cand = Path(data_store.__file__).parent / "data" / name
            p = str(cand) if cand.is_file() else None
        except ImportError:
            p = None
    return Path(p) if p else None


def sample_real_files() -> list[Path]:
    """Paths of a handful of real images (CT, MR, CR, US, RGB, palette; 8/16-bit, signed
    and unsigned, JPEG / JPEG 2000 compressed); [] when the data packages are missing."""
    out = []
    for name, _what in REAL_SAMPLE_FILES:
        p = find_test_file(name)
        if p is not None:
            out.append(p)
    return out


def ensure_sample_store(store_dir: str | Path, *, log: Callable[[str], None] | None = None,
                        slices: int = 64, size: int = 512, slide: bool = True) -> Store:
    """Open (creating if needed) the store; on first run fill it with sample data.

    Sample data is added only when the store has no study and the catalogue has no
    ``sample_data_added`` setting; the setting is written afterwards (also when the store
    already had studies), so deleting the samples later does not bring them back.
    Not meant for two processes initialising the same store at the same moment.
    """
    from .ingest import ingest_paths

    store = Store(store_dir)
    cat = store.catalogue
    if cat.get_setting(SAMPLE_SETTING) is not None:
        return store
    if cat.counts()["studies"] == 0:
        with tempfile.TemporaryDirectory(prefix="medview-sample-") as tmp:
            ct = make_sample_ct(Path(tmp) / "ct", slices=slices, size=size)
            report = ingest_paths(ct + sample_real_files(), store, log=log)
        cat.set_setting(SAMPLE_SETTING, report.summary())
    else:
        cat.set_setting(SAMPLE_SETTING, "store already had studies")
    if slide:
        ensure_sample_slide(store, log=log)
    return store


def ensure_sample_slide(store: Store, *, log: Callable[[str], None] | None = None,
                        path: Path = SAMPLE_SLIDE) -> dict | None:
    """Ingest the sample slide into ``store``'s slide store once (recorded in the
    catalogue's settings, so a slide the user deletes is not added again). Returns the
    slide's catalogue row, or None when it was added before, the file is not there (an
    installation without the resources folder) or cannot be ingested (logged, nothing
    recorded: the next start tries again; the app starts either way)."""
    cat = store.catalogue
    if cat.get_setting(SAMPLE_SLIDE_SETTING) is not None:
        return None
    if not Path(path).is_file():
        if log:
            log(f"sample slide not found ({path}); no sample slide added")
        return None
    from server.slide_store import SlideStore

    patient_id, patient_name, accession = SAMPLE_SLIDE_PATIENT
    if log:
        log("Adding the sample slide (real H&E scan, CMU-1-Small-Region)…")
    try:
        with SlideStore.for_image_store(store.root) as slides:
            row = slides.ingest(path, patient_id=patient_id, patient_name=patient_name,
                                accession=accession, stain="H&E",
                                label="Sample: skin, H&E (CMU-1-Small-Region, CC0)")
    except Exception as e:  # noqa: BLE001 - a sample must never keep the app from starting
        if log:
            log(f"could not add the sample slide ({path}): {e}")
        return None
    cat.set_setting(SAMPLE_SLIDE_SETTING, row["slide_uid"])
    return row
