"""Headless slide rendering: ``medview render --slide ID --level L [--region x,y,w,h]
[--sr 2|4] --out file.png``.

* ``--slide``: slide UID or catalogue number; ``--level``: pyramid level (0 = full
  resolution, each next level halves it); ``--region x,y,w,h`` in pixels of that level
  (default: the whole level).
* Data come from the slide store of ``--store`` (default: the desktop app's store, made
  with its samples — the sample slide included — on first use, as the app does), or
  from an image server with ``--server URL`` through the packet protocol (only the tiles
  of the region, and of edge tiles only the precincts needed, are fetched).
* ``--sr 2|4|8`` super-resolves the region (output ``s·w × s·h``) with the shipped
  generator; ×8 only when it is offered (:func:`imaging.sr.offer_check`: its weights beat
  bicubic by at least 1 dB on held-out slides), else exit 2 with the reason. The
  picture is then *marked*: a magenta frame and a banner "SUPER-RESOLVED
  ×s — GENERATED, NOT SCANNED DETAIL", and PNG text chunks ``MedView-Generated``; a
  generated picture can never be mistaken for a scan. ``--sr-ensemble`` averages the
  generator over the 8 flips/rotations of the input (8× the time; about +0.1 dB on the
  held-out tiles of ``bench/sr.py``).
* ``--layers N`` renders from the first N quality layers (default all: lossless).
* From a server, the render stays within the user's rights on the slide: a level finer
  than they allow, more layers, a region outside the allowed ones (or the whole level
  under a region right) exits 1 with the reason in plain words; by default ("all layers")
  it renders with the layers the rights allow, and says so.

The PNG also carries the slide's QC status (``MedView-QC``); a flagged slide is reported
on standard error.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

SR_COLOUR = (230, 0, 200)


def default_store() -> Path:
    base = os.environ.get("MEDVIEW_HOME") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "medview")
    return Path(base) / "store"


def mark_generated(rgb: np.ndarray, scale: int, *, banner: bool = True,
                   frame: int = 4) -> np.ndarray:
    """A copy of ``rgb`` with the generated-detail marking: a magenta frame, corner
    hatching, and (``banner``) a text banner."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(np.ascontiguousarray(rgb)).convert("RGB")
    d = ImageDraw.Draw(im)
    w, h = im.size
    f = max(1, min(frame, w // 8, h // 8))
    for i in range(f):
        d.rectangle([i, i, w - 1 - i, h - 1 - i], outline=SR_COLOUR)
    step = 6
    n = min(48, w // 3, h // 3)
    for k in range(0, n, step):                     # hatched top-left corner
        d.line([(k, 0), (0, k)], fill=SR_COLOUR, width=2)
    if banner and w >= 60 and h >= 24:
        text = f"SUPER-RESOLVED x{scale} - GENERATED, NOT SCANNED DETAIL"
        bh = 14
        d.rectangle([f, f, w - 1 - f, f + bh], fill=SR_COLOUR)
        d.text((f + 4, f + 2), text if w > 360 else f"SR x{scale} GENERATED", fill=(255, 255, 255))
    return np.asarray(im)


def save_png(path: str | Path, rgb: np.ndarray, text: dict[str, str]) -> None:
    from imaging.pyramid import write_atomic
    from client.srqueue import png_with_text

    write_atomic(Path(path).resolve(), png_with_text(rgb, text))


def render_region(provider, level: int, region: tuple[int, int, int, int] | None = None, *,
                  sr: int | None = None, layers: int = 0,
                  ensemble: bool = False) -> tuple[np.ndarray, dict]:
    """(RGB picture, PNG text) of a region of a level, optionally super-resolved
    (``ensemble``: the generator's self-ensemble, 8× the time, a little more accurate)."""
    g = provider.levels[level]
    x, y, w, h = region or (0, 0, g.width, g.height)
    text = {"MedView-Slide": str(provider.info.get("slide_uid")),
            "MedView-Level": str(level), "MedView-Region": f"{x},{y},{w},{h}",
            "MedView-QC": str(provider.info.get("qc_status") or "unchecked")}
    if not sr:
        return provider.read_level(level, x, y, w, h, layers=layers), text
    from imaging.sr import load_generator

    gen = load_generator(sr)
    margin = 8
    out = np.empty((h * sr, w * sr, 3), np.uint8)
    step = 256                       # input block; keeps memory small on big regions
    for by in range(0, h, step):
        for bx in range(0, w, step):
            bw, bh = min(step, w - bx), min(step, h - by)
            src = provider.read_level(level, x + bx - margin, y + by - margin,
                                      bw + 2 * margin, bh + 2 * margin, layers=layers)
            up = gen.upscale(src, ensemble=ensemble)
            m = margin * sr
            out[by * sr:(by + bh) * sr, bx * sr:(bx + bw) * sr] = up[m:m + bh * sr, m:m + bw * sr]
    text["MedView-Generated"] = (f"super-resolution x{sr} - generated, not scanned detail; "
                                 f"generator {gen.meta.get('architecture', '')[:60]}"
                                 + ("; self-ensemble of 8 flips/rotations" if ensemble else ""))
    return mark_generated(out, sr), text


def region_arg(s: str) -> tuple[int, int, int, int]:
    """argparse type for ``x,y,w,h`` (also used by ``medview fetch``)."""
    try:
        x, y, w, h = (int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("region must be x,y,w,h") from None
    if min(x, y) < 0 or min(w, h) <= 0:
        raise argparse.ArgumentTypeError("region must have x,y >= 0 and w,h > 0")
    return x, y, w, h


def build_parser(prog: str = "medview render") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slide", required=True, help="slide UID or catalogue number")
    p.add_argument("--level", type=int, default=0)
    p.add_argument("--region", type=region_arg, help="x,y,w,h in pixels of the level")
    p.add_argument("--sr", type=int, choices=(2, 4, 8),
                   help="super-resolve ×2, ×4 or (where offered) ×8 (marked)")
    p.add_argument("--sr-ensemble", action="store_true",
                   help="with --sr: average over the 8 flips/rotations (8x the time)")
    p.add_argument("--layers", type=int, default=0, help="quality layers (default all)")
    p.add_argument("--store", help=f"image store (default {default_store()})")
    p.add_argument("--server", help="image server URL (instead of a local store)")
    p.add_argument("--user", default=os.environ.get("MEDVIEW_USER", "local"))
    p.add_argument("--password", default=os.environ.get("MEDVIEW_PASSWORD"))
    p.add_argument("--out", required=True, help="PNG file")
    return p


def dispatch_slide_render(argv: list[str]) -> int | None:
    """For ``medview``: run ``render --slide ...`` here and return its exit code; None
    when ``argv`` is not a slide render (then ``medview`` carries on as before).
    ``--store`` given before ``render`` (``medview --store DIR render --slide ...``) is
    passed on."""
    argv = list(argv)
    if "render" not in argv:
        return None
    i = argv.index("render")
    rest = argv[i + 1:]
    if not any(a == "--slide" or a.startswith("--slide=") for a in rest):
        return None
    head = argv[:i]
    for opt in ("--store", "--server"):
        if opt in head and opt not in rest:
            j = head.index(opt)
            if j + 1 < len(head):
                rest += [opt, head[j + 1]]
    return main(rest)


def _slide_words(provider) -> dict:
    if provider is None:
        return {}
    return {"levels": provider.info.get("levels"), "mpp": provider.info.get("mpp"),
            "layers": provider.stored_layers, "versions": provider.info.get("versions")}


def _rights_words(provider) -> str:
    """The user's rights on the slide in plain words ("" when unlimited)."""
    from client.policy_text import explain_slide_rights

    if not provider.limited:
        return ""
    return explain_slide_rights(provider.rights, **_slide_words(provider))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.sr_ensemble and not args.sr:
        print("medview render: --sr-ensemble needs --sr 2|4", file=sys.stderr)
        return 2
    if args.sr:
        from imaging.sr import offer_check

        why = offer_check(args.sr)
        if why:
            print(f"medview render: {why}", file=sys.stderr)
            return 2
    from client.session import ServerError

    from server.slide_catalogue import CatalogueError
    from client.slides import LocalSlide, RemoteSlide

    session = store = provider = None
    try:
        if args.server:
            from client.session import Session

            session = Session(args.server, args.user, args.password)
            provider = RemoteSlide(session, args.slide)
        else:
            from server.slide_store import SlideStore

            root = Path(args.store) if args.store else default_store()
            if not args.store:
                # the desktop app's store, with its samples (the sample slide included),
                # made on first use as `medview render --series` does
                from server.sample import ensure_sample_store

                ensure_sample_store(root, log=lambda m: print(m, file=sys.stderr)).close()
            from server.database import store_exists

            if not store_exists(root) or not (root / "slides").is_dir():
                print(f"medview render: no slide store at {root / 'slides'}", file=sys.stderr)
                return 1
            store = SlideStore.for_image_store(root)
            provider = LocalSlide.from_store(store, args.slide)
        if not 0 <= args.level < len(provider.levels):
            print(f"medview render: level {args.level} out of range (0-{len(provider.levels) - 1})",
                  file=sys.stderr)
            return 1
        g = provider.levels[args.level]
        if args.region and (args.region[0] >= g.width or args.region[1] >= g.height):
            print(f"medview render: region outside level {args.level} ({g.width}x{g.height})",
                  file=sys.stderr)
            return 1
        reason = provider.beyond(args.level, args.region, args.layers)
        if reason:
            hint = (" (name a part with --region x,y,w,h)"
                    if args.region is None and provider.allowed_regions(args.level) else "")
            print(f"medview render: beyond your rights: {reason}{hint}.", file=sys.stderr)
            words = _rights_words(provider)
            if words:
                print(words, file=sys.stderr)
            return 1
        rgb, text = render_region(provider, args.level, args.region, sr=args.sr,
                                  ensemble=args.sr_ensemble,
                                  layers=args.layers)
        if provider.max_layers < provider.stored_layers and not args.layers:
            text["MedView-Layers"] = (f"{provider.max_layers} of {provider.stored_layers} "
                                      "(the most your rights allow)")
            print(f"note: rendered with {provider.max_layers} of {provider.stored_layers} "
                  "quality layers, the most your rights allow (not the original)",
                  file=sys.stderr)
        save_png(args.out, rgb, text)
        qc = provider.info.get("qc_status")
        if qc == "flagged":
            flags = (provider.info.get("qc") or {}).get("flags")
            print(f"warning: slide QC flagged: {', '.join(flags or [])}", file=sys.stderr)
        print(f"wrote {args.out} ({rgb.shape[1]}x{rgb.shape[0]}"
              f"{', SUPER-RESOLVED x%d (marked)' % args.sr if args.sr else ''})")
        return 0
    except ServerError as e:
        if e.status == 403:             # refused (the rights changed, or no access at all)
            from client.policy_text import explain_slide_rights_error

            print(f"medview render: beyond your rights: {e.message}.", file=sys.stderr)
            print(explain_slide_rights_error(e, **_slide_words(provider)),
                  file=sys.stderr)
        else:
            print(f"medview render: {e}", file=sys.stderr)
        return 1
    except (CatalogueError, OSError, ValueError, RuntimeError) as e:
        print(f"medview render: {e}", file=sys.stderr)
        return 1
    finally:
        if store is not None:
            store.close()
        if session is not None:
            session.logout()


if __name__ == "__main__":
    sys.exit(main())
