"""Helpers for the pathology tests: slide stores and slide files made from real tissue."""
from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np


def write_dicom_wsi(folder: Path, img: np.ndarray, *, tile: int = 256, levels: int = 2,
                    mpp: float = 0.5, label: np.ndarray | None = None) -> list[Path]:
    """A DICOM VL Whole Slide Microscopy series (TILED_FULL, uncompressed), one
    instance per level (each level the previous one halved by block mean)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from pathology.tilesource import block_mean

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_uid = generate_uid(), generate_uid(), generate_uid()
    out = []

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
        ds.PatientID, ds.PatientName, ds.AccessionNumber = "WSI-1", "Slide^Test", "ACC-WSI"
        ds.ContainerIdentifier = "S-1"
        ds.ImageType = ["ORIGINAL", "PRIMARY", kind, "NONE"]
        ds.AcquisitionDateTime = "20260102030405"
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.Rows, ds.Columns = rows, cols
        return ds

    cur = img
    for lv in range(levels):
        h, w = cur.shape[:2]
        ds = base("VOLUME", tile, tile)
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
        ds.DimensionOrganizationType = "TILED_FULL"
        cols, rows = -(-w // tile), -(-h // tile)
        ds.NumberOfFrames = cols * rows
        pm = Dataset()
        pm.PixelSpacing = [mpp * (2 ** lv) / 1000.0] * 2
        pm.SliceThickness = 0.001
        fg = Dataset()
        fg.PixelMeasuresSequence = Sequence([pm])
        ds.SharedFunctionalGroupsSequence = Sequence([fg])
        frames = []
        for r in range(rows):
            for c in range(cols):
                f = np.full((tile, tile, 3), 255, np.uint8)
                part = cur[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
                f[:part.shape[0], :part.shape[1]] = part
                frames.append(f.tobytes())
        ds.PixelData = b"".join(frames)
        p = folder / f"level{lv}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
        cur = block_mean(cur, 2)
    if label is not None:
        ds = base("LABEL", label.shape[0], label.shape[1])
        ds.NumberOfFrames = 1
        ds.PixelData = np.ascontiguousarray(label).tobytes()
        p = folder / "label.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def new_store(root: Path):
    from pathology.store import SlideStore
    from server_stub.store import Store

    Store(root).close()
    return SlideStore.for_image_store(root)


def today_minus(days: float) -> str:
    t = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=days)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")
