"""Every input of the HTTP API checked before it is used: a bad one gets a 400 (413 for a
body that is too large) naming the field, never a 500.

* Request bodies are read with a size limit (:func:`read_body`) and parsed by the one
  JSON parser of the server (:func:`parse_json`): nesting depth bounded (checked before
  parsing, so that no recursion limit is ever reached), no NaN or infinity, integers
  within 64 bits (SQLite's range), UTF-8 only. An error names the field by its path
  (``body.model.k.b``).
* Query parameters a route declares (:class:`Param`, given to the app's ``guarded``
  decorator) are checked by kind and range before the handler runs; the same
  declarations describe the route in the OpenAPI document (:mod:`server.openapi`).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
MAX_BODY_BYTES = 16 << 20      # a cache declaration of a large series is a few MB
MAX_JSON_DEPTH = 32
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")
_INT = re.compile(r"[+-]?[0-9]{1,20}")          # ASCII digits only ("²".isdigit() is True)


class InputError(Exception):
    """A malformed input: ``status`` (400, or 413 for a body too large), ``field`` the
    name of the parameter or the path of the body element."""

    def __init__(self, message: str, field: str, status: int = 400):
        super().__init__(message)
        self.field = field
        self.status = status


async def read_body(request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, at most ``limit`` bytes (413 beyond, read no further)."""
    cl = request.headers.get("content-length")
    if cl is not None:
        if not cl.strip().isdigit():
            raise InputError("Content-Length must be a number of bytes", "Content-Length")
        if int(cl) > limit:
            raise InputError(f"the body is larger than {limit} bytes", "body", 413)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise InputError(f"the body is larger than {limit} bytes", "body", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def json_depth(text: str, limit: int) -> int:
    """The nesting depth of a JSON text (strings skipped); stops counting past ``limit``."""
    depth = deepest = 0
    for m in _BRACKET.finditer(_STRING.sub("", text)):
        if m.group() in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def _finite_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(f"number {s} is out of range")
    return v


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _check_ints(obj, path: str) -> None:
    if isinstance(obj, bool):
        return
    if isinstance(obj, int):
        if not INT64_MIN <= obj <= INT64_MAX:
            raise InputError(f"{path}: integer beyond 64 bits", path)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_ints(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_ints(v, f"{path}[{i}]")


def parse_json(raw: bytes | str, *, field: str = "body", max_depth: int = MAX_JSON_DEPTH,
               object_only: bool = False):
    """Parse a JSON body within the limits above; :class:`InputError` (400) naming the
    field otherwise. ``object_only``: the body must be a JSON object."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{field} must be UTF-8 encoded JSON", field) from None
    else:
        text = raw
    if json_depth(text, max_depth) > max_depth:
        raise InputError(f"{field} is nested deeper than {max_depth} levels", field)
    try:
        obj = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise InputError(f"{field} must be JSON ({e})", field) from None
    _check_ints(obj, field)
    if object_only and not isinstance(obj, dict):
        raise InputError(f"{field} must be a JSON object", field)
    return obj


@dataclass(frozen=True)
class Param:
    """A query parameter a route takes: ``kind`` ``int``, ``number``, ``str`` or ``bool``;
    ``lo``/``hi`` bound an ``int`` (default 0 … 2**63-1)."""

    name: str
    kind: str = "str"
    description: str = ""
    lo: int | None = 0
    hi: int | None = INT64_MAX
    required: bool = False
    enum: tuple[str, ...] | None = None

    def check(self, value: str):
        if self.kind == "int":
            s = value.strip()
            lo = INT64_MIN if self.lo is None else self.lo
            hi = INT64_MAX if self.hi is None else self.hi
            if not _INT.fullmatch(s) or not lo <= int(s) <= hi:
                raise InputError(f"{self.name}: integers from {lo} to {hi} only, "
                                 f"got {value!r}", self.name)
            return int(s)
        if self.kind == "number":
            try:
                v = float(value)
            except ValueError:
                v = math.nan
            if not math.isfinite(v):
                raise InputError(f"{self.name} must be a finite number, got {value!r}", self.name)
            return v
        if self.kind == "bool":
            if value.lower() not in ("0", "1", "true", "false", "yes", "no"):
                raise InputError(f"{self.name} must be true or false, got {value!r}", self.name)
            return value.lower() in ("1", "true", "yes")
        if self.enum is not None and value not in self.enum:
            raise InputError(f"{self.name} must be one of {', '.join(self.enum)}, "
                             f"got {value!r}", self.name)
        if "\x00" in value:
            raise InputError(f"{self.name} must not contain NUL", self.name)
        return value

    def schema(self) -> dict:
        if self.kind == "int":
            return {"type": "integer", "minimum": INT64_MIN if self.lo is None else self.lo,
                    "maximum": INT64_MAX if self.hi is None else self.hi}
        if self.kind == "number":
            return {"type": "number"}
        if self.kind == "bool":
            return {"type": "boolean"}
        if self.enum is not None:
            return {"type": "string", "enum": list(self.enum)}
        return {"type": "string"}


def check_query(params: tuple[Param, ...] | list[Param], query) -> None:
    """Check the declared parameters present in ``query`` (a Starlette QueryParams)."""
    for p in params:
        for value in query.getlist(p.name):
            p.check(value)
