"""The site policy: image versions, quality figures, purposes, the diagnosis-status matrix,
the automatic version choice (V8) and the storage settings.

The tables live in TOML files (``resources/policy.toml`` holds the documented defaults; a
site overrides parts of them in ``STORE/policy.toml``, see :func:`load_policy`). This
module reads and checks them and answers the questions the server asks:

* :meth:`SitePolicy.series_versions` — what V1, V2, V3 mean for one series: the number
  of quality layers of each version (a truncation point of the one stored codestream),
  the ratio the site asks for, the ratio actually reached, quality figure and purpose;
* :meth:`SeriesVersions.select` — the version a client asks for by name, by quality or
  by purpose;
* :meth:`SitePolicy.allowed_versions` — the status matrix;
* :meth:`SitePolicy.choose_auto` — the automatic choice from diagnosis status, link
  speed, client memory and CPU, the user's groups and the place of use, with the reasons.

No HTTP and no database here: everything is a pure function of the tables and the facts
it is given, so it is tested directly.
"""
from __future__ import annotations

import fnmatch
import hashlib
import ipaddress
import json
import math
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

RESOURCES = Path(__file__).resolve().parents[1] / "resources"
DEFAULT_POLICY = RESOURCES / "policy.toml"
SITE_POLICY_NAME = "policy.toml"
STATUSES = (1, 2, 3, 4, 5)
_AUTO_KEYS = {"status", "group", "place", "link_mbps_below", "link_mbps_at_least",
              "memory_mb_below", "cpus_below", "latency_ms_above"}


class PolicyError(ValueError):
    """The policy file is malformed (with the file and the entry)."""


class SelectionError(ValueError):
    """A client asked for a version, quality or purpose that does not exist."""


# --------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class VersionDef:
    name: str
    label: str
    purpose: str
    lossless: bool = False


@dataclass(frozen=True)
class RatioRow:
    modality: str
    body_part: str
    exam: str
    ratios: dict[str, float]

    def specificity(self) -> int:
        return sum(v != "*" for v in (self.modality, self.body_part, self.exam))

    def matches(self, modality: str, body_part: str, exams: Iterable[str]) -> bool:
        def eq(pattern: str, value: str) -> bool:
            return pattern == "*" or fnmatch.fnmatchcase(value.upper(), pattern.upper())
        return (eq(self.modality, modality) and eq(self.body_part, body_part)
                and (self.exam == "*" or any(eq(self.exam, e) for e in exams if e)))


@dataclass(frozen=True)
class AutoRule:
    when: dict[str, Any]
    choose: str
    why: str


@dataclass(frozen=True)
class StorageSettings:
    migrate_after_days: float = 30
    keep_hot: str = "V2"
    min_status: int = 1
    archive: str = ""
    schedule_hours: float = 24


@dataclass(frozen=True)
class AutoInputs:
    """What the automatic choice looks at; None = not known."""

    status: int | None = None
    link_bps: float | None = None
    memory_mb: float | None = None
    cpus: int | None = None
    latency_ms: float | None = None
    groups: tuple[str, ...] = ()
    place: str | None = None


@dataclass(frozen=True)
class AutoChoice:
    version: str
    reasons: list[str]
    why: str = ""                 # the rule's own words ("" for the default)
    facts: str = ""               # what was measured that made it hold

    def to_json(self) -> dict:
        return {"version": self.version, "reasons": list(self.reasons), "why": self.why,
                "facts": self.facts}


# --------------------------------------------------------------------------- per series
@dataclass(frozen=True)
class VersionInfo:
    """One version of one series."""

    name: str
    label: str
    purpose: str
    quality: int
    lossless: bool
    layers: int | None            # quality layers to send; None = all (lossless)
    target_ratio: float           # what the site table asks (1 for lossless)
    actual_ratio: float           # raw pixel bytes / bytes sent, over the whole series
    bytes: int                    # compressed bytes of the series at this version

    def to_json(self) -> dict:
        return {"name": self.name, "label": self.label, "purpose": self.purpose,
                "quality": self.quality, "lossless": self.lossless, "layers": self.layers,
                "target_ratio": self.target_ratio,
                "actual_ratio": round(self.actual_ratio, 2), "bytes": self.bytes}


@dataclass(frozen=True)
class SeriesVersions:
    series_uid: str
    versions: list[VersionInfo]          # best quality first
    nlayers: int                         # layers every image of the series has
    raw_bytes: int

    def get(self, name: str) -> VersionInfo | None:
        return next((v for v in self.versions if v.name == name), None)

    def names(self) -> list[str]:
        return [v.name for v in self.versions]

    def layers_of(self, name: str) -> int:
        """Layers of a version as a number (lossless = all layers)."""
        v = self.get(name)
        if v is None:
            raise SelectionError(f"unknown version {name!r}")
        return self.nlayers if v.layers is None else v.layers

    def select(self, *, version: str | None = None, quality: int | None = None,
               purpose: str | None = None) -> VersionInfo:
        """The version asked for by name, by quality (the cheapest version whose quality
        figure reaches it; the best one if none does) or by purpose."""
        if version is not None:
            v = self.get(version)
            if v is None:
                raise SelectionError(f"unknown version {version!r}: this server has "
                                     f"{', '.join(self.names())}")
            return v
        if quality is not None:
            ok = [v for v in self.versions if v.quality >= quality]
            return min(ok, key=lambda v: v.quality) if ok else self.versions[0]
        if purpose is not None:
            for v in self.versions:
                if v.purpose.lower() == purpose.lower():
                    return v
            raise SelectionError(f"unknown purpose {purpose!r}: this server has "
                                 f"{', '.join(sorted({v.purpose for v in self.versions}))}")
        raise SelectionError("ask for a version, a quality or a purpose")

    def to_json(self) -> list[dict]:
        return [v.to_json() for v in self.versions]


@dataclass(frozen=True)
class ImageFacts:
    """What the version computation needs of one image (from its packet index)."""

    raw_bytes: int                 # uncompressed pixel bytes (BitsAllocated per sample)
    layer_bytes: tuple[int, ...]   # compressed bytes (headers included) at 1..nlayers layers


def image_facts(index, bits_allocated: int | None) -> ImageFacts:
    """:class:`ImageFacts` of a :class:`~codestream.index.PacketIndex`."""
    bpp = max(1, ((bits_allocated or max(index.precision)) + 7) // 8)
    raw = index.width * index.height * index.ncomp * bpp
    hdr = index.main_header_end + (index.tile_header[1] - index.tile_header[0])
    top = index.numres - 1
    return ImageFacts(raw, tuple(hdr + index.bytes_at(q, top) for q in range(1, index.nlayers + 1)))


# --------------------------------------------------------------------------- codec (H1)
CODEC_NAMES = ("jpegls", "htj2k", "jxl", "j2k")     # lossless final-copy codecs
_CODEC_KEYS = {"size_threshold", "small_grayscale", "large_grayscale", "colour",
               "keep_jpeg_baseline"}
JPEG_BASELINE_TS = "1.2.840.10008.1.2.4.50"


@dataclass(frozen=True)
class CodecChoice:
    """The final-copy codec of one image: a codec name, or "keep" (stays as it arrived)."""

    codec: str
    reason: str


@dataclass(frozen=True)
class CodecPolicy:
    """The [codec] table: which lossless codec an image's final copy gets."""

    size_threshold: int = 1000
    small_grayscale: str = "jpegls"
    large_grayscale: str = "htj2k"
    colour: str = "jxl"
    keep_jpeg_baseline: bool = True
    overrides: tuple[tuple[str, str, dict], ...] = ()    # (modality, body_part, settings)
    on_ingest: bool = False          # make the final copy right after each ingest

    def settings_for(self, modality: str | None, body_part: str | None) -> dict:
        out = {k: getattr(self, k) for k in _CODEC_KEYS}
        rows = [(sum(v != "*" for v in (m, b)), i, d)
                for i, (m, b, d) in enumerate(self.overrides)
                if fnmatch.fnmatchcase((modality or "").upper(), m.upper())
                and fnmatch.fnmatchcase((body_part or "").upper(), b.upper())]
        for _spec, _i, d in sorted(rows, key=lambda r: (r[0], r[1])):
            out.update(d)
        return out

    def choose(self, *, rows: int, cols: int, samples: int, modality: str | None = None,
               body_part: str | None = None, transfer_syntax: str | None = None) -> CodecChoice:
        """The codec the table gives an image (pure function of the table and the facts)."""
        s = self.settings_for(modality, body_part)
        where = f" ({modality or '?'}/{body_part or '?'})" if s != self.settings_for(None, None) else ""
        if s["keep_jpeg_baseline"] and transfer_syntax == JPEG_BASELINE_TS:
            return CodecChoice("keep", "arrived as JPEG baseline: stays JPEG" + where)
        if samples > 1:
            return CodecChoice(s["colour"], "colour" + where)
        t = int(s["size_threshold"])
        if rows < t and cols < t:
            return CodecChoice(s["small_grayscale"], f"grayscale, both sides < {t} px" + where)
        return CodecChoice(s["large_grayscale"], f"grayscale, a side >= {t} px" + where)


def _parse_codec(raw: dict, fail) -> CodecPolicy:
    c = raw.get("codec") or {}
    if not isinstance(c, dict):
        raise fail("[codec] must be a table")

    def check(d: dict, where: str) -> dict:
        out = {}
        for k, v in d.items():
            if k in ("modality", "body_part", "overrides") or (k == "on_ingest" and where == "[codec]"):
                continue
            if k not in _CODEC_KEYS:
                raise fail(f"{where}: unknown key {k!r} (known: {', '.join(sorted(_CODEC_KEYS))})")
            if k == "size_threshold":
                if not isinstance(v, int) or v < 1:
                    raise fail(f"{where}: size_threshold must be a positive integer, got {v!r}")
            elif k == "keep_jpeg_baseline":
                if not isinstance(v, bool):
                    raise fail(f"{where}: keep_jpeg_baseline must be true or false")
            elif v not in CODEC_NAMES:
                raise fail(f"{where}: {k} = {v!r}; codecs are {', '.join(CODEC_NAMES)}")
            out[k] = v
        return out

    base = check(c, "[codec]")
    overrides = []
    for i, r in enumerate(c.get("overrides", [])):
        if not isinstance(r, dict):
            raise fail(f"[[codec.overrides]] row {i + 1} must be a table")
        d = check(r, f"[[codec.overrides]] row {i + 1}")
        if not d:
            raise fail(f"[[codec.overrides]] row {i + 1} changes nothing")
        overrides.append((str(r.get("modality", "*")), str(r.get("body_part", "*")), d))
    on_ingest = c.get("on_ingest", False)
    if not isinstance(on_ingest, bool):
        raise fail("[codec]: on_ingest must be true or false")
    return CodecPolicy(**base, overrides=tuple(overrides), on_ingest=on_ingest)


# --------------------------------------------------------------------------- the policy
@dataclass
class SitePolicy:
    versions: list[VersionDef]
    ratio_rows: list[RatioRow]
    quality: dict[str, dict[str, int]]
    status_names: dict[int, str]
    status_versions: dict[int, list[str]]
    auto_advance: bool
    auto_default: str
    auto_rules: list[AutoRule]
    networks: list[tuple[Any, str]]
    storage: StorageSettings
    sources: list[str] = field(default_factory=list)
    fingerprint: str = ""
    codec: CodecPolicy = field(default_factory=CodecPolicy)
    diagnosing_versions: list[str] = field(default_factory=list)
    """Versions a user who may diagnose receives at every status ([status] diagnosing_versions)."""

    # ---------------------------------------------------------------- lookups
    def version_names(self) -> list[str]:
        return [v.name for v in self.versions]

    def status_name(self, status: int) -> str:
        return self.status_names.get(int(status), str(status))

    def allowed_versions(self, status: int, diagnosing: bool = False) -> list[str]:
        """Versions the status matrix lets the server send at this diagnosis status; with
        ``diagnosing`` (the user may diagnose) also :attr:`diagnosing_versions`."""
        row = set(self.status_versions.get(int(status), self.version_names()))
        if diagnosing:
            row |= set(self.diagnosing_versions)
        return [n for n in self.version_names() if n in row]

    def ratios_for(self, modality: str | None, body_part: str | None,
                   exams: Iterable[str | None] = ()) -> dict[str, float]:
        exams = [e for e in exams if e]
        best: RatioRow | None = None
        for row in self.ratio_rows:
            if row.matches(modality or "", body_part or "", exams):
                if best is None or row.specificity() >= best.specificity():
                    best = row
        return dict(best.ratios) if best else {}

    def quality_for(self, modality: str | None) -> dict[str, int]:
        out = dict(self.quality.get("*", {}))
        out.update(self.quality.get((modality or "").upper(), {}))
        return out

    def place_for(self, peer: str | None, declared: str | None) -> str | None:
        """Place of use: the site's network table first, else what the client says."""
        if peer:
            try:
                ip = ipaddress.ip_address(peer)
            except ValueError:
                ip = None
            if ip is not None:
                for net, place in self.networks:
                    if ip.version == net.version and ip in net:
                        return place
        return declared or None

    # ---------------------------------------------------------------- versions of a series
    def series_versions(self, series_uid: str, info: dict, images: list[ImageFacts]) -> SeriesVersions:
        """V1..Vn of a series: layers per version and the ratios actually reached.

        ``info`` is the catalogue's series row (Modality, BodyPartExamined,
        StudyDescription, SeriesDescription). Every image of the series gets the same
        layer count (a series is shown at one quality, P9).
        """
        if not images:
            raise PolicyError(f"series {series_uid} has no images")
        nl = min(len(f.layer_bytes) for f in images)
        raw = sum(f.raw_bytes for f in images)
        at = [sum(f.layer_bytes[q - 1] for f in images) for q in range(1, nl + 1)]
        full = sum(f.layer_bytes[-1] for f in images)
        ratios = self.ratios_for(info.get("Modality"), info.get("BodyPartExamined"),
                                 (info.get("StudyDescription"), info.get("SeriesDescription")))
        quality = self.quality_for(info.get("Modality"))
        out = []
        for vd in self.versions:
            if vd.lossless:
                layers, target, nbytes = None, 1.0, full
            else:
                target = float(ratios.get(vd.name, 0) or 0)
                if target <= 0:
                    raise PolicyError(f"no compression ratio for version {vd.name} "
                                      f"(modality {info.get('Modality')!r}) in the [[ratios]] table")
                cands = range(1, nl) if nl > 1 else range(1, 2)
                layers = min(cands, key=lambda q: (abs(math.log((raw / at[q - 1]) / target)), q))
                nbytes = at[layers - 1]
            out.append(VersionInfo(vd.name, vd.label, vd.purpose, int(quality.get(vd.name, 0)),
                                   vd.lossless, layers, target, raw / max(1, nbytes), nbytes))
        return SeriesVersions(series_uid, out, nl, raw)

    # ---------------------------------------------------------------- V8
    def choose_auto(self, inputs: AutoInputs, allowed: Iterable[str] | None = None) -> AutoChoice:
        """The automatic version: first matching rule, then the nearest allowed version."""
        names = self.version_names()
        allowed_list = [n for n in names if allowed is None or n in set(allowed)]
        reasons: list[str] = []
        chosen = None
        why = facts = ""
        for n, rule in enumerate(self.auto_rules, 1):
            ok, said = _rule_holds(rule.when, inputs)
            if ok:
                chosen = rule.choose
                why, facts = rule.why, said
                reasons.append(f"rule {n} ({rule.why}; {said}) chooses {chosen}")
                break
        if chosen is None:
            chosen = self.auto_default
            reasons.append(f"no rule applies: the default {chosen}")
        if not allowed_list:
            return AutoChoice(chosen, reasons + ["no version is allowed"], why, facts)
        if chosen not in allowed_list:
            i = names.index(chosen)
            best = min(allowed_list, key=lambda n: (abs(names.index(n) - i), names.index(n)))
            reasons.append(f"{chosen} may not be sent here (allowed: {', '.join(allowed_list)}); "
                           f"{best} is the nearest")
            chosen = best
        return AutoChoice(chosen, reasons, why, facts)


def _rule_holds(when: dict[str, Any], x: AutoInputs) -> tuple[bool, str]:
    said = []
    for key, want in when.items():
        if key == "status":
            ok = x.status is not None and x.status in want
            said.append(f"status {x.status}")
        elif key == "group":
            ok = bool(set(x.groups) & set(want))
            said.append(f"group {', '.join(x.groups) or 'none'}")
        elif key == "place":
            ok = x.place is not None and x.place in want
            said.append(f"place {x.place}")
        elif key in ("link_mbps_below", "link_mbps_at_least"):
            mbps = None if x.link_bps is None else x.link_bps / 1e6
            ok = mbps is not None and (mbps < want if key == "link_mbps_below" else mbps >= want)
            said.append("link unknown" if mbps is None else f"link {mbps:.1f} Mbit/s")
        elif key == "memory_mb_below":
            ok = x.memory_mb is not None and x.memory_mb < want
            said.append(f"memory {x.memory_mb} MB")
        elif key == "latency_ms_above":
            ok = x.latency_ms is not None and x.latency_ms > want
            said.append("latency unknown" if x.latency_ms is None else f"latency {x.latency_ms:.0f} ms")
        elif key == "cpus_below":
            ok = x.cpus is not None and x.cpus < want
            said.append(f"{x.cpus} processors")
        else:                       # rejected when the policy is loaded
            ok = False
        if not ok:
            return False, ""
    return True, ", ".join(said) or "always"


# --------------------------------------------------------------------------- loading
def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _read(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise PolicyError(f"{path}: cannot read: {e}") from None


def parse_policy(raw: dict, sources: list[str] | None = None) -> SitePolicy:
    """Check a merged policy table and build a :class:`SitePolicy` (one parser per
    table, in this order: versions, ratios, quality, status, auto, storage, codec)."""
    where = " + ".join(sources or ["policy"])

    def fail(msg: str) -> PolicyError:
        return PolicyError(f"{where}: {msg}")

    versions = _parse_versions(raw, fail)
    names = [v.name for v in versions]
    rows = _parse_ratios(raw, versions, fail)
    quality = _parse_quality(raw, names, fail)
    st = raw.get("status") or {}
    status_names, status_versions, diagnosing = _parse_status(st, names, fail)
    auto = raw.get("auto") or {}
    default, rules, networks = _parse_auto(auto, names, fail)
    storage = _parse_storage(raw, names, fail)
    fp = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return SitePolicy(versions, rows, quality, status_names, status_versions,
                      bool(st.get("auto_advance", True)), default, rules, networks, storage,
                      list(sources or []), fp, _parse_codec(raw, fail),
                      [str(x) for x in diagnosing])


def _parse_versions(raw: dict, fail) -> list[VersionDef]:
    """``[versions]``: at least one; the first, and only it, lossless."""
    vt = raw.get("versions")
    if not isinstance(vt, dict) or not vt:
        raise fail("[versions] must define at least one version")
    versions = []
    for name, d in vt.items():
        if not isinstance(d, dict):
            raise fail(f"[versions.{name}] must be a table")
        versions.append(VersionDef(name, str(d.get("label", name)), str(d.get("purpose", "")),
                                   bool(d.get("lossless", False))))
    if not versions[0].lossless or sum(v.lossless for v in versions) != 1:
        raise fail("the first version, and only it, must be lossless (lossless = true)")
    return versions


def _parse_ratios(raw: dict, versions: list[VersionDef], fail) -> list[RatioRow]:
    """``[[ratios]]``: target ratios (>= 1) per modality / body part / exam, with a
    default row that names every lossy version."""
    names = [v.name for v in versions]
    rows = []
    for i, r in enumerate(raw.get("ratios", [])):
        if not isinstance(r, dict):
            raise fail(f"[[ratios]] row {i + 1} must be a table")
        unknown = set(r) - {"modality", "body_part", "exam"} - set(names)
        if unknown:
            raise fail(f"[[ratios]] row {i + 1}: unknown key(s) {', '.join(sorted(unknown))}")
        ratios = {}
        for n in names:
            if n in r:
                try:
                    ratios[n] = float(r[n])
                except (TypeError, ValueError):
                    raise fail(f"[[ratios]] row {i + 1}: {n} must be a number") from None
                if ratios[n] < 1:
                    raise fail(f"[[ratios]] row {i + 1}: {n} = {r[n]} (ratios are >= 1)")
        rows.append(RatioRow(str(r.get("modality", "*")), str(r.get("body_part", "*")),
                             str(r.get("exam", "*")), ratios))
    lossy = [v.name for v in versions if not v.lossless]
    if lossy and not any(r.specificity() == 0 and all(n in r.ratios for n in lossy) for r in rows):
        raise fail("[[ratios]] needs a default row (every field \"*\") with a ratio for "
                   + ", ".join(lossy))
    return rows


def _parse_quality(raw: dict, names: list[str], fail) -> dict[str, dict[str, int]]:
    """``[quality.<modality>]``: quality figures per version; ``"*"`` names every one."""
    quality = {}
    for mod, q in (raw.get("quality") or {}).items():
        if not isinstance(q, dict):
            raise fail(f"[quality.{mod}] must be a table")
        quality[mod.upper() if mod != "*" else "*"] = {k: int(v) for k, v in q.items()}
    for n in names:
        if n not in quality.get("*", {}):
            raise fail(f'[quality."*"] needs a figure for {n}')
    return quality


def _parse_status(st: dict, names: list[str], fail
                  ) -> tuple[dict[int, str], dict[int, list[str]], list]:
    """``[status]``: status names, the versions allowed per status (1-5), the versions
    that count as diagnosing."""
    status_names = {int(k): str(v) for k, v in (st.get("names") or {}).items()}
    status_versions: dict[int, list[str]] = {}
    for k, v in (st.get("versions") or {}).items():
        try:
            s = int(k)
        except ValueError:
            raise fail(f"[status.versions]: {k!r} is not a status 1-5") from None
        if s not in STATUSES:
            raise fail(f"[status.versions]: status {s} is not 1-5")
        bad = [x for x in v if x not in names]
        if bad:
            raise fail(f"[status.versions] {s}: unknown version(s) {', '.join(bad)}")
        status_versions[s] = list(v)
    diagnosing = st.get("diagnosing_versions") or []
    if not isinstance(diagnosing, list) or any(x not in names for x in diagnosing):
        raise fail(f"[status] diagnosing_versions must list versions of {', '.join(names)}")
    return status_names, status_versions, diagnosing


def _parse_auto(auto: dict, names: list[str], fail) -> tuple[str, list[AutoRule], list]:
    """``[auto]``: the default version, the rules of the automatic choice (V8), the
    networks that name a place."""
    default = str(auto.get("default", names[0]))
    if default not in names:
        raise fail(f"[auto] default {default!r} is not a version")
    rules = []
    for i, r in enumerate(auto.get("rules", [])):
        when = dict(r.get("when") or {})
        unknown = set(when) - _AUTO_KEYS
        if unknown:
            raise fail(f"[[auto.rules]] {i + 1}: unknown condition(s) {', '.join(sorted(unknown))}")
        if r.get("choose") not in names:
            raise fail(f"[[auto.rules]] {i + 1}: choose must be one of {', '.join(names)}")
        rules.append(AutoRule(when, r["choose"], str(r.get("why", f"rule {i + 1}"))))
    networks = []
    for cidr, place in (auto.get("networks") or {}).items():
        try:
            networks.append((ipaddress.ip_network(cidr, strict=False), str(place)))
        except ValueError:
            raise fail(f"[auto.networks]: {cidr!r} is not a network (CIDR)") from None
    return default, rules, networks


def _parse_storage(raw: dict, names: list[str], fail) -> StorageSettings:
    """``[storage]``: when images move to the archive and which version stays hot."""
    s = raw.get("storage") or {}
    storage = StorageSettings(float(s.get("migrate_after_days", 30)), str(s.get("keep_hot", "V2")),
                              int(s.get("min_status", 1)), str(s.get("archive", "")),
                              float(s.get("schedule_hours", 24)))
    if storage.keep_hot not in names:
        raise fail(f"[storage] keep_hot {storage.keep_hot!r} is not a version")
    return storage


def load_policy(store_root: str | Path | None = None, path: str | Path | None = None) -> SitePolicy:
    """The shipped defaults, overridden by ``STORE/policy.toml`` (if it exists) and by
    ``path`` (if given)."""
    if not DEFAULT_POLICY.is_file():
        raise PolicyError(f"the default policy file {DEFAULT_POLICY} is missing "
                          "(MedView's resources/ folder must sit beside server/)")
    raw = _read(DEFAULT_POLICY)
    defaults = raw
    sources = [str(DEFAULT_POLICY)]
    site_purposes: dict[str, str] = {}
    for p in _site_files(store_root, path):
        over = _read(p)
        for name, d in (over.get("versions") or {}).items():
            if isinstance(d, dict) and "purpose" in d:
                site_purposes[name] = str(d["purpose"])
        raw = _merge(raw, over)
        sources.append(str(p))
    return parse_policy(_keep_site_purposes(raw, defaults, site_purposes), sources)


def _keep_site_purposes(raw: dict, defaults: dict, site: dict[str, str]) -> dict:
    """A purpose a site file gives one version is taken from the version the defaults
    give it to: that version gets, instead, the purpose the site's version had by default
    (when no other version has it), else none. A site file written against older defaults
    (V3 "comparison") keeps its meaning; selection by purpose stays unambiguous."""
    vt = raw.get("versions")
    if not site or not isinstance(vt, dict):
        return raw
    dv = defaults.get("versions") or {}

    def default_purpose(name: str) -> str:
        d = dv.get(name)
        return str(d.get("purpose", "")) if isinstance(d, dict) else ""
    vt = {k: dict(v) if isinstance(v, dict) else v for k, v in vt.items()}
    for name, d in vt.items():
        if name in site or not isinstance(d, dict):
            continue
        mine = str(d.get("purpose", "")).lower()
        taker = next((a for a, pa in site.items() if a != name and mine and pa.lower() == mine), None)
        if taker is None:
            continue
        freed = default_purpose(taker)
        used = {str(v.get("purpose", "")).lower() for k, v in vt.items()
                if k != name and isinstance(v, dict)}
        d["purpose"] = freed if freed and freed.lower() not in used else ""
    return dict(raw, versions=vt)


def _site_files(store_root, path) -> list[Path]:
    out = []
    if store_root is not None and (Path(store_root) / SITE_POLICY_NAME).is_file():
        out.append(Path(store_root) / SITE_POLICY_NAME)
    if path is not None:
        if not Path(path).is_file():
            raise PolicyError(f"policy file {path} does not exist")
        out.append(Path(path))
    return out


class PolicySource:
    """The current policy, re-read when one of its files changes (checked at most every
    ``interval`` seconds). A broken edit keeps the last good policy and is logged."""

    def __init__(self, store_root: str | Path | None = None, path: str | Path | None = None,
                 interval: float = 2.0) -> None:
        self.store_root, self.path, self.interval = store_root, path, interval
        self._lock = threading.Lock()
        self._policy = load_policy(store_root, path)
        self._stamp = self._mtimes()
        self._checked = time.monotonic()
        self.last_error: str | None = None

    def _mtimes(self) -> tuple:
        files = [DEFAULT_POLICY, *_site_files(self.store_root, self.path)]
        out = []
        for f in files:
            try:
                out.append((str(f), f.stat().st_mtime_ns))
            except OSError:
                out.append((str(f), None))
        if self.store_root is not None:
            out.append(("site", (Path(self.store_root) / SITE_POLICY_NAME).exists()))
        return tuple(out)

    def get(self) -> SitePolicy:
        now = time.monotonic()
        with self._lock:
            if now - self._checked >= self.interval:
                self._checked = now
                stamp = self._mtimes()
                if stamp != self._stamp:
                    self._stamp = stamp
                    try:
                        self._policy = load_policy(self.store_root, self.path)
                        self.last_error = None
                    except PolicyError as e:
                        import logging
                        logging.getLogger("medview.policy").error("policy not reloaded: %s", e)
                        self.last_error = str(e)
            return self._policy
