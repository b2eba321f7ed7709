"""The client side of user rights (SPEC P7): keep requests within what the server allows.

The server describes a user's rights on a series in the series description
(``"rights"``) and in the body of a 403 answer: ``max_layers``, ``max_reduce_min``,
``allowed_regions`` (``[[x, y, w, h], ...]``), ``allowed_images`` (``"0-9,12"``),
``allowed_versions`` and ``denied`` (what the refused request exceeded).
:class:`Limits` holds them and :meth:`Limits.clamp` turns any packet request into the
largest request within them, so the client can "ask again within the maximum".
"""
from __future__ import annotations

from dataclasses import dataclass

from codestream.ranges import format_ranges, parse_ranges

from .session import ServerError


class RightsLimited(ServerError):
    """Nothing of what was asked may be fetched (e.g. none of the images is allowed).

    Raised by the client before asking the server; shaped like the server's own 403
    (``status`` 403, ``body`` with the limits), so callers handle both alike."""

    def __init__(self, message: str, limits: "Limits", denied: str) -> None:
        super().__init__(403, message, {"error": message, "status": 403,
                                        "denied": [denied], **limits.to_body()})
        self.limits = limits



def is_rights_body(body: dict | None) -> bool:
    """A 403 body from the packet planner (not e.g. a refused action)."""
    return bool(body) and isinstance(body.get("denied"), list) and "action" not in body["denied"]


@dataclass
class Limits:
    max_layers: int | None = None
    max_reduce_min: int | None = None
    regions: list[tuple[int, int, int, int]] | None = None
    images: set[int] | None = None
    versions: list[str] | None = None

    @classmethod
    def from_body(cls, body: dict | None) -> "Limits":
        body = body or {}
        return cls(
            max_layers=body.get("max_layers"),
            max_reduce_min=body.get("max_reduce_min") or None,
            regions=[tuple(int(v) for v in r) for r in body["allowed_regions"]]
            if body.get("allowed_regions") is not None else None,
            images=parse_ranges(body["allowed_images"])
            if body.get("allowed_images") is not None else None,
            versions=list(body["allowed_versions"]) if body.get("allowed_versions") is not None else None)

    def to_body(self) -> dict:
        d: dict = {}
        if self.max_layers is not None:
            d["max_layers"] = self.max_layers
        if self.max_reduce_min:
            d["max_reduce_min"] = self.max_reduce_min
        if self.regions is not None:
            d["allowed_regions"] = [list(r) for r in self.regions]
        if self.images is not None:
            d["allowed_images"] = format_ranges(self.images)
        if self.versions is not None:
            d["allowed_versions"] = list(self.versions)
        return d

    @property
    def limited(self) -> bool:
        return any(v is not None for v in (self.max_layers, self.max_reduce_min, self.regions,
                                            self.images))

    def clamp(self, params: dict, images: list[dict]) -> dict:
        """The largest request within the limits (``params`` as built by
        :meth:`client.series.SeriesData.transfer`; ``images`` the series' image list)."""
        p = dict(params)
        n = len(images)
        if self.images is not None:
            asked = parse_ranges(p["comps"]) if p.get("comps") else set(range(n))
            keep = asked & self.images
            if not keep:
                raise RightsLimited(f"none of images {format_ranges(asked)} may be loaded "
                                    f"(allowed: {format_ranges(self.images) or 'none'})", self, "images")
            p["comps"] = format_ranges(keep)
        comps = parse_ranges(p["comps"]) if p.get("comps") else set(range(n))
        ims = [images[c] for c in sorted(comps) if c < n] or images
        if self.max_layers is not None:
            if self.max_layers <= 0:
                raise RightsLimited("no quality layer of this series may be loaded now", self,
                                    "layers")
            have = min(im["nlayers"] for im in ims) if ims else self.max_layers
            p["layers"] = min(int(p.get("layers") or have), self.max_layers)
        if self.max_reduce_min:
            top = min(im["numres"] - 1 for im in ims) if ims else 0
            p["reduce"] = max(int(p.get("reduce") or 0), min(self.max_reduce_min, top))
        if self.regions is not None:
            if not self.regions:
                raise RightsLimited("no part of these images may be loaded", self, "region")
            if p.get("roff"):
                x, y = (int(v) for v in p["roff"].split(","))
                w, h = (int(v) for v in p["rsiz"].split(","))
                best = max(self.regions, key=lambda a: _overlap((x, y, w, h), a))
                if _overlap((x, y, w, h), best) == 0:
                    raise RightsLimited("the part of the image asked for is outside the "
                                        "allowed regions", self, "region")
                x0, y0 = max(x, best[0]), max(y, best[1])
                x1 = min(x + w, best[0] + best[2])
                y1 = min(y + h, best[1] + best[3])
                x, y, w, h = x0, y0, x1 - x0, y1 - y0
            else:
                x, y, w, h = self.regions[0]
            p["roff"], p["rsiz"] = f"{x},{y}", f"{w},{h}"
        if self.versions is not None and p.get("version") not in (None, "auto"):
            if p["version"] not in self.versions:
                if not self.versions:
                    raise RightsLimited("no version of this study may be sent now", self, "version")
                p["version"] = self.versions[0]
        return p


def _overlap(a, b) -> int:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    return max(0, x1 - x0) * max(0, y1 - y0)
