"""The one consistency check of a store: every catalogued file (hot store and archive)
present with its recorded size and SHA-256, and the orphans; ``repair`` deletes orphans
only (a row with a damaged file needs a human, or a re-ingest of the original).

It sits above :mod:`server.store` and :mod:`server.tiers` (the store no longer
imports the tier engine to check itself).
"""
from __future__ import annotations

from .store import FsckReport, Store, StoreError
from .tiers import tier_fsck


def fsck(store: Store, repair: bool = False) -> FsckReport:
    """Check every catalogued file and list orphans; ``repair`` deletes orphans only.

    Files moved to the archive (:mod:`server.tiers`) are checked there, and
    orphans in the archive are listed (as ``archive:<key>``) and repaired too.

    Run it while nothing ingests into the store: a file written by an ingest that has
    not committed yet looks like an orphan.
    """
    report = FsckReport()
    refs = store.catalogue.file_refs()
    # tiered storage: archived files are checked in the archive (server.tiers)
    refs = tier_fsck(store, refs, report, repair)
    referenced = set()
    for rel, sha, size, sop in refs:
        referenced.add(rel)
        report.checked += 1
        problem = store.check_file(rel, sha, size)
        if problem is None:
            continue
        if problem == "file is missing":
            report.missing.append((rel, sop, problem))
        else:
            report.damaged.append((rel, sop, problem))
    hot_orphans = sorted(rel for rel in store.iter_files() if rel not in referenced)
    report.orphans.extend(hot_orphans)
    if repair:
        for rel in hot_orphans:
            try:
                store.delete_file(rel)
                report.removed.append(rel)
            except (OSError, StoreError):
                pass
    return report

