"""Slide tiers (W3): recent / mid / long, the temporary tier, and the idle-time mover.

Policy (:meth:`server.slide_store.TierConfig.tier_for`): a slide of a patient in hospital
stays in ``recent``; otherwise by age of acquisition, ``recent`` up to ``recent_days``,
``mid`` up to ``mid_days``, then ``long``. Generated tiles (super-resolution) live in
``temp`` and are purged when the patient is discharged.

A move never loses data — copy, verify, commit, delete:

1. a ``tier_move`` row is journalled (``copying``);
2. every file is copied into ``<dest tier>/.incoming-<uid>-…`` (fsynced, manifest last);
3. the copy is verified: every file's SHA-256 and size against the manifest, and the
   manifest's own SHA-256 against the catalogue;
4. the copy is renamed into place and, in one transaction, the slide row gets its new
   tier and the journal row becomes ``committed``;
5. only then is the source folder deleted, and the journal row becomes ``done``.

When the image store keeps its data in an object store (S3, :mod:`server.slide_objects`)
the bucket is the one place of every tier, as the series' hot store is: a move verifies
the slide's objects and records the new tier (journalled the same way); no bytes move.

:meth:`SlideTiers.recover` (run before every batch) finishes what a crash interrupted: a
``copying`` move had not committed, so its partial copy is deleted and the source — still
what the catalogue points at — is kept; a ``committed`` move deletes the leftover source
once the destination is verified. Fault points for crash tests (``MEDVIEW_FAULTS``, see
:mod:`server.faults`): ``slide-move.copied``, ``slide-move.renamed``,
``slide-move.committed``; in-process tests may set :attr:`SlideTiers.fault` instead.

:class:`server.jobs.SlideTierJob` runs :meth:`SlideTiers.run_once` in the server's
one job scheduler, one slide at a time, only after ``idle_seconds`` without slide
activity, and stops between two moves as soon as someone is working again.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from server import faults

from server.slide_catalogue import TIERS
from imaging.pyramid import MANIFEST, StoredSlide, fsync_dir, verify_folder
from server.slide_store import SlideStore

log = logging.getLogger("medview.server.slide_tiers")


class TierMoveError(RuntimeError):
    """A move failed; the source is intact and still catalogued."""


@dataclass
class TierReport:
    moved: list[tuple[str, str, str]] = field(default_factory=list)   # uid, from, to
    failed: list[tuple[str, str]] = field(default_factory=list)       # uid, reason
    recovered: list[str] = field(default_factory=list)
    purged_tiles: int = 0
    stopped_early: bool = False

    def summary(self) -> str:
        return (f"{len(self.moved)} moved, {len(self.failed)} failed, "
                f"{len(self.recovered)} recovered, {self.purged_tiles} generated tiles purged"
                + (" (stopped: activity)" if self.stopped_early else ""))


def _copy_file(src: Path, dst: Path) -> None:
    with open(src, "rb") as fi, open(dst, "xb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
        fo.flush()
        os.fsync(fo.fileno())


def copy_verified(src_dir: Path | None, dst_dir: Path, manifest_sha256: str | None = None,
                  fault: Callable[[str, Path], None] | None = None,
                  fill: Callable[[Path], None] | None = None) -> None:
    """Copy a pyramid folder to ``dst_dir`` (which must not exist) through a staging
    folder, verify it completely, then rename it into place. Raises TierMoveError
    (nothing left behind) when the copy does not verify. ``fill(staging)`` instead of
    ``src_dir``: writes the files itself (a download from the object store)."""
    if dst_dir.exists():
        raise TierMoveError(f"{dst_dir} exists already")
    dst_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = dst_dir.parent / f".incoming-{dst_dir.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        if fill is not None:
            fill(staging)
        else:
            names = sorted(p.name for p in src_dir.iterdir() if p.is_file() and p.name != MANIFEST)
            for n in names + [MANIFEST]:
                _copy_file(src_dir / n, staging / n)
        fsync_dir(staging)
        if fault:
            fault("copied", staging)
        faults.point("slide-move.copied")
        man_bytes = (staging / MANIFEST).read_bytes()
        if manifest_sha256 and hashlib.sha256(man_bytes).hexdigest() != manifest_sha256:
            raise TierMoveError("the copied manifest does not match the catalogue")
        problems = verify_folder(staging, StoredSlide.open(staging).manifest)
        if problems:
            raise TierMoveError("the copy does not verify: " + "; ".join(problems))
        os.rename(staging, dst_dir)
        fsync_dir(dst_dir.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class SlideTiers:
    """Moves slides between tiers and purges the temporary tier."""

    def __init__(self, store: SlideStore) -> None:
        self.store = store
        self.cat = store.catalogue
        self.fault: Callable[[str, Path], None] | None = None   # tests: raise at a point
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ policy
    def plan(self, now: float | None = None) -> list[tuple[dict, str]]:
        """(slide row, tier it should be in) for every slide in the wrong tier."""
        out = []
        for row in self.cat.slides():
            want = self.store.config.tier_for(row["patient_status"], row["acquired_at"], now)
            if want != row["tier"]:
                out.append((row, want))
        return out

    # ------------------------------------------------------------------ one move
    def move(self, ref: str | int, to_tier: str) -> dict:
        """Move one slide (copy, verify, commit, delete); returns the new row."""
        if to_tier not in TIERS:
            raise ValueError(f"tier must be one of {', '.join(TIERS)}")
        with self._lock:
            row = self.store.slide(ref)
            if row["tier"] == to_tier:
                return row
            # in the image store's object store (S3) the bucket is the one place of every
            # tier: the move checks the objects and records the new tier, nothing is copied
            objects = self.store.objects
            src = self.store.slide_dir(row)
            dst = self.store.config.tier_root(to_tier) / row["path"]
            move = self.cat.begin_move(row["pk"], row["tier"], to_tier)
            try:
                if objects is not None:
                    problems = objects.verify(row["path"], row["manifest_sha256"])
                    if problems:
                        raise TierMoveError("the slide's objects do not verify (not moved): "
                                            + "; ".join(problems))
                elif not src.is_dir():
                    raise TierMoveError(f"the slide folder {src} is missing")
                else:
                    problems = StoredSlide.open(src).verify()
                    if problems:
                        raise TierMoveError("the source does not verify (not moved): "
                                            + "; ".join(problems))
                    if dst.exists():          # left by an earlier, interrupted attempt
                        shutil.rmtree(dst)
                    copy_verified(src, dst, row["manifest_sha256"], self.fault)
                    faults.point("slide-move.renamed")
                    if self.fault:
                        self.fault("renamed", dst)
            except BaseException as e:
                if isinstance(e, Exception):
                    self.cat.end_move(move, "failed", str(e))
                raise
            with self.cat.db.transaction():
                self.cat.set_tier(row["pk"], to_tier, row["path"])
                self.cat.db.execute("UPDATE tier_move SET state = 'committed' WHERE pk = ?", [move])
            self.store.forget(row["slide_uid"])
            if objects is not None:
                where = objects.objects.url
                self.cat.end_move(move, "done", f"in place: the objects stay in {where}")
                log.info("slide %s: tier %s -> %s (objects stay in %s)", row["slide_uid"],
                         row["tier"], to_tier, where)
                return self.store.slide(row["pk"])
            faults.point("slide-move.committed")
            if self.fault:
                self.fault("committed", dst)
            shutil.rmtree(src)
            fsync_dir(src.parent)
            self.cat.end_move(move, "done")
            log.info("slide %s moved %s -> %s", row["slide_uid"], row["tier"], to_tier)
            return self.store.slide(row["pk"])

    # ------------------------------------------------------------------ recovery
    def recover(self) -> list[str]:
        """Finish or roll back moves a crash interrupted; returns the slide UIDs."""
        done = []
        for m in self.cat.open_moves():
            row = self.cat.slide(m["slide_pk"])
            if row is None:
                continue
            uid = row["slide_uid"]
            if self.store.objects is not None:   # moves in place: nothing to copy or remove
                self.cat.end_move(m["pk"], "done" if row["tier"] == m["to_tier"] else "failed",
                                  "interrupted; the objects stay where they are")
                self.store.forget(uid)
                done.append(uid)
                continue
            src_root = self.store.config.tier_root(m["from_tier"])
            dst_root = self.store.config.tier_root(m["to_tier"])
            for root in (src_root, dst_root):
                if root.is_dir():
                    for p in root.glob(f".incoming-{row['path']}-*"):
                        shutil.rmtree(p, ignore_errors=True)
            if m["state"] == "copying":
                # not committed: the catalogue still points at the source; drop the copy
                if row["tier"] == m["from_tier"]:
                    stale = dst_root / row["path"]
                    if stale.exists() and stale != self.store.slide_dir(row):
                        shutil.rmtree(stale, ignore_errors=True)
                    self.cat.end_move(m["pk"], "failed", "interrupted before commit; source kept")
                else:
                    self.cat.end_move(m["pk"], "done", "recovered")
            else:   # committed: the destination is the slide; remove the leftover source
                here = self.store.slide_dir(row)
                problems = StoredSlide.open(here).verify() if here.is_dir() else ["missing"]
                old = src_root / row["path"]
                if problems:
                    log.error("slide %s: committed copy in %s does not verify (%s); the source "
                              "%s is kept", uid, here, problems, old)
                    self.cat.end_move(m["pk"], "failed", "; ".join(problems))
                    continue
                if old.exists() and old != here:
                    shutil.rmtree(old)
                self.cat.end_move(m["pk"], "done", "recovered after commit")
            self.store.forget(uid)
            done.append(uid)
        return done

    # ------------------------------------------------------------------ temp tier
    def purge_temp(self, patient_id: str | None = None) -> int:
        """Drop the generated tiles of discharged patients (or of ``patient_id``)."""
        n = 0
        for row in self.cat.slides(patient_id=patient_id):
            if patient_id is None and row["patient_status"] != "discharged":
                continue
            tiles = self.cat.temp_tiles([row["pk"]])
            d = self.store.config.tier_root("temp") / row["slide_uid"]
            if not tiles and not d.exists():
                continue
            self.cat.drop_temp_tiles(row["pk"])
            shutil.rmtree(d, ignore_errors=True)
            n += len(tiles)
        return n

    # ------------------------------------------------------------------ batches
    def run_once(self, *, max_moves: int | None = None, now: float | None = None,
                 should_stop: Callable[[], bool] = lambda: False) -> TierReport:
        rep = TierReport()
        rep.recovered = self.recover()
        rep.purged_tiles = self.purge_temp()
        for row, want in self.plan(now):
            if should_stop():
                rep.stopped_early = True
                break
            if max_moves is not None and len(rep.moved) >= max_moves:
                break
            try:
                self.move(row["pk"], want)
                rep.moved.append((row["slide_uid"], row["tier"], want))
            except (TierMoveError, OSError) as e:
                log.error("slide %s not moved: %s", row["slide_uid"], e)
                rep.failed.append((row["slide_uid"], str(e)))
        return rep
