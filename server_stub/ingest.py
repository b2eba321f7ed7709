"""Ingest DICOM files into a :class:`~server_stub.store.Store`.

What happens to one file
------------------------
1. **Recognise**: a file is DICOM if bytes 128..131 are ``DICM`` (the Part 10 preamble
   magic), whatever its name. Everything else is skipped with a reason.
2. **Deduplicate**: the SHA-256 of the whole file is looked up in the catalogue; a file
   already stored is a no-op. A different file with an already stored SOP Instance UID is
   skipped ("SOP Instance UID already stored with different content").
3. **Decode** every frame with pydicom (its JPEG, JPEG-LS, JPEG 2000, RLE and deflate
   plugins; native little/big endian). Colour is normalised to what the codestream holds:
   YBR_FULL / YBR_FULL_422 (and the JPEG 2000 YBR_RCT / YBR_ICT that the decoder
   converts) become RGB, PALETTE COLOR is expanded through its lookup table to 8-bit RGB,
   MONOCHROME1 stays MONOCHROME1 (the viewer inverts). 32-bit integer data is accepted
   only when its values fit in 16 bits; float pixel data is refused.
4. **Encode** every frame with :func:`codestream.encode.encode_frame` and, with
   ``verify=True`` (default), decode it again with :func:`codestream.encode.decode_full`
   and compare bit for bit with the decoded DICOM pixels.
5. **Store**: codestreams and packet indexes are written atomically, then the original
   file (content addressed, bit for bit), and only then the catalogue rows of the
   instance and all its frames, in one transaction. A crash at any point leaves at worst
   orphan files; the next ingest of the same file completes.

Concurrency: steps 1-4 (CPU-bound: decoding and encoding; OpenJPEG and the pydicom
plugins release the GIL) run in a small thread pool, files in flight bounded; step 5 runs
on the calling thread only, in input order, so the catalogue has a single writer.

No exception escapes for a bad file: every file ends up in exactly one of
``IngestReport.imported``, ``.duplicates`` or ``.skipped`` (with a reason and a kind).

The instance row's pixel description (SamplesPerPixel, PhotometricInterpretation,
BitsAllocated, BitsStored, PixelRepresentation) describes the pixels *as encoded* in the
codestreams (e.g. RGB after a palette or YCbCr conversion); the original values remain in
the stored header JSON and in the original file.
"""
from __future__ import annotations

import collections
import io
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .catalogue import DuplicateInstanceError
from .store import Store, sha256_hex

# Kinds of skip. NOT_DICOM and NOT_IMAGE are expected in any folder and are not errors.
NOT_DICOM = "not-dicom"
NOT_IMAGE = "not-image"
UNSUPPORTED = "unsupported"
ERROR = "error"
CONFLICT = "conflict"
BENIGN_KINDS = frozenset({NOT_DICOM, NOT_IMAGE})

CONFLICT_REASON = "SOP Instance UID already stored with different content"

#: Elements larger than this (bytes) go into the header JSON as a BulkDataURI.
BULK_DATA_THRESHOLD = 64 * 1024
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)   # Pixel / Float / Double Float Pixel Data

LogFn = Callable[[str], None]
ProgressFn = Callable[[int, int], None]


# --------------------------------------------------------------------------- report

@dataclass
class ImportedFile:
    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    frames: int
    sha256: str


@dataclass
class DuplicateFile:
    path: Path
    sha256: str
    sop_instance_uid: str | None = None


@dataclass
class SkippedFile:
    path: Path
    reason: str
    kind: str = ERROR

    @property
    def is_error(self) -> bool:
        return self.kind not in BENIGN_KINDS


@dataclass
class IngestReport:
    """Outcome of :func:`ingest_paths`: every file is in exactly one list."""

    imported: list[ImportedFile] = field(default_factory=list)
    duplicates: list[DuplicateFile] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)

    @property
    def errors(self) -> list[SkippedFile]:
        """Skipped files that were DICOM images we could not take (not benign skips)."""
        return [s for s in self.skipped if s.is_error]

    @property
    def ok(self) -> bool:
        return not self.errors

    def skipped_reason(self, path: str | Path) -> str | None:
        p = Path(path)
        for s in self.skipped:
            if s.path == p:
                return s.reason
        return None

    def summary(self) -> str:
        return (f"{len(self.imported)} imported, {len(self.duplicates)} duplicates, "
                f"{len(self.skipped)} skipped ({len(self.errors)} errors)")


class _Skip(Exception):
    """Internal: abandon this file with a reason."""

    def __init__(self, reason: str, kind: str = ERROR):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


# --------------------------------------------------------------------------- file discovery

def iter_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Files named, and files found recursively (sorted) in folders named."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for dirpath, dirs, files in os.walk(p):
                dirs.sort()
                for name in sorted(files):
                    yield Path(dirpath) / name
        else:
            yield p


def is_dicom_file(path: str | Path) -> bool:
    """True if the file has the DICOM Part 10 preamble magic (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


# --------------------------------------------------------------------------- attribute helpers

def _first(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return v[0] if len(v) else None
    return v


def _num(v: Any) -> float | None:
    try:
        v = _first(v)
        if v is None or v == "":
            return None
        f = float(v)
        return f if np.isfinite(f) else None
    except (TypeError, ValueError, IndexError):
        return None


def _int(v: Any) -> int | None:
    f = _num(v)
    try:
        return None if f is None else int(round(f))
    except (OverflowError, ValueError):
        return None


def _nums(v: Any, n: int | None = None) -> list[float] | None:
    if v is None or v == "":
        return None
    try:
        seq = list(v) if not isinstance(v, (str, bytes)) else [v]
        out = [float(x) for x in seq]
    except (TypeError, ValueError):
        return None
    if n is not None and len(out) != n:
        return None
    return out if all(np.isfinite(out)) else None


def _text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        v = v.decode("latin-1", "replace")
    if not isinstance(v, str) and (isinstance(v, (list, tuple))
                                   or type(v).__name__ == "MultiValue"):
        v = "\\".join(str(x) for x in v)
    s = str(v).strip().strip("\x00").strip()
    return s or None


def _get(ds, keyword: str) -> Any:
    """Attribute value or None, never raising on malformed values."""
    try:
        elem = ds.get(keyword)
    except Exception:  # noqa: BLE001 - malformed value in a foreign file
        return None
    if elem is None:
        return None
    return getattr(elem, "value", elem)


def _fg(ds, frame_index: int | None, seq_keyword: str, keyword: str) -> Any:
    """Value from an enhanced multi-frame functional group: the frame's own group first
    (when ``frame_index`` is given), else the shared one."""
    groups = []
    if frame_index is not None:
        per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
        if per_frame and frame_index < len(per_frame):
            groups.append(per_frame[frame_index])
    shared = _get(ds, "SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for item in groups:
        seq = _get(item, seq_keyword)
        if seq:
            v = _get(seq[0], keyword)
            if v is not None and v != "":
                return v
    return None


def _attr(ds, keyword: str, seq_keyword: str | None) -> Any:
    v = _get(ds, keyword)
    if (v is None or v == "") and seq_keyword:
        v = _fg(ds, 0, seq_keyword, keyword)
    return v


def _frame_position(ds, frame_index: int) -> list[float] | None:
    """Per-frame ImagePositionPatient of an enhanced multi-frame (own group only)."""
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
    if not per_frame or frame_index >= len(per_frame):
        return None
    seq = _get(per_frame[frame_index], "PlanePositionSequence")
    if not seq:
        return None
    return _nums(_get(seq[0], "ImagePositionPatient"), 3)


def _truncation(ds) -> str | None:
    """A reason if the dataset's last element is shorter than its declared length
    (pydicom stops quietly at the end of a truncated file)."""
    try:
        tags = list(ds.keys())
        if not tags:
            return "truncated or damaged: no data element could be read"
        elem = ds.get_item(tags[-1])
        length = getattr(elem, "length", None)
        value = getattr(elem, "value", None)
        if (isinstance(value, (bytes, bytearray)) and length is not None
                and length != 0xFFFFFFFF and len(value) < length):
            return (f"truncated: the file ends inside element {tags[-1]} ({len(value)} of "
                    f"{length} bytes present)")
    except Exception:  # noqa: BLE001 - leave it to the later checks
        return None
    return None


def _header_json(ds) -> str:
    """DICOM JSON of the dataset without its pixel data; big binary elements become a
    ``BulkDataURI`` of the form ``bulk/ggggeeee`` (resolvable against the original)."""
    for tag in _PIXEL_TAGS:
        if tag in ds:
            del ds[tag]

    def bulk(elem) -> str:
        return f"bulk/{elem.tag:08X}"

    try:
        d = ds.to_json_dict(BULK_DATA_THRESHOLD, bulk)
    except Exception:  # noqa: BLE001 - a malformed element: drop it, keep the rest
        d = ds.to_json_dict(BULK_DATA_THRESHOLD, bulk, suppress_invalid_tags=True)
    return json.dumps(d, separators=(",", ":"))


def instance_attributes(ds) -> dict[str, Any]:
    """Patient / study / series / instance attributes of a dataset for the catalogue
    (geometry, rescale and window fall back to the enhanced functional groups)."""
    a: dict[str, Any] = {
        "PatientID": _text(_get(ds, "PatientID")) or "",
        "PatientName": _text(_get(ds, "PatientName")) or "",
        "PatientBirthDate": _text(_get(ds, "PatientBirthDate")),
        "PatientSex": _text(_get(ds, "PatientSex")),
        "StudyInstanceUID": _text(_get(ds, "StudyInstanceUID")),
        "StudyDate": _text(_get(ds, "StudyDate")),
        "StudyTime": _text(_get(ds, "StudyTime")),
        "StudyDescription": _text(_get(ds, "StudyDescription")),
        "AccessionNumber": _text(_get(ds, "AccessionNumber")),
        "StudyID": _text(_get(ds, "StudyID")),
        "ReferringPhysicianName": _text(_get(ds, "ReferringPhysicianName")),
        "SeriesInstanceUID": _text(_get(ds, "SeriesInstanceUID")),
        "SeriesNumber": _int(_get(ds, "SeriesNumber")),
        "SeriesDescription": _text(_get(ds, "SeriesDescription")),
        "Modality": _text(_get(ds, "Modality")),
        "BodyPartExamined": _text(_get(ds, "BodyPartExamined")),
        "SeriesDate": _text(_get(ds, "SeriesDate")),
        "SeriesTime": _text(_get(ds, "SeriesTime")),
        "FrameOfReferenceUID": _text(_get(ds, "FrameOfReferenceUID")),
        "SOPInstanceUID": _text(_get(ds, "SOPInstanceUID")),
        "SOPClassUID": _text(_get(ds, "SOPClassUID")),
        "InstanceNumber": _int(_get(ds, "InstanceNumber")),
        "ImagePositionPatient": _nums(_attr(ds, "ImagePositionPatient", "PlanePositionSequence"), 3),
        "ImageOrientationPatient": _nums(
            _attr(ds, "ImageOrientationPatient", "PlaneOrientationSequence"), 6),
        "PixelSpacing": _nums(_attr(ds, "PixelSpacing", "PixelMeasuresSequence"), 2),
        "SliceThickness": _num(_attr(ds, "SliceThickness", "PixelMeasuresSequence")),
        "SpacingBetweenSlices": _num(_attr(ds, "SpacingBetweenSlices", "PixelMeasuresSequence")),
        "RescaleSlope": _num(_attr(ds, "RescaleSlope", "PixelValueTransformationSequence")),
        "RescaleIntercept": _num(_attr(ds, "RescaleIntercept",
                                       "PixelValueTransformationSequence")),
        "RescaleType": _text(_attr(ds, "RescaleType", "PixelValueTransformationSequence")),
        "WindowCenter": _num(_attr(ds, "WindowCenter", "FrameVOILUTSequence")),
        "WindowWidth": _num(_attr(ds, "WindowWidth", "FrameVOILUTSequence")),
    }
    if a["PixelSpacing"] is None:      # projection radiography
        a["PixelSpacing"] = _nums(_get(ds, "ImagerPixelSpacing"), 2)
    return a


# --------------------------------------------------------------------------- pixels

@dataclass
class PreparedFrame:
    """One frame as handed to the encoder, and how to describe it."""

    pixels: np.ndarray
    signed: bool
    bits_stored: int          # passed to encode_frame
    samples_per_pixel: int
    photometric: str
    bits_allocated: int


def _bits_needed(lo: int, hi: int, signed: bool) -> int:
    if signed:
        n = 1
        while not (-(1 << (n - 1)) <= lo and hi <= (1 << (n - 1)) - 1):
            n += 1
        return n
    return max(1, int(hi).bit_length())


def _palette_to_rgb8(arr: np.ndarray, ds) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    rgb = apply_color_lut(arr, ds)
    if rgb.dtype == np.uint8:
        return rgb
    rgb = rgb.astype(np.uint32)
    if not (rgb & 0xFF).any():                  # 8-bit entries stored in the high byte
        return (rgb >> 8).astype(np.uint8)
    if not (rgb % 257).any():                   # 8-bit entries scaled by 257
        return (rgb // 257).astype(np.uint8)
    if rgb.max() <= 255:
        return rgb.astype(np.uint8)
    return ((rgb * 255 + 32767) // 65535).astype(np.uint8)   # true 16-bit entries: round


def prepare_frame(arr: np.ndarray, meta: dict[str, Any], ds) -> PreparedFrame:
    """Decoded DICOM frame -> what the encoder gets. Raises ``_Skip`` when unsupported."""
    from pydicom.pixels import convert_color_space

    pi = str(meta.get("photometric_interpretation", _get(ds, "PhotometricInterpretation")))
    spp = int(meta.get("samples_per_pixel", 1))
    ba = int(meta.get("bits_allocated", _get(ds, "BitsAllocated") or 16))
    bs = int(meta.get("bits_stored", _get(ds, "BitsStored") or ba))
    pr = int(meta.get("pixel_representation", _get(ds, "PixelRepresentation") or 0))
    if arr.dtype.kind == "f":
        raise _Skip("floating point pixel data not supported", UNSUPPORTED)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)

    if pi == "PALETTE COLOR":
        if spp != 1:
            raise _Skip(f"PALETTE COLOR with SamplesPerPixel {spp} not supported", UNSUPPORTED)
        try:
            rgb = _palette_to_rgb8(arr, ds)
        except Exception as e:  # noqa: BLE001
            raise _Skip(f"cannot apply the palette colour lookup table: "
                        f"{type(e).__name__}: {e}", ERROR) from None
        return PreparedFrame(np.ascontiguousarray(rgb), False, 8, 3, "RGB", 8)

    if spp == 3:
        if pi in ("YBR_FULL", "YBR_FULL_422"):
            arr = convert_color_space(arr, pi, "RGB")
            pi = "RGB"
        if pi != "RGB":
            raise _Skip(f"colour PhotometricInterpretation {pi} not supported", UNSUPPORTED)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise _Skip(f"unexpected colour frame shape {arr.shape}", ERROR)
        if arr.dtype.kind not in "ui":
            raise _Skip(f"colour samples of type {arr.dtype} not supported", UNSUPPORTED)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0:
            raise _Skip("signed colour samples not supported", UNSUPPORTED)
        if hi > 65535:
            raise _Skip(f"BitsAllocated {ba} not supported: colour values need "
                        f"{_bits_needed(lo, hi, False)} bits (at most 16 are supported)",
                        UNSUPPORTED)
        if arr.dtype != np.uint8 and hi <= 255 and bs <= 8:
            arr = arr.astype(np.uint8)
        elif arr.dtype not in (np.uint8, np.uint16):
            arr = arr.astype(np.uint16) if hi > 255 else arr.astype(np.uint8)
        bits = 8 if arr.dtype == np.uint8 else max(min(bs, 16), _bits_needed(0, hi, False))
        return PreparedFrame(np.ascontiguousarray(arr), False, bits, 3, "RGB",
                             8 if arr.dtype == np.uint8 else 16)

    if spp != 1:
        raise _Skip(f"SamplesPerPixel {spp} not supported", UNSUPPORTED)
    if pi not in ("MONOCHROME1", "MONOCHROME2"):
        raise _Skip(f"PhotometricInterpretation {pi} with one sample not supported",
                    UNSUPPORTED)
    if arr.ndim != 2:
        raise _Skip(f"unexpected frame shape {arr.shape}", ERROR)
    if arr.dtype.kind not in "ui":
        raise _Skip(f"pixel type {arr.dtype} not supported", UNSUPPORTED)
    signed = pr == 1 or arr.dtype.kind == "i"
    lo, hi = int(arr.min()), int(arr.max())
    need = _bits_needed(lo, hi, signed)
    if need > 16:
        raise _Skip(f"BitsAllocated {ba} not supported: pixel values need {need} bits "
                    "(at most 16 are supported)", UNSUPPORTED)
    bits = max(1, min(bs, 16))
    if need > bits:        # values outside BitsStored (bogus header or high-bit overlays)
        bits = need
    if arr.dtype.itemsize > 2:
        arr = arr.astype(np.int16 if signed else np.uint16)
        ba = 16
    return PreparedFrame(np.ascontiguousarray(arr), signed, bits, 1, pi, ba)


def _iter_frames(ds) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """(array, pixel metadata) per frame, as pydicom decodes it (YCbCr -> RGB)."""
    from pydicom.pixels import as_pixel_options, get_decoder

    tsyntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise NotImplementedError(
            "Unable to decode the pixel data as a (0002,0010) 'Transfer Syntax UID' "
            f"value of '{getattr(tsyntax, 'name', tsyntax)}' is not supported") from None
    opts = as_pixel_options(ds)
    yield from decoder.iter_array(ds, validate=True, raw=False, **opts)


# --------------------------------------------------------------------------- per file work

@dataclass
class _EncodedFrame:
    codestream: bytes
    index_json: bytes
    offset: int
    numres: int
    nlayers: int
    position: list[float] | None


@dataclass
class _Prepared:
    path: Path
    data: bytes
    sha256: str
    attrs: dict[str, Any]
    frames: list[_EncodedFrame]


def _analyse(path: Path, store: Store, verify: bool) -> _Prepared | DuplicateFile | SkippedFile:
    """Steps 1-4 for one file (runs in a worker thread; reads the catalogue only)."""
    try:
        return _analyse_inner(path, store, verify)
    except _Skip as s:
        return SkippedFile(path, s.reason, s.kind)
    except MemoryError:
        return SkippedFile(path, "out of memory while decoding", ERROR)
    except Exception as e:  # noqa: BLE001 - a bad file must never stop an ingest
        return SkippedFile(path, f"unexpected error: {type(e).__name__}: {e}", ERROR)


def _analyse_inner(path: Path, store: Store, verify: bool) -> _Prepared | DuplicateFile:
    import pydicom
    from pydicom.uid import UID

    from codestream.encode import decode_full, encode_frame

    try:
        with open(path, "rb") as f:
            head = f.read(132)
            if len(head) < 132:
                raise _Skip("not DICOM: shorter than the 128-byte preamble and 'DICM' "
                            "marker", NOT_DICOM)
            if head[128:132] != b"DICM":
                raise _Skip("not DICOM: no 'DICM' marker at byte 128", NOT_DICOM)
            data = head + f.read()
    except OSError as e:
        raise _Skip(f"cannot read file: {e}", ERROR) from None

    sha = sha256_hex(data)
    cat = store.catalogue
    if cat.has_original(sha):
        return DuplicateFile(path, sha)

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001
        raise _Skip(f"unreadable DICOM: {type(e).__name__}: {e}", ERROR) from None

    truncated = _truncation(ds)
    if truncated:
        raise _Skip(truncated, ERROR)
    attrs = instance_attributes(ds)
    if not any(tag in ds for tag in _PIXEL_TAGS):
        sop_class = attrs["SOPClassUID"]
        label = UID(sop_class).name if sop_class else "no SOP Class UID"
        if ("Rows" in ds and "Columns" in ds) or label.endswith("Image Storage"):
            raise _Skip(f"truncated or damaged: an image ({label}) without a Pixel Data "
                        "element", ERROR)
        raise _Skip(f"no pixel data (not an image: {label})", NOT_IMAGE)
    if 0x7FE00010 not in ds:
        raise _Skip("floating point pixel data not supported", UNSUPPORTED)
    for key in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        if not attrs[key]:
            raise _Skip(f"missing {key}", ERROR)
    existing = cat.find_instance(attrs["SOPInstanceUID"])
    if existing is not None:
        if existing["original_sha256"] == sha:
            return DuplicateFile(path, sha, attrs["SOPInstanceUID"])
        raise _Skip(CONFLICT_REASON, CONFLICT)

    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    ts_label = getattr(ts, "name", None) or str(ts)
    attrs["TransferSyntaxUID"] = str(ts) if ts else None

    prepared: list[PreparedFrame] = []
    positions: list[list[float] | None] = []
    try:
        for i, (arr, meta) in enumerate(_iter_frames(ds)):
            prepared.append(prepare_frame(arr, meta, ds))
            positions.append(_frame_position(ds, i))
    except _Skip:
        raise
    except Exception as e:  # noqa: BLE001 - report pydicom's own words
        raise _Skip(f"cannot decode pixel data ({ts_label}): {type(e).__name__}: {e}",
                    ERROR) from None
    if not prepared:
        raise _Skip("pixel data holds no frame", ERROR)

    encoded: list[_EncodedFrame] = []
    for n, (pf, pos) in enumerate(zip(prepared, positions), start=1):
        try:
            ef = encode_frame(pf.pixels, signed=pf.signed, bits_stored=pf.bits_stored)
        except Exception as e:  # noqa: BLE001
            raise _Skip(f"encoding failed for frame {n}: {type(e).__name__}: {e}",
                        ERROR) from None
        if verify:
            try:
                back = decode_full(ef.codestream, ef.offset, pf.signed)
            except Exception as e:  # noqa: BLE001
                raise _Skip(f"lossless verification failed for frame {n}: cannot decode "
                            f"the codestream: {type(e).__name__}: {e}", ERROR) from None
            if back.shape != pf.pixels.shape or not np.array_equal(back, pf.pixels):
                bad = (int(np.count_nonzero(back != pf.pixels))
                       if back.shape == pf.pixels.shape else -1)
                what = (f"{bad} samples differ" if bad >= 0
                        else f"shape {back.shape} != {pf.pixels.shape}")
                raise _Skip(f"lossless verification failed for frame {n}: {what}", ERROR)
        encoded.append(_EncodedFrame(
            codestream=ef.codestream, index_json=ef.index.to_json().encode("utf-8"),
            offset=int(ef.offset), numres=int(ef.index.numres), nlayers=int(ef.index.nlayers),
            position=pos))

    first = prepared[0]
    attrs.update({
        "NumberOfFrames": len(prepared),
        "Rows": int(first.pixels.shape[0]),
        "Columns": int(first.pixels.shape[1]),
        "SamplesPerPixel": first.samples_per_pixel,
        "PhotometricInterpretation": first.photometric,
        "BitsAllocated": first.bits_allocated,
        "BitsStored": (_int(_get(ds, "BitsStored")) if first.samples_per_pixel == 1
                       and first.bits_allocated == _int(_get(ds, "BitsAllocated"))
                       else first.bits_stored),
        "PixelRepresentation": 1 if first.signed else 0,
        "signed": first.signed,
        "bits_stored": max(p.bits_stored for p in prepared),
    })
    del prepared
    attrs["header_json"] = _header_json(ds)
    return _Prepared(path, data, sha, attrs, encoded)


def _commit(p: _Prepared, store: Store) -> ImportedFile | DuplicateFile | SkippedFile:
    """Step 5 (calling thread only): files first, then the rows in one transaction."""
    cat = store.catalogue
    a = p.attrs
    sop = a["SOPInstanceUID"]
    if cat.has_original(p.sha256):
        return DuplicateFile(p.path, p.sha256, sop)
    existing = cat.find_instance(sop)
    if existing is not None:
        if existing["original_sha256"] == p.sha256:
            return DuplicateFile(p.path, p.sha256, sop)
        return SkippedFile(p.path, CONFLICT_REASON, CONFLICT)
    try:
        frames = []
        for n, ef in enumerate(p.frames, start=1):
            cs_rel, idx_rel = store.codestream_paths(a["SeriesInstanceUID"], sop, n)
            cs_sha = store.atomic_write(cs_rel, ef.codestream)
            idx_sha = store.atomic_write(idx_rel, ef.index_json)
            frames.append({
                "frame": n, "codestream_relpath": cs_rel, "codestream_sha256": cs_sha,
                "codestream_size": len(ef.codestream), "index_relpath": idx_rel,
                "index_sha256": idx_sha, "index_size": len(ef.index_json),
                "offset": ef.offset, "numres": ef.numres, "nlayers": ef.nlayers,
                "ImagePositionPatient": ef.position,
            })
        orig_rel, orig_sha = store.put_original(p.data)
        a.update({"original_relpath": orig_rel, "original_sha256": orig_sha,
                  "original_size": len(p.data)})
        cat.add_instance(a, frames)
    except DuplicateInstanceError as e:        # another process got there first
        if e.original_sha256 == p.sha256:
            return DuplicateFile(p.path, p.sha256, sop)
        return SkippedFile(p.path, CONFLICT_REASON, CONFLICT)
    except OSError as e:
        return SkippedFile(p.path, f"cannot write to the store: {e}", ERROR)
    return ImportedFile(p.path, sop, a["SeriesInstanceUID"], a["StudyInstanceUID"],
                        len(frames), p.sha256)


# --------------------------------------------------------------------------- entry point

def ingest_paths(paths: Iterable[str | Path], store: Store, log: LogFn | None = None,
                 progress: ProgressFn | None = None, *, verify: bool = True,
                 workers: int = 2) -> IngestReport:
    """Ingest files and folders (recursively) into ``store``.

    ``log(message)`` is called once per file with the outcome; ``progress(done, total)``
    after each file. ``verify`` decodes every new codestream and compares it bit for bit
    with the source pixels. ``workers`` threads decode and encode; catalogue writes stay
    on the calling thread. Never raises for a bad input file.
    """
    files = list(iter_files(paths))
    total = len(files)
    report = IngestReport()
    emit = log or (lambda _msg: None)

    def record(result: ImportedFile | DuplicateFile | SkippedFile) -> None:
        if isinstance(result, ImportedFile):
            report.imported.append(result)
            emit(f"imported  {result.path} ({result.frames} frame"
                 f"{'s' if result.frames != 1 else ''}, SOP {result.sop_instance_uid})")
        elif isinstance(result, DuplicateFile):
            report.duplicates.append(result)
            emit(f"duplicate {result.path} (already stored)")
        else:
            report.skipped.append(result)
            emit(f"skipped   {result.path}: {result.reason}")
        if progress is not None:
            progress(len(report.imported) + len(report.duplicates) + len(report.skipped),
                     total)

    def finish(result: _Prepared | DuplicateFile | SkippedFile) -> None:
        if isinstance(result, _Prepared):
            try:
                result = _commit(result, store)
            except Exception as e:  # noqa: BLE001 - e.g. catalogue locked for too long
                result = SkippedFile(result.path,
                                     f"cannot store: {type(e).__name__}: {e}", ERROR)
        record(result)

    workers = max(1, int(workers))
    window = 2 * workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest") as pool:
        pending: collections.deque[Future] = collections.deque()
        for path in files:
            pending.append(pool.submit(_analyse, path, store, verify))
            while len(pending) >= window:
                finish(pending.popleft().result())
        while pending:
            finish(pending.popleft().result())
    return report
