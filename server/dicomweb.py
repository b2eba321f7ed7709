"""DICOMweb (PS3.18): QIDO-RS, WADO-RS, STOW-RS, rendered and thumbnail resources.

Registered by :mod:`server.app` with :func:`routes` (like
:mod:`server.policy_routes`); every route goes through the app's ``guarded``
decorator (the one authorisation point, and the audit). Each handler also checks that
every UID of its path belongs to its parent (study ⊃ series ⊃ instance ⊃ frame) and
serves only that object; a study- or series-wide answer checks the grant of every series
it contains, and anything that sends full-quality pixels or originals needs an unlimited
grant on every image concerned (:meth:`Grant.allows_whole`).

Routes (under ``/dicomweb``)
----------------------------
QIDO-RS (``browse``)      ``GET /studies``, ``/series``, ``/instances``,
                          ``/studies/{study}/series``, ``/studies/{study}/instances``,
                          ``/studies/{study}/series/{series}/instances``
WADO-RS (``retrieve``)    ``GET /studies/{study}``, ``.../series/{series}``,
                          ``.../instances/{sop}``: ``multipart/related;
                          type="application/dicom"`` (any transfer syntax of
                          :data:`FRAME_ENCODERS`, ``*`` = the original as stored);
                          ``application/zip`` (study, series): the originals in a zip;
                          ``.../frames/{list}``: ``multipart/related`` frames;
                          ``.../instances/{sop}/bulk/{tag}``: bulk data
WADO-RS (``metadata``)    ``GET .../metadata`` at study, series and instance level
rendered (``fetch``)      ``GET .../rendered`` and ``.../thumbnail`` at study, series,
                          instance and frame level: ``image/jpeg`` or ``image/png``;
                          ``window=center,width[,linear|sigmoid]``,
                          ``viewport=vw,vh``, ``quality=1..100``
STOW-RS (``store``)       ``POST /studies``, ``POST /studies/{study}``

QIDO-RS query keys: every key is a keyword or a tag (``00100020``) matched by
:meth:`server.catalogue.Catalogue.qido` (PS3.4 C.2.2.2 matching; anything it cannot
match is refused with 400 naming the key), plus ``includefield`` (keywords, tags or
``all``), ``fuzzymatching`` (``true``/``false``; accepted, person names always match
case-insensitively), ``limit``, ``offset`` and the project's ``format=json``
(keyword-keyed plain JSON for its own client).

Media negotiation: the Accept header with quality values; for multipart answers the
``type`` and ``transfer-syntax`` parameters. A frame or instance is produced in a
transfer syntax only by an entry of :data:`FRAME_ENCODERS` (native explicit VR little
endian and JPEG 2000 lossless here; other codecs register with
:func:`register_frame_encoder`) or, for ``*`` or its own syntax, as the original holds
it; nothing acceptable → 406, never another syntax. Pixel values always equal pydicom's
decode of the original file (signed stays signed; PALETTE COLOR stays palette indices).

Compatibility with the project's own clients (not PS3.18): an instance asked with
``Accept: */*`` (or none, or ``application/dicom``) is the original file as one part;
a frame asked as ``application/x-medview-codestream`` is the stored (layered,
offset-shifted) JPEG 2000 codestream with its offset in ``X-MedView-Offset`` (409
while its lossless layer is not verified: :mod:`server.verify`).
"""
from __future__ import annotations

import io
import logging
import math
import re
import secrets
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .catalogue import QueryError, qido_key
from .http_ranges import range_response
from .packets import RequestError
from .responses import json_response
from .inputs import Param
from .targets import may_hide, visible_instances, visible_rows

#: the paging parameters of QIDO-RS, checked (64-bit range, 400 naming the field) by the
#: one authorisation point before the handler runs
PAGE = (Param("limit", "int", "at most this many results"),
        Param("offset", "int", "skip this many results"))

log = logging.getLogger("medview.dicomweb")

PREFIX = "/dicomweb"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
NATIVE_SYNTAXES = (EXPLICIT_LE, IMPLICIT_LE, DEFLATED_LE, BIG_ENDIAN)
LEGACY_CODESTREAM = "application/x-medview-codestream"

#: Part media type of a frame in each transfer syntax (PS3.18 Table 8.7.3-2/-3).
SYNTAX_MEDIA: dict[str, str] = {
    EXPLICIT_LE: "application/octet-stream",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    J2K_LOSSLESS: "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx", "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.4.110": "image/jxl", "1.2.840.10008.1.2.4.111": "image/jxl",
    "1.2.840.10008.1.2.4.112": "image/jxl",
}
#: The transfer syntax a part media type means when the request names none.
MEDIA_DEFAULT_SYNTAX: dict[str, str] = {
    "application/octet-stream": EXPLICIT_LE, "image/jp2": J2K_LOSSLESS,
    "image/jpeg": "1.2.840.10008.1.2.4.50", "image/jls": "1.2.840.10008.1.2.4.80",
    "image/dicom-rle": "1.2.840.10008.1.2.5", "image/x-dicom-rle": "1.2.840.10008.1.2.5",
    "image/jphc": "1.2.840.10008.1.2.4.201", "image/jxl": "1.2.840.10008.1.2.4.110",
    "image/jpx": "1.2.840.10008.1.2.4.92", "image/x-jls": "1.2.840.10008.1.2.4.80",
}


class NotAcceptable(RequestError):
    def __init__(self, message: str):
        super().__init__(message, status=406)


# --------------------------------------------------------------------------- encoders

@dataclass(frozen=True)
class PixelInfo:
    """How the original describes its pixels (what an encoder must keep)."""

    rows: int
    columns: int
    samples: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str


@dataclass(frozen=True)
class FrameEncoder:
    """Encodes one decoded frame (pydicom's array of the original) in a transfer syntax.
    ``encode(array, info) -> bytes``: the frame's bytes as a DICOM fragment (or the
    native frame for an uncompressed syntax). ``lossless``: values decode equal."""

    syntax: str
    media: str
    encode: Callable[[np.ndarray, PixelInfo], bytes]
    lossless: bool = True
    encapsulated: bool = True


def _encode_native(arr: np.ndarray, info: PixelInfo) -> bytes:
    if info.bits_allocated == 1:
        from pydicom.pixels import pack_bits

        return pack_bits(arr, pad=False)
    dtype = np.dtype(f"{'<i' if info.signed else '<u'}{max(1, info.bits_allocated // 8)}")
    return np.ascontiguousarray(arr).astype(dtype, copy=False).tobytes()


def _encode_j2k_lossless(arr: np.ndarray, info: PixelInfo) -> bytes:
    """Reversible JPEG 2000 codestream (no JP2 box): the SIZ marks signed samples signed
    and the precision is BitsStored, so a decoder returns the original values."""
    import imagecodecs

    a = np.ascontiguousarray(arr)
    if a.dtype.itemsize > 2 or a.dtype.kind not in "ui":
        raise NotAcceptable(f"JPEG 2000 lossless cannot hold {a.dtype} samples")
    levels = max(1, min(6, min(a.shape[:2]).bit_length() - 1))
    bits = max(1, min(info.bits_stored, a.dtype.itemsize * 8))
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    need = (max(hi.bit_length(), (~lo).bit_length()) + 1 if a.dtype.kind == "i"
            else hi.bit_length())
    bits = max(bits, need)       # values outside BitsStored must survive too
    return bytes(imagecodecs.jpeg2k_encode(a, level=0, codecformat="J2K", reversible=True,
                                           mct=False, resolutions=levels, bitspersample=bits,
                                           numthreads=1))


#: Transfer syntax → encoder. Add codecs with :func:`register_frame_encoder`.
FRAME_ENCODERS: dict[str, FrameEncoder] = {
    EXPLICIT_LE: FrameEncoder(EXPLICIT_LE, "application/octet-stream", _encode_native,
                              encapsulated=False),
    J2K_LOSSLESS: FrameEncoder(J2K_LOSSLESS, "image/jp2", _encode_j2k_lossless),
}


def register_frame_encoder(syntax: str, media: str,
                           encode: Callable[[np.ndarray, PixelInfo], bytes], *,
                           lossless: bool = True) -> None:
    """Make frames and instances available in another (encapsulated) transfer syntax."""
    FRAME_ENCODERS[syntax] = FrameEncoder(syntax, media, encode, lossless)
    SYNTAX_MEDIA.setdefault(syntax, media)
    MEDIA_DEFAULT_SYNTAX.setdefault(media, syntax)


def _codec_encoder(syntax: str) -> Callable[[np.ndarray, PixelInfo], bytes]:
    """An encoder through the codec interface (:mod:`codestream.codecs`): the values of
    pydicom's decode, lossless; an image the codec cannot hold is 406 with the reason."""
    from codestream import codecs

    codec = codecs.get(syntax)

    def encode(arr: np.ndarray, info: PixelInfo) -> bytes:
        if info.bits_allocated == 1:
            raise NotAcceptable(f"{codec.label}: 1-bit images are sent natively only")
        try:
            return codec.encode(arr, signed=info.signed, bits_stored=info.bits_stored)
        except (codecs.CodecError, codecs.CodecUnavailable) as e:
            raise NotAcceptable(f"{codec.label}: {e}") from None
    return encode


def _register_codecs() -> None:
    """JPEG-LS, HTJ2K (RPCL and any order) and JPEG XL lossless, where the library is
    there (SPEC H1: the final copies' syntaxes, served from the copy when one exists)."""
    from codestream import codecs

    for ts in (codecs.JPEGLS_LOSSLESS, codecs.HTJ2K_LOSSLESS_RPCL, codecs.HTJ2K_LOSSLESS,
               codecs.JPEGXL_LOSSLESS):
        if codecs.get(ts).available:
            register_frame_encoder(ts, SYNTAX_MEDIA[ts], _codec_encoder(ts))


_register_codecs()


# --------------------------------------------------------------------------- the original

_YBR_TO_RGB = frozenset({"YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})


class Original:
    """An original file, parsed once, with pydicom's decode of its frames."""

    def __init__(self, data: bytes):
        import pydicom

        self.data = data
        self.ds = pydicom.dcmread(io.BytesIO(data))
        self.syntax = str(self.ds.file_meta.get("TransferSyntaxUID", EXPLICIT_LE))
        ds = self.ds
        self.frames = int(ds.get("NumberOfFrames") or 1) if "PixelData" in ds else 0
        pr = int(ds.get("PixelRepresentation") or 0)
        self.stored_photometric = str(ds.get("PhotometricInterpretation", ""))
        # pydicom's decode (the reference) converts YCbCr to RGB
        pi = "RGB" if self.stored_photometric in _YBR_TO_RGB else self.stored_photometric
        self.info = PixelInfo(int(ds.get("Rows") or 0), int(ds.get("Columns") or 0),
                              int(ds.get("SamplesPerPixel") or 1),
                              int(ds.get("BitsAllocated") or 8),
                              int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8),
                              pr == 1, pi)

    @property
    def encapsulated(self) -> bool:
        return self.syntax not in NATIVE_SYNTAXES

    def array(self, index: int) -> np.ndarray:
        """pydicom's decode of frame ``index`` (0-based): the reference values."""
        from pydicom.pixels import pixel_array

        return pixel_array(self.ds, index=index)

    def native(self, index: int) -> bytes:
        """Frame ``index`` in explicit VR little endian: a native little endian original's
        bytes as it holds them (its photometric interpretation and planar configuration,
        as its metadata says); otherwise pydicom's decode (YCbCr of a compressed original
        comes out as RGB, as pydicom gives it)."""
        i = self.info
        if self.syntax in (EXPLICIT_LE, IMPLICIT_LE, DEFLATED_LE) and i.bits_allocated % 8 == 0:
            size = i.rows * i.columns * i.samples * i.bits_allocated // 8
            raw = self.ds.PixelData
            if len(raw) >= size * self.frames:
                return bytes(raw[index * size:(index + 1) * size])
        return _encode_native(self.array(index), self.info)

    def fragments(self, index: int) -> bytes:
        """The encapsulated original's frame ``index`` as it is stored."""
        from pydicom.encaps import generate_frames

        for n, f in enumerate(generate_frames(self.ds.PixelData, number_of_frames=self.frames)):
            if n == index:
                return f
        raise RequestError(f"frame {index + 1} not found in the original", status=404)


class FinalCopy:
    """An instance's final copy (:mod:`server.policy_copies`): its bytes as stored,
    read when first needed, and its frames as stored. An RPCL HTJ2K copy (.4.202) is also
    a valid HTJ2K lossless codestream (.4.201), so its frames serve both syntaxes."""

    def __init__(self, syntax: str, load: Callable[[], bytes]):
        self.syntax = syntax
        self._load = load
        self._data: bytes | None = None
        self._frames: list[bytes] | None = None

    @property
    def data(self) -> bytes:
        if self._data is None:
            self._data = self._load()
        return self._data

    def frame_syntaxes(self) -> tuple[str, ...]:
        if self.syntax == "1.2.840.10008.1.2.4.202":
            return (self.syntax, "1.2.840.10008.1.2.4.201")
        return (self.syntax,)

    def fragments(self, index: int) -> bytes:
        if self._frames is None:
            import pydicom
            from pydicom.encaps import generate_frames

            from .convert import register_transfer_syntaxes

            register_transfer_syntaxes()
            ds = pydicom.dcmread(io.BytesIO(self.data))
            n = int(ds.get("NumberOfFrames") or 1)
            self._frames = list(generate_frames(ds.PixelData, number_of_frames=n))
        if not 0 <= index < len(self._frames):
            raise RequestError(f"frame {index + 1} not found in the final copy", status=404)
        return self._frames[index]


class _LazyOriginal:
    """An :class:`Original` read and parsed only when first used: a frame served from the
    final copy never reads the original."""

    def __init__(self, load: Callable[[], Original]):
        self._load = load
        self._orig: Original | None = None

    def __getattr__(self, name):
        if self._orig is None:
            self._orig = self._load()
        return getattr(self._orig, name)


def transcode_instance(orig: Original, syntax: str) -> bytes:
    """The original file in another transfer syntax (explicit VR little endian or an
    encapsulated syntax of :data:`FRAME_ENCODERS`); pixel values as pydicom decodes them,
    palette stays palette, signed stays signed."""
    import copy

    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    enc = FRAME_ENCODERS.get(syntax)
    if enc is None:
        raise NotAcceptable(f"transfer syntax {syntax} cannot be produced")
    ds = copy.deepcopy(orig.ds)
    if "PixelData" in ds:
        frames = [enc.encode(orig.array(n), orig.info) for n in range(orig.frames)]
        if enc.encapsulated:
            ds.PixelData = encapsulate(frames, has_bot=True)
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        else:
            data = b"".join(frames)
            ds.PixelData = data + (b"\0" if len(data) % 2 else b"")
            ds["PixelData"].VR = "OW" if orig.info.bits_allocated > 8 else "OB"
            ds["PixelData"].is_undefined_length = False
        if orig.info.photometric != ds.get("PhotometricInterpretation"):
            ds.PhotometricInterpretation = orig.info.photometric
        if orig.info.samples > 1:
            ds.PlanarConfiguration = 0
        if "ExtendedOffsetTable" in ds:
            del ds["ExtendedOffsetTable"]
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    from .convert import register_transfer_syntaxes

    register_transfer_syntaxes()           # pydicom 3.0 does not know JPEG XL yet
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return out.getvalue()


# --------------------------------------------------------------------------- negotiation

@dataclass
class MediaRange:
    media: str
    params: dict = field(default_factory=dict)
    q: float = 1.0

    @property
    def part_type(self) -> str | None:
        t = self.params.get("type")
        return t.lower() if t else None

    @property
    def syntax(self) -> str | None:
        return self.params.get("transfer-syntax")


def _split_params(text: str, sep: str = ";") -> list[str]:
    """``text`` split at ``sep`` outside double quotes (header lists and parameters)."""
    out, cur, quoted = [], "", False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return out


def parse_accept(header: str | None) -> list[MediaRange]:
    """The Accept header as media ranges, best first (q=0 dropped; equal q: in order)."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    out = []
    for part in _split_params(header, ","):
        if not part.strip():
            continue
        media, *params = _split_params(part)
        mr = MediaRange(media.strip().lower())
        for p in params:
            k, _, v = p.strip().partition("=")
            k, v = k.strip().lower(), v.strip().strip('"')
            if k == "q":
                try:
                    mr.q = float(v)
                except ValueError:
                    raise RequestError(f"Accept: bad quality value {v!r}") from None
            elif k:
                mr.params[k] = v
        if mr.q > 0:
            out.append(mr)
    out.sort(key=lambda m: -m.q)
    return out


def _matches(pattern: str, media: str) -> bool:
    if pattern in ("*/*", "*"):
        return True
    if pattern.endswith("/*"):
        return media.split("/")[0] == pattern[:-2]
    return pattern == media


# --------------------------------------------------------------------------- multipart

def _boundary() -> str:
    return f"medview-{secrets.token_hex(12)}"


def whole_multipart(parts: list[tuple[bytes, str, dict]]) -> tuple[bytes, str]:
    """The multipart/related body in one piece, with a boundary that depends only on the
    parts: the same representation every time, so byte ranges of it can be asked for
    one after the other. Returns (body, boundary)."""
    import hashlib

    h = hashlib.sha256()
    for content, ctype, headers in parts:
        h.update(ctype.encode())
        h.update(repr(sorted(headers.items())).encode())
        h.update(hashlib.sha256(content).digest())
    boundary = f"medview-{h.hexdigest()[:24]}"
    return b"".join(multipart_body(parts, boundary)), boundary


def multipart_body(parts: Iterable[tuple[bytes, str, dict]], boundary: str) -> Iterator[bytes]:
    """``parts``: (content, content type, extra headers) → multipart/related body chunks."""
    for content, ctype, headers in parts:
        head = f"--{boundary}\r\nContent-Type: {ctype}\r\n"
        for k, v in headers.items():
            head += f"{k}: {v}\r\n"
        yield (head + "\r\n").encode("latin-1")
        yield content
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("latin-1")


def parse_multipart(body: bytes, content_type: str) -> tuple[str | None, list[tuple[dict, bytes]]]:
    """A multipart/related request body → (its ``type`` parameter, [(part headers, part
    content)]). Raises RequestError (415 / 400) when it is not one."""
    media, *params = _split_params(content_type or "")
    if media.strip().lower() != "multipart/related":
        raise RequestError(f"Content-Type {media.strip() or '(none)'} is not supported: STOW-RS "
                           'takes multipart/related; type="application/dicom"', status=415)
    p = {}
    for x in params:
        k, _, v = x.strip().partition("=")
        p[k.strip().lower()] = v.strip().strip('"')
    boundary = p.get("boundary")
    if not boundary:
        raise RequestError("multipart/related without a boundary parameter")
    delim = b"--" + boundary.encode("latin-1")
    chunks = body.split(delim)
    if len(chunks) < 3:
        raise RequestError("the multipart body holds no part")
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break
        if chunk.startswith(b"\r\n"):
            chunk = chunk[2:]
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            if not head.strip():
                head, content = b"", b""
            else:
                raise RequestError("a multipart part has no header/body separator")
        if content.endswith(b"\r\n"):
            content = content[:-2]
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            k, _, v = line.partition(":")
            if k.strip():
                headers[k.strip().lower()] = v.strip()
        parts.append((headers, content))
    return p.get("type"), parts


# --------------------------------------------------------------------------- DICOM JSON

def to_dicom_json(row: dict) -> dict:
    """Keyword-keyed dict → DICOM JSON model (tags as 8 hex digits with VR and Value)."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    out = {}
    for k, v in row.items():
        tag = tag_for_keyword(k)
        if tag is None or v is None or v == "" or v == []:
            continue
        vr = dictionary_VR(tag)
        vals = v if isinstance(v, list) else [v]
        if vr == "PN":
            vals = [{"Alphabetic": str(x)} for x in vals]
        elif vr == "IS":
            vals = [int(x) for x in vals]
        out[f"{tag:08X}"] = {"vr": vr, "Value": vals}
    return out


# Default return attributes (PS3.18 Table 6.7.1-2, -2a) and the attributes of each level
# a study / series answer may take from a stored header (includefield=all).
STUDY_RETURN = ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
                "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate",
                "PatientSex", "StudyInstanceUID", "StudyID", "StudyDescription",
                "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
SERIES_RETURN = ("Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber",
                 "SeriesDate", "SeriesTime", "BodyPartExamined",
                 "NumberOfSeriesRelatedInstances")
INSTANCE_RETURN = ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns",
                   "BitsAllocated", "NumberOfFrames")
STUDY_LEVEL_ATTRS = frozenset(STUDY_RETURN) | {
    "IssuerOfPatientID", "PatientBirthTime", "OtherPatientIDsSequence", "PatientComments",
    "EthnicGroup", "PatientAge", "PatientSize", "PatientWeight", "Occupation",
    "AdditionalPatientHistory", "NameOfPhysiciansReadingStudy", "ProcedureCodeSequence",
    "AdmittingDiagnosesDescription", "IssuerOfAccessionNumberSequence",
    "PhysiciansOfRecord", "TimezoneOffsetFromUTC"}
SERIES_LEVEL_ATTRS = frozenset(SERIES_RETURN) | {
    "Laterality", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "RequestAttributesSequence", "ProtocolName", "OperatorsName",
    "PerformingPhysicianName", "FrameOfReferenceUID", "Manufacturer",
    "ManufacturerModelName", "StationName", "InstitutionName", "PatientPosition"}
# catalogue values that describe the stored codestream, not the original: never answered
# from the catalogue at instance level (the original header says what the file holds)
_FROM_HEADER = {"Rows", "Columns", "BitsAllocated", "NumberOfFrames", "SamplesPerPixel",
                "PhotometricInterpretation", "BitsStored", "PixelRepresentation"}
_PRIVATE = {"codestream_relpath", "codestream_sha256", "index_relpath", "index_sha256",
            "original_relpath", "original_sha256", "header_json"}


def _keyword_tag(keyword: str) -> str | None:
    from pydicom.datadict import tag_for_keyword

    t = tag_for_keyword(keyword)
    return None if t is None else f"{t:08X}"


# --------------------------------------------------------------------------- routes

class DicomWeb:
    """The DICOMweb routes, each wrapped by ``guarded`` (see :mod:`server.app`).

    One method per handler (wrapped by the authorisation point in
    :meth:`routes`); built by :func:`routes`."""

    def __init__(self, srv, guarded) -> None:
        self.srv = srv
        self.guarded = guarded

    def base_url(self, request: Request) -> str:
        """Where this server is, for RetrieveURL and BulkDataURI. Some clients
        (dicomweb-client) send a Host header without the port; when that host is the
        address the server is bound to, the bound port is meant."""
        base = str(request.base_url).rstrip("/")
        host = request.headers.get("host", "")
        server = request.scope.get("server")
        if server and host == server[0] and server[1] not in (80, 443):
            base = f"{request.url.scheme}://{host}:{server[1]}"
        return base + PREFIX

    # ----------------------------------------------------------------- rights and lookups
    def series_grant(self, request: Request, series: str):
        """The session user's grant on ``series`` (its own rules win over the study's)."""
        if series == request.path_params.get("series"):
            return request.state.grant
        return self.srv.auth.grant_for(request.state.session.user, series)

    def need_action(self, request: Request, series: str, action: str):
        g = self.series_grant(request, series)
        if g.actions is not None and action not in g.actions:
            raise RequestError(f"beyond your rights: series {series} ({action})", status=403,
                               denied=["action"])
        return g

    def need_whole(self, request: Request, series: str, sops: set[str] | None = None) -> None:
        """Full-quality pixels or originals of ``sops`` (None: all) of ``series``: only
        with an unlimited grant on every image concerned."""
        g = self.need_action(request, series, "retrieve")
        versions = self.srv.versions.get(series)
        csns = [r["index"] for r in self.srv.facts.images(series)
                if sops is None or r["SOPInstanceUID"] in sops]
        if not all(g.allows_whole(c, versions) for c in csns or [None]):
            raise RequestError("beyond your rights: whole files and full-quality pixels "
                               "need unlimited access to the image; ask for packets within "
                               "your rights at /jpip", status=403,
                               **g.limits(versions, ["whole-file"]))

    def path_study(self, request: Request) -> str:
        study = request.path_params["study"]
        if self.srv.catalogue.get_study(study) is None:
            raise RequestError(f"unknown study {study}", status=404)
        return study

    def path_series(self, request: Request) -> dict:
        study, series = request.path_params["study"], request.path_params["series"]
        info = self.srv.catalogue.get_series(series)
        if info is None or info["StudyInstanceUID"] != study:
            raise RequestError(f"unknown series {series} in study {study}", status=404)
        return info

    def path_instance(self, request: Request) -> dict:
        self.path_series(request)
        sop = request.path_params["sop"]
        row = self.srv.catalogue.find_instance(sop)
        if (row is None or row["SeriesInstanceUID"] != request.path_params["series"]
                or row["StudyInstanceUID"] != request.path_params["study"]):
            raise RequestError(f"unknown instance {sop} in this series", status=404)
        request.state.audit.update(study=row["StudyInstanceUID"],
                                   series=row["SeriesInstanceUID"], sop=sop)
        return row

    def path_frames(self, request: Request, row: dict) -> list[int]:
        text = request.path_params["frame"]
        try:
            nums = [int(x) for x in text.split(",")]
        except ValueError:
            raise RequestError(f"frames: {text!r} is not a list of frame numbers") from None
        n = int(row["NumberOfFrames"] or 1)
        for f in nums:
            if not 1 <= f <= n:
                raise RequestError(f"frame {f} does not exist (the instance has {n})",
                                   status=404)
        request.state.audit["frames"] = text
        return nums

    def instances_of(self, request: Request, study: str, series: str | None = None) -> list[dict]:
        """Every instance of a study / series (rights checked per series)."""
        matches = [("StudyInstanceUID", study)]
        if series:
            matches.append(("SeriesInstanceUID", series))
        rows = self.srv.catalogue.qido("instance", matches)
        if not rows:
            raise RequestError("no instance found", status=404)
        return rows

    def original(self, row: dict) -> Original:
        return Original(self.srv.tiers.read_original(row))

    def final_copy(self, row: dict) -> FinalCopy | None:
        """The instance's verified final copy (SPEC H1), read through the tiers (recalled
        from the archive if it was moved); None when it has none or it is the original."""
        from .policy_copies import final_copy_row

        fc = final_copy_row(self.srv.catalogue.db, row["SOPInstanceUID"])
        if fc is None or fc["codec"] == "keep" or not fc["transfer_syntax"]:
            return None
        return FinalCopy(fc["transfer_syntax"], lambda: self.srv.tiers.read_final(row, fc))

    # ----------------------------------------------------------------- QIDO-RS
    def qido(self, level: str):
        def handler(request: Request):
            matches, include, page, plain = [], set(), {}, False
            seen = set()
            for k, v in request.query_params.multi_items():
                if k in ("limit", "offset"):
                    try:
                        n = int(v)
                        if not 0 <= n <= 1 << 31:
                            raise ValueError
                    except ValueError:
                        raise QueryError(f"{k} must be an integer from 0 to 2147483648") from None
                    page[k] = n
                elif k == "includefield":
                    for f in v.split(","):
                        f = f.strip()
                        if f == "all":
                            include.add("all")
                        elif f:
                            include.add(qido_key(f).keyword)
                elif k == "fuzzymatching":
                    if v.lower() not in ("true", "false"):
                        raise QueryError("fuzzymatching must be true or false")
                elif k == "format":
                    if v != "json":
                        raise QueryError("format: only json (keyword-keyed plain JSON)")
                    plain = True
                elif k == "cid":
                    continue
                else:
                    key = qido_key(k)
                    g = request.state.grant
                    if key.level is None and g.actions is not None and "metadata" not in g.actions:
                        raise RequestError(f"{k}: matching on header attributes needs the "
                                           "metadata right", status=403, denied=["action"])
                    if key.keyword in seen:
                        raise QueryError(f"{k}: the same attribute given twice")
                    seen.add(key.keyword)
                    matches.append((k, v))
                    include.add(key.keyword)
            if "study" in request.path_params:
                self.path_study(request)
                matches.append(("StudyInstanceUID", request.path_params["study"]))
            if "series" in request.path_params:
                self.path_series(request)
                matches.append(("SeriesInstanceUID", request.path_params["series"]))
            want_header = bool(include - set(STUDY_RETURN) - set(SERIES_RETURN)
                               - {"StudyInstanceUID", "SeriesInstanceUID"}) or level == "instance"
            # rules that hide rows: filter first, then page, so a page is never short
            hide = may_hide(self.srv, request.state.session.user, "browse") or level == "instance"
            rows = self.srv.catalogue.qido(level, matches,
                                      limit=None if hide else page.get("limit"),
                                      offset=0 if hide else page.get("offset", 0),
                                      header=want_header)
            rows = self.browsable(request, level, rows)
            if hide:
                start = page.get("offset", 0)
                rows = rows[start:start + page["limit"] if page.get("limit") is not None
                            else None]
            if plain:
                return json_response(request, [{k: v for k, v in r.items()
                                                if k not in _PRIVATE and k != "_meta"}
                                               for r in rows])
            base = self.base_url(request)
            return json_response(request, [self.qido_result(level, r, include, base) for r in rows],
                                 media_type="application/dicom+json")
        return handler

    def browsable(self, request: Request, level: str, rows: list[dict]) -> list[dict]:
        """Only what the user may browse, decided as for a request on the row (its series,
        study and patient: :func:`server.targets.visible_rows`); instances only when
        all their images are within the grant's image ranges. Attributes beyond the
        default ones (``includefield``) come from the stored header: only where the user
        also has the ``metadata`` action (``_meta`` on the row)."""
        user = request.state.session.user
        rows = visible_rows(self.srv, user, rows, "browse")
        meta = {id(r) for r in visible_rows(self.srv, user, rows, "metadata")}
        for r in rows:
            r["_meta"] = id(r) in meta
        if level == "instance":
            by_series: dict[str, list[dict]] = {}
            for r in rows:
                by_series.setdefault(r["SeriesInstanceUID"], []).append(r)
            keep = set()
            for se, rs in by_series.items():
                grant = self.srv.auth.grant_for(user, se)
                keep |= {id(r) for r in visible_instances(self.srv, grant, se, rs)}
            rows = [r for r in rows if id(r) in keep]
        return rows

    def qido_result(self, level: str, row: dict, include: set[str], base: str) -> dict:
        keys = list(STUDY_RETURN)
        if level in ("series", "instance"):
            keys += SERIES_RETURN
        if level == "instance":
            keys += INSTANCE_RETURN
        header = row.get("header_json") or {}
        if not row.get("_meta", True):       # no metadata right: the default keys only
            include = {k for k in include if k in keys}
        plain = {k: row.get(k) for k in keys if k in row and k not in
                 (_FROM_HEADER if level == "instance" else ())}
        if level != "study":
            plain.pop("NumberOfStudyRelatedSeries", None)
            plain.pop("NumberOfStudyRelatedInstances", None)
        out = to_dicom_json(plain)
        allowed = set(STUDY_LEVEL_ATTRS)
        if level in ("series", "instance"):
            allowed |= SERIES_LEVEL_ATTRS
        wanted = [k for k in keys if k not in plain] + sorted(include - set(keys))
        if "all" in include:
            if level == "instance":
                wanted = list(header)        # every attribute of the instance
            else:
                wanted += sorted(allowed)
        for k in wanted:
            tag = k if re.fullmatch(r"[0-9A-F]{8}", k) else _keyword_tag(k)
            if tag is None or tag in out or tag not in header:
                continue
            if level != "instance" and k not in allowed and k not in include:
                continue
            item = header[tag]
            if "BulkDataURI" in item:
                continue
            out[tag] = item
        st, se = row["StudyInstanceUID"], row.get("SeriesInstanceUID")
        url = f"{base}/studies/{st}"
        if level != "study":
            url += f"/series/{se}"
        if level == "instance":
            url += f"/instances/{row['SOPInstanceUID']}"
        out["00081190"] = {"vr": "UR", "Value": [url]}
        out["00080056"] = {"vr": "CS", "Value": ["ONLINE"]}
        return dict(sorted(out.items()))

    # ----------------------------------------------------------------- metadata
    def metadata_of(self, request: Request, rows: list[dict]) -> list[dict]:
        base = self.base_url(request)
        out = []
        for r in rows:
            h = self.srv.catalogue.instance_header(r["SOPInstanceUID"]) or {}
            url = (f"{base}/studies/{r['StudyInstanceUID']}/series/{r['SeriesInstanceUID']}"
                   f"/instances/{r['SOPInstanceUID']}")
            for item in h.values():
                self._absolute_bulk(item, url)
            h["7FE00010"] = {"vr": "OB" if (r.get("BitsAllocated") or 8) <= 8 else "OW",
                             "BulkDataURI": f"{url}/bulk/7FE00010"}
            out.append(dict(sorted(h.items())))
        return out

    def _absolute_bulk(self, item, url: str) -> None:
        if not isinstance(item, dict):
            return
        uri = item.get("BulkDataURI")
        if isinstance(uri, str) and uri.startswith("bulk/"):
            item["BulkDataURI"] = f"{url}/{uri}"
        for v in item.get("Value") or []:
            if isinstance(v, dict):
                for sub in v.values():
                    self._absolute_bulk(sub, url)

    def json_only(self, request: Request) -> None:
        for mr in parse_accept(request.headers.get("accept")):
            if any(_matches(mr.media, m) for m in ("application/dicom+json", "application/json")):
                return
        raise NotAcceptable("metadata is available as application/dicom+json only")

    def study_metadata(self, request: Request):
        self.json_only(request)
        rows = self.instances_of(request, self.path_study(request))
        for s in {r["SeriesInstanceUID"] for r in rows}:
            self.need_action(request, s, "metadata")
        return json_response(request, self.metadata_of(request, rows),
                             media_type="application/dicom+json")

    def series_metadata(self, request: Request):
        self.json_only(request)
        self.path_series(request)
        rows = self.instances_of(request, request.path_params["study"], request.path_params["series"])
        return json_response(request, self.metadata_of(request, rows),
                             media_type="application/dicom+json")

    def instance_metadata(self, request: Request):
        self.json_only(request)
        row = self.path_instance(request)
        return json_response(request, self.metadata_of(request, [row]),
                             media_type="application/dicom+json")

    # ----------------------------------------------------------------- retrieve
    def instance_choice(self, request: Request, *, single_ok: bool) -> tuple[bool, str | None]:
        """(multipart?, transfer syntax; None = the original as stored) from the Accept
        header. ``single_ok``: one instance, which may go as a single part."""
        problems = []
        for mr in parse_accept(request.headers.get("accept")):
            if mr.media == "multipart/related":
                if mr.part_type not in (None, "application/dicom", "*/*", "application/*"):
                    problems.append(f"type={mr.part_type}")
                    continue
                multi = True
            elif mr.media == "application/dicom":
                multi = not single_ok
            elif mr.media in ("*/*", "application/*"):
                return not single_ok, None
            else:
                problems.append(mr.media)
                continue
            ts = mr.syntax
            if ts in (None, "*"):
                return multi, None
            if ts in FRAME_ENCODERS:
                return multi, ts
            problems.append(f"transfer-syntax={ts}")
        raise NotAcceptable("cannot produce " + ", ".join(problems or ["what was asked"])
                            + '; available: multipart/related; type="application/dicom" with '
                            f"transfer-syntax * or {', '.join(FRAME_ENCODERS)}")

    def instance_bytes(self, row: dict, syntax: str | None) -> tuple[bytes, str]:
        if syntax is None:
            return self.srv.tiers.read_original(row), row.get("TransferSyntaxUID") or ""
        fc = self.final_copy(row)
        if fc is not None and fc.syntax == syntax:
            return fc.data, syntax                    # the final copy, bytes as stored
        data = self.srv.tiers.read_original(row)
        orig = Original(data)
        if syntax == orig.syntax:
            return data, syntax
        return transcode_instance(orig, syntax), syntax

    def multipart_instances(self, rows: list[dict], syntax: str | None,
                            request: Request | None = None) -> Response:
        """The instances as multipart/related parts. The first part is made before the
        answer starts, so that a damaged or missing file (or a syntax that cannot hold
        the pixels) is a clear error status; a later failure ends the body without its
        closing boundary, which a client sees as an incomplete answer. With a Range
        header the body is made whole (a stable boundary) and the ranges sent."""
        boundary = _boundary()

        def part(r):
            data, ts = self.instance_bytes(r, syntax)
            return data, (f"application/dicom; transfer-syntax={ts}" if ts
                          else "application/dicom"), {}
        if request is not None and request.headers.get("range"):
            body, boundary = whole_multipart([part(r) for r in rows])
            return range_response(request.headers, body, f'multipart/related; '
                                  f'type="application/dicom"; boundary={boundary}')
        first = part(rows[0])

        def parts():
            yield first
            for r in rows[1:]:
                yield part(r)
        ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
        return StreamingResponse(multipart_body(parts(), boundary), media_type=ctype)

    def wants_zip(self, request: Request) -> bool:
        for mr in parse_accept(request.headers.get("accept")):
            if mr.media == "application/zip":
                return True
            if mr.media in ("multipart/related", "application/dicom", "*/*"):
                return False
        return False

    def zip_response(self, rows: list[dict], name: str) -> StreamingResponse:
        """The originals in a zip (stored, not deflated: images hardly shrink), built in a
        temporary file and streamed."""
        tmp = tempfile.TemporaryFile()
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                for r in rows:
                    z.writestr(f"{r['StudyInstanceUID']}/{r['SeriesInstanceUID']}/"
                               f"{r['SOPInstanceUID']}.dcm", self.srv.tiers.read_original(r))
            tmp.seek(0)
        except BaseException:
            tmp.close()
            raise

        def body():
            with tmp:
                while chunk := tmp.read(1 << 20):
                    yield chunk
        return StreamingResponse(body(), media_type="application/zip", headers={
            "Content-Disposition": f'attachment; filename="{name}.zip"'})

    def retrieve_many(self, request: Request, rows: list[dict], name: str):
        by_series: dict[str, set[str]] = {}
        for r in rows:
            by_series.setdefault(r["SeriesInstanceUID"], set()).add(r["SOPInstanceUID"])
        for s, sops in by_series.items():
            self.need_whole(request, s, sops)
        request.state.audit["instances"] = len(rows)
        if self.wants_zip(request):
            return self.zip_response(rows, name)
        _multi, syntax = self.instance_choice(request, single_ok=False)
        return self.multipart_instances(rows, syntax)

    def retrieve_study(self, request: Request):
        study = self.path_study(request)
        return self.retrieve_many(request, self.instances_of(request, study), study)

    def retrieve_series(self, request: Request):
        self.path_series(request)
        st, se = request.path_params["study"], request.path_params["series"]
        return self.retrieve_many(request, self.instances_of(request, st, se), se)

    def retrieve_instance(self, request: Request):
        row = self.path_instance(request)
        self.need_whole(request, row["SeriesInstanceUID"], {row["SOPInstanceUID"]})
        multi, syntax = self.instance_choice(request, single_ok=True)
        if multi:
            return self.multipart_instances([row], syntax, request)
        data, ts = self.instance_bytes(row, syntax)
        return range_response(request.headers, data, f"application/dicom; transfer-syntax={ts}"
                              if syntax else "application/dicom")

    # ----------------------------------------------------------------- frames
    def frame_plan(self, request: Request, orig: Original, stored=None, final=None,
                   single_ok: bool = False):
        """(part media type, syntax, encode(frame index) -> bytes, multipart?) for the
        Accept header. ``single_ok``: one frame, which may go as a single part when a
        frame media type is asked for itself (``Accept: image/jphc``), as HTJ2K-aware web
        viewers do with byte ranges."""
        problems = []
        for mr in parse_accept(request.headers.get("accept")):
            multi = True
            if mr.media == "multipart/related":
                ptype = mr.part_type or "*/*"
                ts = mr.syntax
            elif mr.media in ("*/*", "application/*"):
                ptype, ts = "application/octet-stream", EXPLICIT_LE
            elif single_ok and mr.media in MEDIA_DEFAULT_SYNTAX:
                ptype, ts, multi = mr.media, mr.syntax, False
            else:
                problems.append(mr.media if single_ok or mr.media not in MEDIA_DEFAULT_SYNTAX
                                else f"{mr.media} (one frame per single-part answer)")
                continue
            if ts is None:
                ts = MEDIA_DEFAULT_SYNTAX.get(ptype)
                if ts is None and ptype in ("*/*", "image/*", "application/*"):
                    ts = EXPLICIT_LE if ptype != "image/*" else "*"
            plan = self.frame_syntax(orig, ptype, ts, stored, final)
            if plan is not None:
                return (*plan, multi)
            problems.append(f"type={ptype} transfer-syntax={ts}")
        raise NotAcceptable("cannot produce frames as " + ", ".join(problems) + "; available: "
                            + ", ".join(f"{e.media} ({s})" for s, e in FRAME_ENCODERS.items())
                            + f", or * (as stored: {orig.syntax if orig.encapsulated else J2K_LOSSLESS})")

    def frame_syntax(self, orig: Original, ptype: str, ts: str | None, stored=None, final=None):
        if ts is None:
            return None
        if final is not None and ts in final.frame_syntaxes() and ts in FRAME_ENCODERS:
            media = FRAME_ENCODERS[ts].media
            if _matches(ptype, media):                  # the final copy's frames as stored
                return media, ts, final.fragments
        if ts == "*" and not orig.encapsulated and stored is not None:
            enc = FRAME_ENCODERS[J2K_LOSSLESS]
            if _matches(ptype, enc.media):      # the stored codestream where it needs no
                return enc.media, J2K_LOSSLESS, stored    # offset undone, else re-encoded
        if ts == "*" and orig.encapsulated:
            ts = orig.syntax
            media = SYNTAX_MEDIA.get(ts, "application/octet-stream")
            if _matches(ptype, media):
                return media, ts, orig.fragments
            return None
        if ts == "*":       # a native original: JPEG 2000 lossless, or native if asked
            ts = J2K_LOSSLESS if _matches(ptype, "image/jp2") else EXPLICIT_LE
        if ts == orig.syntax and orig.encapsulated:
            media = SYNTAX_MEDIA.get(ts, "application/octet-stream")
            return (media, ts, orig.fragments) if _matches(ptype, media) else None
        enc = FRAME_ENCODERS.get(ts)
        if enc is None or not _matches(ptype, enc.media):
            return None
        if ts == EXPLICIT_LE:
            return enc.media, ts, orig.native
        return enc.media, ts, lambda i: enc.encode(orig.array(i), orig.info)

    def frames(self, request: Request):
        row = self.path_instance(request)
        nums = self.path_frames(request, row)
        self.need_whole(request, row["SeriesInstanceUID"], {row["SOPInstanceUID"]})
        accept = request.headers.get("accept", "")
        if LEGACY_CODESTREAM in accept:
            return self.stored_codestream(row, nums)
        orig = _LazyOriginal(lambda: self.original(row))
        media, ts, produce, multi = self.frame_plan(request, orig, self.stored_or_encoded(row, orig),
                                               self.final_copy(row), single_ok=len(nums) == 1)
        boundary = _boundary()
        base = self.base_url(request)
        url = (f"{base}/studies/{row['StudyInstanceUID']}/series/{row['SeriesInstanceUID']}"
               f"/instances/{row['SOPInstanceUID']}/frames")
        request.state.audit["transfer_syntax"] = ts

        first = produce(nums[0] - 1)       # errors before the answer starts
        if not multi:                       # one frame, single part (byte ranges welcome)
            return range_response(request.headers, first, f"{media}; transfer-syntax={ts}",
                                  {"Content-Location": f"{url}/{nums[0]}"})
        if request.headers.get("range"):
            body, boundary = whole_multipart(
                [(first if k == 0 else produce(n - 1), f"{media}; transfer-syntax={ts}",
                  {"Content-Location": f"{url}/{n}"}) for k, n in enumerate(nums)])
            return range_response(request.headers, body,
                                  f'multipart/related; type="{media}"; boundary={boundary}')

        def parts():
            for k, n in enumerate(nums):
                yield first if k == 0 else produce(n - 1), f"{media}; transfer-syntax={ts}", {
                    "Content-Location": f"{url}/{n}"}
        ctype = f'multipart/related; type="{media}"; boundary={boundary}'
        return StreamingResponse(multipart_body(parts(), boundary), media_type=ctype)

    def series_pixeldata(self, request: Request):
        """Retrieve Pixel Data of a series (PS3.18 10.4.1.1.5, the series' Pixel Data
        resource): every frame of every image of the series in one multipart/related
        answer, in the transfer syntax the Accept header asks for, each part naming its
        instance and frame in Content-Location — a whole volume in one request (the
        client's full-quality HTJ2K load) instead of one request per frame."""
        self.path_series(request)
        st, se = request.path_params["study"], request.path_params["series"]
        self.need_whole(request, se)
        with_frames = {r["SOPInstanceUID"] for r in self.srv.facts.images(se)}
        rows = [r for r in self.instances_of(request, st, se) if r["SOPInstanceUID"] in with_frames]
        if not rows:
            raise RequestError(f"series {se} holds no image", status=404)
        base = self.base_url(request)
        plans = []                       # every instance's plan first: a 406 before the answer
        for row in rows:
            orig = _LazyOriginal(lambda row=row: self.original(row))
            media, ts, produce, _multi = self.frame_plan(
                request, orig, self.stored_or_encoded(row, orig), self.final_copy(row))
            url = f"{base}/studies/{st}/series/{se}/instances/{row['SOPInstanceUID']}/frames"
            plans.append((int(row["NumberOfFrames"] or 1), media, ts, produce, url))
        request.state.audit.update(instances=len(rows), transfer_syntax=plans[0][2])
        first = plans[0][3](0)           # errors before the answer starts
        boundary = _boundary()

        def parts():
            for k, (n, media, ts, produce, url) in enumerate(plans):
                for i in range(n):
                    yield (first if k == i == 0 else produce(i),
                           f"{media}; transfer-syntax={ts}", {"Content-Location": f"{url}/{i + 1}"})
        ctype = f'multipart/related; type="{plans[0][1]}"; boundary={boundary}'
        return StreamingResponse(multipart_body(parts(), boundary), media_type=ctype)

    def stored_or_encoded(self, row: dict, orig: Original):
        """frame index → JPEG 2000 lossless of the original's values: the stored
        codestream itself when it holds exactly those values with no offset (unsigned
        greyscale), else encoded from pydicom's decode (signed values marked signed in
        the SIZ marker, never shifted; palette indices, not colours)."""
        rows = {r["frame"]: r for r in self.srv.facts.images(row["SeriesInstanceUID"])
                if r["SOPInstanceUID"] == row["SOPInstanceUID"]}
        enc = FRAME_ENCODERS[J2K_LOSSLESS]

        def produce(i: int) -> bytes:
            plain = (orig.info.samples == 1 and not orig.info.signed
                     and orig.info.photometric in ("MONOCHROME1", "MONOCHROME2"))
            r = rows.get(i + 1)
            if plain and r is not None and r["offset"] == 0 and not r["signed"] \
                    and r["SamplesPerPixel"] == 1 \
                    and (r.get("lossless_state") or "verified") == "verified":
                return self.srv.tiers.read_codestream(r)
            return enc.encode(orig.array(i), orig.info)
        return produce

    def stored_codestream(self, row: dict, nums: list[int]) -> Response:
        if len(nums) != 1:
            raise RequestError(f"{LEGACY_CODESTREAM}: one frame at a time")
        for r in self.srv.facts.images(row["SeriesInstanceUID"]):
            if r["SOPInstanceUID"] == row["SOPInstanceUID"] and r["frame"] == nums[0]:
                state = r.get("lossless_state") or "verified"
                if state != "verified":         # the whole codestream is lossless
                    raise RequestError(
                        f"the lossless layer of this instance is {state} "
                        + ("(not verified yet: its lossy layers stream through /jpip)"
                           if state == "pending" else "(its verification failed)"),
                        status=409)
                return Response(self.srv.tiers.read_codestream(r), media_type=LEGACY_CODESTREAM,
                                headers={"X-MedView-Offset": str(r["offset"]),
                                         "X-MedView-Signed": "1" if r["signed"] else "0"})
        raise RequestError("unknown frame", status=404)

    # ----------------------------------------------------------------- bulk data
    def bulkdata(self, request: Request):
        row = self.path_instance(request)
        self.need_whole(request, row["SeriesInstanceUID"], {row["SOPInstanceUID"]})
        try:
            tag = int(request.path_params["tag"], 16)
        except ValueError:
            raise RequestError("bulk data: the tag is eight hex digits") from None
        orig = self.original(row)
        if tag == 0x7FE00010:
            content = b"".join(orig.native(i) for i in range(orig.frames))
        else:
            if tag not in orig.ds:
                raise RequestError(f"no element {tag:08X} in this instance", status=404)
            content = _element_bytes(orig.ds[tag])
        for mr in parse_accept(request.headers.get("accept")):
            if mr.media in ("multipart/related", "*/*") and (mr.part_type or "*/*") in (
                    "*/*", "application/octet-stream"):
                boundary = _boundary()
                return StreamingResponse(
                    multipart_body([(content, "application/octet-stream", {})], boundary),
                    media_type=f'multipart/related; type="application/octet-stream"; '
                               f"boundary={boundary}")
            if mr.media == "application/octet-stream":
                return Response(content, media_type="application/octet-stream")
        raise NotAcceptable('bulk data is multipart/related; type="application/octet-stream"')

    # ----------------------------------------------------------------- rendered
    def render_params(self, request: Request) -> dict:
        return rendering_parameters(request.query_params)

    def render_media(self, request: Request) -> str:
        for mr in parse_accept(request.headers.get("accept")):
            media = (mr.part_type or "image/jpeg") if mr.media == "multipart/related" else mr.media
            for m in ("image/jpeg", "image/png"):
                if _matches(media, m):
                    return m
        raise NotAcceptable("rendered images are image/jpeg or image/png")

    def rendered_image(self, request: Request, row: dict, frame: int, params: dict, media: str) -> bytes:
        orig = self.original(row)
        return render_frame(orig, frame - 1, params, media)

    def rendered_response(self, request: Request, row: dict, frame: int, *,
                          thumbnail: bool = False) -> Response:
        params = self.render_params(request)
        if thumbnail:
            params.setdefault("viewport", (128, 128))
        media = self.render_media(request)
        self.need_whole(request, row["SeriesInstanceUID"], {row["SOPInstanceUID"]})
        return Response(self.rendered_image(request, row, frame, params, media), media_type=media)

    def representative(self, request: Request, study: str, series: str | None) -> dict:
        rows = self.instances_of(request, study, series)
        if series is None:
            first = rows[0]["SeriesInstanceUID"]
            rows = [r for r in rows if r["SeriesInstanceUID"] == first]
        return rows[len(rows) // 2]

    def rendered_many(self, request: Request, rows: list[dict]) -> Response:
        params = self.render_params(request)
        media = self.render_media(request)
        by_series: dict[str, set[str]] = {}
        for r in rows:
            by_series.setdefault(r["SeriesInstanceUID"], set()).add(r["SOPInstanceUID"])
        for s, sops in by_series.items():
            self.need_whole(request, s, sops)
        boundary = _boundary()

        def parts():
            for r in rows:
                yield self.rendered_image(request, r, 1, params, media), media, {}
        return StreamingResponse(multipart_body(parts(), boundary),
                                 media_type=f'multipart/related; type="{media}"; '
                                            f"boundary={boundary}")

    def instance_rendered(self, request: Request):
        return self.rendered_response(request, self.path_instance(request), 1)

    def instance_thumbnail(self, request: Request):
        return self.rendered_response(request, self.path_instance(request), 1, thumbnail=True)

    def frame_rendered(self, request: Request):
        row = self.path_instance(request)
        nums = self.path_frames(request, row)
        if len(nums) != 1:
            raise QueryError("a rendered frame is one frame number")
        return self.rendered_response(request, row, nums[0])

    def frame_thumbnail(self, request: Request):
        row = self.path_instance(request)
        nums = self.path_frames(request, row)
        if len(nums) != 1:
            raise QueryError("a thumbnail is of one frame number")
        return self.rendered_response(request, row, nums[0], thumbnail=True)

    def series_rendered(self, request: Request):
        self.path_series(request)
        return self.rendered_many(request, self.instances_of(request, request.path_params["study"],
                                                   request.path_params["series"]))

    def study_rendered(self, request: Request):
        return self.rendered_many(request, self.instances_of(request, self.path_study(request)))

    def series_thumbnail(self, request: Request):
        self.path_series(request)
        row = self.representative(request, request.path_params["study"], request.path_params["series"])
        return self.rendered_response(request, row, 1, thumbnail=True)

    def study_thumbnail(self, request: Request):
        row = self.representative(request, self.path_study(request), None)
        return self.rendered_response(request, row, 1, thumbnail=True)

    # ----------------------------------------------------------------- STOW-RS
    def may_store(self, request: Request, study: str) -> bool:
        """The ``store`` action on the study an instance goes into (a rule on that study
        may take away what the grant on ``*`` allows)."""
        g = self.srv.auth.grant_for(request.state.session.user, None, study)
        return g.actions is None or "store" in g.actions

    def stow(self, request: Request):
        from .ingest import ingest_paths

        target = request.path_params.get("study")
        ptype, parts = parse_multipart(request.state.body, request.headers.get("content-type"))
        if ptype is not None and ptype.lower() != "application/dicom":
            raise RequestError(f'type="{ptype}" is not supported: STOW-RS here takes '
                               '"application/dicom" parts', status=415)
        base = self.base_url(request)
        referenced, failed = [], []
        with tempfile.TemporaryDirectory(prefix="mv-stow-") as tmp:
            files: list[tuple[Path, str | None, str | None]] = []
            for n, (headers, content) in enumerate(parts):
                ctype = headers.get("content-type", "application/dicom").split(";")[0].strip()
                sop_class, sop, study = _peek(content)
                if ctype.lower() != "application/dicom":
                    failed.append((sop_class, sop, 0xC000, f"part {n + 1}: {ctype}"))
                    continue
                if target is not None and study is not None and study != target:
                    failed.append((sop_class, sop, 0xA900,
                                   f"part {n + 1}: study {study} is not {target}"))
                    continue
                if study is not None and study != target and not self.may_store(request, study):
                    failed.append((sop_class, sop, 0x0124,
                                   f"part {n + 1}: no right to store into study {study}"))
                    continue
                p = Path(tmp) / f"part{n:05d}.dcm"
                p.write_bytes(content)
                files.append((p, sop_class, sop))
            report = ingest_paths([f[0] for f in files], self.srv.store, workers=1) if files else None
            known = {f[0]: f for f in files}
            if report is not None:
                for imp in report.imported:
                    referenced.append((known[imp.path][1], imp.sop_instance_uid,
                                       imp.study_instance_uid, imp.series_instance_uid))
                for dup in report.duplicates:
                    row = self.srv.catalogue.find_instance(dup.sop_instance_uid or known[dup.path][2] or "")
                    if row is not None:
                        referenced.append((row["SOPClassUID"], row["SOPInstanceUID"],
                                           row["StudyInstanceUID"], row["SeriesInstanceUID"]))
                    else:
                        failed.append((known[dup.path][1], known[dup.path][2], 0x0110,
                                       "duplicate of an unknown instance"))
                for sk in report.skipped:
                    failed.append((known[sk.path][1], known[sk.path][2],
                                   _FAILURE_CODES.get(sk.kind, 0x0110), sk.reason))
                accounted = ({i.path for i in report.imported} | {d.path for d in report.duplicates}
                             | {s.path for s in report.skipped})
                for p, sop_class, sop in files:      # any other outcome a newer ingest adds
                    if p not in accounted:
                        failed.append((sop_class, sop, 0x0110, "not stored"))
        resp: dict = {}
        if target is not None:
            resp["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{target}"]}
        if referenced:
            resp["00081199"] = {"vr": "SQ", "Value": [{
                **({"00081150": {"vr": "UI", "Value": [c]}} if c else {}),
                "00081155": {"vr": "UI", "Value": [s]},
                "00081190": {"vr": "UR", "Value": [
                    f"{base}/studies/{st}/series/{se}/instances/{s}"]},
            } for c, s, st, se in referenced]}
        if failed:
            resp["00081198"] = {"vr": "SQ", "Value": [{
                **({"00081150": {"vr": "UI", "Value": [c]}} if c else {}),
                **({"00081155": {"vr": "UI", "Value": [s]}} if s else {}),
                "00081197": {"vr": "US", "Value": [code]},
            } for c, s, code, _why in failed]}
        request.state.audit.update(stored=len(referenced), failed=len(failed),
                                   reasons=[f"{s}: {why}" for _c, s, _code, why in failed][:50])
        status = 200 if not failed else (202 if referenced else 409)
        return JSONResponse(resp, status_code=status, media_type="application/dicom+json")

    def routes(self) -> list[Route]:
        """The route table, each handler wrapped by ``guarded``."""
        S = PREFIX + "/studies/{study}"
        SE = S + "/series/{series}"
        I = SE + "/instances/{sop}"
        return [
            Route(PREFIX + "/studies", self.guarded("browse", query=PAGE)(self.qido("study")), methods=["GET"]),
            Route(PREFIX + "/studies", self.guarded("store")(self.stow), methods=["POST"]),
            Route(PREFIX + "/series", self.guarded("browse", query=PAGE)(self.qido("series"))),
            Route(PREFIX + "/instances", self.guarded("browse", query=PAGE)(self.qido("instance"))),
            Route(S, self.guarded("retrieve")(self.retrieve_study), methods=["GET"]),
            Route(S, self.guarded("store")(self.stow), methods=["POST"]),
            Route(S + "/metadata", self.guarded("metadata")(self.study_metadata)),
            Route(S + "/rendered", self.guarded("fetch")(self.study_rendered)),
            Route(S + "/thumbnail", self.guarded("fetch")(self.study_thumbnail)),
            Route(S + "/series", self.guarded("browse", query=PAGE)(self.qido("series"))),
            Route(S + "/instances", self.guarded("browse", query=PAGE)(self.qido("instance"))),
            Route(SE, self.guarded("retrieve")(self.retrieve_series)),
            Route(SE + "/metadata", self.guarded("metadata")(self.series_metadata)),
            Route(SE + "/pixeldata", self.guarded("retrieve")(self.series_pixeldata)),
            Route(SE + "/rendered", self.guarded("fetch")(self.series_rendered)),
            Route(SE + "/thumbnail", self.guarded("fetch")(self.series_thumbnail)),
            Route(SE + "/instances", self.guarded("browse", query=PAGE)(self.qido("instance"))),
            Route(I, self.guarded("retrieve")(self.retrieve_instance)),
            Route(I + "/metadata", self.guarded("metadata")(self.instance_metadata)),
            Route(I + "/rendered", self.guarded("fetch")(self.instance_rendered)),
            Route(I + "/thumbnail", self.guarded("fetch")(self.instance_thumbnail)),
            Route(I + "/bulk/{tag}", self.guarded("retrieve")(self.bulkdata)),
            Route(I + "/frames/{frame}", self.guarded("retrieve")(self.frames)),
            Route(I + "/frames/{frame}/rendered", self.guarded("fetch")(self.frame_rendered)),
            Route(I + "/frames/{frame}/thumbnail", self.guarded("fetch")(self.frame_thumbnail)),
        ]


def routes(srv, guarded) -> list[Route]:
    """The DICOMweb routes, each wrapped by ``guarded`` (see :mod:`server.app`)."""
    return DicomWeb(srv, guarded).routes()


# FailureReason (PS3.18 Table 10.5.3-... / PS3.4 Annex GG) for each ingest outcome kind
_FAILURE_CODES = {"not-dicom": 0xC000, "not-image": 0x0122, "unsupported": 0xC000,
                  "error": 0x0110, "conflict": 0x0111}


def _peek(content: bytes) -> tuple[str | None, str | None, str | None]:
    """(SOP Class, SOP Instance, Study Instance UID) of a part, None where unreadable."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(content), stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"])
    except Exception:  # noqa: BLE001 - the ingest says why
        return None, None, None

    def g(k):
        v = ds.get(k)
        return str(v).strip("\0 ") if v else None
    return g("SOPClassUID"), g("SOPInstanceUID"), g("StudyInstanceUID")


def _element_bytes(elem) -> bytes:
    """An element's value as explicit VR little endian bytes."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    if isinstance(elem.value, (bytes, bytearray)):
        return bytes(elem.value)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem)
    raw = fp.getvalue()
    head = 12 if elem.VR in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN",
                             "UR", "UT", "UV") else 8
    return raw[head:]


# --------------------------------------------------------------------------- rendering

def rendering_parameters(q) -> dict:
    """PS3.18 8.3.5.1 rendering parameters: ``window=center,width[,linear|linear_exact|
    sigmoid]``, ``viewport=vw,vh[,sx,sy,sw,sh]`` (the source region, then scaled to fit
    vw x vh keeping the aspect ratio), ``quality=1..100``; ``iccprofile=no``. Anything
    else (``annotation`` included: nothing is burned in) is refused with 400."""
    out: dict = {}
    if "window" in q:
        parts = q["window"].split(",")
        try:
            c, w = float(parts[0]), float(parts[1])
            fn = parts[2].strip().lower() if len(parts) > 2 else "linear"
        except (ValueError, IndexError):
            raise QueryError("window must be center,width[,linear|linear_exact|sigmoid]") from None
        if (len(parts) > 3 or not (math.isfinite(c) and math.isfinite(w)) or w <= 0
                or fn not in ("linear", "sigmoid", "linear_exact")):
            raise QueryError("window must be center,width[,linear|linear_exact|sigmoid] "
                             "with a width > 0")
        out["window"] = (c, w, fn)
    if "viewport" in q:
        try:
            vals = [int(x) for x in q["viewport"].split(",")]
        except ValueError:
            raise QueryError("viewport must be vw,vh[,sx,sy,sw,sh] in whole pixels") from None
        if len(vals) not in (2, 6) or not all(1 <= v <= 8192 for v in vals[:2]):
            raise QueryError("viewport must be vw,vh[,sx,sy,sw,sh] with vw, vh in 1..8192")
        if len(vals) == 6 and (min(vals[2:4]) < 0 or min(vals[4:]) <= 0
                               or max(vals[2:]) > 1 << 20):
            raise QueryError("viewport: the source region sx,sy,sw,sh must lie at x, y >= 0 "
                             "with a positive size (flipping is not supported)")
        out["viewport"] = tuple(vals[:2])
        if len(vals) == 6:
            out["region"] = tuple(vals[2:])
    if "quality" in q:
        try:
            out["quality"] = int(q["quality"])
        except ValueError:
            raise QueryError("quality must be an integer 1..100") from None
        if not 1 <= out["quality"] <= 100:
            raise QueryError("quality must be an integer 1..100")
    if "iccprofile" in q and q["iccprofile"] != "no":
        raise QueryError("iccprofile: only 'no' is supported")
    for k in q:
        if k not in ("window", "viewport", "quality", "cid", "iccprofile"):
            raise QueryError(f"{k}: not a supported rendering parameter (window, viewport, "
                             "quality, iccprofile=no)")
    return out


def render_frame(orig: Original, index: int, params: dict, media: str) -> bytes:
    """A frame as a consumer image: palette through its lookup table, colour as is,
    greyscale through the modality LUT and the window (asked, else the header's first,
    else the frame's range); MONOCHROME1 inverted; fitted into ``viewport``."""
    from PIL import Image
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    ds = orig.ds
    arr = orig.array(index)
    pi = orig.info.photometric
    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        img8 = (rgb >> 8).astype(np.uint8) if rgb.dtype != np.uint8 and rgb.max() > 255 \
            else rgb.astype(np.uint8)
    elif arr.ndim == 3:
        img8 = arr if arr.dtype == np.uint8 else (
            arr.astype(np.float64) * 255.0 / max(1, (1 << orig.info.bits_stored) - 1)
        ).round().clip(0, 255).astype(np.uint8)
    else:
        vals = apply_modality_lut(arr, ds).astype(np.float64)
        win = params.get("window")
        if win is None:
            wc, ww = ds.get("WindowCenter"), ds.get("WindowWidth")
            try:
                c = float(wc[0] if hasattr(wc, "__len__") and not isinstance(wc, str) else wc)
                w = float(ww[0] if hasattr(ww, "__len__") and not isinstance(ww, str) else ww)
                win = (c, w, "linear") if w > 0 else None
            except (TypeError, ValueError):
                win = None
        if win is None:
            lo, hi = float(vals.min()), float(vals.max())
            win = ((lo + hi) / 2 + 0.5, max(hi - lo + 1, 1.0), "linear")
        c, w, fn = win
        if fn == "sigmoid":
            out = 255.0 / (1 + np.exp(-4 * (vals - c) / w))
        elif fn == "linear_exact":
            out = (vals - (c - w / 2)) / w * 255.0
        else:            # PS3.3 C.11.2.1.2.1
            out = ((vals - (c - 0.5)) / (w - 1) + 0.5) * 255.0 if w > 1 else \
                np.where(vals <= c - 0.5, 0.0, 255.0)
        img8 = np.clip(out, 0, 255).round().astype(np.uint8)
        if pi == "MONOCHROME1":
            img8 = 255 - img8
    img = Image.fromarray(img8)
    region = params.get("region")
    if region is not None:
        sx, sy, sw, sh = region
        if sx >= img.width or sy >= img.height:
            raise QueryError(f"viewport: the source region starts outside the "
                             f"{img.width}x{img.height} image")
        img = img.crop((sx, sy, min(img.width, sx + sw), min(img.height, sy + sh)))
    vp = params.get("viewport")
    if vp is not None:
        scale = min(vp[0] / img.width, vp[1] / img.height)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.LANCZOS)
    out = io.BytesIO()
    if media == "image/png":
        img.save(out, "PNG")
    else:
        img.save(out, "JPEG", quality=params.get("quality", 90))
    return out.getvalue()


__all__ = ["FRAME_ENCODERS", "FrameEncoder", "NotAcceptable", "Original", "PixelInfo",
           "parse_accept", "register_frame_encoder", "render_frame", "routes",
           "transcode_instance", "to_dicom_json"]
