"""Helpers for the pathology tests: slide stores and slide files made from real tissue."""
from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np


def write_dicom_wsi(folder: Path, img: np.ndarray, *, tile: int = 256, levels: int = 2,
                    mpp: float = 0.5, label: np.ndarray | None = None,
                    organisation: str = "TILED_FULL", codec: str = "native",
                    missing: set[tuple[int, int]] | frozenset = frozenset(),
                    shuffle_seed: int | None = None, positions: bool | None = None,
                    series_uid: str | None = None) -> list[Path]:
    """A DICOM VL Whole Slide Microscopy series, one instance per level (each level the
    previous one halved by block mean), written the way scanners and converters write
    them (the attributes of the WSI IOD: shared and per-frame functional groups, optical
    path, dimension organisation, total pixel matrix origin).

    ``organisation``: "TILED_FULL" (frames in row-major order, no per-frame positions
    unless ``positions``) or "TILED_SPARSE" (every frame carries its position in the
    total pixel matrix, 1-based); ``missing`` (tile column, tile row) of level 0 are left
    out (TILED_SPARSE only: a scanner skips empty glass); ``shuffle_seed`` stores the
    frames in a random order (TILED_SPARSE only). ``codec``: "native" (explicit VR little
    endian), "j2k" (JPEG 2000 lossless, reversible colour transform: YBR_RCT), "jpeg"
    (JPEG baseline, 4:2:0 YBR_FULL_422, quality 90). Edge frames are padded with white."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import (ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit,
                             generate_uid)

    from imaging.tilesource import block_mean

    sparse = organisation == "TILED_SPARSE"
    if (missing or shuffle_seed is not None) and not sparse:
        raise ValueError("missing tiles and shuffled frames need TILED_SPARSE")
    if positions is None:
        positions = sparse
    folder.mkdir(parents=True, exist_ok=True)
    study, frame_uid = generate_uid(), generate_uid()
    series = series_uid or generate_uid()
    out = []

    def code(value: str, scheme: str, meaning: str) -> Dataset:
        c = Dataset()
        c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
        return c

    def base(kind: str, rows: int, cols: int) -> Dataset:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.6"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "SM"
        ds.Manufacturer, ds.ManufacturerModelName = "MedView tests", "write_dicom_wsi"
        ds.SoftwareVersions = "1"
        ds.PatientID, ds.PatientName, ds.AccessionNumber = "WSI-1", "Slide^Test", "ACC-WSI"
        ds.PatientBirthDate, ds.PatientSex, ds.StudyID = "", "", "1"
        ds.ReferringPhysicianName, ds.StudyDate, ds.StudyTime = "", "20260102", "030405"
        ds.SeriesNumber, ds.InstanceNumber = 1, len(out) + 1
        ds.ContainerIdentifier = "S-1"
        ds.IssuerOfTheContainerIdentifierSequence = Sequence()
        ds.ContainerTypeCodeSequence = Sequence([code("433466003", "SCT", "Microscope slide")])
        spec = Dataset()
        spec.SpecimenIdentifier, spec.SpecimenUID = "S-1", generate_uid()
        spec.IssuerOfTheSpecimenIdentifierSequence = Sequence()
        spec.SpecimenPreparationSequence = Sequence()
        ds.SpecimenDescriptionSequence = Sequence([spec])
        ds.ImageType = ["ORIGINAL", "PRIMARY", kind, "NONE"]
        ds.AcquisitionDateTime = "20260102030405"
        ds.ContentDate, ds.ContentTime = "20260102", "030405"
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.Rows, ds.Columns = rows, cols
        ds.BurnedInAnnotation = "YES" if kind == "LABEL" else "NO"
        ds.SpecimenLabelInImage = "YES" if kind == "LABEL" else "NO"
        ds.FocusMethod, ds.ExtendedDepthOfField = "AUTO", "NO"
        ds.VolumetricProperties = "VOLUME"
        ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
        op = Dataset()
        op.OpticalPathIdentifier = "1"
        op.IlluminationTypeCodeSequence = Sequence([code("111744", "DCM", "Brightfield illumination")])
        op.IlluminationColorCodeSequence = Sequence([code("414298005", "SCT", "Full Spectrum")])
        ds.OpticalPathSequence = Sequence([op])
        ds.NumberOfOpticalPaths = 1
        ds.TotalPixelMatrixFocalPlanes = 1
        return ds

    def encode(frames: list[np.ndarray], ds: Dataset) -> None:
        if codec == "native":
            ds.PixelData = b"".join(np.ascontiguousarray(f).tobytes() for f in frames)
            return
        import imagecodecs

        if codec == "j2k":
            data = [imagecodecs.jpeg2k_encode(f, level=0, codecformat="J2K", reversible=True,
                                              mct=True) for f in frames]
            ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
            ds.PhotometricInterpretation = "YBR_RCT"
        elif codec == "jpeg":
            data = [imagecodecs.jpeg8_encode(f, level=90, subsampling="420") for f in frames]
            ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
            ds.PhotometricInterpretation = "YBR_FULL_422"
            ds.LossyImageCompression = "01"
            ds.LossyImageCompressionMethod = "ISO_10918_1"
        else:
            raise ValueError(f"unknown codec {codec!r}")
        ds.PixelData = encapsulate(data, has_bot=True)
        ds["PixelData"].VR = "OB"

    rng = np.random.default_rng(shuffle_seed)
    cur = img
    for lv in range(levels):
        h, w = cur.shape[:2]
        ds = base("VOLUME", tile, tile)
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
        ds.DimensionOrganizationType = organisation
        ps = mpp * (2 ** lv) / 1000.0
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight, ds.ImagedVolumeDepth = w * ps, h * ps, 0.001
        origin = Dataset()
        origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 20.0, 40.0
        ds.TotalPixelMatrixOriginSequence = Sequence([origin])
        dim_uid = generate_uid()
        dorg = Dataset()
        dorg.DimensionOrganizationUID = dim_uid
        ds.DimensionOrganizationSequence = Sequence([dorg])
        if positions:
            idx = []
            for tag in (0x0048021E, 0x0048021F):      # column, row position in the matrix
                d = Dataset()
                d.DimensionOrganizationUID = dim_uid
                d.DimensionIndexPointer = tag
                d.FunctionalGroupPointer = 0x0048021A  # Plane Position (Slide) Sequence
                idx.append(d)
            ds.DimensionIndexSequence = Sequence(idx)
        cols, rows = -(-w // tile), -(-h // tile)
        pm = Dataset()
        pm.PixelSpacing = [ps] * 2
        pm.SliceThickness = 0.001
        ft = Dataset()
        ft.FrameType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        opi = Dataset()
        opi.OpticalPathIdentifier = "1"
        fg = Dataset()
        fg.PixelMeasuresSequence = Sequence([pm])
        fg.WholeSlideMicroscopyImageFrameTypeSequence = Sequence([ft])
        fg.OpticalPathIdentificationSequence = Sequence([opi])
        ds.SharedFunctionalGroupsSequence = Sequence([fg])
        cells = [(c, r) for r in range(rows) for c in range(cols)
                 if not (lv == 0 and (c, r) in missing)]
        if shuffle_seed is not None:
            cells = [cells[i] for i in rng.permutation(len(cells))]
        frames, per_frame = [], []
        for c, r in cells:
            f = np.full((tile, tile, 3), 255, np.uint8)
            part = cur[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
            f[:part.shape[0], :part.shape[1]] = part
            frames.append(f)
            if positions:
                pos = Dataset()
                pos.ColumnPositionInTotalImagePixelMatrix = c * tile + 1
                pos.RowPositionInTotalImagePixelMatrix = r * tile + 1
                # slide coordinates (mm): the image's x runs along -y of the slide
                pos.XOffsetInSlideCoordinateSystem = round(20.0 - r * tile * ps, 6)
                pos.YOffsetInSlideCoordinateSystem = round(40.0 - c * tile * ps, 6)
                pos.ZOffsetInSlideCoordinateSystem = 0.0
                content = Dataset()
                content.DimensionIndexValues = [c + 1, r + 1]
                pf = Dataset()
                pf.FrameContentSequence = Sequence([content])
                pf.PlanePositionSlideSequence = Sequence([pos])
                per_frame.append(pf)
        ds.NumberOfFrames = len(frames)
        if positions:
            ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
        encode(frames, ds)
        p = folder / f"level{lv}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
        cur = block_mean(cur, 2)
    if label is not None:
        ds = base("LABEL", label.shape[0], label.shape[1])
        ds.NumberOfFrames = 1
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = label.shape[1], label.shape[0]
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.PixelData = np.ascontiguousarray(label).tobytes()
        p = folder / "label.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def new_store(root: Path):
    from server.slide_store import SlideStore
    from server.store import Store

    Store(root).close()
    return SlideStore.for_image_store(root)


def today_minus(days: float) -> str:
    t = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=days)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")
