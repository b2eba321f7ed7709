"""The client side of user rights (SPEC P7): keep requests within what the server allows.

The server describes a user's rights on a series in the series description
(``"rights"``) and in the body of a 403 answer: ``max_layers``, ``max_reduce_min``,
``allowed_regions`` (``[[x, y, w, h], ...]``), ``allowed_images`` (``"0-9,12"``),
``allowed_versions`` and ``denied`` (what the refused request exceeded); on a slide also
``finest_level`` (the finest pyramid level the user may get).
:class:`Limits` holds them and :meth:`Limits.clamp` turns any packet request into the
largest request within them, so the client can "ask again within the maximum".
:meth:`Limits.for_level` puts the limits on a slide into the terms of one pyramid level
(as the server's :func:`server.slides.slide_problems` applies them), so the same
:meth:`~Limits.clamp` serves the slide client (:class:`client.slides.RemoteSlide`).
"""
from __future__ import annotations

from dataclasses import dataclass

from codestream.ranges import format_ranges, parse_ranges
from codestream.rights_wire import limits_body, parse_limits

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
    finest_level: int | None = None           # slides: the finest pyramid level allowed

    @classmethod
    def from_body(cls, body: dict | None) -> "Limits":
        return cls(**parse_limits(body))

    def to_body(self) -> dict:
        return limits_body(max_layers=self.max_layers, max_reduce_min=self.max_reduce_min,
                           regions=self.regions, images=self.images, versions=self.versions,
                           finest_level=self.finest_level)

    @property
    def limited(self) -> bool:
        return any(v is not None for v in (self.max_layers, self.max_reduce_min, self.regions,
                                            self.images))

    def finest(self, nlevels: int) -> int:
        """Slides: the finest pyramid level of ``nlevels`` the user may get (0: any)."""
        if self.finest_level is not None:
            return min(self.finest_level, nlevels - 1)
        return min(self.max_reduce_min or 0, nlevels - 1)

    def for_level(self, level: int, downsample: int, nlevels: int) -> Limits:
        """Slides: these limits in the terms of pyramid level ``level`` (reduced
        ``downsample`` times, of ``nlevels``), for :meth:`clamp` on a request of that
        level — regions scaled outward to the level, the resolution right less the
        level's own reduction (left over only on the top level, when the right goes
        beyond the pyramid). Raises :class:`RightsLimited` when nothing of the level may
        be fetched: a level finer than allowed, or image limits (a slide has no image
        numbers, so they allow none of it)."""
        if self.images is not None:
            raise RightsLimited("your rights limit images by number, and a slide has no image "
                                "numbers: none of this slide may be loaded", self, "images")
        finest = self.finest(nlevels)
        if level < finest:
            raise RightsLimited(f"level {level} is finer than your rights allow on this slide "
                                f"(the finest is level {finest})", self, "resolution")
        left = (self.max_reduce_min or 0) - level
        return Limits(max_layers=self.max_layers, max_reduce_min=left if left > 0 else None,
                      regions=None if self.regions is None
                      else [level_rect(r, downsample) for r in self.regions],
                      versions=self.versions)

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


def level_rect(rect, downsample: int) -> tuple[int, int, int, int]:
    """A full-resolution rectangle x, y, w, h in pixels of a level reduced ``downsample``
    times, rounded outward (a level pixel counts when it covers an allowed pixel), as the
    server scales a slide's allowed regions."""
    x, y, w, h = (int(v) for v in rect)
    x0, y0 = x // downsample, y // downsample
    x1, y1 = -(-(x + w) // downsample), -(-(y + h) // downsample)
    return x0, y0, x1 - x0, y1 - y0


def intersect(a, b) -> tuple[int, int, int, int] | None:
    """The common part of two x, y, w, h rectangles (None if they do not meet)."""
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    return (x0, y0, x1 - x0, y1 - y0) if x1 > x0 and y1 > y0 else None


def _overlap(a, b) -> int:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    return max(0, x1 - x0) * max(0, y1 - y0)
