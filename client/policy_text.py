"""Server policy in words a clinician understands (no Qt).

The server speaks in quality layers, resolution reductions, image indices and version
names; a radiologist thinks in "reference quality", "half resolution", "images 1 to 10".
These functions translate the rights block of a series description and the body of a
403 answer (see :mod:`server.rights`), log-in failures, and the archive's
"recalling" state.
"""
from __future__ import annotations

import re

from typing import Any, Iterable, Mapping, Sequence

from codestream.ranges import parse_ranges

__all__ = ["explain_rights", "explain_rights_error", "explain_login_error", "explain_recall",
           "explain_slide_rights", "explain_slide_rights_error", "version_label",
           "status_label", "image_ranges_1based", "explain_shown_version", "explain_choice",
           "explain_link", "prior_line"]

_DENIED = {
    "images": "Some of the images you asked for are not available to your account.",
    "layers": "The image quality you asked for is higher than your account may load.",
    "resolution": "The image resolution you asked for is higher than your account may load.",
    "region": "Only part of these images is available to your account.",
    "version": "The image version you asked for may not be sent at the moment.",
    "whole-file": "Your access does not include downloading the original files.",
}
_ACTIONS = {
    "browse": "search the study list",
    "metadata": "see image information and diagnostic records",
    "fetch": "load images",
    "retrieve": "download original files",
    "diagnose": "change the diagnosis status, notes, annotations or the report",
}



def image_ranges_1based(text: str) -> str:
    """Server image indices ("0-9,12") as a clinician counts them ("1 to 10 and 13")."""
    vals = sorted(parse_ranges(text))
    if not vals:
        return "none"
    spans, i = [], 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        a, b = vals[i] + 1, vals[j] + 1
        spans.append(str(a) if a == b else f"{a} to {b}")
        i = j + 1
    return spans[0] if len(spans) == 1 else ", ".join(spans[:-1]) + " and " + spans[-1]


def version_label(v: Mapping[str, Any], short: bool = False) -> str:
    """"V2 – reference, about 1:20 (reaches 1:20.3), quality 50 %"."""
    if v.get("lossless"):
        ratio = "original quality (lossless)"
    else:
        ratio = f"about 1:{v.get('target_ratio', 0):g}"
        if not short and v.get("actual_ratio"):
            ratio += f" (reaches 1:{v['actual_ratio']:.1f})"
    text = f"{v['name']} – {v.get('purpose', '')}, {ratio}"
    if not short and v.get("quality") is not None:
        text += f", quality {v['quality']} %"
    return text


def explain_shown_version(selection: Mapping[str, Any] | None, versions: Sequence[Mapping[str, Any]],
                          auto: Mapping[str, Any] | None = None, status: int | None = None,
                          status_names: Mapping[str, str] | None = None) -> str:
    """One sentence for the Reading dock: which version is shown and why.

    ``selection`` as the version selector emits it ({} best allowed, {"version": "auto"
    | name}, {"purpose": p}, {"quality": q}); ``versions`` as the series description
    lists them (best first, each with ``allowed``); ``auto`` the server's automatic
    choice (version, reasons); ``status`` the study's diagnosis status."""
    if not versions:
        return ""
    sel = dict(selection or {})
    allowed = [v for v in versions if v.get("allowed", True)]
    st = f" while the study is {status_label(status, status_names)}" if status else ""
    if not allowed:
        return f"No version of this series may be sent to you{st}."
    by_name = {v["name"]: v for v in versions}
    wanted, why = None, ""
    if not sel:
        wanted, why = allowed[0], f"the best version you may receive{st}"
    elif sel.get("version") == "auto":
        wanted = by_name.get((auto or {}).get("version")) or allowed[0]
        reasons = [r for r in (auto or {}).get("reasons", []) if r]
        why = "chosen automatically" + (f" because {reasons[0]}" if reasons else "")
    elif "version" in sel:
        wanted, why = by_name.get(sel["version"]), "as you chose"
    elif "purpose" in sel:
        wanted = next((v for v in versions if v.get("purpose") == sel["purpose"]), None)
        why = f"the version for {sel['purpose']} you chose"
    elif "quality" in sel:
        ok = [v for v in versions if v.get("quality", 0) >= sel["quality"]]
        wanted = min(ok, key=lambda v: v["quality"]) if ok else versions[0]
        why = f"the smallest version of at least {sel['quality']} % quality"
    if wanted is None:
        wanted, why = allowed[0], f"the best version you may receive{st}"
    if wanted.get("allowed", True):
        return f"Shown: {version_label(wanted, short=True)} — {why}."
    i = versions.index(wanted)
    nearest = min(allowed, key=lambda v: (abs(versions.index(v) - i), versions.index(v)))
    return (f"Shown: {version_label(nearest, short=True)} — the nearest allowed version, "
            f"because {wanted['name']} may not be sent now{st}.")


def status_label(status: int, names: Mapping[str, str] | None = None) -> str:
    names = names or {}
    name = names.get(str(status)) or {1: "unread", 2: "read", 3: "notes", 4: "annotations",
                                      5: "report"}.get(int(status), "")
    return f"{status} – {name}" if name else str(status)


def _fraction(reduce: int) -> str:
    return {1: "half", 2: "a quarter of the", 3: "an eighth of the"}.get(
        reduce, f"1/{2 ** reduce} of the")


def _quality_words(max_layers: int, versions: Sequence[Mapping] | None,
                   nlayers: int | None) -> str:
    if max_layers <= 0:
        return "no image quality at all at the moment"
    of = f" of {nlayers}" if nlayers else ""
    fitting = [v for v in versions or () if not v.get("lossless") and v.get("layers")
               and v["layers"] <= max_layers]
    if fitting:
        best = max(fitting, key=lambda v: v["layers"])
        if best["layers"] == max_layers:
            return (f"at most {best.get('purpose') or 'reduced'} quality "
                    f"({version_label(best, short=True)}), not the original")
        return (f"at most quality level {max_layers}{of}: better than "
                f"{version_label(best, short=True)}, but not the original")
    return f"at most quality level {max_layers}{of} (compressed, not the original)"


def explain_rights(rights: Mapping[str, Any] | None, *, images: Sequence[Mapping] | None = None,
                   versions: Sequence[Mapping] | None = None,
                   status_names: Mapping[str, str] | None = None) -> str:
    """The standing limits on a series, as sentences; "" when there are none."""
    if not rights:
        return ""
    parts = []
    first = images[0] if images else None
    if rights.get("allowed_images") is not None:
        n = f" of {len(images)}" if images else ""
        parts.append(f"images {image_ranges_1based(rights['allowed_images'])}{n} only")
    if rights.get("max_layers") is not None:
        parts.append(_quality_words(int(rights["max_layers"]), versions,
                                    first.get("nlayers") if first else None))
    if rights.get("max_reduce_min"):
        red = int(rights["max_reduce_min"])
        size = ""
        if first and first.get("Columns"):
            w, h = -(-first["Columns"] // 2 ** red), -(-first["Rows"] // 2 ** red)
            size = f": {w} × {h} instead of {first['Columns']} × {first['Rows']} pixels"
        parts.append(f"at most {_fraction(red)} resolution{size}")
    if rights.get("allowed_regions") is not None:
        regs = rights["allowed_regions"]
        if not regs:
            parts.append("no part of the images")
        else:
            where = "; ".join(f"columns {x + 1}–{x + w}, rows {y + 1}–{y + h}" for x, y, w, h in regs)
            parts.append(f"only part of each image ({where}); the rest is shown blurred")
    text = ""
    if parts:
        text = "Your access to this series is limited to " + "; ".join(parts) + "."
    allowed = rights.get("allowed_versions")
    if allowed is not None and versions and len(allowed) < len(versions):
        status = rights.get("diagnosis_status")
        st = f" while the study is {status_label(status, status_names)}" if status else ""
        if not allowed:
            text += f" No version of this study may be sent{st}."
        else:
            names = [version_label(v, short=True) for v in versions if v["name"] in allowed]
            text += f" Versions that may be sent{st}: " + "; ".join(names) + "."
    return text.strip()


def explain_rights_error(error: Any, *, images: Sequence[Mapping] | None = None,
                         versions: Sequence[Mapping] | None = None,
                         status_names: Mapping[str, str] | None = None) -> str:
    """A 403 (a :class:`client.session.ServerError`, or its JSON body) in plain words:
    what was refused, what is allowed, and that the viewer carries on within it."""
    body = getattr(error, "body", error) if not isinstance(error, Mapping) else error
    body = body or {}
    denied: Iterable[str] = body.get("denied") or []
    if "action" in denied:
        allowed = body.get("allowed_actions") or []
        what = ", ".join(_ACTIONS.get(a, a) for a in allowed) or "nothing"
        return ("Your account is not allowed to do this. It may: " + what + ". "
                "Ask your administrator if you need more.")
    lines = [_DENIED[d] for d in denied if d in _DENIED]
    if not lines:
        lines = ["The server refused this request: " + str(body.get("error") or error)]
    limits = explain_rights(body, images=images, versions=versions, status_names=status_names)
    if limits:
        lines.append(limits)
    lines.append("The viewer shows the series within these limits.")
    return " ".join(lines)


def _and(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _level_words(level: int, levels: Sequence[Mapping] | None, mpp: float | None) -> str:
    ds = 2 ** level
    if levels and level < len(levels):
        ds = int(levels[level].get("downsample") or ds)
    if mpp:
        return f"level {level} ({mpp * ds:.3g} µm/px)"
    return f"level {level} (1/{ds} of the full resolution)"


def explain_slide_rights(rights: Mapping[str, Any] | None, *,
                         levels: Sequence[Mapping] | None = None, mpp: float | None = None,
                         layers: int | None = None, versions: Sequence[Mapping] | None = None,
                         unlimited: bool | None = None) -> str:
    """The standing limits on a whole slide, as sentences ("" when there are none):
    ``rights`` as in the slide description or a 403 (``finest_level`` included);
    ``levels``, ``mpp``, ``layers`` (stored quality layers) and ``versions`` from the
    slide description."""
    rights = rights or {}
    parts: list[str] = []
    if rights.get("allowed_images") is not None:
        return ("Your rights allow none of this slide: they limit images by number, and a "
                "slide has no image numbers. Ask your administrator for a rule on the slide, "
                "its exam or its patient.")
    finest = rights.get("finest_level")
    if finest is None and rights.get("max_reduce_min"):
        finest = int(rights["max_reduce_min"])
        if levels:
            finest = min(finest, len(levels) - 1)
    top = len(levels) - 1 if levels else None
    if finest:
        if top is not None and finest >= top and int(rights.get("max_reduce_min") or 0) > top:
            parts.append(f"only as its smallest overview (level {finest}, reduced further)")
        else:
            parts.append(f"up to {_level_words(int(finest), levels, mpp)}")
    cap = rights.get("max_layers")
    if cap is not None and (layers is None or int(cap) < layers):
        cap = int(cap)
        if cap <= 0:
            parts.append("no image quality at all at the moment")
        else:
            of = f"{cap} of {layers}" if layers else f"{cap}"
            match = [v for v in versions or () if not v.get("lossless") and v.get("layers") == cap]
            what = (f"{version_label(match[0], short=True)}, not the original" if match
                    else "compressed, not the original")
            parts.append(f"{of} quality layer{'s' if (layers or cap) != 1 else ''} ({what})")
    regs = rights.get("allowed_regions")
    if regs is not None:
        if not regs:
            parts.append("in no part")
        else:
            where = "; ".join(f"columns {x + 1}–{x + w}, rows {y + 1}–{y + h}"
                              for x, y, w, h in regs)
            parts.append(f"in part only ({where} at full resolution; the rest is grey)")
    text = ""
    if parts:
        text = "Your rights allow this slide " + _and(parts) + "."
        if finest:
            text += (f" Zooming in further shows level {finest} enlarged (labelled), not "
                     "finer detail.")
    allowed = rights.get("allowed_versions")
    if allowed is not None and versions and len(allowed) < len(versions):
        if not allowed:
            text += " No version of this slide may be sent now."
        else:
            names = [version_label(v, short=True) for v in versions if v["name"] in allowed]
            text += " Versions that may be sent: " + "; ".join(names) + "."
    if unlimited is False:
        text += (" Label and macro images are not permitted: they are whole images of the "
                 "slide (the label carries the patient's identity) and need unlimited access.")
    return text.strip()


def explain_slide_rights_error(error: Any, **slide) -> str:
    """A 403 on a slide (ServerError or its body) in plain words: what was refused, what
    is allowed (``slide``: the keywords of :func:`explain_slide_rights`), and that the
    viewer carries on within it."""
    body = getattr(error, "body", error) if not isinstance(error, Mapping) else error
    body = body or {}
    denied: Iterable[str] = body.get("denied") or []
    if "action" in denied:
        return explain_rights_error(body)
    lines = [_DENIED[d] for d in denied if d in _DENIED and d != "whole-file"]
    if "whole-file" in denied:
        lines.append("Label and macro images need unlimited access to the slide.")
    if not lines:
        lines = ["The server refused this request: " + str(body.get("error") or error)]
    limits = explain_slide_rights(body, **slide)
    if limits:
        lines.append(limits)
    lines.append("The viewer shows the slide within these limits.")
    return " ".join(lines)


def explain_login_error(error: Any) -> str:
    """Why a log-in failed, for the log-in dialog."""
    status = getattr(error, "status", None)
    body = getattr(error, "body", {}) or {}
    if status == 429:
        wait = body.get("retry_after")
        when = f" in {int(wait)} seconds" if wait else " later"
        return ("Too many failed log-in attempts. For your protection log-in is paused: "
                f"try again{when}.")
    if status == 401:
        return "The user name or the password is not correct."
    if status == 0:
        return f"The image server cannot be reached. {getattr(error, 'message', error)}"
    return f"Log-in failed: {getattr(error, 'message', error)}"


def explain_recall(msg: Mapping[str, Any] | None, recalling: bool = True) -> str:
    """The archive state, for the status line."""
    if not recalling:
        return "The original images are back from the archive."
    n = len((msg or {}).get("images") or [])
    what = f"{n} image{'s' if n != 1 else ''}" if n else "images"
    return (f"Fetching the original quality of {what} from the archive. Compressed "
            "versions are shown meanwhile; this can take a moment.")


def _mbps(bps: float | None) -> str:
    if bps is None:
        return "not measured yet"
    mbps = bps / 1e6
    return f"{mbps:.1f} Mbit/s" if mbps < 100 else f"{mbps:.0f} Mbit/s"


def explain_choice(version: Mapping[str, Any] | None, selection: Mapping[str, Any] | None,
                   auto: Mapping[str, Any] | None = None,
                   versions: Sequence[Mapping] | None = None) -> str:
    """Which version is loaded and why, in one sentence, for the Reading dock (V8).

    ``version`` is what the server said it sends (an announce's ``version``, or None),
    ``selection`` the viewer's choice, ``auto`` the automatic choice with ``why`` and
    ``facts`` (as the series description or an announce carries it)."""
    sel = dict(selection or {})
    by_name = {v["name"]: v for v in versions or []}
    name = (version or {}).get("name")
    if not name and sel.get("version") == "auto":
        name = (auto or {}).get("version")
    desc = dict(by_name.get(name, {}), **(version or {})) if name else {}
    label = version_label(desc, short=True) if desc.get("name") else (name or "")
    if not sel:
        link = by_name.get((auto or {}).get("version") or "")
        if link and not link.get("lossless"):
            # the adaptive plan (client.series_loader): the link's version first, the rest at rest
            facts = (auto or {}).get("facts") or ""
            return (f"Best allowed: {f'measured {facts}, so ' if facts else ''}the images come "
                    f"as {version_label(link, short=True)} first and in full quality once you "
                    "pause.")
        if name:
            return f"Loading {label}: the best your rights allow."
        return "Loading the original quality: no version was chosen."
    if sel.get("version") == "auto":
        if not name:
            return "The version is chosen automatically when the images load."
        why = (auto or {}).get("why") or ""
        facts = (auto or {}).get("facts") or ""
        if why:
            because = why[0].lower() + why[1:]
            return f"Automatic choice {label}, because {because} ({facts})."
        return f"Automatic choice {label}: no rule applies, so the site's default is used."
    if "version" in sel:
        return f"Loading {label or sel['version']}, as you chose."
    if "purpose" in sel:
        return f"Loading {label or 'the version'} for {sel['purpose']}, as you chose."
    return f"Loading {label or 'the version'}: the cheapest reaching quality {sel.get('quality')} %."


def explain_link(context: Mapping[str, Any] | None) -> str:
    """The measured link and computer as the server last heard them."""
    c = dict(context or {})
    parts = [f"link {_mbps(c.get('link_bps'))}"]
    if c.get("latency_ms") is not None:
        parts.append(f"latency {c['latency_ms']:.0f} ms")
    if c.get("memory_mb") is not None:
        parts.append(f"{c['memory_mb'] / 1024:.1f} GB free memory")
    if c.get("cpus"):
        parts.append(f"{c['cpus']} processors")
    return "Measured: " + ", ".join(parts) + "."


_PRIOR_STATES = {
    "waiting": "waiting",
    "archived": "in the archive: being recalled",
    "recalling": "recalling from archive…",
    "fetching": "loading for comparison…",
    "ready": "ready for comparison",
    "failed": "could not be loaded",
}


def prior_line(prior: Mapping[str, Any], state: str | None = None,
               detail: Mapping[str, Any] | None = None) -> str:
    """One line of the prior-study list: date, modalities, description and its state."""
    d = re.sub(r"\D", "", str(prior.get("StudyDate") or ""))
    date = f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 else (d or "no date")
    mods = prior.get("ModalitiesInStudy") or []
    mods = mods if isinstance(mods, str) else "/".join(str(m) for m in mods)
    desc = prior.get("StudyDescription") or ""
    text = " · ".join(x for x in (date, mods, desc) if x)
    if state == "skipped":
        reason = (detail or {}).get("reason") or "not loaded"
        return f"{text} — not loaded ahead ({reason}); opens on demand"
    if state:
        said = _PRIOR_STATES.get(state, state)
        v = (detail or {}).get("version")
        if v and state in ("fetching", "recalling", "ready"):
            ratio = (detail or {}).get("ratio")
            how = ("lossless" if ratio is not None and ratio <= 1.0
                   else f"about 1:{ratio:.0f}" if ratio else "")
            said += f" ({v}{', ' + how if how else ''})"
        return f"{text} — {said}"
    return text
