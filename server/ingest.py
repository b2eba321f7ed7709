"""Ingest DICOM files into a :class:`~server.store.Store`.

What happens to one file
------------------------
1. **Recognise**: a file is DICOM if bytes 128..131 are ``DICM`` (the Part 10 preamble
   magic), whatever its name, or if it has no preamble but starts with a plausible group
   0002 / 0008 element and pydicom reads it with ``force=True`` (old ACR-NEMA style files
   such as pydicom-data's ``OT-PAL-8-face.dcm``; the transfer syntax is the one pydicom
   detects). Everything else is skipped with a reason.
2. **Deduplicate**: the SHA-256 of the whole file is looked up in the catalogue; a file
   already stored is a no-op.
3. **Check the header** (nothing decoded yet; :func:`check_header`): the UIDs that key
   the store (study, series, SOP instance, SOP class, frame of reference) are digits and
   dots, at most 64 characters, after stripping one trailing padding byte (a site flag,
   ``accept_nonstandard_uids``, lets other printable UIDs in); Rows, Columns,
   NumberOfFrames, SamplesPerPixel and BitsAllocated are sane and within the site limits
   (:class:`IngestLimits`: frames, pixels per frame, decoded bytes per instance: the
   decompression-bomb guard); native pixel data is exactly Rows x Columns x frames x
   samples x bits long (one padding byte allowed), encapsulated pixel data has a basic or
   extended offset table of one entry per frame, one codestream start per frame whose
   JPEG SOF / JPEG 2000 SIZ size is the header's, RLE segments that decode (counted, not
   decoded) to Rows x Columns bytes; a deflated dataset inflates to no more than its
   header accounts for (counted before pydicom inflates it). Anything else is refused
   with the reason; it is never reinterpreted.
4. **Flag impossible values** (:func:`value_flags`): NaN / infinite / zero / negative
   spacing or thickness, non-finite position, an orientation that is not two orthonormal
   vectors, a rescale slope of 0 or NaN, a window width <= 0. The instance is stored (the
   original is kept bit for bit) with its flags in ``instance.geometry_flags``; the
   catalogue gets no value for the bad geometry and window attributes (the viewer
   refuses mm measurements and MPR on a flagged instance).
5. **Conflict**: a file whose SOP Instance UID is already stored with other content is
   neither stored over the other nor dropped: it goes to the quarantine
   (:mod:`server.quarantine`) bit for bit with the reason, the stored instance it
   conflicts with and what differs; the audit log records it; ``medview-server
   quarantine`` resolves it.
6. **Decode** every frame with pydicom (its JPEG, JPEG-LS, JPEG 2000, RLE and deflate
   plugins; native little/big endian). Colour is normalised to what the codestream holds:
   YBR_FULL / YBR_FULL_422 (and the JPEG 2000 YBR_RCT / YBR_ICT that the decoder
   converts) become RGB, PALETTE COLOR is expanded through its lookup table to 8-bit RGB,
   MONOCHROME1 stays MONOCHROME1 (the viewer inverts). 32-bit integer data is accepted
   only when its values fit in 16 bits; float pixel data is refused.
7. **Encode** every frame with :func:`codestream.encode.encode_frame` and, with
   ``verify=True`` (default), decode it again with :func:`codestream.encode.decode_full`
   and compare bit for bit with the decoded DICOM pixels.
8. **Store**: codestreams and packet indexes are written atomically, then the original
   file (content addressed, bit for bit), and only then the catalogue rows of the
   instance and all its frames, in one transaction. A crash at any point leaves at worst
   orphan files; the next ingest of the same file completes.

Concurrency: steps 1-7 (CPU-bound: decoding and encoding; OpenJPEG and the pydicom
plugins release the GIL) run in a small thread pool, files in flight bounded; step 8 and
the quarantine writes run on the calling thread only, in input order, so the catalogue
has a single writer (and the conflict check is repeated there, so two files of one
batch with the same UID are caught too).

No exception escapes for a bad file: every file ends up in exactly one of
``IngestReport.imported``, ``.duplicates``, ``.quarantined`` or ``.skipped`` (with a
reason and a kind).

The instance row's pixel description (SamplesPerPixel, PhotometricInterpretation,
BitsAllocated, BitsStored, PixelRepresentation) describes the pixels *as encoded* in the
codestreams (e.g. RGB after a palette or YCbCr conversion); the original values remain in
the stored header JSON and in the original file.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from imaging.dicom import (attr, first, get, group_value, has_preamble, int_value,  # noqa: F401
                           nums, num, plausible_dataset_start, text)

from .catalogue import DuplicateInstanceError
from .store import Store, sha256_hex

# Kinds of skip. NOT_DICOM and NOT_IMAGE are expected in any folder and are not errors.
NOT_DICOM = "not-dicom"
NOT_IMAGE = "not-image"
UNSUPPORTED = "unsupported"
ERROR = "error"
CONFLICT = "conflict"
REFUSED = "refused"          # the header contradicts itself or a site limit
BENIGN_KINDS = frozenset({NOT_DICOM, NOT_IMAGE})

from .quarantine import CONFLICT_REASON  # noqa: E402  (one wording everywhere)

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
    flags: list[str] = field(default_factory=list)   # impossible values (value_flags)


@dataclass
class QuarantinedFile:
    """A file whose SOP Instance UID is already stored with other content: kept in the
    quarantine (entry ``quarantine_id``), not stored as an instance."""

    path: Path
    sop_instance_uid: str
    sha256: str
    reason: str
    quarantine_id: int
    stored_sha256: str | None = None


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
    quarantined: list[QuarantinedFile] = field(default_factory=list)

    @property
    def flagged(self) -> list[ImportedFile]:
        """Imported files stored with impossible values flagged."""
        return [f for f in self.imported if f.flags]

    def merge(self, other: "IngestReport") -> None:
        """Add another report's files (e.g. one batch of a larger import)."""
        self.imported += other.imported
        self.duplicates += other.duplicates
        self.skipped += other.skipped
        self.quarantined += other.quarantined

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
        text = (f"{len(self.imported)} imported, {len(self.duplicates)} duplicates, "
                f"{len(self.skipped)} skipped ({len(self.errors)} errors)")
        if self.quarantined:
            text += (f", {len(self.quarantined)} quarantined (same SOP Instance UID as a "
                     "stored instance, other content: see `medview-server quarantine list`)")
        if self.flagged:
            text += f", {len(self.flagged)} stored with impossible values flagged"
        return text


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


# --------------------------------------------------------------------------- attribute helpers
# (imaging.dicom: the one set of DICOM header helpers, shared with the viewer)
_first, _num, _int, _nums, _text, _get = first, num, int_value, nums, text, get
_fg, _attr = group_value, attr
_plausible_dataset_start = plausible_dataset_start



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


# --------------------------------------------------------------------------- site limits

@dataclass(frozen=True)
class IngestLimits:
    """Site limits checked from the header before anything is decoded.

    The defaults pass real CT and MR series, US cine loops (thousands of frames),
    mammography (about 4k x 5k) and tiled whole-slide images (up to a million tiles);
    a site lowers them in the ``[ingest]`` table of ``STORE/policy.toml``::

        [ingest]
        max_frames = 1000000
        max_pixels_per_frame = 268435456      # 16384 x 16384
        max_decoded_bytes = 68719476736       # 64 GiB per instance
        accept_nonstandard_uids = false
    """

    max_frames: int = 1_000_000
    max_pixels_per_frame: int = 1 << 28
    max_decoded_bytes: int = 1 << 36
    accept_nonstandard_uids: bool = False

    @classmethod
    def for_store(cls, root: str | Path, **override: Any) -> "IngestLimits":
        """The limits of a store: defaults, then ``STORE/policy.toml`` [ingest], then
        ``override`` (values that are None are ignored). Raises ValueError on a bad
        value."""
        import tomllib

        values: dict[str, Any] = {}
        path = Path(root) / "policy.toml"
        if path.is_file():
            try:
                with open(path, "rb") as f:
                    values.update((tomllib.load(f).get("ingest") or {}))
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise ValueError(f"{path}: {e}") from None
        values.update({k: v for k, v in override.items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"[ingest] unknown key(s): {', '.join(sorted(unknown))}")
        for k, v in values.items():
            if k == "accept_nonstandard_uids":
                if not isinstance(v, bool):
                    raise ValueError(f"[ingest] {k} must be true or false")
            elif not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"[ingest] {k} must be a positive integer, got {v!r}")
        return cls(**values)


# --------------------------------------------------------------------------- recognition

def _read_preambleless(data: bytes):
    """pydicom's reading of a file without preamble, with the transfer syntax it
    detected written into the file meta (so the pixel decoders know it)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    if len(ds) == 0:
        raise _Skip("not DICOM: no preamble and no data element could be read", NOT_DICOM)
    if 0x00080018 not in ds:
        raise _Skip("not DICOM: no preamble and no SOP Instance UID", NOT_DICOM)
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        if implicit is None:
            raise _Skip("not DICOM: no preamble and no recognisable encoding", NOT_DICOM)
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        elem = ds.get_item(0x7FE00010) if 0x7FE00010 in ds else None
        if elem is not None and getattr(elem, "length", 0) == 0xFFFFFFFF:
            raise _Skip("encapsulated pixel data without a file meta header naming its "
                        "transfer syntax", REFUSED)
    return ds


# --------------------------------------------------------------------------- header checks

_UID_CHECKED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
                "FrameOfReferenceUID")
_UID_STRICT_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UID_LAX_BAD = re.compile(r"[\x00-\x20\x7f/\\?#%]")


def _raw_text(ds, keyword: str) -> str | None:
    """An element's value as the file holds it (before pydicom strips padding)."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return None
    try:
        elem = ds.get_item(tag)
    except Exception:  # noqa: BLE001
        return None
    v = getattr(elem, "value", None)
    if v is None:
        return None
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("latin-1")
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return "\\".join(str(x) for x in v)
    return str(v)


def uid_problem(raw: str, *, lax: bool = False) -> str | None:
    """Why a UID (as stored, with at most one trailing NUL or space of padding) is not
    acceptable, or None. ``lax`` accepts any printable UID up to 64 characters that is
    safe in a URL path segment."""
    uid = raw[:-1] if raw[-1:] in ("\x00", " ") else raw
    if not uid:
        return "is empty"
    if len(uid) > 64:
        return f"is {len(uid)} characters long (at most 64)"
    if lax:
        if _UID_LAX_BAD.search(uid):
            return f"holds a control character, a space or one of / \\ ? # % ({uid!r})"
        return None
    if not _UID_STRICT_RE.match(uid):
        bad = sorted({c for c in uid if c not in "0123456789."})
        if bad:
            return (f"holds characters other than digits and dots "
                    f"({', '.join(repr(c) for c in bad)}): {uid!r}")
        return f"is not dot-separated numbers: {uid!r}"
    return None


def _check_uids(ds, limits: IngestLimits) -> None:
    for kw in _UID_CHECKED:
        raw = _raw_text(ds, kw)
        if raw is None or (raw == "" and kw == "FrameOfReferenceUID"):
            continue
        problem = uid_problem(raw, lax=limits.accept_nonstandard_uids)
        if problem:
            raise _Skip(f"invalid {kw}: {problem} (a site may accept such UIDs with "
                        "[ingest] accept_nonstandard_uids)", REFUSED)


def _header_int(ds, keyword: str, default: int | None = None) -> int:
    """A required integer attribute of the pixel description, or a refusal."""
    raw = _get(ds, keyword)
    if raw is None or raw == "":
        if default is not None:
            return default
        raise _Skip(f"pixel description incomplete: no {keyword}", REFUSED)
    try:
        v = _first(raw)
        f = float(v)
        if not np.isfinite(f) or f != int(f):
            raise ValueError
        return int(f)
    except (TypeError, ValueError, OverflowError, IndexError):
        raise _Skip(f"{keyword} is not an integer: {raw!r}", REFUSED) from None


def check_header(ds, limits: IngestLimits) -> dict[str, int]:
    """Refuse (``_Skip``) a header whose pixel description contradicts its pixel data or
    exceeds the site limits; nothing is decoded. Returns rows, columns, frames, samples,
    bits_allocated."""
    rows, cols, spp, ba, frames = _pixel_description(ds)
    _check_limits(rows, cols, spp, ba, frames, limits)
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    elem = ds.get_item(0x7FE00010)
    value = getattr(elem, "value", None)
    undefined = getattr(elem, "length", None) == 0xFFFFFFFF
    encapsulated = bool(ts is not None and getattr(ts, "is_encapsulated", False))
    if value is None:
        raise _Skip("Pixel Data element is empty", REFUSED)
    what = (f"Rows {rows} x Columns {cols} x {frames} frame{'s' if frames != 1 else ''} x "
            f"{spp} sample{'s' if spp != 1 else ''} x {ba} bits")
    if not encapsulated:
        _check_native_pixels(ds, value, undefined, ts, what)
    else:
        _check_encapsulated_pixels(ds, value, ts, rows, cols, spp, ba, frames, what)
    return {"rows": rows, "columns": cols, "frames": frames, "samples": spp,
            "bits_allocated": ba}


def _pixel_description(ds) -> tuple[int, int, int, int, int]:
    """(Rows, Columns, SamplesPerPixel, BitsAllocated, frames) of a header, each
    possible (``_Skip`` otherwise)."""
    rows = _header_int(ds, "Rows")
    cols = _header_int(ds, "Columns")
    spp = _header_int(ds, "SamplesPerPixel", 1)
    ba = _header_int(ds, "BitsAllocated")
    nf_raw = _get(ds, "NumberOfFrames")
    frames = 1 if nf_raw is None or str(nf_raw).strip() == "" else _header_int(
        ds, "NumberOfFrames")
    for kw, v in (("Rows", rows), ("Columns", cols), ("NumberOfFrames", frames),
                  ("SamplesPerPixel", spp)):
        if v < 1:
            raise _Skip(f"{kw} is {v}: an image needs at least 1", REFUSED)
    if spp not in (1, 3):
        raise _Skip(f"SamplesPerPixel {spp} not supported", UNSUPPORTED)
    if ba != 1 and (ba % 8 or ba > 64):
        raise _Skip(f"BitsAllocated {ba} is not 1 or a multiple of 8 up to 64", REFUSED)
    bs = _get(ds, "BitsStored")
    if bs not in (None, "") and _header_int(ds, "BitsStored") > ba:
        raise _Skip(f"BitsStored {bs} is more than BitsAllocated {ba}", REFUSED)
    return rows, cols, spp, ba, frames


def _check_limits(rows: int, cols: int, spp: int, ba: int, frames: int,
                  limits: IngestLimits) -> None:
    """The site limits (frames, pixels per frame, decoded bytes), before any decoding."""
    pixels = rows * cols
    decoded = pixels * spp * max(1, ba // 8) * frames
    if frames > limits.max_frames:
        raise _Skip(f"too many frames: NumberOfFrames {frames} exceeds the site limit "
                    f"max_frames = {limits.max_frames} (not decoded)", REFUSED)
    if pixels > limits.max_pixels_per_frame:
        raise _Skip(f"frames too large: {rows} x {cols} = {pixels} pixels exceeds the site "
                    f"limit max_pixels_per_frame = {limits.max_pixels_per_frame} "
                    "(not decoded)", REFUSED)
    if decoded > limits.max_decoded_bytes:
        raise _Skip(f"too much pixel data: {decoded} decoded bytes exceeds the site limit "
                    f"max_decoded_bytes = {limits.max_decoded_bytes} (not decoded)", REFUSED)


def _check_native_pixels(ds, value, undefined: bool, ts, what: str) -> None:
    """Native Pixel Data holds exactly what the header describes (one pad byte allowed)."""
    if undefined:
        raise _Skip("encapsulated (undefined length) Pixel Data under the native "
                    f"transfer syntax {ts}", REFUSED)
    from pydicom.pixels.utils import get_expected_length

    try:
        expected = int(get_expected_length(ds, "bytes"))
    except Exception as e:  # noqa: BLE001
        raise _Skip(f"cannot size the pixel data: {type(e).__name__}: {e}",
                    REFUSED) from None
    have = len(value)
    if have != expected and not (expected % 2 == 1 and have == expected + 1):
        raise _Skip(f"geometry does not match the pixel data: {what} = {expected} "
                    f"bytes, Pixel Data holds {have} bytes (refused, not "
                    "reinterpreted)", REFUSED)


def _check_encapsulated_pixels(ds, value, ts, rows: int, cols: int, spp: int, ba: int,
                               frames: int, what: str) -> None:
    """Encapsulated Pixel Data: one offset table entry, one fragment and one codestream
    start per frame, RLE segments of the right size, codestreams of the header's size."""
    from pydicom.encaps import parse_basic_offsets, parse_fragments

    if not (isinstance(value, (bytes, bytearray)) and value[:4] == b"\xfe\xff\x00\xe0"):
        raise _Skip(f"transfer syntax {ts.name} needs encapsulated Pixel Data; the "
                    "element is not (refused, not reinterpreted)", REFUSED)
    try:
        buf = io.BytesIO(value)
        bot = parse_basic_offsets(buf)
        nfrag, _offsets = parse_fragments(buf)
    except Exception as e:  # noqa: BLE001
        raise _Skip(f"encapsulated Pixel Data is damaged: {type(e).__name__}: {e}",
                    REFUSED) from None
    eot = _get(ds, "ExtendedOffsetTable")
    if eot:
        if len(eot) // 8 != frames:
            raise _Skip(f"geometry does not match the pixel data: {what}, the extended "
                        f"offset table lists {len(eot) // 8} frames", REFUSED)
    elif bot and len(bot) != frames:
        raise _Skip(f"geometry does not match the pixel data: {what}, the basic offset "
                    f"table lists {len(bot)} frames", REFUSED)
    if nfrag < frames:
        raise _Skip(f"geometry does not match the pixel data: {what}, the encapsulated "
                    f"Pixel Data holds {nfrag} fragment{'s' if nfrag != 1 else ''}",
                    REFUSED)
    starts = _frame_starts(value, _offsets, str(ts))
    if starts is not None and starts != frames:
        raise _Skip(f"geometry does not match the pixel data: {what}, the encapsulated "
                    f"Pixel Data holds {starts} compressed frame"
                    f"{'s' if starts != 1 else ''}", REFUSED)
    if str(ts) == _RLE:
        _check_rle(value, _offsets, rows * cols, spp * max(1, ba // 8), what)
    for n, o in enumerate(_offsets, start=1):
        size = _codestream_size(value, o)
        if size is not None and size != (rows, cols):
            raise _Skip(f"geometry does not match the pixel data: {what}, fragment {n} "
                        f"holds a {size[0]} x {size[1]} codestream (refused before "
                        "decoding)", REFUSED)


_RLE = "1.2.840.10008.1.2.5"
_J2K_PREFIX = "1.2.840.10008.1.2.4.9"        # JPEG 2000 (90-93) and HTJ2K (201-203: below)
_JPEG_PREFIXES = ("1.2.840.10008.1.2.4.5", "1.2.840.10008.1.2.4.7", "1.2.840.10008.1.2.4.8")


def _frame_starts(value: bytes, offsets: list[int], ts: str) -> int | None:
    """How many compressed frames the fragments hold, counted by their start (an RLE
    header per fragment; a JPEG / JPEG-LS SOI or JPEG 2000 SOC + SIZ opening a fragment),
    or None for a transfer syntax whose frames this does not recognise."""
    heads = [value[o + 8:o + 12] for o in offsets]
    if ts == _RLE:
        return len(heads)
    if ts.startswith(_J2K_PREFIX) or ts.startswith("1.2.840.10008.1.2.4.20"):
        return sum(1 for h in heads if h == b"\xff\x4f\xff\x51" or h == b"\x00\x00\x00\x0c")
    if ts.startswith(_JPEG_PREFIXES):
        return sum(1 for h in heads if h[:3] == b"\xff\xd8\xff")
    return None


def _rle_segment_length(seg: bytes) -> int:
    """Bytes a PackBits segment (DICOM RLE, PS3.5 G.3) decodes to, counted without
    decoding."""
    n, i, end = 0, 0, len(seg)
    while i < end:
        h = seg[i]
        if h < 128:                  # literal run of h + 1 bytes
            n += h + 1
            i += h + 2
        elif h > 128:                # replicate the next byte 257 - h times
            n += 257 - h
            i += 2
        else:
            i += 1
    return n


def _check_rle(value: bytes, offsets: list[int], plane: int, segments: int,
               what: str) -> None:
    """Every RLE frame has the header's number of segments, each decoding to Rows x
    Columns bytes (one byte of padding allowed): checked before any decoding."""
    for n, o in enumerate(offsets, start=1):
        length = int.from_bytes(value[o + 4:o + 8], "little")
        frame = value[o + 8:o + 8 + length]
        if len(frame) < 64:
            raise _Skip(f"RLE frame {n} has no complete header", REFUSED)
        count = int.from_bytes(frame[0:4], "little")
        starts = [int.from_bytes(frame[4 + 4 * k:8 + 4 * k], "little") for k in range(count)]
        if count != segments or count > 15:
            raise _Skip(f"geometry does not match the pixel data: {what}, RLE frame {n} "
                        f"holds {count} segments, {segments} expected", REFUSED)
        bounds = starts + [len(frame)]
        for k in range(count):
            if not 64 <= bounds[k] <= bounds[k + 1] <= len(frame):
                raise _Skip(f"RLE frame {n}: segment {k + 1} offsets are damaged", REFUSED)
            got = _rle_segment_length(frame[bounds[k]:bounds[k + 1]])
            if got not in (plane, plane + 1):
                raise _Skip(f"geometry does not match the pixel data: {what}, RLE frame {n} "
                            f"segment {k + 1} decodes to {got} bytes, not {plane} (refused "
                            "before decoding)", REFUSED)


def _codestream_size(value: bytes, offset: int) -> tuple[int, int] | None:
    """(rows, columns) a JPEG / JPEG-LS (SOFn) or JPEG 2000 (SIZ) codestream opening the
    fragment at ``offset`` declares, read from its first markers; None when the fragment
    does not start a codestream this recognises."""
    length = int.from_bytes(value[offset + 4:offset + 8], "little")
    data = value[offset + 8:offset + 8 + min(length, 1 << 16)]
    if data[:4] == b"\xff\x4f\xff\x51" and len(data) >= 24:
        x, y = int.from_bytes(data[8:12], "big"), int.from_bytes(data[12:16], "big")
        xo, yo = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return (y - yo, x - xo)
    if data[:3] != b"\xff\xd8\xff":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:                 # fill byte
            i += 1
            continue
        seg = int.from_bytes(data[i + 2:i + 4], "big")
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:
            if i + 9 > len(data):
                return None
            return (int.from_bytes(data[i + 5:i + 7], "big"),
                    int.from_bytes(data[i + 7:i + 9], "big"))
        if marker == 0xDA:                 # scan before any frame header
            return None
        i += 2 + seg
    return None


# --------------------------------------------------------------------------- impossible values

_GEOMETRY_KEYWORDS = ("PixelSpacing", "ImagerPixelSpacing", "SliceThickness",
                      "SpacingBetweenSlices", "ImagePositionPatient",
                      "ImageOrientationPatient")


def _raw_floats(v: Any) -> list[float] | None:
    """Every value as a float (NaN and infinities kept), [] when unreadable, None when
    absent."""
    if v is None or v == "":
        return None
    seq = list(v) if (isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue") \
        else [v]
    try:
        return [float(x) for x in seq]
    except (TypeError, ValueError, OverflowError):
        return []


def value_flags(ds) -> list[str]:
    """Impossible values of the header, one sentence each (empty when all is well). The
    geometry ones start with the attribute keyword (see :data:`_GEOMETRY_KEYWORDS`)."""
    flags: list[str] = []
    items = [("", ds)]
    shared = _get(ds, "SharedFunctionalGroupsSequence")
    if shared:
        items.append(("shared functional groups: ", shared[0]))
    per_frame = _get(ds, "PerFrameFunctionalGroupsSequence")
    for i, item in enumerate(per_frame or ()):
        items.append((f"frame {i + 1}: ", item))

    def values(item, keyword, seq_keyword):
        out = [_raw_floats(_get(item, keyword))]
        if seq_keyword and item is not ds:
            seq = _get(item, seq_keyword)
            if seq:
                out.append(_raw_floats(_get(seq[0], keyword)))
        return [v for v in out if v is not None]

    checks = (("PixelSpacing", "PixelMeasuresSequence", 2, "spacing"),
              ("ImagerPixelSpacing", None, 2, "spacing"),
              ("SliceThickness", "PixelMeasuresSequence", 1, "spacing"),
              ("SpacingBetweenSlices", "PixelMeasuresSequence", 1, "spacing"),
              ("ImagePositionPatient", "PlanePositionSequence", 3, "finite"),
              ("ImageOrientationPatient", "PlaneOrientationSequence", 6, "orientation"),
              ("RescaleSlope", "PixelValueTransformationSequence", 1, "slope"),
              ("WindowWidth", "FrameVOILUTSequence", 1, "width"))
    for where, item in items:
        for kw, seq_kw, n, kind in checks:
            for vals in values(item, kw, seq_kw):
                text = "\\".join(f"{v:g}" for v in vals)
                label = f"{kw}: {where}"
                if not vals or (kind != "width" and kind != "slope" and len(vals) != n):
                    flags.append(f"{label}unreadable or wrong count of values")
                elif not all(np.isfinite(vals)):
                    flags.append(f"{label}not a finite number ({text})")
                elif kind == "spacing" and any(v <= 0 for v in vals):
                    flags.append(f"{label}zero or negative ({text})")
                elif kind == "slope" and vals[0] == 0:
                    flags.append(f"{label}zero (every pixel would have the same value)")
                elif kind == "width" and any(v <= 0 for v in vals):
                    flags.append(f"{label}zero or negative window width ({text})")
                elif kind == "orientation":
                    r, c = np.asarray(vals[:3]), np.asarray(vals[3:6])
                    nr, nc, dot = float(np.linalg.norm(r)), float(np.linalg.norm(c)), \
                        float(abs(np.dot(r, c)))
                    if abs(nr - 1) > 1e-3 or abs(nc - 1) > 1e-3 or dot > 1e-3:
                        flags.append(f"{label}not orthonormal (|row| {nr:.4g}, |column| "
                                     f"{nc:.4g}, row.column {dot:.4g})")
    flags = list(dict.fromkeys(flags))
    if len(flags) > 12:                 # e.g. every frame of an enhanced multi-frame
        flags = flags[:12] + [f"{flags[12].split(':', 1)[0]}: and {len(flags) - 12} more"]
    return flags


def geometry_flagged(flags: Iterable[str]) -> bool:
    """True when a flag concerns the geometry (not rescale or window)."""
    return any(f.split(":", 1)[0] in _GEOMETRY_KEYWORDS for f in flags)


def _clear_flagged(attrs: dict[str, Any], flags: list[str]) -> None:
    """The catalogue holds no value for an attribute flagged as impossible (the original
    file and the header JSON keep it); RescaleSlope 0 stays (0 is a number the viewer
    shows with the warning, not a value to replace)."""
    for f in flags:
        kw = f.split(":", 1)[0]
        if kw in ("ImagerPixelSpacing",):
            kw = "PixelSpacing"
        if kw == "WindowWidth":
            attrs["WindowWidth"] = attrs["WindowCenter"] = None
        elif kw in attrs and kw != "RescaleSlope":
            attrs[kw] = None


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
    if str(tsyntax) == _RLE and "pydicom" in decoder.available_plugins:
        # pydicom's own RLE decoder refuses segments of the wrong length; the fallback
        # plugin (pylibjpeg-rle) quietly returns them cut to the header's Rows x Columns,
        # or panics: one strict decoder, never a second opinion.
        opts["decoding_plugin"] = "pydicom"
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
    flags: list[str] = field(default_factory=list)


@dataclass
class _Conflict:
    """A file for the quarantine: its SOP Instance UID is stored with other content."""

    path: Path
    data: bytes
    sha256: str
    sop_instance_uid: str


_Result = _Prepared | _Conflict | DuplicateFile | SkippedFile


def _analyse(path: Path, store: Store, verify: bool, limits: IngestLimits) -> _Result:
    """Steps 1-7 for one file (runs in a worker thread; reads the catalogue only)."""
    try:
        return _analyse_inner(path, store, verify, limits)
    except _Skip as s:
        return SkippedFile(path, s.reason, s.kind)
    except MemoryError:
        return SkippedFile(path, "out of memory while decoding", ERROR)
    except Exception as e:  # noqa: BLE001 - a bad file must never stop an ingest
        return SkippedFile(path, f"unexpected error: {type(e).__name__}: {e}", ERROR)
    except BaseException as e:
        # A decoder written in Rust panics with pyo3's PanicException, a BaseException
        # (e.g. the RLE decoder on Rows smaller than its segments): the file is bad, the
        # ingest goes on. Interrupts and exits still stop it.
        if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        return SkippedFile(path, f"decoder failure: {type(e).__name__}: {e}", ERROR)


def read_candidate(path: Path) -> bytes:
    """Step 1, the bytes: the whole file when it may be DICOM (Part 10 preamble, or a
    plausible preamble-less dataset start); ``_Skip`` otherwise."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
            if has_preamble(head):
                return head + f.read()
            if not _plausible_dataset_start(head):
                raise _Skip("not DICOM: no 'DICM' marker at byte 128 and no dataset start",
                            NOT_DICOM)
            return head + f.read()
    except OSError as e:
        raise _Skip(f"cannot read file: {e}", ERROR) from None


_DEFLATED = "1.2.840.10008.1.2.1.99"
_PIXEL_TAG_BYTES = b"\xe0\x7f\x10\x00"


def _meta_end(data: bytes) -> tuple[int, str | None]:
    """(offset where the dataset starts, transfer syntax) of a Part 10 file, read from
    its file meta group; (132, None) when the group cannot be read."""
    from pydicom.filereader import read_dataset

    if data[132:136] != b"\x02\x00\x00\x00" or data[136:138] != b"UL":
        return 132, None
    end = 144 + int.from_bytes(data[140:144], "little")
    try:
        meta = read_dataset(io.BytesIO(data[132:end]), False, True)
        ts = meta.get("TransferSyntaxUID")
    except Exception:  # noqa: BLE001 - pydicom will say what is wrong
        return 132, None
    return end, (str(ts).strip("\x00 ") if ts else None)


def _inflate_budget(head: bytes, limits: IngestLimits) -> int | None:
    """Bytes a deflated dataset may inflate to, from its own header (Rows x Columns x
    frames x samples x bits, capped by the site limit) plus 16 MiB for the other
    elements; None while ``head`` does not reach the Pixel Data element yet."""
    from pydicom.filereader import read_dataset

    at = head.find(_PIXEL_TAG_BYTES)
    if at < 0:
        return None
    try:
        ds = read_dataset(io.BytesIO(head[:at]), False, True)
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        spp, ba = int(ds.get("SamplesPerPixel") or 1), int(ds.BitsAllocated)
        native = (rows * cols * frames * spp * ba + 7) // 8
    except Exception:  # noqa: BLE001 - no usable pixel description: the site limit only
        native = limits.max_decoded_bytes
    return at + min(max(native, 0), limits.max_decoded_bytes) + (16 << 20)


def _check_deflated(data: bytes, limits: IngestLimits) -> None:
    """A deflated dataset is inflated (and counted, not kept) before pydicom inflates it
    whole: refused when it inflates to more than its own header accounts for (a deflate
    bomb would otherwise fill the memory before any check)."""
    import zlib

    start, ts = _meta_end(data)
    if ts != _DEFLATED:
        return
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    inp: bytes | memoryview = memoryview(data)[start:]
    head = bytearray()
    total = 0
    budget: int | None = None
    while True:
        try:
            out = d.decompress(inp, 1 << 20)
        except zlib.error as e:
            raise _Skip(f"deflated dataset is damaged: {e}", ERROR) from None
        inp = d.unconsumed_tail
        total += len(out)
        if budget is None:
            head += out
            budget = _inflate_budget(bytes(head), limits)
            if budget is None and len(head) > (64 << 20):
                budget = len(head) + limits.max_decoded_bytes
        if budget is not None and total > budget:
            raise _Skip(f"decompression bomb: the deflated dataset inflates to more than "
                        f"{budget} bytes, more than its header describes (refused before "
                        "decoding)", REFUSED)
        if d.eof or (not out and not inp):
            return


def parse_dataset(data: bytes, limits: IngestLimits | None = None):
    """Step 1, the dataset: pydicom's reading (``force`` only for preamble-less files);
    a deflated dataset is first checked against ``limits`` (see _check_deflated)."""
    import pydicom

    if has_preamble(data):
        _check_deflated(data, limits or IngestLimits())
    try:
        if has_preamble(data):
            return pydicom.dcmread(io.BytesIO(data))
        return _read_preambleless(data)
    except _Skip:
        raise
    except Exception as e:  # noqa: BLE001
        if not has_preamble(data):
            raise _Skip(f"not DICOM: no preamble, and pydicom cannot read it "
                        f"({type(e).__name__})", NOT_DICOM) from None
        raise _Skip(f"unreadable DICOM: {type(e).__name__}: {e}", ERROR) from None


def _describe(ds) -> dict[str, Any]:
    """Attributes of an image instance, or ``_Skip`` (truncated, not an image, no UIDs)."""
    from pydicom.uid import UID

    truncated = _truncation(ds)
    if truncated:
        raise _Skip(truncated, ERROR)
    attrs = instance_attributes(ds)
    if not any(tag in ds for tag in _PIXEL_TAGS):
        sop_class = attrs["SOPClassUID"]
        try:
            label = UID(sop_class).name if sop_class else "no SOP Class UID"
        except Exception:  # noqa: BLE001
            label = str(sop_class)
        if ("Rows" in ds and "Columns" in ds) or label.endswith("Image Storage"):
            raise _Skip(f"truncated or damaged: an image ({label}) without a Pixel Data "
                        "element", ERROR)
        raise _Skip(f"no pixel data (not an image: {label})", NOT_IMAGE)
    if 0x7FE00010 not in ds:
        raise _Skip("floating point pixel data not supported", UNSUPPORTED)
    for key in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        if not attrs[key]:
            raise _Skip(f"missing {key}", ERROR)
    return attrs


def _decode_frames(ds, shape: dict[str, int]) -> tuple[list[PreparedFrame],
                                                       list[list[float] | None]]:
    """Step 6: every frame decoded by pydicom, checked against the header's shape."""
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    ts_label = getattr(ts, "name", None) or str(ts)
    want = (shape["rows"], shape["columns"])
    prepared: list[PreparedFrame] = []
    positions: list[list[float] | None] = []
    try:
        for i, (arr, meta) in enumerate(_iter_frames(ds)):
            if tuple(arr.shape[:2]) != want:
                raise _Skip(f"frame {i + 1} decodes to {arr.shape[0]} x {arr.shape[1]}, the "
                            f"header says Rows {want[0]} x Columns {want[1]} (refused, not "
                            "reinterpreted)", REFUSED)
            if i >= shape["frames"]:
                raise _Skip(f"the pixel data holds more than NumberOfFrames "
                            f"{shape['frames']} frames", REFUSED)
            prepared.append(prepare_frame(arr, meta, ds))
            positions.append(_frame_position(ds, i))
    except _Skip:
        raise
    except Exception as e:  # noqa: BLE001 - report pydicom's own words
        raise _Skip(f"cannot decode pixel data ({ts_label}): {type(e).__name__}: {e}",
                    ERROR) from None
    if len(prepared) != shape["frames"]:
        raise _Skip(f"the pixel data holds {len(prepared)} frames, NumberOfFrames says "
                    f"{shape['frames']}", REFUSED)
    return prepared, positions


def _encode_frames(prepared: list[PreparedFrame], positions: list[list[float] | None],
                   verify: bool) -> list[_EncodedFrame]:
    """Step 7: one layered codestream per frame, checked bit for bit when ``verify``."""
    from codestream.encode import decode_full, encode_frame

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
    return encoded


def _analyse_inner(path: Path, store: Store, verify: bool,
                   limits: IngestLimits) -> _Result:
    data = read_candidate(path)                                    # 1. recognise
    return prepare(data, path, store, verify, limits)


def prepare(data: bytes, path: Path, store: Store, verify: bool, limits: IngestLimits, *,
            check_conflict: bool = True) -> _Result:
    """Steps 1-7 on a file's bytes; raises ``_Skip`` with the reason for a refusal.
    ``check_conflict`` False prepares a quarantined file for its resolution."""
    sha = sha256_hex(data)
    cat = store.catalogue
    if cat.has_original(sha):                                      # 2. deduplicate
        return DuplicateFile(path, sha)
    ds = parse_dataset(data, limits)
    _check_uids(ds, limits)            # 3. header checks (UIDs first: raw, before use)
    attrs = _describe(ds)
    shape = check_header(ds, limits)
    flags = value_flags(ds)                                        # 4. impossible values
    sop = attrs["SOPInstanceUID"]
    existing = cat.find_instance(sop) if check_conflict else None  # 5. conflict
    if existing is not None:
        if existing["original_sha256"] == sha:
            return DuplicateFile(path, sha, sop)
        return _Conflict(path, data, sha, sop)

    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    attrs["TransferSyntaxUID"] = str(ts) if ts else None
    prepared, positions = _decode_frames(ds, shape)                # 6. decode
    encoded = _encode_frames(prepared, positions, verify)          # 7. encode (+ verify)

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
        "geometry_flags": flags,
    })
    _clear_flagged(attrs, flags)
    del prepared
    attrs["header_json"] = _header_json(ds)
    return _Prepared(path, data, sha, attrs, encoded, flags)


def _already(p: _Prepared, cat) -> DuplicateFile | _Conflict | None:
    """The file, or another with its SOP Instance UID, is catalogued by now."""
    sop = p.attrs["SOPInstanceUID"]
    if cat.has_original(p.sha256):
        return DuplicateFile(p.path, p.sha256, sop)
    existing = cat.find_instance(sop)
    if existing is not None:
        if existing["original_sha256"] == p.sha256:
            return DuplicateFile(p.path, p.sha256, sop)
        return _Conflict(p.path, p.data, p.sha256, sop)
    return None


def _write_files(p: _Prepared, store: Store, batch=None) -> list[dict]:
    """The frame files and the original, each written atomically (temp file, rename)
    and made durable now (fsync of the file and its folder), or, with ``batch`` (a
    :class:`~server.store.DurableBatch`), all at once before the batch's
    transaction. Returns the frame rows; sets the original's."""
    a = p.attrs
    sop = a["SOPInstanceUID"]
    frames = []
    for n, ef in enumerate(p.frames, start=1):
        cs_rel, idx_rel = store.codestream_paths(a["SeriesInstanceUID"], sop, n)
        cs_sha = store.atomic_write(cs_rel, ef.codestream, batch=batch)
        idx_sha = store.atomic_write(idx_rel, ef.index_json, batch=batch)
        frames.append({
            "frame": n, "codestream_relpath": cs_rel, "codestream_sha256": cs_sha,
            "codestream_size": len(ef.codestream), "index_relpath": idx_rel,
            "index_sha256": idx_sha, "index_size": len(ef.index_json),
            "offset": ef.offset, "numres": ef.numres, "nlayers": ef.nlayers,
            "ImagePositionPatient": ef.position,
        })
    orig_rel, orig_sha = store.put_original(p.data, batch=batch)
    a.update({"original_relpath": orig_rel, "original_sha256": orig_sha,
              "original_size": len(p.data)})
    return frames


def _imported(p: _Prepared, frames: list[dict]) -> ImportedFile:
    a = p.attrs
    return ImportedFile(p.path, a["SOPInstanceUID"], a["SeriesInstanceUID"],
                        a["StudyInstanceUID"], len(frames), p.sha256, list(p.flags))


def _commit(p: _Prepared, store: Store) -> ImportedFile | DuplicateFile | SkippedFile | _Conflict:
    """Step 8 (calling thread only): files first, then the rows in one transaction. A
    conflict found only now (the other file came earlier in the same batch, or from
    another process) is handed back for the quarantine."""
    cat = store.catalogue
    sop = p.attrs["SOPInstanceUID"]
    found = _already(p, cat)
    if found is not None:
        return found
    try:
        frames = _write_files(p, store)
        cat.add_instance(p.attrs, frames)
    except DuplicateInstanceError as e:        # another process got there first
        if e.original_sha256 == p.sha256:
            return DuplicateFile(p.path, p.sha256, sop)
        return _Conflict(p.path, p.data, p.sha256, sop)
    except OSError as e:
        return SkippedFile(p.path, f"cannot write to the store: {e}", ERROR)
    return _imported(p, frames)


#: Step 8 in batches: at most this many files, or this many bytes held, per commit.
COMMIT_BATCH_FILES = 16
COMMIT_BATCH_BYTES = 64 << 20


def _commit_batch(batch: list[_Prepared], store: Store) -> list:
    """Step 8 for several files (calling thread only): every file written atomically
    (temp file, rename), then all of them made durable at once (one ``syncfs`` of the
    store's file system, or each file and folder fsynced where that is not available),
    then ONE transaction with every instance's rows — so a row never names a file that
    is not durable, and a crash before the commit leaves only files no row names
    (orphans that fsck reports), never a row without its file. Duplicates and SOP
    conflicts are found against the catalogue and inside the batch. Should the
    transaction fail as a whole, each file is committed on its own."""
    from .store import DurableBatch

    if len(batch) == 1:
        return [_commit(batch[0], store)]
    cat = store.catalogue
    out: list = [None] * len(batch)
    todo: list[tuple[int, _Prepared, list[dict]]] = []
    shas: set[str] = set()
    sops: dict[str, str] = {}
    durable = DurableBatch(store.root)
    for i, p in enumerate(batch):
        sop = p.attrs["SOPInstanceUID"]
        found = _already(p, cat)
        if found is None and p.sha256 in shas:
            found = DuplicateFile(p.path, p.sha256, sop)
        elif found is None and sop in sops:             # same UID, other bytes: after
            found = _Conflict(p.path, p.data, p.sha256, sop)    # the first is stored
        if found is not None:
            out[i] = found
            continue
        try:
            frames = _write_files(p, store, durable)
        except OSError as e:
            out[i] = SkippedFile(p.path, f"cannot write to the store: {e}", ERROR)
            continue
        shas.add(p.sha256)
        sops[sop] = p.sha256
        todo.append((i, p, frames))
    try:
        durable.make_durable()
    except OSError as e:                    # nothing of the batch is stored
        why = f"cannot write to the store: {e}"
        for i, p, _frames in todo:
            out[i] = SkippedFile(p.path, why, ERROR)
        return out
    try:
        with cat._transaction():
            for i, p, frames in todo:
                try:
                    cat.add_instance(p.attrs, frames)    # joins the batch's transaction
                except DuplicateInstanceError as e:      # another process, meanwhile
                    out[i] = (DuplicateFile(p.path, p.sha256, e.sop_uid)
                              if e.original_sha256 == p.sha256
                              else _Conflict(p.path, p.data, p.sha256, e.sop_uid))
                else:
                    out[i] = _imported(p, frames)
    except Exception:  # noqa: BLE001 - rolled back: one by one, each says what went wrong
        for i, p, _frames in todo:
            try:
                out[i] = _commit(p, store)
            except Exception as e:  # noqa: BLE001
                out[i] = SkippedFile(p.path, f"cannot store: {type(e).__name__}: {e}", ERROR)
    return out


def _quarantine(c: _Conflict, store: Store, audit: "AuditFn") -> QuarantinedFile | SkippedFile:
    """Keep a conflicting file in the quarantine (calling thread only) and audit it."""
    from . import quarantine as q

    try:
        entry = q.add(store, c.data, c.sop_instance_uid, source_path=str(c.path))
    except Exception as e:  # noqa: BLE001 - never lose it silently: say so
        return SkippedFile(c.path, f"{CONFLICT_REASON}, and it could not be kept in the "
                                   f"quarantine: {type(e).__name__}: {e}", CONFLICT)
    reason = entry.reason
    audit("ingest", c.sop_instance_uid, "quarantined",
          {"path": str(c.path), "quarantine_id": entry.id, "sha256": entry.sha256,
           "stored_sha256": entry.stored_sha256, "reason": reason,
           "differences": entry.differences})
    return QuarantinedFile(c.path, c.sop_instance_uid, entry.sha256, reason, entry.id,
                           entry.stored_sha256)


AuditFn = Callable[[str, str | None, str, dict], None]


def store_auditor(store: Store, user: str | None = None) -> tuple[AuditFn, Callable[[], None]]:
    """(audit function, close) writing to the store's audit log (server.auth), the
    Authority opened on first use."""
    import getpass

    holder: list[Any] = []
    who = user or _os_user(getpass)

    def audit(action: str, resource: str | None, outcome: str, detail: dict) -> None:
        from .auth import Authority

        if not holder:
            holder.append(Authority(store.database))
        holder[0].audit(user=who, action=action, resource=resource, outcome=outcome,
                        detail=detail)

    def close() -> None:
        for a in holder:
            a.close()
        holder.clear()

    return audit, close


def _os_user(getpass) -> str:
    try:
        return f"os:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no user name in this environment
        return "os:?"


# --------------------------------------------------------------------------- entry point

def ingest_paths(paths: Iterable[str | Path], store: Store, log: LogFn | None = None,
                 progress: ProgressFn | None = None, *, verify: bool = True,
                 workers: int | None = None, limits: IngestLimits | None = None,
                 audit: AuditFn | None = None, user: str | None = None) -> IngestReport:
    """Ingest files and folders (recursively) into ``store``.

    ``log(message)`` is called once per file with the outcome; ``progress(done, total)``
    as files are settled (stored ones a batch at a time). ``verify`` decodes every new
    codestream and compares it bit for bit with the source pixels. ``workers`` threads
    decode and encode (OpenJPEG runs without the interpreter lock); store and catalogue
    writes stay on the calling thread, in batches (:func:`_commit_batch`: at most
    ``COMMIT_BATCH_FILES`` files or ``COMMIT_BATCH_BYTES``, one transaction and one fsync
    per folder each; a crash loses at most the batch being committed, whose files stay
    behind as orphans that fsck reports). ``limits`` defaults to the store's (:meth:`IngestLimits.
    for_store`). Quarantined files are audited through ``audit(action, resource,
    outcome, detail)``, by default into the store's audit log as ``user`` (default the
    operating-system user). Never raises for a bad input file.
    """
    files = list(iter_files(paths))
    if limits is None:
        limits = IngestLimits.for_store(store.root)
    close_audit: Callable[[], None] = lambda: None
    if audit is None:
        audit, close_audit = store_auditor(store, user)
    run = _IngestRun(store, len(files), log or (lambda _msg: None), progress, audit)
    # OpenJPEG runs without the interpreter lock: a thread per core (at least 2, at most 8)
    workers = max(1, int(workers)) if workers is not None else \
        max(2, min(8, os.cpu_count() or 2))
    window = 2 * workers
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest") as pool:
            pending: collections.deque[Future] = collections.deque()
            for path in files:
                pending.append(pool.submit(_analyse, path, store, verify, limits))
                while len(pending) >= window:
                    run.finish(pending.popleft().result())
            while pending:
                run.finish(pending.popleft().result())
            run.flush()
    finally:
        close_audit()
    from .policy_copies import after_ingest     # final copies, if [codec] on_ingest (H1)

    after_ingest(store, [f.sop_instance_uid for f in run.report.imported], log_fn=log)
    return run.report


class _IngestRun:
    """The calling thread's side of :func:`ingest_paths`: analysed files gathered into
    commit batches, each outcome settled (a conflict quarantined), reported and logged."""

    def __init__(self, store: Store, total: int, emit: LogFn, progress: ProgressFn | None,
                 audit: AuditFn) -> None:
        self.store = store
        self.total = total
        self.emit = emit
        self.progress = progress
        self.audit = audit
        self.report = IngestReport()
        self.batch: list[_Prepared] = []
        self.held = 0                               # bytes held by the batch

    def done(self) -> int:
        r = self.report
        return len(r.imported) + len(r.duplicates) + len(r.skipped) + len(r.quarantined)

    def record(self, result: ImportedFile | DuplicateFile | SkippedFile | QuarantinedFile
               ) -> None:
        report, emit = self.report, self.emit
        if isinstance(result, ImportedFile):
            report.imported.append(result)
            flags = f"; FLAGGED: {'; '.join(result.flags)}" if result.flags else ""
            emit(f"imported  {result.path} ({result.frames} frame"
                 f"{'s' if result.frames != 1 else ''}, SOP {result.sop_instance_uid}"
                 f"{flags})")
        elif isinstance(result, DuplicateFile):
            report.duplicates.append(result)
            emit(f"duplicate {result.path} (already stored)")
        elif isinstance(result, QuarantinedFile):
            report.quarantined.append(result)
            emit(f"quarantined {result.path}: {result.reason} (entry "
                 f"{result.quarantine_id})")
        else:
            report.skipped.append(result)
            emit(f"skipped   {result.path}: {result.reason}")
        if self.progress is not None:
            self.progress(self.done(), self.total)

    def settle(self, result) -> None:
        if isinstance(result, _Conflict):
            result = _quarantine(result, self.store, self.audit)
        self.record(result)

    def flush(self) -> None:
        """Commit the batch (:func:`_commit_batch`) and settle its files."""
        items = self.batch[:]
        self.batch.clear()
        self.held = 0
        if not items:
            return
        try:
            results = _commit_batch(items, self.store)
        except Exception as e:  # noqa: BLE001 - e.g. catalogue locked for too long
            results = [SkippedFile(p.path, f"cannot store: {type(e).__name__}: {e}", ERROR)
                       for p in items]
        for r in results:
            self.settle(r)

    def finish(self, result: _Result) -> None:
        """One analysed file: a prepared one joins the batch (committed when full);
        anything else is settled now (a conflict after the batch, which may hold its
        stored twin)."""
        if isinstance(result, _Prepared):
            self.batch.append(result)
            self.held += len(result.data) + sum(len(f.codestream) + len(f.index_json)
                                                for f in result.frames)
            if len(self.batch) >= COMMIT_BATCH_FILES or self.held >= COMMIT_BATCH_BYTES:
                self.flush()
            return
        if isinstance(result, _Conflict):
            self.flush()                     # its stored twin may be in the batch
        self.settle(result)


# Public names of the pipeline's parts (server.quarantine resolves entries with them).
Refusal = _Skip
Prepared = _Prepared
commit_prepared = _commit
