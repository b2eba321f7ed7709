"""The batch converter (SPEC H4): DICOM in, DICOM out in another transfer syntax, every
attribute kept, every output proven before it counts.

``medview-server convert PATH... --out DIR [--to policy|jpegls|htj2k|jxl|j2k]
[--lossy RATIO] [--workers N] [--report FILE]`` runs :func:`convert_paths`; one file goes
through :func:`convert_file`:

1. read the input with pydicom (a file that is not DICOM, has no pixels or cannot be
   decoded is reported as failed; the other files go on). The common case — explicit VR
   little endian, a native greyscale image, its pixel data ending the file — is read
   without pydicom by a walk of the header (:func:`_read_header`: each element's extent
   and the dozen values needed), its frames straight from the file's bytes, and the
   output is the same file, byte for byte, the general path makes of it (tested);
2. choose the codec: ``--to`` names it, or ``policy`` asks the site policy's [codec]
   table (:class:`~server.policy.CodecPolicy`; an image that arrived as JPEG baseline
   stays as it is and is copied byte for byte);
3. encode each frame through :mod:`codestream.codecs` and encapsulate the frames
   (``pydicom.encaps``, one fragment per frame, with a Basic Offset Table);
4. the output dataset is the input dataset with only the pixel data and transfer syntax
   changed: every other element, private tags and sequences included, is kept as it was;
   lossless outputs keep the SOP Instance UID. Colour that pydicom converts from YBR to RGB
   is stored as RGB (PhotometricInterpretation RGB, PlanarConfiguration 0). Lossy outputs
   get a new SOP Instance UID and record the loss and the derivation as PS3.3 C.7.6.1.1.5
   asks: LossyImageCompression "01", LossyImageCompressionRatio and
   LossyImageCompressionMethod (appended to earlier values), ImageType DERIVED, a
   DerivationDescription, DerivationCodeSequence (DCM 113040 "Lossy Compression") and a
   SourceImageSequence item pointing at the original instance;
5. the output file is made in memory and proven before it is written
   (:func:`verify_encoded`): every encoded frame is decoded with our codec and compared
   with pydicom's decode of the input — lossless must be bit-exact; lossy reports PSNR
   and maximum error and is refused below ``min_psnr`` or above ``max_error`` — and the
   file's bytes are shown to hold exactly those frames (the encapsulated pixel data
   after its element header) under the codec's transfer syntax, without parsing the
   dataset again. It is then written once, to a temporary file beside its final name,
   fsynced and renamed into place (atomic), so an output that exists is a verified one —
   a rerun skips it. The input is read once and never written.

With ``--workers N`` (N > 1), N worker processes (forked after :func:`warm_up`) take a
file at a time: the parent sends paths, each worker reads, converts, proves and writes
(fsync on a writer thread) itself and answers with the file's result; a worker that dies
fails the file it was converting and a new one takes the rest
(:func:`_convert_in_workers`).

The report (:class:`ConvertReport`) lists per file: file, output, status, codec, transfer
syntax, bytes before and after, ratio, seconds, verification; ``write_report`` writes it
as JSON and CSV.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from codestream import codecs
from imaging.files import fsync_dirs, is_temp_name, write_atomic, write_file_atomic

TARGETS = ("policy", "jpegls", "htj2k", "jxl", "j2k")
DEFAULT_MIN_PSNR = 40.0                 # dB: lossy outputs below this are refused
LOSSY_METHOD = {                        # LossyImageCompressionMethod (PS3.3 C.7.6.1.1.5.1)
    "jpegls": "ISO_14495_1", "j2k": "ISO_15444_1", "htj2k": "ISO_15444_15",
    "jxl": "ISO_18181_1", "jpeg": "ISO_10918_1",
}
LOSSY_INPUT_TS = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
                  "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.4.112",
                  "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.101", "1.2.840.10008.1.2.4.102",
                  "1.2.840.10008.1.2.4.103"}


class ConvertError(Exception):
    """One file cannot be converted (the reason is reported; the batch goes on)."""


@dataclass
class Options:
    to: str = "policy"                   # policy | jpegls | htj2k | jxl | j2k
    lossy_ratio: float | None = None     # None = lossless
    min_psnr: float = DEFAULT_MIN_PSNR
    max_error: float | None = None
    codec_policy: object | None = None   # a server.policy.CodecPolicy (policy mode)


@dataclass
class FileResult:
    file: str
    output: str = ""
    status: str = "failed"               # converted | kept | skipped | failed
    codec: str = ""
    transfer_syntax: str = ""
    bytes_before: int = 0
    bytes_after: int = 0
    ratio: float = 0.0
    seconds: float = 0.0
    verification: str = ""               # bit-exact | psnr ... | byte copy | reason it failed
    psnr: float | None = None
    max_error: float | None = None
    sop_instance_uid: str = ""
    source_sop_instance_uid: str = ""
    sha256: str = ""
    reason: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("psnr", "max_error"):
            if d[k] is not None and math.isinf(d[k]):
                d[k] = "inf"
        return d


@dataclass
class ConvertReport:
    results: list[FileResult] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def summary(self) -> str:
        before = sum(r.bytes_before for r in self.results if r.status in ("converted", "kept"))
        after = sum(r.bytes_after for r in self.results if r.status in ("converted", "kept"))
        ratio = f", {before} -> {after} bytes ({before / after:.2f}:1)" if after else ""
        return (f"{len(self.results)} files: {self.count('converted')} converted, "
                f"{self.count('kept')} kept as they were, {self.count('skipped')} done before, "
                f"{self.count('failed')} failed{ratio} in {self.seconds:.1f} s")

    def to_json(self) -> dict:
        return {"summary": self.summary(), "seconds": round(self.seconds, 3),
                "counts": {s: self.count(s) for s in ("converted", "kept", "skipped", "failed")},
                "files": [r.to_json() for r in self.results]}


CSV_FIELDS = ("file", "output", "status", "codec", "transfer_syntax", "bytes_before",
              "bytes_after", "ratio", "seconds", "verification", "psnr", "max_error", "error")


def write_report(report: ConvertReport, path: str | Path) -> tuple[Path, Path]:
    """Write the report as JSON and CSV: ``path`` with .json and .csv suffixes."""
    p = Path(path)
    base = p.with_suffix("") if p.suffix.lower() in (".json", ".csv") else p
    jpath, cpath = base.with_suffix(".json"), base.with_suffix(".csv")
    import io
    import threading

    rows = []
    for r in report.results:
        d = r.to_json()
        rows.append({k: d[k] for k in CSV_FIELDS})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    w.writerows(rows)
    jpath.parent.mkdir(parents=True, exist_ok=True)
    # both written atomically and fsynced at once (the fsyncs overlap), then their names
    # made durable by one fsync of the folder(s)
    errors: list[BaseException] = []

    def write(path: Path, data: bytes) -> None:
        try:
            write_atomic(path, data, sync_dir=False)
        except BaseException as e:  # noqa: BLE001 - raised below, in the caller
            errors.append(e)
    t = threading.Thread(target=write, args=(cpath, buf.getvalue().encode()),
                         name="convert-report")
    t.start()
    write(jpath, json.dumps(report.to_json(), indent=1).encode())
    t.join()
    if errors:
        raise errors[0]
    fsync_dirs({jpath.parent, cpath.parent})
    return jpath, cpath


# --------------------------------------------------------------------------- one dataset
@dataclass
class Converted:
    """An encoded dataset, not yet written: what :func:`encode_dataset` returns."""

    dataset: object                 # pydicom FileDataset ready to write
    codec: codecs.Codec
    reference: list[np.ndarray]     # pydicom's decode of the input, frame by frame
    signed: bool
    bits_stored: int
    reason: str
    fragments: list[bytes] = field(default_factory=list)   # the encoded frames
    pixel_data: bytes | None = None   # the encapsulated frames, when ``dataset`` is None

    @property
    def encapsulated(self) -> bytes:
        """The pixel data element's value: the encapsulated frames."""
        if self.pixel_data is not None:
            return self.pixel_data
        return self.dataset["PixelData"].value


def read_pixels(ds) -> tuple[list[np.ndarray], str]:
    """pydicom's decode of a dataset's frames and the PhotometricInterpretation they are in."""
    if "PixelData" not in ds:
        raise ConvertError("no pixel data (not an image)")
    pi = str(ds.get("PhotometricInterpretation", "")).strip()
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    ba = int(ds.get("BitsAllocated", 0) or 0)
    if not ds.get("Rows") or not ds.get("Columns"):
        raise ConvertError("pixel data without Rows/Columns (damaged image module)")
    if ba not in (8, 16):
        raise ConvertError(f"BitsAllocated {ba}: only 8 and 16-bit images are converted")
    # YBR_RCT/ICT name the JPEG 2000 colour transform, which the decoder undoes (RCT
    # exactly): the samples come out RGB. YBR_FULL(_422) stored losslessly would need
    # pydicom's rounded YBR -> RGB conversion.
    if spp == 3 and pi in ("YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420") \
            and ts not in LOSSY_INPUT_TS:
        raise ConvertError(f"{pi} samples stored losslessly: turning them into RGB would not "
                           "be lossless, so the image is not converted")
    if spp not in (1, 3):
        raise ConvertError(f"SamplesPerPixel {spp} is not supported")
    check_photometric(pi, spp)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    arr = _native_greyscale(ds, ts, spp, ba, n)
    if arr is None:
        try:
            arr = ds.pixel_array
        except Exception as e:  # noqa: BLE001 - pydicom's reason, reported
            raise ConvertError(f"pixel data cannot be decoded: {type(e).__name__}: {e}") from None
    frames = _frames(arr, n)
    if len(frames) != n:
        raise ConvertError(f"NumberOfFrames {n} but {len(frames)} frames decoded")
    out_pi = "RGB" if spp == 3 and pi.startswith("YBR") else pi
    return frames, out_pi


_PHOTOMETRIC = {1: ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"),
                3: ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420",
                    "YBR_ICT", "YBR_RCT")}


def check_photometric(pi: str, spp: int) -> None:
    """A PhotometricInterpretation the standard defines for ``spp`` samples, or
    ConvertError: a damaged or lying value says nothing reliable about the samples, and an
    output keeping it would not open in a viewer."""
    if pi not in _PHOTOMETRIC.get(spp, ()):
        raise ConvertError(f"PhotometricInterpretation {pi!r} is not one for {spp} sample(s) "
                           "per pixel (damaged image module)")


def _frames(arr: np.ndarray, n: int) -> list[np.ndarray]:
    arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)   # big-endian files
    return [np.ascontiguousarray(f) for f in arr] if n > 1 else [np.ascontiguousarray(arr)]


_NATIVE_LE = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")


def _native_greyscale(ds, ts: str, spp: int, ba: int, n: int, raw=None) -> np.ndarray | None:
    """The frames of a native little-endian greyscale image read straight from the bytes
    pydicom already holds (or ``raw``, the pixel data's bytes): a view, no copy, with the
    unused high bits handled as pydicom's ``pixel_array`` handles them (masked off, or the
    sign extended; a copy only when some sample has such bits to change); None for
    anything else (pydicom decodes it)."""
    layout = _native_layout(ds, ts, spp, ba, n)
    if layout is None:
        return None
    dt, shape, bits = layout
    if raw is None:
        raw = ds.get("PixelData")
        if not isinstance(raw, (bytes, bytearray)):
            return None
    count = math.prod(shape)
    if len(raw) < count * dt.itemsize:
        return None                       # short pixel data: pydicom says what is wrong
    arr = np.frombuffer(raw, dt, count).reshape(shape)
    if bits < ba:
        if dt.kind == "i":
            half = 1 << (bits - 1)
            if int(arr.min()) < -half or int(arr.max()) >= half:
                shift = ba - bits
                arr = (arr << shift) >> shift
        elif int(arr.max()) >> bits:
            arr = arr & ((1 << bits) - 1)
    return arr


def _native_layout(ds, ts: str, spp: int, ba: int, n: int
                   ) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """(dtype, shape, BitsStored) of a native little-endian greyscale image's pixel data,
    None when it is not one (or its values are damaged: pydicom says what is wrong)."""
    if ts not in _NATIVE_LE or spp != 1 or ba not in (8, 16):
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        bits = int(ds.get("BitsStored", ba) or ba)
    except (TypeError, ValueError, AttributeError):
        return None
    if not 1 <= bits <= ba or rows <= 0 or cols <= 0 or n <= 0:
        return None
    dt = np.dtype(f"<{'i' if signed else 'u'}{ba // 8}")
    return dt, ((n, rows, cols) if n > 1 else (rows, cols)), bits


def encode_dataset(ds, codec: codecs.Codec, *, ratio: float | None = None,
                   reason: str = "", copy_first: bool = True, resolve: bool = True) -> Converted:
    """The dataset re-encoded with ``codec``: a deep copy, or ``ds`` itself changed in
    place when ``copy_first`` is False (the converter's own freshly read dataset)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    if not codec.available:
        raise ConvertError(codec.missing)
    frames, out_pi = read_pixels(ds)
    signed, bits = _sign_and_bits(ds)
    encoded = _encode_frames(codec, frames, signed, bits, ratio)
    big_endian = getattr(ds, "original_encoding", (None, True))[1] is False
    if copy_first:
        out = copy.deepcopy(ds)
    else:
        out = ds
        if not codec.lossless:
            ds = _Original(ds)      # what the lossy record needs of the input (the
                                    # attributes read below are read before any change)
    _drop_group_length(out)
    if resolve:
        _resolve(out)
    for kw in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):   # the input's frames
        if kw in out:
            del out[kw]
    if big_endian:
        _to_little_endian(out)
    in_ts = str(ds.file_meta.TransferSyntaxUID)
    in_pi = str(ds.get("PhotometricInterpretation", ""))
    in_spp = int(ds.get("SamplesPerPixel", 1) or 1)
    out.file_meta.TransferSyntaxUID = UID(codec.transfer_syntax)
    out.PixelData = encapsulate(encoded, has_bot=True)
    out["PixelData"].VR = "OB"
    out["PixelData"].is_undefined_length = True
    if out_pi != in_pi:
        out.PhotometricInterpretation = out_pi
    if in_spp == 3:
        out.PlanarConfiguration = 0
    if in_ts in LOSSY_INPUT_TS and out.get("LossyImageCompression") != "01":
        out.LossyImageCompression = "01"
    if not codec.lossless:
        raw = sum(f.nbytes for f in frames)
        _mark_lossy(out, ds, codec, raw / max(1, sum(len(e) for e in encoded)))
    return Converted(out, codec, frames, signed, bits, reason, encoded)


def _sign_and_bits(ds) -> tuple[bool, int]:
    """(signed, BitsStored) as the encoder is told them."""
    return (int(ds.get("PixelRepresentation", 0) or 0) == 1,
            int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16))


def _encode_frames(codec: codecs.Codec, frames: list[np.ndarray], signed: bool, bits: int,
                   ratio: float | None) -> list[bytes]:
    why = codec.supports(frames[0], signed=signed, bits_stored=bits)
    if why:
        raise ConvertError(why)
    encoded = []
    for f in frames:
        try:
            encoded.append(codec.encode(f, signed=signed, bits_stored=bits,
                                        ratio=None if codec.lossless else ratio))
        except codecs.CodecError as e:
            raise ConvertError(str(e)) from None
    return encoded


class _Original:
    """The input attributes the lossy record reads, captured before ``ds`` is changed."""

    _KEYS = ("SOPClassUID", "SOPInstanceUID", "LossyImageCompressionRatio",
             "LossyImageCompressionMethod", "ImageType", "DerivationDescription",
             "DerivationCodeSequence", "SourceImageSequence", "PhotometricInterpretation",
             "SamplesPerPixel")

    def __init__(self, ds) -> None:
        self._v = {k: copy.deepcopy(ds.get(k)) for k in self._KEYS}
        self.file_meta = copy.deepcopy(ds.file_meta)

    def get(self, key, default=None):
        v = self._v.get(key)
        return default if v is None else v

    def __getattr__(self, key):
        if key.startswith("_") or key not in self._v:
            raise AttributeError(key)
        return self._v[key]


def _resolve(ds) -> None:
    """Turn every raw element into a DataElement with its VR (pydicom converts on access
    and keeps the result): a dataset read as implicit VR (some files say explicit and are
    not) is then written as explicit VR correctly."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _resolve(item)


def _drop_group_length(ds) -> None:
    """pydicom 3 refuses to write group-0000 elements (some real files carry them)."""
    for tag in [t for t in ds.keys() if t.group == 0]:
        del ds[tag]


def _mark_lossy(out, src, codec: codecs.Codec, ratio: float) -> None:
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    new_uid = generate_uid()
    out.SOPInstanceUID = new_uid
    out.file_meta.MediaStorageSOPInstanceUID = new_uid
    out.LossyImageCompression = "01"

    def append(keyword: str, value: str) -> None:
        old = src.get(keyword)
        vals = [] if old is None or old == "" else (list(old) if not isinstance(old, str) and
                                                    hasattr(old, "__iter__") else [old])
        setattr(out, keyword, [str(v) for v in vals] + [value])
    append("LossyImageCompressionRatio", f"{ratio:.2f}"[:16])
    append("LossyImageCompressionMethod", LOSSY_METHOD.get(codec.name, codec.name))
    it = list(src.get("ImageType", []) or [])
    if it:
        it[0] = "DERIVED"
        out.ImageType = it
    desc = f"Lossy compression {codec.label}, ratio {ratio:.1f}:1 (medview-server convert)"
    old = str(src.get("DerivationDescription", "") or "")
    out.DerivationDescription = (old + "; " + desc if old else desc)[:1024]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "113040", "DCM", "Lossy Compression"
    out.DerivationCodeSequence = [*(src.get("DerivationCodeSequence") or []), code]
    ref = Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator = "121320", "DCM"
    purpose.CodeMeaning = "Uncompressed predecessor"
    ref.PurposeOfReferenceCodeSequence = [purpose]
    out.SourceImageSequence = [*(src.get("SourceImageSequence") or []), ref]


_NEW_TS = {   # transfer syntaxes newer than pydicom 3.0's UID dictionary
    codecs.JPEGXL_LOSSLESS: ("JPEG XL Lossless", "JPEGXLLossless"),
    codecs.JPEGXL_RECOMPRESSION: ("JPEG XL JPEG Recompression", "JPEGXLJPEGRecompression"),
    codecs.JPEGXL: ("JPEG XL", "JPEGXL"),
}


_registered = False


def register_transfer_syntaxes() -> None:
    """Teach pydicom the JPEG XL transfer syntaxes (PS3.6 2024) so it writes and reads them
    as encapsulated explicit VR little endian."""
    global _registered
    if _registered:
        return
    from pydicom._uid_dict import UID_dictionary

    for uid, (name, keyword) in _NEW_TS.items():
        UID_dictionary.setdefault(uid, (name, "Transfer Syntax", "", "", keyword))
    _registered = True


_SWAP_VRS = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}


def _to_little_endian(ds) -> None:
    """Swap the raw words of OW/OL/OF/OD/OV values of a dataset read as big endian (pydicom
    keeps those as the file's bytes; numbers of other VRs are already parsed)."""
    for elem in ds:
        if elem.tag == 0x7FE00010:
            continue
        if elem.VR == "SQ":
            for item in elem.value:
                _to_little_endian(item)
        elif elem.VR in _SWAP_VRS and isinstance(elem.value, (bytes, bytearray)) and elem.value:
            n = _SWAP_VRS[elem.VR]
            dt = np.dtype(f">u{n}")
            elem.value = np.frombuffer(elem.value, dt).astype(dt.newbyteorder("<")).tobytes()


def dataset_bytes(ds) -> bytes:
    """The DICOM file (preamble, meta, dataset) as bytes, explicit VR little endian
    (what every encapsulated syntax uses)."""
    from io import BytesIO

    from pydicom.filewriter import dcmwrite

    register_transfer_syntaxes()
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return buf.getvalue()


@dataclass
class Verification:
    ok: bool
    text: str
    psnr: float | None = None
    max_error: float | None = None


_PIXEL_HEADER = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"   # (7FE0,0010) OB, undefined
_SEQ_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"          # (FFFE,E0DD), length 0


def verify_encoded(data: bytes, conv: Converted, *, min_psnr: float = DEFAULT_MIN_PSNR,
                   max_error: float | None = None) -> Verification:
    """The proof of an output before it is written, without reading it back as DICOM:
    every encoded frame decoded by the codec and compared with the reference
    (:func:`compare_frames`), and the file bytes shown to carry exactly those frames —
    the encapsulated pixel data after its element header, byte for byte — under the
    codec's transfer syntax in the file meta information. Same result as
    :func:`verify_bytes`, without a second parse of the whole dataset."""
    pixel = conv.encapsulated
    at = data.rfind(_PIXEL_HEADER)
    p0 = at + len(_PIXEL_HEADER)
    if (at < 0 or not data.startswith(pixel, p0)            # compared in place, no copy
            or not data.startswith(_SEQ_DELIMITER, p0 + len(pixel))):
        return Verification(False, "the written pixel data are not the encoded frames")
    if _meta_transfer_syntax(data) != conv.codec.transfer_syntax:
        return Verification(False, "the written transfer syntax is not the codec's")
    return compare_frames(conv.fragments, conv, min_psnr=min_psnr, max_error=max_error)


def _meta_transfer_syntax(data: bytes) -> str | None:
    """TransferSyntaxUID (0002,0010) of a DICOM file's meta information (explicit VR
    little endian after the preamble and "DICM"), None if it is not there."""
    import struct

    if data[128:132] != b"DICM":
        return None
    i = 132
    while i + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, i)
        if group != 2:
            return None
        vr = data[i + 4:i + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
            (n,) = struct.unpack_from("<I", data, i + 8)
            head = 12
        else:
            (n,) = struct.unpack_from("<H", data, i + 6)
            head = 8
        if elem == 0x0010:
            return data[i + head:i + head + n].rstrip(b"\0 ").decode("ascii", "replace")
        i += head + n
    return None


def verify_bytes(data: bytes, conv: Converted, *, min_psnr: float = DEFAULT_MIN_PSNR,
                 max_error: float | None = None) -> Verification:
    """Read ``data`` back as DICOM, decode every frame with our codec and compare with the
    reference (pydicom's decode of the input)."""
    from io import BytesIO

    import pydicom
    from pydicom.encaps import generate_frames

    register_transfer_syntaxes()
    try:
        back = pydicom.dcmread(BytesIO(data))
        if str(back.file_meta.TransferSyntaxUID) != conv.codec.transfer_syntax:
            return Verification(False, "the written transfer syntax is not the codec's")
        n = int(back.get("NumberOfFrames", 1) or 1)
        frags = list(generate_frames(back.PixelData, number_of_frames=n))
    except Exception as e:  # noqa: BLE001
        return Verification(False, f"the output cannot be read back: {e}")
    return compare_frames(frags, conv, min_psnr=min_psnr, max_error=max_error)


def compare_frames(frags: list[bytes], conv: Converted, *, min_psnr: float = DEFAULT_MIN_PSNR,
                   max_error: float | None = None) -> Verification:
    """Decode each fragment with the codec and compare with the reference frames: bit-exact
    for a lossless codec; PSNR and maximum error within the limits for a lossy one."""
    if len(frags) != len(conv.reference):
        return Verification(False, f"{len(frags)} frames written, {len(conv.reference)} expected")
    worst_err, sq, count = 0.0, 0.0, 0
    lo, hi = math.inf, -math.inf
    for i, (frag, ref) in enumerate(zip(frags, conv.reference)):
        try:
            got = conv.codec.decode(frag, signed=conv.signed, bits_stored=conv.bits_stored)
        except codecs.CodecError as e:
            return Verification(False, f"frame {i}: {e}")
        if got.shape != ref.shape:
            return Verification(False, f"frame {i}: decoded {got.shape}, expected {ref.shape}")
        if got.dtype == ref.dtype and np.array_equal(got, ref):
            count += ref.size                   # identical: no error to add up
            if not conv.codec.lossless:
                lo, hi = min(lo, float(ref.min())), max(hi, float(ref.max()))
            continue
        d = got.astype(np.float64) - ref.astype(np.float64)
        worst_err = max(worst_err, float(np.abs(d).max()))
        sq += float((d * d).sum())
        count += d.size
        lo, hi = min(lo, float(ref.min())), max(hi, float(ref.max()))
    if conv.codec.lossless:
        if worst_err:
            return Verification(False, f"NOT bit-exact: max error {worst_err:g}", max_error=worst_err)
        return Verification(True, "bit-exact", math.inf, 0.0)
    mse = sq / max(1, count)
    peak = max(1.0, hi - lo)
    p = math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)
    text = f"PSNR {p:.2f} dB, max error {worst_err:g}"
    if p < min_psnr:
        return Verification(False, f"{text}: below the limit of {min_psnr:g} dB", p, worst_err)
    if max_error is not None and worst_err > max_error:
        return Verification(False, f"{text}: max error above the limit of {max_error:g}", p, worst_err)
    return Verification(True, text, p, worst_err)


def choose_codec(ds, opts: Options) -> tuple[codecs.Codec | None, str]:
    """The codec for ``ds`` (None = keep the file as it is) and why."""
    if opts.to == "policy":
        pol = opts.codec_policy
        if pol is None:
            from .policy import load_policy
            pol = load_policy().codec
        choice = pol.choose(rows=int(ds.get("Rows", 0) or 0), cols=int(ds.get("Columns", 0) or 0),
                            samples=int(ds.get("SamplesPerPixel", 1) or 1),
                            modality=ds.get("Modality"), body_part=ds.get("BodyPartExamined"),
                            transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")))
        if choice.codec == "keep":
            return None, choice.reason
        name, reason = choice.codec, f"policy: {choice.reason}"
    elif opts.to in TARGETS:
        name, reason = opts.to, f"--to {opts.to}"
    else:
        raise ConvertError(f"unknown target {opts.to!r} (one of {', '.join(TARGETS)})")
    codec = codecs.by_name(name, lossless=opts.lossy_ratio is None)
    return codec, reason


# --------------------------------------------------------------------------- one file
def convert_bytes(data: bytes, opts: Options, name: str = "") -> tuple[FileResult, bytes | None]:
    """Convert one DICOM file given as bytes: (result, verified output bytes or None).
    Writes nothing; never raises for bad input (the result says what happened)."""
    t0 = time.perf_counter()
    res = FileResult(name, bytes_before=len(data))
    out: bytes | None = None
    try:
        hdr = _read_header(data)
        if hdr is not None:                  # the common case, without pydicom
            out = _convert_plain(data, hdr, opts, res)
        if out is None:
            out = _convert_dataset(data, opts, res)
        res.bytes_after = len(out)
        res.sha256 = hashlib.sha256(out).hexdigest()
        res.ratio = round(res.bytes_before / max(1, res.bytes_after), 3)
    except ConvertError as e:
        res.status, res.error, out = "failed", str(e), None
    except Exception as e:  # noqa: BLE001 - one file never stops the batch
        res.status, res.error, out = "failed", f"{type(e).__name__}: {e}", None
    res.seconds = round(time.perf_counter() - t0, 4)
    return res, out


def _convert_dataset(data: bytes, opts: Options, res: FileResult) -> bytes:
    """The general path of :func:`convert_bytes`: the file read by pydicom; the proven
    output (raises ConvertError)."""
    import warnings
    from io import BytesIO

    import pydicom
    from pydicom.errors import InvalidDicomError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # pydicom warns about damage it then survives
        try:
            ds = pydicom.dcmread(BytesIO(data))
        except (InvalidDicomError, EOFError) as e:
            raise ConvertError(f"not a DICOM file: {e}") from None
        except Exception as e:  # noqa: BLE001 - damaged headers raise many kinds
            raise ConvertError(f"damaged DICOM file: {type(e).__name__}: {e}") from None
        if "PixelData" not in ds:
            raise ConvertError("no pixel data (not an image, or cut inside its pixel data)")
        res.source_sop_instance_uid = str(ds.get("SOPInstanceUID", ""))
        codec, reason = choose_codec(ds, opts)
        res.reason = reason
        if codec is None:                            # stays as it arrived: a byte copy
            res.codec, res.transfer_syntax = "keep", str(ds.file_meta.TransferSyntaxUID)
            res.status, res.verification = "kept", "byte copy"
            res.sop_instance_uid = res.source_sop_instance_uid
            return data
        res.codec, res.transfer_syntax = codec.name, codec.transfer_syntax
        splice = _splice_plan(data, ds, codec)
        conv = encode_dataset(ds, codec, ratio=opts.lossy_ratio, reason=reason,
                              copy_first=False, resolve=splice is None)
        enc = (dataset_bytes(conv.dataset) if splice is None
               else _spliced_bytes(data, conv, *splice))
        _prove(enc, conv, opts, res)
        res.status = "converted"
        res.sop_instance_uid = str(conv.dataset.SOPInstanceUID)
        return enc


def _prove(enc: bytes, conv: Converted, opts: Options, res: FileResult) -> None:
    """:func:`verify_encoded`, its outcome in ``res``; ConvertError when it fails."""
    v = verify_encoded(enc, conv, min_psnr=opts.min_psnr, max_error=opts.max_error)
    res.verification, res.psnr, res.max_error = v.text, v.psnr, v.max_error
    if not v.ok:
        raise ConvertError(f"verification failed: {v.text}")


def _convert_plain(data: bytes, hdr: "_Header", opts: Options, res: FileResult) -> bytes | None:
    """A lossless conversion of a file :func:`_read_header` read: the output is what the
    general path's splice makes of it (the input's bytes but the file meta information
    and the pixel data, :func:`_spliced_bytes`), the frames read in place from the input's
    bytes and proven the same way. None (nothing done) when the codec chosen is not a
    lossless one, or the file meta information is not laid out plainly: the general path
    then converts the file."""
    from pydicom.encaps import encapsulate

    codec, reason = choose_codec(hdr, opts)
    if codec is None or not codec.lossless or not codec.available:
        return None
    meta = _meta_with_syntax(data[132:hdr.start], codec.transfer_syntax)
    if meta is None:
        return None
    res.source_sop_instance_uid = hdr.SOPInstanceUID
    res.reason = reason
    res.codec, res.transfer_syntax = codec.name, codec.transfer_syntax
    check_photometric(str(hdr.get("PhotometricInterpretation", "")), 1)
    n, ba = hdr.NumberOfFrames, hdr.BitsAllocated
    arr = _native_greyscale(hdr, _EXPLICIT_LE, 1, ba, n, memoryview(data)[hdr.at + 12:])
    if arr is None:                          # _read_header checked the layout
        raise ConvertError("the native pixel data do not have the layout read")
    frames = _frames(arr, n)
    signed, bits = _sign_and_bits(hdr)
    encoded = _encode_frames(codec, frames, signed, bits, None)
    conv = Converted(None, codec, frames, signed, bits, reason, encoded,
                     pixel_data=encapsulate(encoded, has_bot=True))
    enc = b"".join((data[:128], b"DICM", meta, data[hdr.start:hdr.at], _PIXEL_HEADER,
                    conv.pixel_data, _SEQ_DELIMITER))
    _prove(enc, conv, opts, res)
    res.status = "converted"
    res.sop_instance_uid = hdr.SOPInstanceUID
    return enc


class _Header:
    """What the converter needs of a plain file's header (see :func:`_read_header`), read
    without building a pydicom dataset; answers ``get`` and attribute access as a dataset
    does for these keywords (``choose_codec`` and the pixel reader take it)."""

    def __init__(self, values: dict, ts: str, start: int, at: int) -> None:
        self._v = values
        self.file_meta = {"TransferSyntaxUID": ts}
        self.start, self.at = start, at          # dataset start, pixel data element

    def get(self, key, default=None):
        return self._v.get(key, default)

    def __getattr__(self, key):
        try:
            return self.__dict__["_v"][key]
        except KeyError:
            raise AttributeError(key) from None


_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_VR_SHORT = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS",
                       b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL",
                       b"US"})
_VR_LONG = frozenset({b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL",
                      b"OV", b"SV", b"UV"})
_HEADER_US = {0x00280002: "SamplesPerPixel", 0x00280010: "Rows", 0x00280011: "Columns",
              0x00280100: "BitsAllocated", 0x00280101: "BitsStored",
              0x00280103: "PixelRepresentation"}
_HEADER_TEXT = {0x00080018: "SOPInstanceUID", 0x00080060: "Modality",
                0x00180015: "BodyPartExamined", 0x00280004: "PhotometricInterpretation",
                0x00280008: "NumberOfFrames"}


def _element(data: bytes, i: int) -> tuple[int, bytes, int, int] | None:
    """(tag, VR, value length, header length) of the explicit VR little endian element
    at ``i``; None past the end or for an unknown VR."""
    import struct

    if i + 8 > len(data):
        return None
    group, elem = struct.unpack_from("<HH", data, i)
    vr = data[i + 4:i + 6]
    if vr in _VR_LONG:
        if i + 12 > len(data):
            return None
        return group << 16 | elem, vr, struct.unpack_from("<I", data, i + 8)[0], 12
    if vr in _VR_SHORT:
        return group << 16 | elem, vr, struct.unpack_from("<H", data, i + 6)[0], 8
    return None


def _meta_well_formed(data: bytes, start: int) -> bool:
    """The file meta information from (0002,0000) to ``start`` (where its group length
    says it ends) is group 2 elements in ascending order, each of a known VR, ending
    exactly there: the spliced output keeps these bytes, so pydicom must be able to read
    them (a damaged meta element is left to pydicom's reading, which refuses it)."""
    i, last = 132, -1
    while i < start:
        el = _element(data, i)
        if el is None:
            return False
        tag, _vr, length, head = el
        if tag >> 16 != 2 or tag <= last or length == 0xFFFFFFFF:
            return False
        last = tag
        i += head + length
    return i == start


def _skip_sequence(data: bytes, i: int, depth: int = 0) -> int | None:
    """The position after an undefined-length sequence whose first item starts at ``i``
    (its items walked as pydicom reads them), None when it is not well formed."""
    import struct

    if depth > 16:
        return None
    end = len(data)
    while i + 8 <= end:
        tag = struct.unpack_from("<HH", data, i)
        length = struct.unpack_from("<I", data, i + 4)[0]
        i += 8
        if tag == (0xFFFE, 0xE0DD):                # sequence delimiter
            return i
        if tag != (0xFFFE, 0xE000):
            return None
        if length != 0xFFFFFFFF:                   # an item of defined length
            i += length
            continue
        while True:                                # its elements up to the item delimiter
            if data[i:i + 4] == b"\xfe\xff\x0d\xe0":
                i += 8
                break
            el = _element(data, i)
            if el is None:
                return None
            _tag, vr, length, head = el
            if length == 0xFFFFFFFF:
                if vr != b"SQ":
                    return None
                i = _skip_sequence(data, i + head, depth + 1)
                if i is None:
                    return None
            else:
                i += head + length
    return None


def _read_header(data: bytes) -> _Header | None:
    """The common case read without pydicom: a file in explicit VR little endian (plain
    file meta information) whose elements come in ascending order, without group
    lengths, ending with a native pixel data element of a greyscale image (the bytes up
    to it are kept as they are: :func:`_splice_plan`'s conditions). The walk only
    finds each element's extent (sequences of undefined length item by item, as pydicom
    reads them) and the few values the converter reads. None for anything else or
    anything unexpected: pydicom then reads the file (and says what is wrong with it)."""
    if (len(data) < 144 or data[128:132] != b"DICM"
            or data[132:138] != b"\x02\x00\x00\x00UL"):
        return None
    start = 144 + int.from_bytes(data[140:144], "little")
    if _meta_transfer_syntax(data) != _EXPLICIT_LE or not _meta_well_formed(data, start):
        return None
    i, end, last = start, len(data), -1
    values: dict = {}
    at = None
    while at is None:
        el = _element(data, i)
        if el is None:
            return None
        tag, vr, length, head = el
        if tag <= last or tag >> 16 in (0, 2):
            return None                            # unordered, group length, meta
        last = tag
        if tag >= 0x7FE00000:
            if (tag != 0x7FE00010 or vr not in (b"OB", b"OW")
                    or i + head + length != end):  # pixel data last, ending the file
                return None
            at = i
        elif length == 0xFFFFFFFF:
            if vr != b"SQ":
                return None
            i = _skip_sequence(data, i + head)
            if i is None:
                return None
        else:
            value = data[i + head:i + head + length]
            if tag in _HEADER_US:
                if vr != b"US" or length != 2:
                    return None
                values[_HEADER_US[tag]] = int.from_bytes(value, "little")
            elif tag in _HEADER_TEXT:
                try:
                    text = value.decode("ascii").rstrip("\0 ")
                except UnicodeDecodeError:
                    return None
                if "\\" in text or text != text.lstrip():
                    return None                    # several values: pydicom reads them
                values[_HEADER_TEXT[tag]] = text
            i += head + length
            if i > end:
                return None
    try:
        n = int(values.get("NumberOfFrames") or 1)
    except ValueError:
        return None
    values["NumberOfFrames"] = n
    if "SOPInstanceUID" not in values or values.get("SamplesPerPixel", 1) != 1:
        return None
    ba = values.get("BitsAllocated", 0)
    hdr = _Header(values, _EXPLICIT_LE, start, at)
    layout = _native_layout(hdr, _EXPLICIT_LE, 1, ba, n) if values.get("Rows") and \
        values.get("Columns") else None
    if layout is None or end - at - 12 < math.prod(layout[1]) * layout[0].itemsize:
        return None
    return hdr


def _splice_plan(data: bytes, ds, codec: codecs.Codec) -> tuple[int, int] | None:
    """Where the input's dataset starts and its pixel data element begins, when a
    lossless conversion changes nothing but the pixel data and the transfer syntax: then
    the output is the input's own bytes for every other element (written once, not
    re-encoded by pydicom: faster, and every attribute kept byte for byte). None when
    anything else would change (implicit VR or big endian input, group lengths, offset
    tables, a colour conversion, a lossy input, elements after the pixel data)."""
    if not codec.lossless or getattr(ds, "original_encoding", None) != (False, True):
        return None
    if data[128:132] != b"DICM" or data[132:138] != b"\x02\x00\x00\x00UL":
        return None
    start = 144 + int.from_bytes(data[140:144], "little")
    if data[start:start + 2] == b"\x02\x00":
        return None
    tags = list(ds.keys())
    if (not tags or tags[-1] != 0x7FE00010 or any(t.group == 0 for t in tags)
            or 0x7FE00000 in ds):              # a pixel group length would go stale
        return None
    if "ExtendedOffsetTable" in ds or "ExtendedOffsetTableLengths" in ds:
        return None
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    pi = str(ds.get("PhotometricInterpretation", "")).strip()
    if spp == 3 and (pi != "RGB" or int(ds.get("PlanarConfiguration", 0) or 0) != 0):
        return None
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if ts in LOSSY_INPUT_TS and ds.get("LossyImageCompression") != "01":
        return None
    tell = getattr(ds.get_item(0x7FE00010), "value_tell", None)
    if tell is None or tell < start + 12:
        return None
    at = tell - 12
    if data[at:at + 4] != b"\xe0\x7f\x10\x00" or data[at + 4:at + 6] not in (b"OB", b"OW"):
        return None
    return start, at


def _spliced_bytes(data: bytes, conv: Converted, start: int, at: int) -> bytes:
    """The output file: the input's preamble, the new file meta information, the input's
    dataset bytes up to its pixel data, the encoded pixel data (see :func:`_splice_plan`)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta_bytes = _meta_with_syntax(data[132:start], conv.codec.transfer_syntax)
    if meta_bytes is None:               # not the plain layout: pydicom writes it
        register_transfer_syntaxes()
        meta = DicomBytesIO()
        write_file_meta_info(meta, conv.dataset.file_meta, enforce_standard=True)
        meta_bytes = meta.getvalue()
    pixel = conv.encapsulated
    return b"".join((data[:128], b"DICM", meta_bytes, data[start:at], _PIXEL_HEADER,
                     pixel, _SEQ_DELIMITER))


_LONG_VRS = (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV")


def _meta_with_syntax(meta: bytes, ts: str) -> bytes | None:
    """The input's file meta information (group 0002, explicit VR little endian, starting
    with its group length) with the TransferSyntaxUID element's value replaced by ``ts``
    and the group length recomputed: what pydicom's ``write_file_meta_info`` writes for
    the same elements, without building a dataset. None when the group is not laid out
    that way (then pydicom writes it)."""
    import struct

    if meta[:8] != b"\x02\x00\x00\x00UL\x04\x00" or len(meta) < 12:
        return None
    if struct.unpack_from("<I", meta, 8)[0] != len(meta) - 12:
        return None
    out, i, seen = [], 12, False
    while i < len(meta):
        if i + 8 > len(meta):
            return None
        group, elem = struct.unpack_from("<HH", meta, i)
        vr = meta[i + 4:i + 6]
        if group != 2:
            return None
        if vr in _LONG_VRS:
            (n,) = struct.unpack_from("<I", meta, i + 8)
            head = 12
        else:
            (n,) = struct.unpack_from("<H", meta, i + 6)
            head = 8
        if n == 0xFFFFFFFF or i + head + n > len(meta):
            return None
        if elem == 0x0010:
            if vr != b"UI":
                return None
            value = ts.encode("ascii")
            value += b"\x00" * (len(value) % 2)
            out.append(meta[i:i + 6] + struct.pack("<H", len(value)) + value)
            seen = True
        else:
            out.append(meta[i:i + head + n])
        i += head + n
    if not seen:
        return None
    body = b"".join(out)
    return b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<I", len(body)) + body


def convert_file(src: str | Path, dst: str | Path, opts: Options, *,
                 sync_dir: bool = True) -> FileResult:
    """Convert one file to ``dst`` (see the module doc). Never raises for a bad file: the
    result says what happened."""
    t0 = time.perf_counter()
    res, out = _convert_to_bytes(Path(src), Path(dst), opts)
    if out is not None:
        _write_output(res, Path(dst), out, sync_dir)
    res.seconds = round(time.perf_counter() - t0, 4)
    return res


def _write_output(res: FileResult, dst: Path, out: bytes, sync_dir: bool) -> FileResult:
    """Write a proven output once, atomically and fsynced (the result says if it failed;
    its checksum was taken by :func:`convert_bytes`)."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(dst, out, sync_dir=sync_dir)
    except OSError as e:
        res.status, res.error = "failed", f"cannot write the output: {e}"
    return res


def convert_files(pairs: list[tuple[str | Path, str | Path]], opts: Options) -> list[FileResult]:
    """:func:`convert_file` for several files (folders fsynced by the caller), each output
    written on a writer thread while the next file is converted: its fsync waits for the
    disk without holding up the encoder. An output still only exists once proven, and
    under its name only once complete (temp file, fsync, rename)."""
    from concurrent.futures import ThreadPoolExecutor

    results: list[FileResult] = []
    with ThreadPoolExecutor(1, thread_name_prefix="convert-write") as writer:
        writes = []
        for s, d in pairs:
            res, out = _convert_to_bytes(Path(s), Path(d), opts)
            results.append(res)
            if out is not None:       # res.seconds: the conversion; the write overlaps
                writes.append(writer.submit(_write_output, res, Path(d), out, False))
        for w in writes:
            w.result()
    return results


def _convert_to_bytes(src: Path, dst: Path, opts: Options) -> tuple[FileResult, bytes | None]:
    """Everything of :func:`convert_file` but the write: (result, proven output or None)."""
    t0 = time.perf_counter()
    res = FileResult(str(src), str(dst))
    try:
        # an output that does not exist yet cannot be the input (no resolve() then)
        exists = dst.exists()
        if exists and src.resolve() == dst.resolve():
            raise ConvertError("the output would overwrite the input")
        res.bytes_before = src.stat().st_size
        if exists:
            done = _done_before(dst)
            if done is not None and done[0] == _expected_ts(src, opts):
                res.status, res.transfer_syntax, res.bytes_after = "skipped", done[0], done[1]
                res.sop_instance_uid = done[2]
                res.ratio = round(res.bytes_before / max(1, res.bytes_after), 3)
                res.verification = "output exists (verified when written)"
                return res, None
        data = src.read_bytes()
    except (ConvertError, OSError) as e:
        res.status, res.error = "failed", str(e)
        res.seconds = round(time.perf_counter() - t0, 4)
        return res, None
    res, out = convert_bytes(data, opts, str(src))
    res.output = str(dst)
    res.seconds = round(time.perf_counter() - t0, 4)
    return res, out


def _expected_ts(src: Path, opts: Options) -> str | None:
    """The transfer syntax this run would give ``src`` (None if its header is unreadable):
    an output in another syntax (an earlier run with another --to or policy) is redone."""
    import pydicom

    try:
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        codec, _ = choose_codec(ds, opts)
    except Exception:  # noqa: BLE001 - the conversion itself reports the problem
        return None
    return str(ds.file_meta.TransferSyntaxUID) if codec is None else codec.transfer_syntax


def _done_before(dst: Path) -> tuple[str, int, str] | None:
    """(transfer syntax, size, SOP UID) of an existing output, None if it is not DICOM."""
    import pydicom

    try:
        ds = pydicom.dcmread(dst, stop_before_pixels=True)
        return str(ds.file_meta.TransferSyntaxUID), dst.stat().st_size, str(ds.get("SOPInstanceUID", ""))
    except Exception:  # noqa: BLE001 - not ours / damaged: converted again
        return None


# --------------------------------------------------------------------------- many files
def plan(paths: Iterable[str | Path], out_dir: str | Path) -> tuple[list[tuple[Path, Path]], list[FileResult]]:
    """(input, output) pairs for files and folders (searched recursively; outputs keep the
    path below the folder given), and results for clashes and missing paths."""
    out_dir = Path(out_dir)
    pairs: list[tuple[Path, Path]] = []
    bad: list[FileResult] = []
    seen: dict[Path, Path] = {}
    out_res = out_dir.resolve()
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
            # an output folder inside the input folder holds our outputs: not inputs
            nested_out = out_res != p.resolve() and _is_under(out_res, p.resolve())
            items = []
            for f in files:
                if (nested_out and _is_under(f.resolve(), out_res)) or is_temp_name(f.name):
                    continue
                items.append((f, out_dir / f.relative_to(p)))
        elif p.is_file():
            items = [(p, out_dir / p.name)]
        else:
            bad.append(FileResult(str(p), status="failed", error="no such file or folder"))
            continue
        for f, o in items:
            key = o.resolve()
            if key in seen:
                bad.append(FileResult(str(f), str(o), status="failed",
                                      error=f"output name clash with {seen[key]}"))
                continue
            seen[key] = f
            pairs.append((f, o))
    return pairs, bad


def _is_under(p: Path, root: Path) -> bool:
    try:
        p.relative_to(root)
        return True
    except ValueError:
        return False


def pool_context():
    """fork when this process runs one thread (workers start at once, nothing to import
    again); else forkserver (forking a threaded process can inherit a held lock)."""
    import multiprocessing as mp
    import threading

    methods = mp.get_all_start_methods()
    if threading.active_count() == 1 and "fork" in methods:
        return mp.get_context("fork")
    if "forkserver" in methods:
        ctx = mp.get_context("forkserver")
        # the forkserver loads the pipelines once; each worker forked from it has them
        # (no effect once the forkserver runs)
        ctx.set_forkserver_preload(["server.ingest", "server.convert", "server.verify"])
        return ctx
    return mp.get_context("spawn")


#: Below this many items, no worker processes are started (their start costs more);
#: in a threaded process (the server, the viewer), whose workers come from a forkserver
#: and import the pipelines first, below the second figure.
PROCESS_MIN_ITEMS = 4
PROCESS_MIN_ITEMS_THREADED = 64


def pool_worth(nitems: int, ctx=None) -> bool:
    """Whether ``nitems`` CPU-bound items are worth starting worker processes for."""
    ctx = ctx or pool_context()
    return nitems >= (PROCESS_MIN_ITEMS if ctx.get_start_method() == "fork"
                      else PROCESS_MIN_ITEMS_THREADED)


def warm_up() -> None:
    """Load what the first conversion would load (the codec library, pydicom's pixel data
    handlers), before worker processes are forked: they inherit it, instead of each
    paying for it on its first file."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import ExplicitVRLittleEndian

    for c in codecs.all_codecs():
        c.available                      # noqa: B018 - imports imagecodecs, checks it
    get_decoder(ExplicitVRLittleEndian)
    import concurrent.futures.thread     # noqa: F401 - the workers' writer thread
    import ctypes                        # noqa: F401 - _reuse_freed_memory
    import pydicom.encaps                # noqa: F401
    import pydicom.filewriter            # noqa: F401


def chunks(items: list, workers: int, most: int = 16) -> list[list]:
    """``items`` in consecutive chunks: about four per worker (so that a slow chunk does
    not leave the others idle at the end), at most ``most`` items each (progress)."""
    size = max(1, min(most, -(-len(items) // (4 * max(1, workers)))))
    return [items[i:i + size] for i in range(0, len(items), size)]


#: Files a worker process holds not yet converted: the one it converts and the next,
#: waiting in its pipe (so it never waits for the parent); more would only unbalance the
#: end. It asks for another as soon as it has converted one (not once it is written).
IN_FLIGHT = 2
#: Proven outputs a worker may hold waiting for its writer thread (a slow disk: an fsync
#: can take longer than a conversion) before it waits for the disk itself.
WRITE_BACKLOG = 4


def convert_paths(paths: Iterable[str | Path], out_dir: str | Path, opts: Options, *,
                  workers: int = 1, progress: Callable[[int, int, FileResult], None] | None = None
                  ) -> ConvertReport:
    """Convert files and folders into ``out_dir``, ``workers`` processes in parallel."""
    t0 = time.perf_counter()
    if opts.to == "policy" and opts.codec_policy is None:
        from .policy import load_policy
        opts.codec_policy = load_policy().codec
    pairs, bad = plan(paths, out_dir)
    report = ConvertReport(list(bad))
    total = len(pairs)
    done = 0

    def note(r: FileResult) -> None:
        nonlocal done
        done += 1
        report.results.append(r)
        if progress:
            progress(done, total, r)

    if workers <= 1 or total <= 1:
        for part in chunks(pairs, 1):
            for r in convert_files(part, opts):
                note(r)
    else:
        _convert_in_workers(pairs, opts, min(workers, total), note)
    fsync_dirs(Path(r.output).parent for r in report.results if r.status in ("converted", "kept"))
    order = {str(s): i for i, (s, _d) in enumerate(pairs)}
    report.results.sort(key=lambda r: order.get(r.file, -1))
    report.seconds = time.perf_counter() - t0
    return report


def _convert_in_workers(pairs: list[tuple[Path, Path]], opts: Options, workers: int,
                        note: Callable[[FileResult], None]) -> None:
    """Convert ``pairs`` in ``workers`` processes, a file at a time each (whichever is free
    takes the next: no idle worker at the end), :data:`IN_FLIGHT` files sent ahead. Only
    paths go to a worker and only its result comes back: the worker reads the input,
    converts, proves and writes the output itself (the write overlapping its next file),
    and answers once the output is written. A worker that dies fails the file it was
    converting (named in the report); a new one takes over the rest (:func:`lost`)."""
    import gc
    from collections import deque

    ctx = pool_context()
    forked = ctx.get_start_method() == "fork"
    if forked:
        warm_up()                        # inherited by every worker
    todo = deque(enumerate(pairs))
    held: dict = {}                      # parent end of a worker's pipe -> (process, {i: src})

    def start() -> None:
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(theirs, opts), daemon=True,
                           name="medview-convert")
        if forked:
            gc.freeze()                  # the workers' collections leave inherited objects
        try:                             # alone (no copy-on-write of their pages)
            proc.start()
        finally:
            if forked:
                gc.unfreeze()
        theirs.close()
        # its files not yet written, how many of them not yet converted, those converted
        held[mine] = (proc, {}, [0], set())

    def send_one(conn) -> None:
        _proc, out, ahead, _c = held[conn]
        i, (s, d) = todo.popleft()
        out[i] = s
        ahead[0] += 1
        conn.send((i, str(s), str(d)))

    def feed(conn) -> None:
        while todo and held[conn][2][0] < IN_FLIGHT:
            send_one(conn)

    strikes: dict[int, int] = {}

    def lost(conn) -> None:
        """A worker died: the file it was converting (the first it had not converted) is
        failed; the others it held (converted but not yet written, or not yet begun) go
        to another worker, unless they were held by a worker that died before."""
        proc, out, _ahead, converted = held.pop(conn)
        proc.join()
        conn.close()
        why = f"worker: the worker process ended abruptly (exit code {proc.exitcode})"
        culprit = next((i for i in out if i not in converted), None)
        again = []
        for i, s in out.items():
            strikes[i] = strikes.get(i, 0) + 1
            if i == culprit or strikes[i] >= 2:
                note(FileResult(str(s), status="failed", error=why))
            else:
                again.append(i)
        for i in reversed(again):
            todo.appendleft((i, pairs[i]))
        if todo:
            start()
            feed(next(reversed(held)))

    stopped: list = []

    def stop_idle() -> None:
        """Workers with nothing to do: told to end (joined at the end, not waited for)."""
        for conn, (proc, out, _ahead, _c) in list(held.items()):
            if not out and not todo:
                conn.send(None)
                conn.close()
                del held[conn]
                stopped.append(proc)

    try:
        for _ in range(workers):
            start()
        for _ in range(IN_FLIGHT):               # the first files spread over the workers
            for conn in held:
                if todo:
                    send_one(conn)
        stop_idle()
        _serve_workers(held, note, feed, lost, stop_idle)
    finally:
        for conn, (proc, _o, _a, _c) in held.items():     # only after an error of ours
            proc.terminate()
            conn.close()
            stopped.append(proc)
        for proc in stopped:
            proc.join()


def _serve_workers(held: dict, note, feed, lost, stop_idle) -> None:
    """The parent's loop of :func:`_convert_in_workers`: results in, next files out."""
    from multiprocessing.connection import wait

    while held:
        sentinels = {proc.sentinel: conn for conn, (proc, *_rest) in held.items()}
        for ready in wait([*held, *sentinels]):
            conn = sentinels.get(ready, ready)
            if conn not in held:
                continue
            proc, out, ahead, converted = held[conn]
            try:
                while conn.poll():       # all it sent, also from a worker that ended
                    msg = conn.recv()
                    if msg[0] == NEXT:   # (NEXT, index): converted, wants another
                        ahead[0] -= 1
                        converted.add(msg[1])
                        continue
                    i, r = msg
                    converted.discard(i)
                    out.pop(i, None)
                    note(r)
            except (EOFError, OSError):
                lost(conn)
                continue
            if not proc.is_alive() and not conn.poll():
                lost(conn)
                continue
            feed(conn)
        stop_idle()


def _worker_main(conn, opts: Options) -> None:
    """A worker process: convert the files the parent sends, a (index, input, output) at a
    time, until None. After each conversion it asks for the next file ("next"); the
    output is written on a writer thread (its fsync does not hold up the next
    conversion; at most :data:`WRITE_BACKLOG` outputs wait for it) and the result (index,
    FileResult) sent once it is written."""
    import threading
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    _reuse_freed_memory()
    lock = threading.Lock()                  # the writer thread sends too

    def send(msg) -> None:
        with lock:
            conn.send(msg)

    def finish(i: int, res: FileResult, dst: str, out: bytes | None) -> None:
        if out is not None:
            _write_output(res, Path(dst), out, False)
        send((i, res))

    writes: deque = deque()
    with ThreadPoolExecutor(1, thread_name_prefix="convert-write") as writer:
        while True:
            try:
                task = conn.recv()
            except (EOFError, OSError):
                break                    # the parent is gone
            if task is None:
                break
            i, s, d = task
            try:
                res, out = _convert_to_bytes(Path(s), Path(d), opts)
            except Exception as e:  # noqa: BLE001 - reported, the worker goes on
                res, out = FileResult(s, d, error=f"{type(e).__name__}: {e}"), None
            send((NEXT, i))
            while writes and (writes[0].done() or len(writes) >= WRITE_BACKLOG):
                writes.popleft().result()
            writes.append(writer.submit(finish, i, res, d, out))
    conn.close()


NEXT = "next"       # a worker's request for another file


def _reuse_freed_memory() -> None:
    """In a worker process (it ends with the batch): glibc keeps freed memory for the next
    file instead of giving each image-sized buffer back to the system and faulting fresh
    zeroed pages in for the next one (a third of the converter's own time per image
    went to that). Nothing where the C library is not glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 64 << 20)      # buffers below 64 MiB from the heap
    mallopt(m_trim_threshold, 256 << 20)     # and up to 256 MiB of it kept


def progress_printer(stream=None) -> Callable[[int, int, FileResult], None]:
    """A progress line per file: [done/total] percent, file, what happened."""
    def show(done: int, total: int, r: FileResult) -> None:
        width = len(str(total))
        if r.status == "failed":
            what = f"FAILED: {r.error}"
        elif r.status == "skipped":
            what = "done before"
        elif r.status == "kept":
            what = f"kept ({r.reason})"
        else:
            what = f"{r.codec} {r.ratio:.2f}:1 {r.verification}"
        print(f"[{done:>{width}}/{total}] {100 * done // max(1, total):3d}%  {r.file}: {what}",
              file=stream or sys.stderr, flush=True)
    return show
