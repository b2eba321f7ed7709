"""JPIP JPP-stream messages (ISO/IEC 15444-9, Annex A), written and parsed.

A message is ``Bin-ID [Class] [CSn] Msg-Offset Msg-Length [Aux]`` followed by the body.
All header fields are VBAS numbers (big-endian 7-bit groups, bit 7 = more follows).
The first Bin-ID byte also carries BB (which of Class/CSn follow) and C (this message
ends its data-bin). A message that starts with 0x00 is an EOR (end of response) message.

:class:`JppParser` is incremental: feed it bytes as they come off the network, it yields
complete messages and keeps the Class/CSn state that BB refers back to.
"""
from __future__ import annotations

from dataclasses import dataclass

PRECINCT, EXT_PRECINCT, TILE_HEADER, TILE, EXT_TILE, MAIN_HEADER, METADATA = 0, 1, 2, 4, 5, 6, 8

# EOR reason codes (Table C.3)
EOR_IMAGE_DONE = 1
EOR_WINDOW_DONE = 2
EOR_WINDOW_CHANGE = 3
EOR_BYTE_LIMIT = 4
EOR_QUALITY_LIMIT = 5
EOR_SESSION_LIMIT = 6
EOR_RESPONSE_LIMIT = 7
EOR_NON_SPECIFIED = 0xFF


class JppError(ValueError):
    """Malformed JPP-stream."""


def vbas(value: int) -> bytes:
    if value < 0:
        raise JppError("VBAS values are non-negative")
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def read_vbas(buf, pos: int) -> tuple[int, int]:
    """Returns (value, new_pos); raises IndexError if buf ends inside the number."""
    val = 0
    for i in range(9):
        b = buf[pos + i]
        val = (val << 7) | (b & 0x7F)
        if not b & 0x80:
            return val, pos + i + 1
    raise JppError("VBAS number longer than 63 bits")


@dataclass(frozen=True)
class JppMessage:
    cls: int
    csn: int
    bin_id: int
    offset: int
    data: bytes
    is_last: bool = False
    aux: int | None = None


@dataclass(frozen=True)
class EorMessage:
    reason: int
    body: bytes = b""


class JppWriter:
    """Encodes messages, using BB to omit Class/CSn when they repeat."""

    def __init__(self) -> None:
        self._cls = 0
        self._csn = 0
        self._first = True

    def message(self, m: JppMessage) -> bytes:
        if m.cls == self._cls and m.csn == self._csn and not self._first:
            bb = 1
        elif m.csn == self._csn and not self._first:
            bb = 2
        else:
            bb = 3
        self._first = False
        self._cls, self._csn = m.cls, m.csn
        # Bin-ID: first byte has 4 id bits, later bytes 7 each.
        nbytes = 1
        while m.bin_id >> (4 + 7 * (nbytes - 1)):
            nbytes += 1
        out = bytearray()
        top = m.bin_id >> (7 * (nbytes - 1))
        first = (bb << 5) | (0x10 if m.is_last else 0) | (top & 0x0F)
        if nbytes > 1:
            first |= 0x80
        out.append(first)
        for i in range(nbytes - 2, -1, -1):
            b = (m.bin_id >> (7 * i)) & 0x7F
            if i:
                b |= 0x80
            out.append(b)
        if bb >= 2:
            out += vbas(m.cls)
        if bb == 3:
            out += vbas(m.csn)
        out += vbas(m.offset) + vbas(len(m.data))
        if m.cls & 1:
            out += vbas(m.aux or 0)
        out += m.data
        return bytes(out)

    @staticmethod
    def eor(reason: int, body: bytes = b"") -> bytes:
        return bytes([0, reason]) + vbas(len(body)) + body


class JppParser:
    """Incremental JPP-stream parser."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._cls = 0
        self._csn = 0

    def feed(self, data: bytes):
        """Add bytes; yield every message that is now complete."""
        self._buf += data
        while self._buf:
            try:
                msg, used = self._parse_one()
            except IndexError:      # incomplete message: wait for more bytes
                return
            del self._buf[:used]
            yield msg

    @property
    def pending(self) -> int:
        """Bytes held that do not yet form a complete message."""
        return len(self._buf)

    def _parse_one(self):
        buf = self._buf
        b0 = buf[0]
        if b0 == 0:
            reason = buf[1]
            ln, pos = read_vbas(buf, 2)
            if pos + ln > len(buf):
                raise IndexError
            return EorMessage(reason, bytes(buf[pos:pos + ln])), pos + ln
        bb = (b0 >> 5) & 3
        if bb == 0:
            raise JppError("Bin-ID with BB = 0 is reserved")
        is_last = bool(b0 & 0x10)
        bin_id = b0 & 0x0F
        pos = 1
        more = b0 & 0x80
        while more:
            b = buf[pos]
            bin_id = (bin_id << 7) | (b & 0x7F)
            more = b & 0x80
            pos += 1
        cls, csn = self._cls, self._csn
        if bb >= 2:
            cls, pos = read_vbas(buf, pos)
        if bb == 3:
            csn, pos = read_vbas(buf, pos)
        offset, pos = read_vbas(buf, pos)
        length, pos = read_vbas(buf, pos)
        aux = None
        if cls & 1:
            aux, pos = read_vbas(buf, pos)
        if pos + length > len(buf):
            raise IndexError
        self._cls, self._csn = cls, csn
        return JppMessage(cls, csn, bin_id, offset, bytes(buf[pos:pos + length]), is_last, aux), pos + length


def parse_all(data: bytes) -> list:
    """Parse a complete JPP-stream; raises JppError if it ends inside a message."""
    p = JppParser()
    out = list(p.feed(data))
    if p.pending:
        raise JppError(f"JPP-stream ends inside a message ({p.pending} bytes left over)")
    return out
