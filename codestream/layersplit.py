"""Split a stored codestream by quality layers, and join it again.

Tiered storage (SPEC V7) keeps the lossy layers of every image in the fast store and moves
the rest (the packets that make the image lossless) to the archive: one codestream, cut
by layers, never two copies of the same data.

* :func:`split_by_layers` cuts a codestream into a *head* (every byte before the first
  packet, i.e. the main and tile-part headers and SOD, then the packets of layers
  ``0..keep-1`` in codestream order) and a *tail* (the packets of layers ``keep..`` in
  codestream order, then whatever follows the last packet: EOC).
* :func:`join_layers` puts head and tail back together, byte for byte; the caller checks
  the result against the recorded SHA-256 of the whole codestream.
* :func:`databins_from_head` gives the data-bins the server can stream from the head
  alone: every packet of the first ``keep`` layers; the other packets are ``None`` so
  that they can never be sent by mistake as empty bytes.

With LRCP (what :mod:`codestream.encode` writes) the head is simply a prefix of the
codestream; the functions work for any progression order the index describes.
"""
from __future__ import annotations

from .databins import Databins
from .index import CodestreamError, PacketIndex


def _check_contiguous(index: PacketIndex) -> None:
    """The packets must tile the body exactly (what PLT-indexed codestreams do)."""
    start, end = index.body
    pos = start
    for _c, _l, _r, _p, off, ln in index.packets.tolist():
        if off != pos:
            raise CodestreamError(f"packet at byte {off} does not follow the previous one "
                                  f"(expected {pos}): cannot split by layers")
        pos += ln
    if pos != end:
        raise CodestreamError(f"packets end at byte {pos}, the body at {end}: cannot split")


def split_point(index: PacketIndex, keep: int) -> int:
    """Size of the head that keeps ``keep`` layers (headers + their packets)."""
    keep = max(0, min(keep, index.nlayers))
    pk = index.packets
    return index.body[0] + int(pk[pk[:, 1] < keep, 5].sum())


def split_by_layers(cs: bytes, index: PacketIndex, keep: int) -> tuple[bytes, bytes]:
    """(head, tail): layers ``0..keep-1`` with the headers, and the rest."""
    if not 1 <= keep <= index.nlayers:
        raise CodestreamError(f"keep must be 1..{index.nlayers} layers, got {keep}")
    if len(cs) != index.total_bytes:
        raise CodestreamError(f"codestream is {len(cs)} bytes, its index says {index.total_bytes}")
    _check_contiguous(index)
    mv = memoryview(cs)
    head = bytearray(mv[:index.body[0]])
    tail = bytearray()
    for _c, l, _r, _p, off, ln in index.packets.tolist():
        (head if l < keep else tail).extend(mv[off:off + ln])
    tail += mv[index.body[1]:]
    return bytes(head), bytes(tail)


def join_layers(head: bytes, tail: bytes, index: PacketIndex, keep: int) -> bytes:
    """Inverse of :func:`split_by_layers`."""
    body0 = index.body[0]
    if len(head) != split_point(index, keep):
        raise CodestreamError(f"head is {len(head)} bytes, expected {split_point(index, keep)}")
    out = bytearray(head[:body0])
    hpos, tpos = body0, 0
    for _c, l, _r, _p, _off, ln in index.packets.tolist():
        if l < keep:
            out += head[hpos:hpos + ln]
            hpos += ln
        else:
            out += tail[tpos:tpos + ln]
            tpos += ln
    out += tail[tpos:]
    if len(out) != index.total_bytes:
        raise CodestreamError(f"joined codestream is {len(out)} bytes, expected {index.total_bytes}")
    return bytes(out)


def databins_from_head(head: bytes, index: PacketIndex, keep: int) -> Databins:
    """Data-bins of the first ``keep`` layers from a head; other packets are ``None``."""
    if len(head) != split_point(index, keep):
        raise CodestreamError(f"head is {len(head)} bytes, expected {split_point(index, keep)}")
    mv = memoryview(head)
    prec: dict[int, list] = {}
    pos = index.body[0]
    for c, l, r, p, _off, ln in index.packets.tolist():
        bins = prec.setdefault(index.databin_id(c, r, p), [None] * index.nlayers)
        if l < keep:
            bins[l] = bytes(mv[pos:pos + ln])
            pos += ln
    return Databins(bytes(mv[:index.main_header_end]),
                    bytes(mv[index.tile_header[0]:index.tile_header[1]]), prec)
