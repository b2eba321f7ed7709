"""Packet index of a JPEG 2000 codestream.

Walks the main header (SIZ, COD), the single tile-part header and its PLT markers, and
maps every packet to ``(comp, layer, res, precinct)`` and a byte range, by replaying the
progression order. Also gives the geometry of every precinct, so that a region request
can be answered with only the precincts that influence it.

Scope, checked and refused with a clear error otherwise: one tile, one tile-part, PLT
markers present, no POC/PPM/PPT, no component-specific COC precinct sizes. That is what
:mod:`codestream.encode` writes.
"""
from __future__ import annotations

import functools
import json
import struct
from dataclasses import dataclass, field

import numpy as np

# Marker codes
SOC, SIZ, COD, COC, TLM, PLM, PLT, QCD, QCC, RGN, POC, PPM, PPT, CRG, COM, CME = (
    0xFF4F, 0xFF51, 0xFF52, 0xFF53, 0xFF55, 0xFF57, 0xFF58, 0xFF5C, 0xFF5D, 0xFF5E,
    0xFF5F, 0xFF60, 0xFF61, 0xFF63, 0xFF64, 0xFF64,
)
SOT, SOP, EPH, SOD, EOC = 0xFF90, 0xFF91, 0xFF92, 0xFF93, 0xFFD9

PROGRESSIONS = ("LRCP", "RLCP", "RPCL", "PCRL", "CPRL")

# 5/3 synthesis reaches this many samples beyond a region at each decomposition level.
_FILTER_MARGIN = 2


class CodestreamError(ValueError):
    """The bytes are not a codestream this index can describe (with the reason)."""


def _ceildiv(a: int, b: int) -> int:
    return -(-a // b)


def iter_marker_segments(buf: bytes, start: int, end: int):
    """Yield (marker, offset, segment_length_including_marker) for header segments."""
    pos = start
    while pos < end:
        if pos + 2 > end:
            raise CodestreamError(f"truncated marker at byte {pos}")
        (marker,) = struct.unpack_from(">H", buf, pos)
        if marker >> 8 != 0xFF:
            raise CodestreamError(f"expected a marker at byte {pos}, found 0x{marker:04x}")
        if marker in (SOC, SOD, EOC):
            yield marker, pos, 2
            pos += 2
            continue
        if pos + 4 > end:
            raise CodestreamError(f"truncated marker segment 0x{marker:04x} at byte {pos}")
        (length,) = struct.unpack_from(">H", buf, pos + 2)
        if pos + 2 + length > len(buf):
            raise CodestreamError(f"marker segment 0x{marker:04x} at byte {pos} runs past the end")
        yield marker, pos, 2 + length
        pos += 2 + length


@dataclass
class PacketIndex:
    """Where every packet of a single-tile codestream lives, and what it covers."""

    width: int
    height: int
    x0: int
    y0: int
    ncomp: int
    subsampling: list[tuple[int, int]]
    precision: list[int]
    signed: list[bool]
    numres: int
    nlayers: int
    progression: str
    sop: bool
    eph: bool
    cblk: tuple[int, int]
    precinct_exp: list[tuple[int, int]]          # per resolution (PPx, PPy)
    main_header_end: int                         # offset of the first SOT
    tile_header: tuple[int, int]                 # markers between SOT and SOD: [start, end)
    body: tuple[int, int]                        # packet data: [start, end)
    total_bytes: int
    # packets[i] = (comp, layer, res, prec, offset, length), in codestream order
    packets: np.ndarray = field(repr=False)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def parse(cls, cs: bytes) -> "PacketIndex":
        buf = bytes(cs) if isinstance(cs, memoryview) else cs
        if len(buf) < 4 or struct.unpack_from(">H", buf, 0)[0] != SOC:
            raise CodestreamError("not a JPEG 2000 codestream (no SOC marker)")
        siz = cod = None
        sot_pos = None
        for marker, pos, seglen in iter_marker_segments(buf, 0, len(buf)):
            if marker == SOT:
                sot_pos = pos
                break
            if marker == SIZ:
                siz = _parse_siz(buf, pos)
            elif marker == COD:
                cod = _parse_cod(buf, pos)
            elif marker == COC:
                raise CodestreamError("COC markers (per-component coding) are not supported")
            elif marker in (POC, PPM):
                raise CodestreamError(f"marker 0x{marker:04x} (POC/PPM) is not supported")
        if siz is None or cod is None:
            raise CodestreamError("main header lacks SIZ or COD")
        if sot_pos is None:
            raise CodestreamError("codestream has no tile (truncated main header?)")
        xsiz, ysiz, xo, yo, xt, yt, xto, yto, comps = siz
        if xto + xt < xsiz or yto + yt < ysiz:
            raise CodestreamError("multi-tile codestreams are not supported")
        # tile-part header
        if sot_pos + 12 > len(buf):
            raise CodestreamError("truncated SOT marker segment")
        _, lsot, isot, psot, tpsot, tnsot = struct.unpack_from(">HHHIBB", buf, sot_pos)
        if lsot != 10:
            raise CodestreamError(f"bad SOT marker segment length {lsot}")
        if isot != 0 or tpsot != 0 or tnsot not in (0, 1):
            raise CodestreamError("only one tile in one tile-part is supported")
        th_start = sot_pos + 12
        sod_pos = None
        plt_lengths: list[int] = []
        for marker, pos, seglen in iter_marker_segments(buf, th_start, len(buf)):
            if marker == SOD:
                sod_pos = pos
                break
            if marker == PLT:
                plt_lengths.extend(_parse_plt(buf, pos, seglen))
            elif marker in (PPT, POC, COC):
                raise CodestreamError(f"tile-part marker 0x{marker:04x} is not supported")
            elif marker == COD:
                cod = _parse_cod(buf, pos)
        if sod_pos is None:
            raise CodestreamError("tile-part header has no SOD (truncated codestream)")
        body_start = sod_pos + 2
        body_end = sot_pos + psot if psot else len(buf) - 2
        if body_end > len(buf):
            raise CodestreamError(
                f"codestream truncated: tile-part needs {body_end} bytes, file has {len(buf)}")
        if not plt_lengths:
            raise CodestreamError("codestream has no PLT markers; packets cannot be indexed")
        scod, prog, nlayers, _mct, ndecomp, cbw, cbh, pexp = cod
        numres = ndecomp + 1
        if any(c[2] == 0 or c[3] == 0 for c in comps) or xsiz <= xo or ysiz <= yo:
            raise CodestreamError("SIZ describes an empty image or a zero sub-sampling factor")
        idx = cls(
            width=xsiz - xo, height=ysiz - yo, x0=xo, y0=yo,
            ncomp=len(comps),
            subsampling=[(c[2], c[3]) for c in comps],
            precision=[c[0] for c in comps], signed=[c[1] for c in comps],
            numres=numres, nlayers=nlayers, progression=PROGRESSIONS[prog],
            sop=bool(scod & 2), eph=bool(scod & 4), cblk=(cbw, cbh),
            precinct_exp=pexp, main_header_end=sot_pos,
            tile_header=(th_start, sod_pos), body=(body_start, body_end),
            total_bytes=len(buf), packets=np.zeros((0, 6), np.int64),
        )
        npk = nlayers * sum(idx.num_precincts(c, r) for c in range(idx.ncomp)
                            for r in range(numres))
        if npk != len(plt_lengths):  # checked before listing: a corrupt SIZ/COD can be huge
            raise CodestreamError(
                f"PLT lists {len(plt_lengths)} packets, progression has {npk}")
        order = idx._packet_order()
        if len(order) != len(plt_lengths):
            raise CodestreamError(
                f"PLT lists {len(plt_lengths)} packets, progression has {len(order)}")
        lengths = np.asarray(plt_lengths, np.int64)
        offsets = body_start + np.concatenate(([0], np.cumsum(lengths)[:-1]))
        if offsets[-1] + lengths[-1] != body_end:
            raise CodestreamError(
                f"PLT lengths sum to {int(lengths.sum())}, tile body is {body_end - body_start}")
        pk = np.empty((len(order), 6), np.int64)
        pk[:, :4] = np.asarray(order, np.int64)
        pk[:, 4] = offsets
        pk[:, 5] = lengths
        idx.packets = pk
        return idx

    # ------------------------------------------------------------------ geometry
    def comp_bounds(self, c: int) -> tuple[int, int, int, int]:
        """Tile-component bounds (x0, y0, x1, y1) on the component's own grid."""
        dx, dy = self.subsampling[c]
        return (_ceildiv(self.x0, dx), _ceildiv(self.y0, dy),
                _ceildiv(self.x0 + self.width, dx), _ceildiv(self.y0 + self.height, dy))

    def res_bounds(self, c: int, r: int) -> tuple[int, int, int, int]:
        """Bounds of resolution r of component c (r = 0 is the smallest)."""
        s = 1 << (self.numres - 1 - r)
        x0, y0, x1, y1 = self.comp_bounds(c)
        return _ceildiv(x0, s), _ceildiv(y0, s), _ceildiv(x1, s), _ceildiv(y1, s)

    def res_size(self, r: int, c: int = 0) -> tuple[int, int]:
        """(width, height) of resolution r."""
        x0, y0, x1, y1 = self.res_bounds(c, r)
        return x1 - x0, y1 - y0

    def precinct_grid(self, c: int, r: int) -> tuple[int, int]:
        """Number of precincts (across, down) at resolution r of component c."""
        x0, y0, x1, y1 = self.res_bounds(c, r)
        px, py = self.precinct_exp[r]
        nw = (_ceildiv(x1, 1 << px) - (x0 >> px)) if x1 > x0 else 0
        nh = (_ceildiv(y1, 1 << py) - (y0 >> py)) if y1 > y0 else 0
        return nw, nh

    def num_precincts(self, c: int, r: int) -> int:
        nw, nh = self.precinct_grid(c, r)
        return nw * nh

    def precinct_rect_res(self, c: int, r: int, p: int) -> tuple[int, int, int, int]:
        """Precinct rectangle (x0, y0, x1, y1) on the grid of resolution r."""
        x0, y0, x1, y1 = self.res_bounds(c, r)
        px, py = self.precinct_exp[r]
        nw, _ = self.precinct_grid(c, r)
        i, j = p % nw, p // nw
        gx = ((x0 >> px) + i) << px
        gy = ((y0 >> py) + j) << py
        return max(x0, gx), max(y0, gy), min(x1, gx + (1 << px)), min(y1, gy + (1 << py))

    def precinct_rect(self, c: int, r: int, p: int) -> tuple[int, int, int, int]:
        """Precinct rectangle in full-resolution image pixels (x0, y0, x1, y1)."""
        s = 1 << (self.numres - 1 - r)
        dx, dy = self.subsampling[c]
        x0, y0, x1, y1 = self.precinct_rect_res(c, r, p)
        return (min(x0 * s * dx - self.x0, self.width), min(y0 * s * dy - self.y0, self.height),
                min(x1 * s * dx - self.x0, self.width), min(y1 * s * dy - self.y0, self.height))

    @functools.cached_property
    def _seq_base(self) -> dict[tuple[int, int], int]:
        base = {}
        for c in range(self.ncomp):
            n = 0
            for r in range(self.numres):
                base[(c, r)] = n
                n += self.num_precincts(c, r)
        return base

    def precinct_seq(self, c: int, r: int, p: int) -> int:
        """Sequence number of a precinct within its tile-component, from res 0 up."""
        return self._seq_base[(c, r)] + p

    def databin_id(self, c: int, r: int, p: int) -> int:
        """JPIP precinct data-bin in-class identifier (one tile: c + s*C)."""
        return c + self.precinct_seq(c, r, p) * self.ncomp

    def databin_key(self, bin_id: int) -> tuple[int, int, int]:
        """Inverse of :meth:`databin_id`: (comp, res, precinct)."""
        c, s = bin_id % self.ncomp, bin_id // self.ncomp
        for r in range(self.numres):
            n = self.num_precincts(c, r)
            if s < n:
                return c, r, s
            s -= n
        raise CodestreamError(f"precinct data-bin {bin_id} does not exist in this codestream")

    def precincts_for_region(self, c: int, r: int, x0: int, y0: int, x1: int, y1: int) -> list[int]:
        """Precincts of resolution r whose data influences the full-resolution region.

        The region is widened at each decomposition level by the reach of the 5/3
        synthesis filter, so a decode of the region from these precincts alone equals the
        decode of the whole codestream restricted to the region.
        """
        dx, dy = self.subsampling[c]
        # region on component grid, then walk down from the top resolution
        rx0 = (x0 + self.x0) // dx
        ry0 = (y0 + self.y0) // dy
        rx1 = _ceildiv(x1 + self.x0, dx)
        ry1 = _ceildiv(y1 + self.y0, dy)
        m = _FILTER_MARGIN
        for _ in range(self.numres - 1 - r):
            rx0, ry0 = (rx0 - m) // 2, (ry0 - m) // 2
            rx1, ry1 = _ceildiv(rx1 + m, 2), _ceildiv(ry1 + m, 2)
        if r > 0:  # this resolution's own detail subbands also reach m samples
            rx0, ry0, rx1, ry1 = rx0 - m, ry0 - m, rx1 + m, ry1 + m
        bx0, by0, bx1, by1 = self.res_bounds(c, r)
        rx0, ry0, rx1, ry1 = max(rx0, bx0), max(ry0, by0), min(rx1, bx1), min(ry1, by1)
        if rx1 <= rx0 or ry1 <= ry0:
            return []
        px, py = self.precinct_exp[r]
        nw, _ = self.precinct_grid(c, r)
        i0, i1 = (rx0 >> px) - (bx0 >> px), ((rx1 - 1) >> px) - (bx0 >> px)
        j0, j1 = (ry0 >> py) - (by0 >> py), ((ry1 - 1) >> py) - (by0 >> py)
        return [j * nw + i for j in range(j0, j1 + 1) for i in range(i0, i1 + 1)]

    # ------------------------------------------------------------------ packets
    def _packet_order(self) -> list[tuple[int, int, int, int]]:
        keys = []
        for c in range(self.ncomp):
            dx, dy = self.subsampling[c]
            for r in range(self.numres):
                s = 1 << (self.numres - 1 - r)
                px, py = self.precinct_exp[r]
                for p in range(self.num_precincts(c, r)):
                    x0, y0, _, _ = self.precinct_rect_res(c, r, p)
                    # position at which B.12.1.3-5 visit the precinct on the reference
                    # grid: its start, except that a first row/column precinct clipped
                    # by an unaligned tile-component origin is visited at the tile
                    # origin (ty0 / tx0), not at its own first sample.
                    gy = self.y0 if y0 % (1 << py) else y0 * s * dy
                    gx = self.x0 if x0 % (1 << px) else x0 * s * dx
                    for l in range(self.nlayers):
                        keys.append((c, l, r, p, gy, gx))
        sort = {
            "LRCP": lambda k: (k[1], k[2], k[0], k[3]),
            "RLCP": lambda k: (k[2], k[1], k[0], k[3]),
            "RPCL": lambda k: (k[2], k[4], k[5], k[0], k[1]),
            "PCRL": lambda k: (k[4], k[5], k[0], k[2], k[1]),
            "CPRL": lambda k: (k[0], k[4], k[5], k[2], k[1]),
        }[self.progression]
        keys.sort(key=sort)
        return [k[:4] for k in keys]

    def packet_table(self) -> dict[tuple[int, int, int, int], tuple[int, int]]:
        """(comp, layer, res, prec) -> (offset, length)."""
        return {tuple(int(v) for v in row[:4]): (int(row[4]), int(row[5])) for row in self.packets}

    def packet_lengths_by_bin(self) -> dict[int, list[int]]:
        """Precinct data-bin id -> lengths of its packets in layer order (computed once;
        callers must not modify the result)."""
        return self._lengths_by_bin

    @functools.cached_property
    def _lengths_by_bin(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for c, l, r, p, _off, ln in self.packets.tolist():
            out.setdefault(self.databin_id(c, r, p), [0] * self.nlayers)[l] = ln
        return out

    def empty_packet(self, seq: int) -> bytes:
        """An empty packet (zero-length header bit), with SOP/EPH as the stream uses."""
        out = b"\x00"
        if self.eph:
            out += b"\xff\x92"
        if self.sop:
            out = struct.pack(">HHH", SOP, 4, seq & 0xFFFF) + out
        return out

    def bytes_at(self, layers: int, res: int) -> int:
        """Total packet bytes of the first `layers` layers up to resolution index `res`."""
        pk = self.packets
        sel = (pk[:, 1] < layers) & (pk[:, 2] <= res)
        return int(pk[sel, 5].sum())

    def reduce_for(self, res: int) -> int:
        return self.numres - 1 - res

    def res_for_size(self, width: int, height: int) -> int:
        """Smallest resolution index whose size is at least (width, height) (JPIP fsiz
        with round-up), capped at full resolution."""
        for r in range(self.numres):
            w, h = self.res_size(r)
            if w >= width and h >= height:
                return r
        return self.numres - 1

    # ------------------------------------------------------------------ (de)serialise
    def to_json(self) -> str:
        d = {k: getattr(self, k) for k in (
            "width", "height", "x0", "y0", "ncomp", "subsampling", "precision", "signed",
            "numres", "nlayers", "progression", "sop", "eph", "cblk", "precinct_exp",
            "main_header_end", "tile_header", "body", "total_bytes")}
        d["version"] = 1
        d["packets"] = self.packets.tolist()
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str | bytes) -> "PacketIndex":
        try:
            d = json.loads(s)
        except ValueError as e:
            raise CodestreamError(f"packet index is not valid JSON: {e}") from None
        if not isinstance(d, dict) or d.pop("version", None) != 1:
            raise CodestreamError("unknown packet index version")
        d["packets"] = np.asarray(d["packets"], np.int64).reshape(-1, 6)
        for k in ("subsampling", "precinct_exp"):
            d[k] = [tuple(v) for v in d[k]]
        for k in ("cblk", "tile_header", "body"):
            d[k] = tuple(d[k])
        return cls(**d)

    @classmethod
    def from_headers(cls, main_header: bytes, tile_header: bytes) -> "PacketIndex":
        """Rebuild the index on the client side from the main and tile header data-bins
        (the tile header carries the PLT markers). Offsets are then relative to a
        virtual codestream main_header + SOT + tile_header + SOD + body."""
        body_len = sum(sum(_parse_plt(tile_header, pos, seglen))
                       for m, pos, seglen in iter_marker_segments(tile_header, 0, len(tile_header))
                       if m == PLT)
        virtual = (bytes(main_header) + struct.pack(">HHHIBB", SOT, 10, 0,
                                                     12 + len(tile_header) + 2 + body_len, 0, 1)
                   + bytes(tile_header) + b"\xff\x93")
        # a virtual body of zeros: parse only reads headers and PLT
        return cls.parse(virtual + bytes(body_len) + b"\xff\xd9")


def _parse_siz(buf, pos):
    (lsiz,) = struct.unpack_from(">H", buf, pos + 2)
    if lsiz < 41 or lsiz != 38 + 3 * struct.unpack_from(">H", buf, pos + 38)[0]:
        raise CodestreamError(f"bad SIZ marker segment (length {lsiz})")
    (_m, _l, _rsiz, xsiz, ysiz, xo, yo, xt, yt, xto, yto, csiz) = struct.unpack_from(
        ">HHHIIIIIIIIH", buf, pos)
    comps = []
    for i in range(csiz):
        ssiz, xr, yr = struct.unpack_from(">BBB", buf, pos + 40 + 3 * i)
        comps.append(((ssiz & 0x7F) + 1, bool(ssiz & 0x80), xr, yr))
    return xsiz, ysiz, xo, yo, xt, yt, xto, yto, comps


def _parse_cod(buf, pos):
    (lcod,) = struct.unpack_from(">H", buf, pos + 2)
    if lcod < 12:
        raise CodestreamError(f"bad COD marker segment (length {lcod})")
    (_m, lcod, scod, prog, nlayers, mct, ndecomp, xcb, ycb, _style, _transform) = struct.unpack_from(
        ">HHBBHBBBBBB", buf, pos)
    if lcod < 12 + (ndecomp + 1) * (scod & 1) or ndecomp > 32 or nlayers == 0:
        raise CodestreamError(f"bad COD marker segment (length {lcod}, {ndecomp} "
                              f"decomposition levels, {nlayers} layers)")
    if prog >= len(PROGRESSIONS):
        raise CodestreamError(f"unknown progression order {prog}")
    numres = ndecomp + 1
    if scod & 1:
        raw = buf[pos + 14: pos + 14 + numres]
        pexp = [(b & 0x0F, b >> 4) for b in raw]
    else:
        pexp = [(15, 15)] * numres
    return scod, prog, nlayers, mct, ndecomp, xcb + 2, ycb + 2, pexp


def _parse_plt(buf, pos, seglen) -> list[int]:
    out, val, more = [], 0, False
    for b in buf[pos + 5: pos + seglen]:
        val = (val << 7) | (b & 0x7F)
        more = bool(b & 0x80)
        if not more:
            out.append(val)
            val = 0
    if more:
        raise CodestreamError("PLT marker ends inside a packet length")
    return out
