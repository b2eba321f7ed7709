"""Data-bins of a codestream and the empty-packet rebuild.

Server side, :func:`split_databins` cuts a stored codestream into the JPIP data-bins it
streams: the main header, the tile header and one precinct data-bin per (comp, res,
precinct) holding that precinct's packets in layer order.

Client side, :class:`BinSet` holds whatever prefix of each data-bin has arrived, and
:func:`rebuild_codestream` turns it into a decodable codestream: main header, a tile-part
header with a correct Psot and without the (now stale) PLT markers, every packet that is
present, and an empty packet in place of each missing one. OpenJPEG decodes the result
exactly as it decodes the full codestream limited to the same layers/resolutions
(J2K-FACTS). Only whole packets are used, and layers are used as a prefix per precinct.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .index import (COC, COD, EOC, PLM, PLT, SIZ, SOD, SOT, TLM, CodestreamError,
                    PacketIndex, iter_marker_segments)
from .jpp import MAIN_HEADER, PRECINCT, TILE_HEADER


@dataclass
class Databins:
    main_header: bytes
    tile_header: bytes
    # bin id -> (packet bytes per layer)
    precincts: dict[int, list[bytes]]


def split_databins(cs: bytes, index: PacketIndex) -> Databins:
    prec: dict[int, list[bytes]] = {}
    mv = memoryview(cs)
    for c, l, r, p, off, ln in index.packets.tolist():
        bins = prec.setdefault(index.databin_id(c, r, p), [b""] * index.nlayers)
        bins[l] = bytes(mv[off:off + ln])
    return Databins(bytes(mv[:index.main_header_end]),
                    bytes(mv[index.tile_header[0]:index.tile_header[1]]), prec)


def read_spans(index: PacketIndex, layers: int, res: int, gap: int = 4096
               ) -> list[tuple[int, int]]:
    """The byte ranges ``[start, end)`` of a codestream that hold its headers and the
    packets of the first ``layers`` layers up to resolution index ``res``: neighbouring
    ranges closer than ``gap`` bytes are merged (one read instead of two)."""
    wanted = [(0, index.tile_header[1])]
    for _c, l, r, _p, off, ln in index.packets.tolist():
        if l < layers and r <= res and ln:
            wanted.append((off, off + ln))
    wanted.sort()
    spans: list[list[int]] = []
    for a, b in wanted:
        if spans and a - spans[-1][1] <= gap:
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([a, b])
    return [(a, b) for a, b in spans]


def databins_from_ranges(index: PacketIndex, read_range, layers: int, res: int,
                         gap: int = 4096) -> Databins:
    """The data-bins of the first ``layers`` layers up to resolution ``res``, read as
    byte ranges (``read_range(start, end) -> bytes``, e.g. HTTP range reads of an object
    store) at the index's packet offsets; other packets are ``None`` (never sent)."""
    spans = read_spans(index, layers, res, gap)
    chunks = [(a, read_range(a, b)) for a, b in spans]

    def cut(off: int, ln: int) -> bytes:
        for a, data in chunks:
            if a <= off and off + ln <= a + len(data):
                return data[off - a:off - a + ln]
        raise CodestreamError(f"bytes {off}-{off + ln} were not read")

    prec: dict[int, list] = {}
    for c, l, r, p, off, ln in index.packets.tolist():
        bins = prec.setdefault(index.databin_id(c, r, p), [None] * index.nlayers)
        if l < layers and r <= res:
            bins[l] = cut(off, ln) if ln else b""
    th0, th1 = index.tile_header
    return Databins(cut(0, index.main_header_end), cut(th0, th1 - th0), prec)


def openjpeg_tile_header(tile_header: bytes, index: PacketIndex) -> bytes:
    """The tile-header data-bin as OpenJPEG's JPIP tools read it: the SOT marker
    segment's parameters (Lsot, Isot, Psot, TPsot, TNsot, without the 0xFF90 marker code
    that the tool writes itself), the tile-part header marker segments, then the SOD
    marker. ISO/IEC 15444-9 A.3.3 leaves SOT and SOD out (:func:`split_databins`)."""
    sot = index.tile_header[0] - 12
    psot = index.body[1] - sot
    return struct.pack(">HHIBB", 10, 0, psot, 0, 1) + tile_header + struct.pack(">H", SOD)


def reduced_main_header(main_header: bytes, discard: int) -> bytes:
    """The main header of the same codestream with its ``discard`` finest resolution
    levels removed: SIZ sizes and offsets divided by 2**discard (rounded up), COD/COC
    decomposition levels lowered and their precinct sizes cut to the levels kept. The
    packets of the kept levels are unchanged, so this header with them decodes exactly
    as the full codestream at that reduction (what OpenJPEG's JPIP transcoder does to
    the headers when resolutions are missing, done before it so that it does not pad
    the dropped levels in every layer)."""
    if discard <= 0:
        return main_header
    out = bytearray(main_header[:2])                   # SOC
    ncomp = 0
    d = 1 << discard
    for marker, pos, seglen in iter_marker_segments(main_header, 2, len(main_header)):
        seg = bytearray(main_header[pos:pos + seglen])
        if marker == SIZ:
            vals = struct.unpack_from(">8I", seg, 6)
            struct.pack_into(">8I", seg, 6, *(-(-v // d) for v in vals))
            (ncomp,) = struct.unpack_from(">H", seg, 38)
        elif marker in (COD, COC):
            # COD: Scod at 4, SGcod 5..8, NL at 9; COC: Ccoc (1 or 2 bytes), Scoc, NL
            if marker == COD:
                scod, nl_at = seg[4], 9
            else:
                c_len = 2 if ncomp >= 257 else 1
                scod, nl_at = seg[4 + c_len], 5 + c_len
            nl = seg[nl_at]
            if discard > nl:
                raise CodestreamError(f"cannot discard {discard} of {nl} levels")
            seg[nl_at] = nl - discard
            if scod & 1:                                # precinct sizes, one per level
                first = nl_at + 5
                seg = seg[:first + nl - discard + 1]
                struct.pack_into(">H", seg, 2, len(seg) - 2)
        elif marker in (TLM, PLM):
            continue                                    # stale once levels are gone
        out += seg
    return bytes(out)


def standard_tile_header(data: bytes) -> bytes:
    """The standard tile-header data-bin from either layout (OpenJPEG's starts with the
    SOT parameters, Lsot = 10, and ends with SOD; a standard one starts with a marker)."""
    if len(data) >= 12 and data[:2] == b"\x00\x0a" and data[-2:] == b"\xff\x93":
        return data[10:-2]
    return data


def _strip(segment_bytes: bytes, drop: tuple[int, ...], start: int = 0) -> bytes:
    out = bytearray(segment_bytes[:start])
    for marker, pos, seglen in iter_marker_segments(segment_bytes, start, len(segment_bytes)):
        if marker not in drop:
            out += segment_bytes[pos:pos + seglen]
    return bytes(out)


@dataclass
class BinSet:
    """The data-bins of one codestream as received so far (prefixes only)."""

    main_header: bytes | None = None
    tile_header: bytes | None = None
    precincts: dict[int, bytes] = field(default_factory=dict)
    _index: PacketIndex | None = field(default=None, repr=False)

    @property
    def index(self) -> PacketIndex | None:
        if self._index is None and self.main_header and self.tile_header:
            self._index = PacketIndex.from_headers(self.main_header, self.tile_header)
        return self._index

    def absorb(self, msg) -> tuple[int, tuple[int, int] | None, bytes]:
        """Merge one JPP message (:class:`codestream.jpp.JppMessage`) into the bins.

        Returns ``(new bytes, key, data)``: how many bytes it added, the cache key
        ``(class, bin id)`` of the data-bin it changed (None if nothing changed) and that
        bin's whole data now. Repeated bytes are dropped; a message that would leave a gap
        in a precinct bin, and a header sent in pieces, are ignored (the client asks again
        and the server's cache model resends them)."""
        if msg.cls in (MAIN_HEADER, TILE_HEADER):
            if msg.offset != 0:
                return 0, None, b""
            if msg.cls == MAIN_HEADER:
                self.main_header = msg.data
            else:
                self.tile_header = standard_tile_header(msg.data)
            self._index = None
            return len(msg.data), (msg.cls, 0), msg.data
        if msg.cls != PRECINCT:
            return 0, None, b""
        have = self.precincts.get(msg.bin_id, b"")
        if msg.offset > len(have):
            return 0, None, b""
        new = msg.data[len(have) - msg.offset:]
        if not new:
            return 0, None, b""
        data = have + new
        self.precincts[msg.bin_id] = data
        return len(new), (PRECINCT, msg.bin_id), data

    def layers_in_bin(self, bin_id: int, lengths: list[int] | None = None) -> int:
        """Number of whole packets (layers) held for a precinct data-bin."""
        data = self.precincts.get(bin_id, b"")
        if lengths is None:
            lengths = self.index.packet_lengths_by_bin()[bin_id]
        n, acc = 0, 0
        for ln in lengths:
            if acc + ln > len(data):
                break
            acc += ln
            n += 1
        return n

    def levels(self, max_res: int | None = None,
               region: tuple[int, int, int, int] | None = None) -> tuple[int, int]:
        """(layers, res) reached: the highest resolution ``res`` (not above ``max_res``)
        such that every precinct of resolutions 0..res holds at least one layer, and
        the smallest layer count among those precincts. With ``region`` (x, y, w, h in
        full-resolution pixels) only the precincts that influence it count.
        (0, -1) if nothing is decodable yet."""
        ix = self.index
        if ix is None:
            return 0, -1
        lengths = ix.packet_lengths_by_bin()
        top = ix.numres - 1 if max_res is None else min(max_res, ix.numres - 1)
        res, layers, best = -1, 0, ix.nlayers
        for r in range(top + 1):
            q = ix.nlayers
            for c in range(ix.ncomp):
                if region is None:
                    precs = range(ix.num_precincts(c, r))
                else:
                    x, y, w, h = region
                    precs = ix.precincts_for_region(c, r, x, y, x + w, y + h)
                for p in precs:
                    b = ix.databin_id(c, r, p)
                    q = min(q, self.layers_in_bin(b, lengths[b]))
            if q == 0:
                break
            best = min(best, q)
            res, layers = r, best
        return layers, res

    def levels_in_region(self, region: tuple[int, int, int, int]) -> tuple[int, int]:
        """:meth:`levels` restricted to the precincts that influence ``region``."""
        return self.levels(region=region)


def rebuild_codestream(bins: BinSet, *, max_layers: int | None = None,
                       max_res: int | None = None) -> bytes:
    """A decodable codestream from whatever packets the BinSet holds. Packets beyond
    ``max_layers`` or resolution ``max_res`` are left out (empty), which decodes the same
    at that layer count / reduction and is faster."""
    ix = bins.index
    if ix is None:
        raise CodestreamError("main header or tile header not received yet")
    lengths = ix.packet_lengths_by_bin()
    # split each precinct bin into whole packets
    packets: dict[tuple[int, int], bytes] = {}
    for b, data in bins.precincts.items():
        lens = lengths.get(b)
        if lens is None:
            continue
        acc = 0
        for l, ln in enumerate(lens):
            if acc + ln > len(data) or (max_layers is not None and l >= max_layers):
                break
            packets[(b, l)] = data[acc:acc + ln]
            acc += ln
    body = bytearray()
    for seq, (c, l, r, p, _off, _ln) in enumerate(ix.packets.tolist()):
        pk = None if max_res is not None and r > max_res else packets.get((ix.databin_id(c, r, p), l))
        body += pk if pk is not None else ix.empty_packet(seq)
    main = _strip(bins.main_header, (TLM, PLM), start=2)  # keep SOC
    th = _strip(bins.tile_header, (PLT,))
    psot = 12 + len(th) + 2 + len(body)
    sot = struct.pack(">HHHIBB", SOT, 10, 0, psot, 0, 1)
    return main + sot + th + struct.pack(">H", SOD) + bytes(body) + struct.pack(">H", EOC)
