"""DICOM header helpers shared by the server's ingest and the viewer's series selection
(pure compute: no Qt, no HTTP, no database).

- Recognising a DICOM file: :func:`has_preamble` (Part 10, ``DICM`` at byte 128),
  :func:`plausible_dataset_start` (a file without the preamble that starts like a
  dataset), :func:`is_dicom_file` (either).
- Reading attribute values from foreign, possibly malformed files without raising:
  :func:`get`, :func:`first`, :func:`num`, :func:`int_value`, :func:`nums`, :func:`text`,
  and the enhanced multi-frame functional groups (:func:`group_value`, :func:`attr`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

PREAMBLE = 128
MAGIC = b"DICM"


def has_preamble(data: bytes) -> bool:
    """``data`` (a file's first bytes) carries the Part 10 magic at byte 128."""
    return len(data) >= PREAMBLE + 4 and data[PREAMBLE:PREAMBLE + 4] == MAGIC


def plausible_dataset_start(head: bytes) -> bool:
    """A file without the Part 10 preamble that starts like a dataset: the first element
    is in group 0002 (file meta) or 0008 (identification), with an explicit VR or an
    implicit length that fits."""
    if len(head) < 8:
        return False
    group, elem = int.from_bytes(head[0:2], "little"), int.from_bytes(head[2:4], "little")
    if group not in (0x0002, 0x0008) or elem > 0x1FFF:
        return False
    vr = head[4:6]
    if vr.isalpha() and vr.isupper():
        return True
    return int.from_bytes(head[4:8], "little") < (1 << 16)


def read_head(path: str | Path, n: int = PREAMBLE + 4) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def is_dicom_file(path: str | Path) -> bool:
    """The Part 10 preamble magic, or (without a preamble) a plausible dataset start."""
    head = read_head(path)
    return has_preamble(head) or plausible_dataset_start(head)


def first(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return v[0] if len(v) else None
    return v


def num(v: Any) -> float | None:
    """The (first) value as a finite float, else None."""
    try:
        v = first(v)
        if v is None or v == "":
            return None
        f = float(v)
        return f if np.isfinite(f) else None
    except (TypeError, ValueError, IndexError):
        return None


def int_value(v: Any) -> int | None:
    f = num(v)
    try:
        return None if f is None else int(round(f))
    except (OverflowError, ValueError):
        return None


def nums(v: Any, n: int | None = None) -> list[float] | None:
    """All values as finite floats (exactly ``n`` of them when given), else None."""
    if v is None or v == "":
        return None
    try:
        seq = list(v) if not isinstance(v, (str, bytes)) else [v]
        out = [float(x) for x in seq]
    except (TypeError, ValueError):
        return None
    if n is not None and len(out) != n:
        return None
    return out if all(np.isfinite(out)) else None


def text(v: Any) -> str | None:
    """A value as stripped text (multi-values joined with a backslash), None if empty."""
    if v is None:
        return None
    if isinstance(v, bytes):
        v = v.decode("latin-1", "replace")
    if not isinstance(v, str) and (isinstance(v, (list, tuple))
                                   or type(v).__name__ == "MultiValue"):
        v = "\\".join(str(x) for x in v)
    s = str(v).strip().strip("\x00").strip()
    return s or None


def get(ds, keyword: str, default: Any = None) -> Any:
    """Attribute value or ``default``, never raising on malformed values."""
    try:
        elem = ds.get(keyword)
    except Exception:  # noqa: BLE001 - malformed value in a foreign file
        return default
    if elem is None:
        return default
    return getattr(elem, "value", elem)


def group_value(ds, frame_index: int | None, seq_keyword: str, keyword: str) -> Any:
    """Value from an enhanced multi-frame functional group: the frame's own group first
    (when ``frame_index`` is given), else the shared one."""
    groups = []
    if frame_index is not None:
        per_frame = get(ds, "PerFrameFunctionalGroupsSequence")
        if per_frame and frame_index < len(per_frame):
            groups.append(per_frame[frame_index])
    shared = get(ds, "SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for item in groups:
        seq = get(item, seq_keyword)
        if seq:
            v = get(seq[0], keyword)
            if v is not None and v != "":
                return v
    return None


def attr(ds, keyword: str, seq_keyword: str | None) -> Any:
    """A top-level attribute, else the first frame's functional group value."""
    v = get(ds, keyword)
    if (v is None or v == "") and seq_keyword:
        v = group_value(ds, 0, seq_keyword, keyword)
    return v
