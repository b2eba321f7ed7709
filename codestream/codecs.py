"""Image codecs behind one small interface (SPEC H1; the pattern of pydicom's decoder plugins).

Each backend is a :class:`Codec` bound to one DICOM transfer syntax::

    from codestream import codecs
    c = codecs.get("1.2.840.10008.1.2.4.80")      # JPEG-LS lossless (CharLS)
    if not c.available:
        raise SystemExit(c.missing)                # names the library that is missing
    data = c.encode(pixels, bits_stored=12, signed=True)
    back = c.decode(data, signed=True, bits_stored=12)     # == pixels, bit-exact
    small = c.decode(data, reduce=2)                        # a quarter of each side

Backends (all through imagecodecs, which bundles the libraries):

=========  ==============  ===================================================  =========
name       library         transfer syntaxes (lossless / lossy)                 reduce
=========  ==============  ===================================================  =========
jpegls     CharLS          1.2.840.10008.1.2.4.80 / .4.81 (near-lossless)       no
htj2k      OpenJPH         1.2.840.10008.1.2.4.202 (RPCL, TLM, tile-parts per   native
                           resolution), .4.201 / .4.203
j2k        OpenJPEG        1.2.840.10008.1.2.4.90 / .4.91                       native
jxl        libjxl          1.2.840.10008.1.2.4.110 / .4.112                     no
jpeg       libjpeg-turbo   1.2.840.10008.1.2.4.50 (baseline, lossy, 8-bit)      no
=========  ==============  ===================================================  =========

"reduce" decodes at 1/2**reduce of each side (ceil), the size a JPEG 2000 decoder gives at
that reduction. Codecs without resolution scalability ("no") decode the whole image and
keep every 2**reduce-th pixel; :attr:`Codec.native_reduce` says which is which.

Pixel conventions follow DICOM: ``pixels`` are (rows, cols) or (rows, cols, 3) arrays,
``signed`` is PixelRepresentation 1, ``bits_stored`` BitsStored. JPEG 2000 and HTJ2K keep
signed samples as signed components. JPEG-LS has no signed samples: the 8 or 16-bit two's
complement pattern is encoded as unsigned samples of that precision P, and
:meth:`Codec.decode` with ``signed=True`` extends the sign at P again (what pydicom does). JPEG XL and JPEG take
unsigned samples only. :meth:`Codec.supports` says, before encoding, why an image cannot be
encoded by a backend; :meth:`Codec.encode` raises :class:`CodecError` with that reason.

Lossy encoding at a target compression ratio (``encode(..., ratio=20)``) searches the
backend's own quality parameter (bisection) for the ratio nearest the target without
going under it by more than 10 %.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
import numpy as np

# DICOM transfer syntax UIDs (PS3.6 Table A-1). pydicom 3.0 does not yet name the JPEG XL ones.
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEGLS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEGLS_NEAR_LOSSLESS = "1.2.840.10008.1.2.4.81"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
J2K = "1.2.840.10008.1.2.4.91"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
HTJ2K_LOSSLESS_RPCL = "1.2.840.10008.1.2.4.202"
HTJ2K = "1.2.840.10008.1.2.4.203"
JPEGXL_LOSSLESS = "1.2.840.10008.1.2.4.110"
JPEGXL_RECOMPRESSION = "1.2.840.10008.1.2.4.111"
JPEGXL = "1.2.840.10008.1.2.4.112"


class CodecError(ValueError):
    """The image cannot be encoded or the data decoded (with the reason)."""


class CodecUnavailable(RuntimeError):
    """The library a codec needs is missing (the message names it)."""


def _imagecodecs():
    try:
        import imagecodecs
    except ImportError:
        return None
    return imagecodecs


@dataclass(frozen=True)
class Codec:
    """One codec bound to one transfer syntax. Subclasses implement ``_encode``/``_decode``."""

    name: str                 # short name: jpegls, htj2k, j2k, jxl, jpeg
    transfer_syntax: str
    lossless: bool
    label: str = ""

    library = ""              # the C library, for messages and version
    _ic_flag = ""             # imagecodecs.<FLAG>.available
    _ic_version = ""          # imagecodecs.<name>_version()
    native_reduce = False
    max_bits = 16
    takes_signed = True
    takes_colour = True

    # ---------------------------------------------------------------- availability
    @property
    def missing(self) -> str:
        """'' when usable; else what is missing, naming the library."""
        ic = _imagecodecs()
        if ic is None:
            return (f"{self.label or self.name} needs {self.library} through the imagecodecs "
                    "package, which is not installed (pip install imagecodecs)")
        flag = getattr(ic, self._ic_flag, None)
        if flag is None or not getattr(flag, "available", False):
            return (f"{self.label or self.name} needs {self.library}, which this imagecodecs "
                    f"build ({ic.__version__}) does not include")
        return ""

    @property
    def available(self) -> bool:
        return not self.missing

    @property
    def version(self) -> str:
        """The library's version, e.g. 'charls 2.4.3' ('' when unavailable)."""
        ic = _imagecodecs()
        if ic is None or not self.available:
            return ""
        fn = getattr(ic, self._ic_version, None)
        try:
            return str(fn()) if fn else f"imagecodecs {ic.__version__}"
        except Exception:  # noqa: BLE001 - a version string is informative only
            return f"imagecodecs {ic.__version__}"

    def _need(self):
        m = self.missing
        if m:
            raise CodecUnavailable(m)
        return _imagecodecs()

    # ---------------------------------------------------------------- checks
    def supports(self, pixels: np.ndarray, *, signed: bool | None = None,
                 bits_stored: int | None = None) -> str:
        """'' when this codec can encode these pixels; else why not."""
        arr = np.asarray(pixels)
        signed = arr.dtype.kind == "i" if signed is None else signed
        bits = bits_stored or arr.dtype.itemsize * 8
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3)):
            return f"{self.name}: pixels must be (rows, cols) or (rows, cols, 3), got {arr.shape}"
        if arr.size == 0:
            return f"{self.name}: the image is empty"
        if arr.dtype.kind not in "ui":
            return f"{self.name}: {arr.dtype} samples are not supported (integers only)"
        if arr.dtype.itemsize * 8 > self.max_bits or bits > self.max_bits:
            return f"{self.name}: at most {self.max_bits} bits per sample, got {max(bits, arr.dtype.itemsize * 8)}"
        if signed and not self.takes_signed:
            return f"{self.name}: signed samples are not supported"
        if arr.ndim == 3 and arr.shape[2] == 3 and not self.takes_colour:
            return f"{self.name}: colour images are not supported"
        return ""

    # ---------------------------------------------------------------- interface
    def encode(self, pixels: np.ndarray, *, signed: bool | None = None,
               bits_stored: int | None = None, ratio: float | None = None, **opts) -> bytes:
        """Encode one frame. Lossless codecs ignore ``ratio``; lossy ones need it (a target
        compression ratio, raw bytes / encoded bytes) unless ``opts`` set their quality."""
        ic = self._need()
        arr = np.ascontiguousarray(pixels)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        signed = arr.dtype.kind == "i" if signed is None else bool(signed)
        why = self.supports(arr, signed=signed, bits_stored=bits_stored)
        if why:
            raise CodecError(why)
        bits = int(bits_stored or arr.dtype.itemsize * 8)
        arr = self._prepare(arr, signed, bits)
        try:
            if self.lossless:
                return bytes(self._encode(ic, arr, bits, None, **opts))
            if opts or ratio is None:
                if ratio is None and not opts:
                    raise CodecError(f"{self.name}: a lossy encode needs ratio= or quality options")
                return bytes(self._encode(ic, arr, bits, None, **opts))
            return self._encode_ratio(ic, arr, bits, float(ratio))
        except CodecError:
            raise
        except Exception as e:  # noqa: BLE001 - the library's own error, named
            raise CodecError(f"{self.name} ({self.library}) could not encode the image: {e}") from e

    def decode(self, data: bytes, reduce: int = 0, *, signed: bool | None = None,
               bits_stored: int | None = None) -> np.ndarray:
        """Decode one frame, at 1/2**reduce of each side. ``signed``/``bits_stored`` (the
        DICOM attributes) restore signed samples where the codec stores them unsigned."""
        ic = self._need()
        if reduce < 0:
            raise CodecError(f"reduce must be >= 0, got {reduce}")
        try:
            arr = self._decode(ic, bytes(data), int(reduce))
        except CodecError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CodecError(f"{self.name} ({self.library}) could not decode the data: {e}") from e
        if reduce and not self.native_reduce:
            step = 1 << reduce
            arr = np.ascontiguousarray(arr[::step, ::step])
        return self._restore(arr, signed, bits_stored)

    # ---------------------------------------------------------------- hooks
    def _prepare(self, arr: np.ndarray, signed: bool, bits: int) -> np.ndarray:
        return arr

    def _restore(self, arr: np.ndarray, signed: bool | None, bits: int | None) -> np.ndarray:
        return arr

    def _encode(self, ic, arr, bits, q, **opts) -> bytes:
        raise NotImplementedError

    def _decode(self, ic, data: bytes, reduce: int) -> np.ndarray:
        raise NotImplementedError

    # lossy: (lo, hi, integer?, larger value = smaller output?)
    _quality_range = (0.0, 1.0, False, True)

    def _encode_ratio(self, ic, arr, bits, target: float) -> bytes:
        """Bisection on the quality parameter for the ratio nearest ``target``."""
        raw = arr.size * arr.dtype.itemsize
        lo, hi, integer, bigger_smaller = self._quality_range
        log = not integer and lo > 0
        best: tuple[float, bytes] | None = None

        def at(q):
            q = int(round(q)) if integer else q
            data = bytes(self._encode(ic, arr, bits, q))
            return raw / max(1, len(data)), data

        a, b = (math.log(lo), math.log(hi)) if log else (lo, hi)
        for _ in range(14):
            mid = (a + b) / 2
            q = math.exp(mid) if log else mid
            r, data = at(q)
            if r >= target * 0.9 and (best is None or abs(math.log(r / target)) < abs(math.log(best[0] / target))):
                best = (r, data)
            # move towards the target ratio
            if (r < target) == bigger_smaller:
                a = mid
            else:
                b = mid
            if integer and abs(b - a) < 1:
                break
        if best is None:
            r, data = at(math.exp(b if bigger_smaller else a) if log else (hi if bigger_smaller else lo))
            best = (r, data)
        return best[1]


# --------------------------------------------------------------------------- backends
def _sign_extend(arr: np.ndarray, bits: int) -> np.ndarray:
    if bits == arr.dtype.itemsize * 8 and arr.dtype.itemsize in (1, 2):
        # the sign bit is the top bit: the same bits read as signed (a view, no copy)
        return arr.view(np.int8 if arr.dtype.itemsize == 1 else np.int16)
    a = arr.astype(np.int32) & ((1 << bits) - 1)
    a = np.where(a >= (1 << (bits - 1)), a - (1 << bits), a)
    return a.astype(np.int8 if bits <= 8 and arr.dtype.itemsize == 1 else np.int16)


def _jls_precision(data: bytes) -> int | None:
    """P of a JPEG-LS codestream's SOF55 segment (None if not found)."""
    i = data.find(b"\xff\xf7")
    return data[i + 4] if 0 <= i and i + 4 < len(data) else None


class JpegLSCodec(Codec):
    library = "CharLS"
    _ic_flag = "JPEGLS"
    _ic_version = "jpegls_version"
    _quality_range = (1, 255, True, True)         # NEAR

    def supports(self, pixels, *, signed=None, bits_stored=None) -> str:
        why = super().supports(pixels, signed=signed, bits_stored=bits_stored)
        arr = np.asarray(pixels)
        signed = arr.dtype.kind == "i" if signed is None else signed
        if not why and signed and not self.lossless:
            why = (f"{self.name}: near-lossless coding of signed samples would wrap at the "
                   "sign boundary; use a lossless or a JPEG 2000 codec")
        return why

    def _prepare(self, arr, signed, bits):
        if arr.dtype.kind == "i":
            # the two's complement pattern as unsigned samples of the codestream's
            # precision P (CharLS writes P = 8 or 16 from the dtype); decoders extend the
            # sign at P, as pydicom does
            return arr.view(np.uint8 if arr.dtype.itemsize == 1 else np.uint16)
        return arr

    def decode(self, data, reduce=0, *, signed=None, bits_stored=None):
        # the sign is extended at the codestream's precision P (what pydicom does)
        return super().decode(data, reduce, signed=signed,
                              bits_stored=_jls_precision(bytes(data)) or bits_stored)

    def _restore(self, arr, signed, bits):
        if signed:
            return _sign_extend(arr, int(bits or arr.dtype.itemsize * 8))
        return arr

    def _encode(self, ic, arr, bits, q, **opts):
        near = opts.get("near", q)
        return ic.jpegls_encode(arr, level=int(near) if near else None)

    def _decode(self, ic, data, reduce):
        return ic.jpegls_decode(data)


class HTJ2KCodec(Codec):
    library = "OpenJPH"
    _ic_flag = "HTJ2K"
    _ic_version = "htj2k_version"
    native_reduce = True
    _quality_range = (1e-5, 1.0, False, True)       # quantisation step

    def _encode(self, ic, arr, bits, q, **opts):
        kw = dict(rgb=False)          # no colour transform: RGB stays RGB
        if self.transfer_syntax == HTJ2K_LOSSLESS_RPCL:
            # PS3.5 A.4.x: RPCL (OpenJPH's order), TLM present, enough decompositions
            # for the base resolution to be <= 64 px; also a tile-part per resolution
            side = max(arr.shape[0], arr.shape[1])
            levels = max(5, math.ceil(math.log2(max(1.0, side / 64))))
            kw.update(tlm=True, tilepart=1, resolutions=levels)
        if self.lossless:
            return ic.htj2k_encode(arr, reversible=True, **kw)
        q = opts.get("qstep", q)
        return ic.htj2k_encode(arr, level=float(q), reversible=False, **kw)

    def _decode(self, ic, data, reduce):
        return ic.htj2k_decode(data, skipres=reduce or None, planar=False)


class J2KCodec(Codec):
    library = "OpenJPEG"
    _ic_flag = "JPEG2K"
    _ic_version = "jpeg2k_version"
    native_reduce = True
    _quality_range = (20.0, 140.0, False, False)     # PSNR target (dB): larger = bigger

    def _encode(self, ic, arr, bits, q, **opts):
        kw = dict(codecformat="J2K", mct=False)
        if bits < arr.dtype.itemsize * 8 and _fits(arr, bits):
            kw["bitspersample"] = bits
        if self.lossless:
            return ic.jpeg2k_encode(arr, level=None, reversible=True, **kw)
        return ic.jpeg2k_encode(arr, level=float(opts.get("psnr", q)), reversible=False, **kw)

    def _decode(self, ic, data, reduce):
        if reduce:
            from .encode import openjpeg_decode     # glymur/OpenJPEG reduce
            return openjpeg_decode(data, reduce=reduce)
        return ic.jpeg2k_decode(data)


class JpegXLCodec(Codec):
    library = "libjxl"
    _ic_flag = "JPEGXL"
    _ic_version = "jpegxl_version"
    takes_signed = False
    _quality_range = (0.01, 25.0, False, True)       # butteraugli distance

    def _encode(self, ic, arr, bits, q, **opts):
        kw = {}
        if bits < arr.dtype.itemsize * 8 and _fits(arr, bits):
            kw["bitspersample"] = bits
        if self.lossless:
            return ic.jpegxl_encode(arr, lossless=True, effort=opts.get("effort", 3), **kw)
        return ic.jpegxl_encode(arr, distance=float(opts.get("distance", q)),
                                effort=opts.get("effort", 3), **kw)

    def _decode(self, ic, data, reduce):
        return ic.jpegxl_decode(data)


class JpegCodec(Codec):
    library = "libjpeg-turbo"
    _ic_flag = "JPEG8"
    _ic_version = "jpeg8_version"
    max_bits = 8
    takes_signed = False
    _quality_range = (1, 100, True, False)           # JPEG quality

    def _encode(self, ic, arr, bits, q, **opts):
        return ic.jpeg8_encode(arr, level=int(opts.get("quality", q)))

    def _decode(self, ic, data, reduce):
        return ic.jpeg8_decode(data)


def _fits(arr: np.ndarray, bits: int) -> bool:
    return bool(arr.size) and int(arr.max()) < (1 << bits) and int(arr.min()) >= 0


# --------------------------------------------------------------------------- registry
_ALL: tuple[Codec, ...] = (
    JpegLSCodec("jpegls", JPEGLS_LOSSLESS, True, "JPEG-LS lossless"),
    JpegLSCodec("jpegls", JPEGLS_NEAR_LOSSLESS, False, "JPEG-LS near-lossless"),
    HTJ2KCodec("htj2k", HTJ2K_LOSSLESS_RPCL, True, "HTJ2K lossless RPCL"),
    HTJ2KCodec("htj2k", HTJ2K_LOSSLESS, True, "HTJ2K lossless"),
    HTJ2KCodec("htj2k", HTJ2K, False, "HTJ2K"),
    J2KCodec("j2k", J2K_LOSSLESS, True, "JPEG 2000 lossless"),
    J2KCodec("j2k", J2K, False, "JPEG 2000"),
    JpegXLCodec("jxl", JPEGXL_LOSSLESS, True, "JPEG XL lossless"),
    JpegXLCodec("jxl", JPEGXL, False, "JPEG XL"),
    JpegCodec("jpeg", JPEG_BASELINE, False, "JPEG baseline"),
)
BY_TS: dict[str, Codec] = {c.transfer_syntax: c for c in _ALL}
NAMES = ("jpegls", "htj2k", "j2k", "jxl", "jpeg")


def get(ts_uid: str) -> Codec:
    """The codec of a transfer syntax UID (KeyError naming the UID if there is none)."""
    try:
        return BY_TS[str(ts_uid)]
    except KeyError:
        raise KeyError(f"no codec for transfer syntax {ts_uid}") from None


def by_name(name: str, lossless: bool = True) -> Codec:
    """The codec called ``name`` (jpegls, htj2k, j2k, jxl, jpeg), lossless or lossy; the
    first registered one wins (HTJ2K lossless = the RPCL syntax .4.202)."""
    for c in _ALL:
        if c.name == name and c.lossless == lossless:
            return c
    kinds = "lossless" if lossless else "lossy"
    raise KeyError(f"no {kinds} codec called {name!r} (known: {', '.join(NAMES)})")


def all_codecs() -> tuple[Codec, ...]:
    return _ALL


def status() -> list[dict]:
    """Availability of every backend (for --version output, /api/health, the bench)."""
    return [{"name": c.name, "transfer_syntax": c.transfer_syntax, "label": c.label,
             "lossless": c.lossless, "library": c.library, "available": c.available,
             "version": c.version, "missing": c.missing} for c in _ALL]


def psnr(reference: np.ndarray, test: np.ndarray, peak: float | None = None) -> float:
    """PSNR in dB over the reference's stored range (inf when identical)."""
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(test, dtype=np.float64)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0:
        return math.inf
    if peak is None:
        peak = max(1.0, float(a.max() - a.min()))
    return 10 * math.log10(peak * peak / mse)



def resolution_prefix(codestream: bytes, reduce: int) -> int:
    """How many first bytes of a one-tile RPCL codestream written with a tile-part per
    resolution (the HTJ2K final copies, .4.202) decode at 1/2**reduce of each side: the
    main header and the tile-parts of the resolutions up to that one. A viewer asks
    for exactly these bytes with an HTTP Range request for a preview. Raises
    CodecError when the codestream is not laid out that way."""
    import struct

    i = codestream.find(b"\xff\x90")                      # the first SOT
    ends: list[int] = []
    while 0 <= i and codestream[i:i + 2] == b"\xff\x90" and i + 12 <= len(codestream):
        _lsot, isot, psot, _tpsot, tnsot = struct.unpack(">HHIBB", codestream[i + 2:i + 12])
        if isot != 0 or psot == 0:
            raise CodecError("not a one-tile codestream with tile-part lengths")
        ends.append(i + psot)
        i += psot
    if not ends or len(ends) != tnsot:
        raise CodecError("the codestream has no complete set of tile-parts")
    levels = len(ends) - 1                                # tile-parts = resolutions
    if not 0 <= reduce <= levels:
        raise CodecError(f"reduce must be 0..{levels}, got {reduce}")
    return ends[levels - reduce]
