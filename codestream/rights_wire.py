"""The rights block on the wire: one encoder and one decoder, shared by the server (the
``rights`` block of a series description and the body of a 403) and the client library
(:class:`client.rights.Limits`).

Fields: ``max_layers``, ``max_reduce_min``, ``allowed_regions`` (``[[x, y, w, h], ...]``),
``allowed_images`` (``"0-9,12"``, :mod:`codestream.ranges`), ``allowed_versions`` and, on a
slide, ``finest_level``. A field is absent when that kind of right is not limited.
"""
from __future__ import annotations

from typing import Iterable

from .ranges import format_ranges, parse_ranges


def limits_body(*, max_layers: int | None = None, max_reduce_min: int | None = None,
                regions: Iterable[Iterable[int]] | None = None,
                images: Iterable[int] | None = None, versions: Iterable[str] | None = None,
                finest_level: int | None = None) -> dict:
    """The wire form of a set of limits (None or 0 ``max_reduce_min`` = not limited)."""
    d: dict = {}
    if max_layers is not None:
        d["max_layers"] = int(max_layers)
    if max_reduce_min:
        d["max_reduce_min"] = int(max_reduce_min)
    if regions is not None:
        d["allowed_regions"] = [[int(v) for v in r] for r in regions]
    if images is not None:
        d["allowed_images"] = format_ranges(images)
    if versions is not None:
        d["allowed_versions"] = list(versions)
    if finest_level is not None:
        d["finest_level"] = int(finest_level)
    return d


def parse_limits(body: dict | None) -> dict:
    """The limits of a wire block, as keyword arguments of :func:`limits_body` (absent
    fields are None)."""
    body = body or {}

    def opt(key, conv):
        v = body.get(key)
        return conv(v) if v is not None else None

    return {
        "max_layers": opt("max_layers", int),
        "max_reduce_min": body.get("max_reduce_min") or None,
        "regions": opt("allowed_regions", lambda rs: [tuple(int(v) for v in r) for r in rs]),
        "images": opt("allowed_images", parse_ranges),
        "versions": opt("allowed_versions", list),
        "finest_level": opt("finest_level", int),
    }
