"""What a user may fetch: the :class:`Grant`, how rules combine into one, and the check
the packet planner runs (SPEC P7, V6).

One mechanism
-------------
:meth:`server.auth.Authority.authorize` is the single decision point: for every
request it works out the user's grant on the series or study named (rights rules of the
user and their groups, plus the diagnosis-status matrix). The packet planner
(:func:`server.packets.plan`) is the single enforcement point for image data: it
calls :func:`check` with exactly what the request would send, and a request beyond the
grant is refused as a whole (HTTP 403) with a body that names the maximum allowed
(:meth:`Grant.limits`), so that the client can ask again within it. The routes that send
whole files (the original DICOM, a whole codestream) are allowed only with an unlimited
grant (:meth:`Grant.allows_whole`).

Rules
-----
A rule belongs to a user or a group and applies to every study (scope ``*``), one study
or one series (scope = its UID), one slide (scope = its slide UID), one pathology exam
(scope ``exam:<accession>``) or one patient (scope ``patient:<Patient ID>``: every study
and every slide of that patient). It may set any of: ``max_layers`` (quality layers),
``max_reduce_min`` (the smallest resolution reduction: 1 = at most half resolution),
``regions`` (rectangles x, y, w, h in full-resolution pixels; a request must lie in one of
them), ``images`` (image indices of the series), ``versions`` (names) and ``actions``
(``browse``, ``metadata``, ``fetch``, ``retrieve``, ``diagnose``, ``store``: DICOMweb
STOW-RS). Unset = no limit.

For a request on series S of study T of patient P the rules of the user and of the user's
groups are ranked: scope S before scope T before ``patient:P`` before ``*`` (a slide: its
UID, then ``exam:<accession>``, then ``patient:P``, then ``*``); at the same scope the
user's own rule before its groups'. The best-ranked level decides; several group rules at
that level combine permissively (the most any of them allows). No rule at all: no limit.
So a rule ``patient:P`` with no actions hides every image of P, radiology and pathology,
from its subject (unless a rule on one of P's studies or slides says otherwise).

Slides (:mod:`server.slides`) are checked by the same :func:`check`, with the
request translated into slide terms there: resolution = pyramid level + reduction, regions
scaled to the level asked.

Region rights and JPEG 2000: a region is sent as the precincts that cover it at every
resolution. At the coarse resolutions one precinct spans much more than the region (at
resolution r a precinct is 128 * 2**(numres-1-r) pixels wide), so the surroundings are
visible at coarse resolution; full-resolution detail stays within the precincts that
touch the allowed region.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from codestream.ranges import format_ranges, parse_ranges  # noqa: F401 (re-exported)
from codestream.rights_wire import limits_body

ACTIONS = ("browse", "metadata", "fetch", "retrieve", "diagnose", "store")
ACTION_WORDS = {
    "browse": "search the study list",
    "metadata": "read image information and diagnostic records",
    "fetch": "load images",
    "retrieve": "download original files",
    "diagnose": "change the diagnosis status, notes, annotations or report",
    "store": "store new images (DICOMweb STOW-RS)",
}



@dataclass
class Rule:
    """One stored rights rule (see the module docstring)."""

    subject: str                        # user name, or "@group"
    scope: str = "*"                    # "*", a Study or a Series Instance UID
    max_layers: int | None = None
    max_reduce_min: int | None = None
    regions: list[tuple[int, int, int, int]] | None = None
    images: set[int] | None = None
    versions: list[str] | None = None
    actions: set[str] | None = None

    def to_json(self) -> dict:
        return {"subject": self.subject, "scope": self.scope, "max_layers": self.max_layers,
                "max_reduce_min": self.max_reduce_min,
                "regions": [list(r) for r in self.regions] if self.regions is not None else None,
                "images": format_ranges(self.images) if self.images is not None else None,
                "versions": self.versions,
                "actions": sorted(self.actions) if self.actions is not None else None}


@dataclass
class Grant:
    """What a user may fetch of a target; None = no limit."""

    max_layers: int | None = None
    max_reduce_min: int | None = None     # smallest allowed reduce (0 = full resolution)
    regions: list[tuple[int, int, int, int]] | None = None
    images: set[int] | None = None
    versions: list[str] | None = None     # versions the user's rights allow
    actions: set[str] | None = None
    status: int | None = None             # diagnosis status of the study, when known
    status_versions: list[str] | None = None   # versions the status matrix allows
    rules: list[str] = field(default_factory=list)   # which rules decided (for messages)

    # ---------------------------------------------------------------- derived
    def allowed_versions(self, names: Iterable[str]) -> list[str] | None:
        """Versions that may be sent (rights and status matrix), in ``names`` order;
        None when neither limits them."""
        if self.versions is None and self.status_versions is None:
            return None
        return [n for n in names
                if (self.versions is None or n in self.versions)
                and (self.status_versions is None or n in self.status_versions)]

    def layer_cap(self, versions=None) -> int | None:
        """The most quality layers any request may get: the rights' ``max_layers`` and
        the largest allowed version (``versions``: a SeriesVersions). None = no cap."""
        caps = [self.max_layers] if self.max_layers is not None else []
        if versions is not None:
            allowed = self.allowed_versions(versions.names())
            if allowed is not None:
                if not allowed:
                    caps.append(0)
                elif not any(versions.get(n).lossless for n in allowed):
                    caps.append(max(versions.layers_of(n) for n in allowed))
        return min(caps) if caps else None

    @property
    def unlimited(self) -> bool:
        return (self.max_layers is None and not self.max_reduce_min and self.regions is None
                and self.images is None)

    def allows_whole(self, csn: int | None, versions=None) -> bool:
        """May a whole file (original DICOM, whole codestream) of image ``csn`` be sent?
        Only without any limit on quality, resolution or region, with the lossless
        version allowed, and the image among the allowed ones."""
        if self.max_layers is not None or self.max_reduce_min or self.regions is not None:
            return False
        if self.images is not None and (csn is None or csn not in self.images):
            return False
        if versions is not None:
            allowed = self.allowed_versions(versions.names())
            if allowed is not None and not any(versions.get(n).lossless for n in allowed):
                return False
        elif self.status_versions is not None or self.versions is not None:
            return False        # versions limited but unknown here: refuse
        return True

    def limits(self, versions=None, denied: Iterable[str] = ()) -> dict:
        """The body of a 403 (and the ``rights`` block of the series description): the
        maximum allowed for every limited kind of right."""
        names = versions.names() if versions is not None else (self.status_versions or self.versions or [])
        d = limits_body(max_layers=self.layer_cap(versions), max_reduce_min=self.max_reduce_min,
                        regions=self.regions, images=self.images,
                        versions=self.allowed_versions(names) if names else None)
        if self.status is not None:
            d["diagnosis_status"] = self.status
        if denied:
            d["denied"] = list(denied)
        return d


def combine(rules: list[Rule]) -> Grant:
    """Rules of one rank, combined permissively (the most any of them allows)."""
    if not rules:
        return Grant()

    def most(values, better):
        if any(v is None for v in values):
            return None
        return better(values)

    g = Grant(
        max_layers=most([r.max_layers for r in rules], max),
        max_reduce_min=None if any(not r.max_reduce_min for r in rules)
        else min(r.max_reduce_min for r in rules),
        regions=None if any(r.regions is None for r in rules)
        else list(dict.fromkeys(x for r in rules for x in r.regions)),
        images=None if any(r.images is None for r in rules)
        else set().union(*(r.images for r in rules)),
        versions=None if any(r.versions is None for r in rules)
        else list(dict.fromkeys(x for r in rules for x in r.versions)),
        actions=None if any(r.actions is None for r in rules)
        else set().union(*(r.actions for r in rules)),
        rules=[f"{r.subject}@{r.scope}" for r in rules])
    return g


PATIENT_PREFIX = "patient:"
EXAM_PREFIX = "exam:"


def patient_scope(patient_id: str | None) -> str | None:
    """The scope of every study and slide of a patient (None if the ID is unknown)."""
    return f"{PATIENT_PREFIX}{patient_id}" if patient_id else None


def exam_scope(accession: str | None) -> str | None:
    """The scope of every slide of a pathology exam (None if there is no accession)."""
    return f"{EXAM_PREFIX}{accession}" if accession else None


def decide(rules: list[Rule], user: str, groups: Iterable[str], series: str | None = None,
           study: str | None = None, patient: str | None = None, *,
           scopes: Iterable[str | None] | None = None) -> Grant:
    """The grant of ``user`` (member of ``groups``) on a series/study/patient from all
    rules; or, with ``scopes`` (finest first, e.g. a slide's UID, exam and patient scopes),
    on whatever those scopes name. ``*`` always comes last."""
    groups = {f"@{g}" for g in groups}
    if scopes is None:
        scopes = (series, study, patient_scope(patient))
    scopes = [s for s in scopes if s and s != "*"] + ["*"]
    for scope in scopes:
        mine = [r for r in rules if r.scope == scope and r.subject == user]
        if mine:
            return combine(mine)
        theirs = [r for r in rules if r.scope == scope and r.subject in groups]
        if theirs:
            return combine(theirs)
    return Grant()


# --------------------------------------------------------------------------- the check
def _clip(rect, w, h):
    x, y, rw, rh = rect
    x0, y0, x1, y1 = max(0, x), max(0, y), min(w, x + rw), min(h, y + rh)
    return x0, y0, max(x0, x1), max(y0, y1)


def check(grant: Grant, *, comps: list[int] | None, n_images: int, layers: dict[int, int],
          reduces: dict[int, int], numres: dict[int, int], sizes: dict[int, tuple[int, int]],
          region: tuple[int, int, int, int] | None, version: str | None = None,
          versions=None) -> list[tuple[str, str]]:
    """What in a request goes beyond the grant: [(kind, explanation)], empty if nothing.

    ``layers`` / ``reduces`` / ``numres`` / ``sizes`` are per image index of the request
    as the planner resolved them (layers asked, resolution reduction asked)."""
    out: list[tuple[str, str]] = []
    if grant.images is not None:
        asked = set(comps) if comps is not None else set(range(n_images))
        beyond = asked - grant.images
        if beyond:
            out.append(("images", f"images {format_ranges(beyond)} are not among those you "
                                  f"may load ({format_ranges(grant.images) or 'none'})"))
    if version is not None and versions is not None:
        allowed = grant.allowed_versions(versions.names())
        if allowed is not None and version not in allowed:
            why = []
            if grant.status_versions is not None and version not in grant.status_versions:
                why.append(f"at diagnosis status {grant.status} the study may be sent as "
                           f"{', '.join(grant.status_versions) or 'no version'}")
            if grant.versions is not None and version not in grant.versions:
                why.append(f"your rights allow {', '.join(grant.versions) or 'no version'}")
            out.append(("version", f"version {version} may not be sent: {'; '.join(why)}"))
    cap = grant.layer_cap(versions)
    if cap is not None:
        over = max(layers.values(), default=0)
        if over > cap:
            out.append(("layers", f"{over} quality layers asked, at most {cap} allowed"))
    if grant.max_reduce_min:
        low = [c for c, red in reduces.items()
               if red < min(grant.max_reduce_min, numres[c] - 1)]
        if low:
            red = min(reduces[c] for c in low)
            out.append(("resolution", f"resolution reduce={red} asked, the finest allowed is "
                                      f"reduce={grant.max_reduce_min}"))
    if grant.regions is not None:
        if region is None:
            out.append(("region", "the whole image asked, only parts of it are allowed"))
        else:
            for c, (w, h) in sizes.items():
                r = _clip(region, w, h)
                if not any(r[0] >= a[0] and r[1] >= a[1] and r[2] <= a[2] and r[3] <= a[3]
                           for a in (_clip(g, w, h) for g in grant.regions)):
                    out.append(("region", f"region {','.join(map(str, region))} is not "
                                          "inside an allowed region"))
                    break
    return out


