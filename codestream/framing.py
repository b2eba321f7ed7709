"""Record framing of a packet response.

The body of a packet response is a sequence of records ``type (1 byte) | length (4 bytes,
big-endian) | payload``. Type DATA carries JPP-stream bytes: the DATA payloads, joined,
form a valid JPP-stream. Type CONTROL carries one UTF-8 JSON object with a ``"type"``
field (``announce``, ``recommend``, ``end``, ``error``; ``recalling``/``recalled`` while
the server waits for its archive). This keeps the product's own
messages apart from the standard JPP data, so JPIP tooling can read the data part.
"""
from __future__ import annotations

import json
import struct

DATA = 0x01
CONTROL = 0x02
_HDR = struct.Struct(">BI")
MAX_RECORD = 64 << 20


class FramingError(ValueError):
    """Malformed record stream."""


def record(rtype: int, payload: bytes) -> bytes:
    return _HDR.pack(rtype, len(payload)) + payload


def control(obj: dict) -> bytes:
    return record(CONTROL, json.dumps(obj, separators=(",", ":")).encode())


class RecordReader:
    """Incremental reader: feed bytes, get (type, payload) records; CONTROL payloads are
    returned decoded as dicts."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes):
        self._buf += data
        while len(self._buf) >= _HDR.size:
            rtype, ln = _HDR.unpack_from(self._buf, 0)
            if rtype not in (DATA, CONTROL) or ln > MAX_RECORD:
                raise FramingError(f"bad record header (type {rtype}, length {ln})")
            if len(self._buf) < _HDR.size + ln:
                return
            payload = bytes(self._buf[_HDR.size:_HDR.size + ln])
            del self._buf[:_HDR.size + ln]
            if rtype == CONTROL:
                try:
                    yield CONTROL, json.loads(payload)
                except ValueError as e:
                    raise FramingError(f"control record is not JSON: {e}") from None
            else:
                yield DATA, payload

    @property
    def pending(self) -> int:
        return len(self._buf)


class PacketStreamReader:
    """The receiving side of a packet response in one object: feed the HTTP body in
    chunks of any size; get ``(CONTROL, dict)`` for control records and ``(DATA, [JPP
    messages])`` for each data record (end-of-response messages dropped). Used by the
    series transfer (:mod:`client.series`) and the slide provider
    (:mod:`client.slides`) alike."""

    def __init__(self) -> None:
        from .jpp import EorMessage, JppParser

        self._records = RecordReader()
        self._jpp = JppParser()
        self._eor = EorMessage

    def feed(self, chunk: bytes):
        for rtype, payload in self._records.feed(chunk):
            if rtype == CONTROL:
                yield CONTROL, payload
            else:
                yield DATA, [m for m in self._jpp.feed(payload) if not isinstance(m, self._eor)]
