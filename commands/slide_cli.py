"""``medview-slide`` (also ``python -m commands.slide_cli``): slide ingest, QC, tiers,
organise and distribute.

    ingest PATH... --patient ID --accession ACC [--patient-name N] [--status S]
           [--label L] [--stain S] [--state low|high] [--mpp M] [--tile 512]
           [--acquired ISO] [--no-qc]
    list [--patient ID] [--accession ACC] [--flagged]
    qc SLIDE [--thresholds qc.json]            re-check a stored slide
    qc --reference SLIDE --out ref.json        make a colour reference from a good slide
    patient ID --status inpatient|outpatient|discharged
    tiers plan | run [--max N] | move SLIDE TIER | recover | moves
    gather PATIENT --out DIR                   one patient's slides and studies in one folder
    station NAME CACHE_DIR                     add (or move) a reading station
    assign ACCESSION STATION                   route an exam to a station
    distribute [--station NAME]                pre-load assigned exams into station caches
    fsck [--repair]
    demo [--patient ID]                        ingest a demonstration slide (real IHC)
    render --slide ID --level L [--region x,y,w,h] [--sr 2|4] --out file.png

Every command takes ``--store DIR``, before or after the command (the image store;
slides live in ``DIR/slides``, default the desktop app's store). Exit status 0 on
success, 1 on a refused or failed operation (with the reason on standard error), 2 on
bad usage. QC-flagged slides are
ingested and listed with their flags; ``ingest`` exits 3 when a slide was flagged.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from commands.slide_render import default_store


def _store(args):
    from server.slide_store import SlideStore

    return SlideStore.for_image_store(Path(args.store) if args.store else default_store())


def _row_line(r: dict) -> str:
    flags = ",".join((r.get("qc") or {}).get("flags") or []) or "-"
    return (f"{r['pk']:>4}  {r['slide_uid'][:12]}  {r['patient_id']:<10} {r['accession']:<10} "
            f"{r['state']:<4} {r['tier']:<6} {r['width']}x{r['height']} L{r['levels']} "
            f"QC {r['qc_status']}({flags})  {r.get('label') or ''}")


def cmd_ingest(args) -> int:
    from imaging.qc import QCThresholds

    th = QCThresholds.load(Path(args.thresholds)) if args.thresholds else None
    flagged = False
    with _store(args) as st:
        for path in args.paths:
            row = st.ingest(path, patient_id=args.patient, accession=args.accession,
                            patient_name=args.patient_name, patient_status=args.status,
                            label=args.label, stain=args.stain, state=args.state,
                            acquired_at=args.acquired, tile_size=args.tile, mpp=args.mpp,
                            run_qc=not args.no_qc, thresholds=th,
                            progress=None if args.quiet else _progress(path))
            print(_row_line(row))
            if row["qc_status"] == "flagged":
                flagged = True
                shown = {k: v for k, v in row["qc"].items() if k != "thresholds"}
                print(f"  QC FLAGGED: {json.dumps(shown)}")
    return 3 if flagged else 0


def _progress(path):
    def cb(done, total):
        if done == total or done % 50 == 0:
            print(f"  {path}: {done}/{total} tiles", file=sys.stderr)
    return cb


def cmd_list(args) -> int:
    with _store(args) as st:
        for r in st.catalogue.slides(patient_id=args.patient, accession=args.accession,
                                     flagged=True if args.flagged else None):
            print(_row_line(r))
    return 0


def cmd_qc(args) -> int:
    from imaging.qc import QCThresholds, make_reference

    with _store(args) as st:
        if args.reference:
            _row, s = st.open(args.reference)
            lv = max(i for i, g in enumerate(s.levels) if max(g.width, g.height) >= 256 or i == 0)
            lv = next((g.level for g in s.levels if max(g.width, g.height) <= 1024), lv)
            g = s.levels[lv]
            ref = make_reference(s.read_region(lv, 0, 0, g.width, g.height), f"slide {s.uid}")
            Path(args.out).write_text(json.dumps(ref))
            print(f"reference written to {args.out}")
            return 0
        if not args.slide:
            print("qc: name a slide (or --reference SLIDE --out FILE)", file=sys.stderr)
            return 2
        th = QCThresholds.load(Path(args.thresholds)) if args.thresholds else None
        row = st.recheck(args.slide, th)
        print(_row_line(row))
        print(json.dumps(row["qc"], indent=2))
    return 0


def cmd_patient(args) -> int:
    with _store(args) as st:
        st.catalogue.set_patient_status(args.patient_id, args.status)
        if args.status == "discharged":
            from server.slide_tiers import SlideTiers

            n = SlideTiers(st).purge_temp(args.patient_id)
            print(f"patient {args.patient_id} discharged; {n} generated tiles purged")
        else:
            print(f"patient {args.patient_id}: {args.status}")
    return 0


def cmd_tiers(args) -> int:
    from server.slide_tiers import SlideTiers

    with _store(args) as st:
        t = SlideTiers(st)
        if args.action == "plan":
            for row, want in t.plan():
                print(f"{row['slide_uid']}  {row['tier']} -> {want}")
        elif args.action == "run":
            print(t.run_once(max_moves=args.max).summary())
        elif args.action == "recover":
            print(f"recovered: {t.recover()}")
        elif args.action == "moves":
            for m in st.catalogue.moves():
                print(f"{m['pk']:>4} slide {m['slide_pk']} {m['from_tier']} -> {m['to_tier']} "
                      f"{m['state']} {m['started_at']} {m['detail'] or ''}")
        elif args.action == "move":
            if not args.slide or not args.tier:
                print("tiers move SLIDE TIER", file=sys.stderr)
                return 2
            row = t.move(args.slide, args.tier)
            print(_row_line(row))
    return 0


def cmd_gather(args) -> int:
    from server.slide_organise import gather_patient

    with _store(args) as st:
        idx = gather_patient(st, args.patient_id, args.out)
        print(f"{len(idx['slides'])} slide(s) and {len(idx['studies'])} radiology "
              f"stud{'y' if len(idx['studies']) == 1 else 'ies'} of patient {args.patient_id} in "
              f"{Path(args.out) / args.patient_id}")
    return 0


def cmd_station(args) -> int:
    with _store(args) as st:
        st.catalogue.add_station(args.name, str(Path(args.cache_dir).resolve()))
        print(f"station {args.name}: cache {Path(args.cache_dir).resolve()}")
    return 0


def cmd_assign(args) -> int:
    with _store(args) as st:
        st.catalogue.assign(args.accession, args.station)
        print(f"exam {args.accession} assigned to {args.station}")
    return 0


def cmd_distribute(args) -> int:
    from server.slide_organise import distribute

    with _store(args) as st:
        for d in distribute(st, args.station):
            print(f"{d['station']}: exam {d['accession']}: "
                  + ", ".join(f"{s['slide_uid'][:12]} {s['copy']}" for s in d["slides"]))
    return 0


def cmd_fsck(args) -> int:
    with _store(args) as st:
        rep = st.fsck(repair=args.repair)
    print(json.dumps(rep, indent=2))
    return 0 if not rep["damaged"] else 1


def cmd_demo(args) -> int:
    from imaging.slide_sample import ihc_slide_source

    with _store(args) as st:
        row = st.ingest(ihc_slide_source(args.width, args.height), patient_id=args.patient,
                        accession=args.accession, patient_name="Demo^Pathology",
                        label="IHC demo (real tissue, scikit-image)", stain="IHC",
                        tile_size=args.tile)
        print(_row_line(row))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medview-slide", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--store", help=f"image store (default {default_store()})")
    sub = p.add_subparsers(dest="command", required=True)

    def sp(name, fn, **kw):
        s = sub.add_parser(name, **kw)
        # also after the command; SUPPRESS keeps a --store given before it
        s.add_argument("--store", default=argparse.SUPPRESS,
                       help=f"image store (default {default_store()})")
        s.set_defaults(fn=fn)
        return s

    s = sp("ingest", cmd_ingest, help="ingest slides (SVS, tiled TIFF, DICOM WSI, images)")
    s.add_argument("paths", nargs="+")
    s.add_argument("--patient", required=True)
    s.add_argument("--accession", required=True)
    s.add_argument("--patient-name")
    s.add_argument("--status", choices=("inpatient", "outpatient", "discharged"))
    s.add_argument("--label")
    s.add_argument("--stain")
    s.add_argument("--state", choices=("low", "high"),
                   help="default: low when coarser than 0.9 µm/px, else high")
    s.add_argument("--mpp", type=float, help="microns per pixel (overrides the file)")
    s.add_argument("--tile", type=int, default=512)
    s.add_argument("--acquired", help="acquisition time (ISO 8601)")
    s.add_argument("--no-qc", action="store_true")
    s.add_argument("--thresholds", help="QC thresholds (JSON)")
    s.add_argument("-q", "--quiet", action="store_true")

    s = sp("list", cmd_list, help="list catalogued slides")
    s.add_argument("--patient")
    s.add_argument("--accession")
    s.add_argument("--flagged", action="store_true")

    s = sp("qc", cmd_qc, help="re-run the quality check, or make a colour reference")
    s.add_argument("slide", nargs="?")
    s.add_argument("--thresholds")
    s.add_argument("--reference", help="make a colour reference from this slide")
    s.add_argument("--out", default="qc_reference.json")

    s = sp("patient", cmd_patient, help="set a patient's status (discharge purges temp)")
    s.add_argument("patient_id")
    s.add_argument("--status", required=True, choices=("inpatient", "outpatient", "discharged"))

    s = sp("tiers", cmd_tiers, help="tier moves (copy, verify, delete)")
    s.add_argument("action", choices=("plan", "run", "move", "recover", "moves"))
    s.add_argument("slide", nargs="?")
    s.add_argument("tier", nargs="?", choices=("recent", "mid", "long"))
    s.add_argument("--max", type=int)

    s = sp("gather", cmd_gather, help="copy one patient's slides and radiology studies into a folder")
    s.add_argument("patient_id")
    s.add_argument("--out", required=True)

    s = sp("station", cmd_station, help="add a reading station and its cache folder")
    s.add_argument("name")
    s.add_argument("cache_dir")

    s = sp("assign", cmd_assign, help="assign an exam to a reading station")
    s.add_argument("accession")
    s.add_argument("station")

    s = sp("distribute", cmd_distribute, help="pre-load assigned exams into station caches")
    s.add_argument("--station")

    s = sp("fsck", cmd_fsck, help="verify every stored slide; list orphan folders")
    s.add_argument("--repair", action="store_true")

    s = sp("demo", cmd_demo, help="ingest a demonstration slide made of real IHC tissue")
    s.add_argument("--patient", default="DEMO-1")
    s.add_argument("--accession", default="PATH-DEMO-1")
    s.add_argument("--width", type=int, default=3072)
    s.add_argument("--height", type=int, default=2048)
    s.add_argument("--tile", type=int, default=512)

    sub.add_parser("render", help="render a slide region to PNG (see `render --help`)",
                   add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "render" in argv:
        # `[--store DIR] [-v] render ...`: the render command has its own parser
        i = argv.index("render")
        head, rest = argv[:i], argv[i + 1:]
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("-v", "--verbose", action="store_true")
        pre.add_argument("--store")
        known, extra = pre.parse_known_args(head)
        if not extra:
            from commands.slide_render import main as render_main

            return render_main((["--store", known.store] if known.store else []) + rest)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from server.slide_catalogue import CatalogueError
    from imaging.pyramid import PyramidError
    from imaging.tilesource import SlideFormatError
    from server.slide_tiers import TierMoveError

    try:
        return args.fn(args)
    except (CatalogueError, PyramidError, SlideFormatError, TierMoveError, OSError,
            ValueError) as e:
        print(f"{args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
