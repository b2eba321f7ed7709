"""The slide store: tier folders, the slide catalogue, ingest with QC.

Layout (``root`` is ``<image store>/slides``; the slide tables are in the store's
``catalogue.sqlite``, :mod:`server.slide_catalogue`)::

    root/
      tiers.json                optional: tier folders and ages (TierConfig)
      qc.json                   optional: QC thresholds (imaging.qc.QCThresholds)
      recent/<slide_uid>/       pyramid folders (imaging.pyramid), one tier each
      mid/<slide_uid>/
      long/<slide_uid>/
      temp/<slide_uid>/         generated (super-resolved) tiles, purged at discharge

Tier folders may be anywhere (another disk, a mounted archive): ``tiers.json`` says
where. The catalogue records the tier and the folder name; the absolute path is
``TierConfig.root(tier) / path``.

Ingest: the pyramid is written to a staging folder in its tier and renamed into place,
QC runs on the stored pyramid, then the slide row is committed (with its QC result, so a
flagged slide is visible at once). A crash before the commit leaves an orphan folder
that ``python -m commands.slide_cli fsck --repair`` removes; never a row without its data.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from imaging.pyramid import DEFAULT_TILE, MANIFEST, StoredSlide
from imaging.qc import QCThresholds, check_slide
from imaging.tilesource import TileSource, open_slide

from .slide_catalogue import (TIERS, CatalogueError, SlideCatalogue, age_days, now_iso,
                              upgrade_slide_catalogue)
from .slide_objects import SlideObjects, store_cache, store_objects
from .slide_pyramid import build_pyramid
from .database import CATALOGUE_NAME, database_of  # noqa: F401

log = logging.getLogger("medview.pathology")

UPLOAD_DIR = "uploading"   # pyramids built here before their upload to an object store
LOW_RES_MPP = 0.9      # coarser than this (below about 10x) a slide is stored as "low"


@dataclass
class TierConfig:
    """Where each tier lives and when slides move on.

    recent: patients in hospital, and slides younger than ``recent_days``;
    mid: younger than ``mid_days``; long: older. ``temp`` holds generated tiles.
    """

    root: Path
    folders: dict[str, str] = field(default_factory=dict)
    recent_days: float = 30.0
    mid_days: float = 365.0
    idle_seconds: float = 60.0        # the scheduler works after this much quiet

    @classmethod
    def load(cls, root: Path) -> "TierConfig":
        p = Path(root) / "tiers.json"
        if not p.is_file():
            return cls(Path(root))
        data = json.loads(p.read_text())
        known = {"folders", "recent_days", "mid_days", "idle_seconds"}
        bad = set(data) - known
        if bad:
            raise ValueError(f"unknown setting(s) in {p}: {', '.join(sorted(bad))}")
        return cls(Path(root), **data)

    def tier_root(self, tier: str) -> Path:
        if tier not in TIERS + ("temp",):
            raise ValueError(f"unknown tier {tier!r}")
        f = self.folders.get(tier)
        p = Path(f) if f else self.root / tier
        return p if p.is_absolute() else self.root / p

    def tier_for(self, patient_status: str | None, acquired_at: str | None,
                 now: float | None = None) -> str:
        if patient_status == "inpatient":
            return "recent"
        age = age_days(acquired_at, now)
        if age is None or age <= self.recent_days:
            return "recent"
        return "mid" if age <= self.mid_days else "long"

    def save(self) -> None:
        data = {"folders": self.folders, "recent_days": self.recent_days,
                "mid_days": self.mid_days, "idle_seconds": self.idle_seconds}
        (self.root / "tiers.json").write_text(json.dumps(data, indent=2))


class SlideStore:
    """A slides root: catalogue + tiers + ingest. Thread-safe for reads."""

    def __init__(self, root: str | Path, catalogue: str | Path | None = None) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        # the one catalogue: the image store's database (``root`` is ``<store>/slides``)
        self.catalogue_path = catalogue or database_of(self.root.parent)
        moved = upgrade_slide_catalogue(self.root, self.catalogue_path)
        if moved is not None:
            log.warning("slide catalogue moved into %s: %s", self.catalogue_path, moved)
        self.catalogue = SlideCatalogue(self.catalogue_path)
        self.config = TierConfig.load(self.root)
        self._opened: dict[tuple[str, str], StoredSlide] = {}
        # the image store's remote object store (S3), if it has one: the pyramids live
        # there (server.slide_objects), whatever the tier
        remote = store_objects(self.root.parent)
        self.objects: SlideObjects | None = (
            SlideObjects(remote, store_cache(self.root.parent)) if remote is not None else None)
        self.activity: Callable[[], None] = lambda: None   # set by the idle scheduler

    @classmethod
    def for_image_store(cls, store_root: str | Path) -> "SlideStore":
        return cls(Path(store_root) / "slides")

    def close(self) -> None:
        self.catalogue.close()

    def __enter__(self) -> "SlideStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ lookup
    def slide_dir(self, row: dict) -> Path:
        return self.config.tier_root(row["tier"]) / row["path"]

    def slide(self, ref: str | int) -> dict:
        row = self.catalogue.slide(ref)
        if row is None:
            raise CatalogueError(f"unknown slide {ref!r}")
        return row

    def open(self, ref: str | int) -> tuple[dict, StoredSlide]:
        """(catalogue row, the stored pyramid) of a slide, wherever its tier is."""
        row = self.slide(ref)
        key = (row["slide_uid"], row["tier"])
        st = self._opened.get(key)
        if st is None:
            st = (self.objects.open(row["path"], row["manifest_sha256"])
                  if self.objects is not None else StoredSlide.open(self.slide_dir(row)))
            if len(self._opened) > 64:
                self._opened.clear()
            self._opened[key] = st
        self.activity()
        return row, st

    def forget(self, slide_uid: str) -> None:
        for k in [k for k in self._opened if k[0] == slide_uid]:
            del self._opened[k]

    def qc_thresholds(self) -> QCThresholds:
        return QCThresholds.load(self.root / "qc.json")

    # ------------------------------------------------------------------ ingest
    def ingest(self, source: str | Path | TileSource, *, patient_id: str, accession: str,
               patient_name: str | None = None, patient_status: str | None = None,
               exam_date: str | None = None, label: str | None = None,
               stain: str | None = None, state: str | None = None,
               acquired_at: str | None = None, tile_size: int = DEFAULT_TILE,
               mpp: float | None = None, run_qc: bool = True,
               thresholds: QCThresholds | None = None, workers: int = 2,
               progress: Callable[[int, int], None] | None = None) -> dict:
        """Read a slide, store its pyramid in the right tier, check it, catalogue it."""
        src = source if isinstance(source, TileSource) else open_slide(source, mpp=mpp)
        own = not isinstance(source, TileSource)
        source_desc = src.source_path or (None if not own else str(source))
        try:
            if mpp is not None:
                src.mpp = (float(mpp), float(mpp))
            exam_pk = self.catalogue.ensure_exam(patient_id, accession, exam_date)
            if patient_name or patient_status:
                self.catalogue.ensure_patient(patient_id, patient_name, patient_status)
            pstatus = self.catalogue.patient(patient_id)["status"]
            acquired = acquired_at or src.acquired_at or now_iso()
            tier = self.config.tier_for(pstatus, acquired)
            if state is None:
                state = "low" if src.mpp and src.mpp[0] > LOW_RES_MPP else "high"
            # to an object store: built in a local upload folder, then uploaded
            dest = self.root / UPLOAD_DIR if self.objects is not None else self.config.tier_root(tier)
            res = build_pyramid(src, dest, tile_size=tile_size,
                                workers=workers, progress=progress,
                                extra={"state": state, "stain": stain, "label": label})
        finally:
            if own:
                src.close()
        uploaded = False
        try:
            if self.objects is not None:
                uploaded = True
                self.objects.upload(res.path, res.slide_uid)
            stored = StoredSlide.open(res.path)     # (the uploaded bytes, checked)
            qc = None
            if run_qc:
                qc = check_slide(stored, thresholds=thresholds or self.qc_thresholds(),
                                 stain=stain)
            man_sha = hashlib.sha256((res.path / MANIFEST).read_bytes()).hexdigest()
            pk = self.catalogue.add_slide(
                slide_uid=res.slide_uid, exam_pk=exam_pk, state=state, tier=tier,
                path=res.slide_uid, acquired_at=acquired, width=stored.width,
                height=stored.height, levels=len(stored.levels), tile_size=tile_size,
                mpp=stored.mpp, nbytes=res.bytes, manifest_sha256=man_sha, label=label,
                stain=stain, source=source_desc, qc=qc)
        except BaseException:
            import shutil

            shutil.rmtree(res.path, ignore_errors=True)    # never an uncatalogued pyramid
            if uploaded:
                try:
                    self.objects.delete(res.slide_uid)
                except Exception as e:  # noqa: BLE001 - left as orphans for fsck
                    log.error("slide %s: uploaded objects not removed (%s); fsck --repair "
                              "removes them", res.slide_uid, e)
            raise
        if self.objects is not None:
            import shutil

            shutil.rmtree(res.path, ignore_errors=True)    # the local copy of the upload
        log.info("slide %s ingested in %.1f s (%d tiles, %d bytes, tier %s, QC %s)",
                 res.slide_uid, res.seconds, res.tiles, res.bytes, tier,
                 "unchecked" if qc is None else (qc.get("flags") or "pass"))
        return self.catalogue.slide(pk)

    def recheck(self, ref: str | int, thresholds: QCThresholds | None = None) -> dict:
        row, st = self.open(ref)
        qc = check_slide(st, thresholds=thresholds or self.qc_thresholds(), stain=row.get("stain"))
        self.catalogue.set_qc(row["pk"], qc)
        return self.catalogue.slide(row["pk"])

    # ------------------------------------------------------------------ fsck
    def fsck(self, repair: bool = False) -> dict:
        """Every catalogued slide verified (SHA-256 of every file); folders that no
        row refers to listed as orphans (and removed with ``repair``)."""
        import shutil

        report = {"checked": 0, "damaged": {}, "orphans": [], "removed": []}
        known = {}
        for row in self.catalogue.slides():
            known[(row["tier"], row["path"])] = row
            report["checked"] += 1
            try:
                if self.objects is not None:
                    problems = self.objects.verify(row["path"], row["manifest_sha256"])
                else:
                    problems = StoredSlide.open(self.slide_dir(row)).verify()
            except Exception as e:  # noqa: BLE001
                problems = [str(e)]
            if problems:
                report["damaged"][row["slide_uid"]] = problems
        if self.objects is not None:
            paths = {p for _t, p in known}
            for uid in sorted(self.objects.uids() - paths):
                report["orphans"].append(self.objects.label(uid))
                if repair:
                    self.objects.delete(uid)
                    report["removed"].append(self.objects.label(uid))
            up = self.root / UPLOAD_DIR
            if up.is_dir():
                for d in sorted(up.iterdir()):
                    report["orphans"].append(str(d))
                    if repair:
                        shutil.rmtree(d, ignore_errors=True)
                        report["removed"].append(str(d))
        busy = {m["slide_pk"] for m in self.catalogue.open_moves()}
        for tier in TIERS:
            troot = self.config.tier_root(tier)
            if not troot.is_dir():
                continue
            for d in sorted(troot.iterdir()):
                if (tier, d.name) in known:
                    continue
                if busy and not d.name.startswith("."):
                    continue             # a move in progress may own it
                report["orphans"].append(str(d))
                if repair:
                    shutil.rmtree(d, ignore_errors=True)
                    report["removed"].append(str(d))
        return report


def slide_summary(row: dict) -> dict:
    """What a client may see of a catalogue row (no file-system paths)."""
    keep = ("pk", "slide_uid", "label", "stain", "state", "tier", "acquired_at", "ingested_at",
            "width", "height", "levels", "tile_size", "mpp", "bytes", "qc_status", "qc",
            "accession", "exam_date", "exam_description", "patient_id", "patient_name",
            "patient_status")
    return {k: row.get(k) for k in keep}
