"""The quarantine: files whose SOP Instance UID is already stored with other content.

Such a file is never dropped and never stored over the instance (nor the other way
round). The ingest (:mod:`server.ingest`) keeps it here instead::

    STORE/quarantine/ab/<sha256>.dcm      the file, bit for bit (atomic write, checked)

with one row in the catalogue's ``quarantine`` table: the file's SOP Instance UID, the
stored instance it conflicts with (its original's SHA-256), the reason with what differs
(header attributes by keyword, pixel data identical or not), where it came from and when.
While a row is open the stored instance is marked ``conflict`` in the series image rows
(``/api/series/{uid}/images``) and the viewer shows it.

An administrator resolves an entry (``medview-server quarantine resolve``):

* ``keep``: the stored instance stays; the quarantined file stays here, marked kept.
* ``replace``: the stored instance's original file is first kept here too (an entry in
  state ``replaced``), then the instance is removed and the quarantined file imported in
  its place. Re-running an interrupted ``replace`` completes it.
* ``new-uid``: the quarantined file is imported as a new instance under a fresh SOP
  Instance UID; the copy records the original UID in its Source Image Sequence
  (ReferencedSOPInstanceUID, with the SOP class) and the entry records both UIDs. The
  quarantined file itself stays unchanged.

Every entry and every resolution is written to the audit log.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from imaging.dicom import has_preamble

from .catalogue import utc_now
from .store import Store, StoreError, sha256_hex

QUARANTINE_DIR = "quarantine"
CONFLICT_REASON = "SOP Instance UID already stored with different content"
ACTIONS = ("keep", "replace", "new-uid")

_COLS = ("pk", "SOPInstanceUID", "stored_sop_instance_uid", "stored_sha256", "relpath",
         "sha256", "size", "reason", "differences", "source_path", "received_at", "state",
         "resolved_at", "resolution", "new_sop_instance_uid")

AuditFn = Callable[[str, "str | None", str, dict], None]


class QuarantineError(Exception):
    """An entry cannot be resolved as asked (the message says why; nothing changed)."""


@dataclass
class Entry:
    id: int
    sop_instance_uid: str
    stored_sop_instance_uid: str
    stored_sha256: str | None
    relpath: str
    sha256: str
    size: int
    reason: str
    differences: list[str] = field(default_factory=list)
    source_path: str | None = None
    received_at: str = ""
    state: str = "open"
    resolved_at: str | None = None
    resolution: str | None = None
    new_sop_instance_uid: str | None = None

    @classmethod
    def from_row(cls, row: tuple) -> "Entry":
        d = dict(zip(_COLS, row))
        d["id"] = d.pop("pk")
        d["sop_instance_uid"] = d.pop("SOPInstanceUID")
        d["differences"] = json.loads(d["differences"]) if d["differences"] else []
        return cls(**d)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def relpath_for(sha256: str) -> str:
    return f"{QUARANTINE_DIR}/{sha256[:2]}/{sha256}.dcm"


def _db(store: Store):
    return store.catalogue.db


def entries(store: Store, state: str | None = None) -> list[Entry]:
    """Entries, oldest first (``state``: open, kept, replaced, imported; None: all)."""
    sql = f"SELECT {', '.join(_COLS)} FROM quarantine"
    params: list[Any] = []
    if state is not None:
        sql += " WHERE state = ?"
        params.append(state)
    return [Entry.from_row(r) for r in _db(store).all(sql + " ORDER BY pk", params)]


def get(store: Store, entry_id: int) -> Entry | None:
    row = _db(store).one(f"SELECT {', '.join(_COLS)} FROM quarantine WHERE pk = ?",
                         [int(entry_id)])
    return None if row is None else Entry.from_row(row)


def _keep_file(store: Store, data: bytes) -> tuple[str, str]:
    """Write the bytes into the quarantine folder atomically and check them back."""
    sha = sha256_hex(data)
    rel = relpath_for(sha)
    if store.check_file(rel, sha, len(data)) is None:
        return rel, sha
    store.atomic_write(rel, data)
    problem = store.check_file(rel, sha, len(data))
    if problem:
        raise StoreError(f"quarantine copy {rel} does not read back: {problem}")
    return rel, sha


def _insert(store: Store, *, sop: str, stored_sop: str, stored_sha: str | None, rel: str,
            sha: str, size: int, reason: str, differences: list[str],
            source_path: str | None, state: str = "open",
            resolution: str | None = None) -> Entry:
    db = _db(store)
    now = utc_now()
    with db.transaction():
        (pk,) = db.one(
            "INSERT INTO quarantine (SOPInstanceUID, stored_sop_instance_uid, stored_sha256, "
            "relpath, sha256, size, reason, differences, source_path, received_at, state, "
            "resolved_at, resolution) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING pk",
            [sop, stored_sop, stored_sha, rel, sha, size, reason, json.dumps(differences),
             source_path, now, state, now if state != "open" else None, resolution])
    return get(store, pk)


def add(store: Store, data: bytes, sop: str, *, source_path: str | None = None) -> Entry:
    """Keep a file whose SOP Instance UID ``sop`` is stored with other content; returns
    its entry (the existing open one when the same file is already quarantined)."""
    sha = sha256_hex(data)
    row = _db(store).one(f"SELECT {', '.join(_COLS)} FROM quarantine WHERE sha256 = ? AND "
                         "SOPInstanceUID = ? AND state = 'open'", [sha, sop])
    if row is not None:
        return Entry.from_row(row)
    existing = store.catalogue.find_instance(sop)
    rel, sha = _keep_file(store, data)
    differences = describe_differences(store, existing, data)
    what = "; ".join(differences)
    reason = f"{CONFLICT_REASON}" + (f": {what}" if what else "")
    return _insert(store, sop=sop, stored_sop=sop,
                   stored_sha=existing["original_sha256"] if existing else None, rel=rel,
                   sha=sha, size=len(data), reason=reason, differences=differences,
                   source_path=source_path)


def _parse(data: bytes):
    """The header of a file that ingest already read once (its checks passed), or of the
    stored original: pydicom, with ``force`` for a file without the preamble."""
    import pydicom

    return pydicom.dcmread(io.BytesIO(data), force=not has_preamble(data))


def describe_differences(store: Store, existing: dict | None, data: bytes) -> list[str]:
    """What differs between the stored instance's original and the newcomer: header
    attributes by keyword (values are not repeated: they may identify a patient) and the
    pixel data."""
    if existing is None:
        return ["the stored instance is gone (removed since)"]
    try:
        old_bytes = store.read_verified(existing["original_relpath"],
                                        existing["original_sha256"],
                                        existing.get("original_size"))
    except Exception as e:  # noqa: BLE001 - archived, or damaged: say so
        return [f"stored original not readable here ({type(e).__name__}); compare by hand"]
    try:
        old, new = _parse(old_bytes), _parse(data)
    except Exception as e:  # noqa: BLE001
        return [f"cannot compare: {getattr(e, 'reason', e)}"]
    from pydicom.datadict import keyword_for_tag

    pixel_tags = {0x7FE00010, 0x7FE00008, 0x7FE00009}
    changed: list[str] = []
    for tag in sorted(set(old.keys()) | set(new.keys())):
        if tag in pixel_tags:
            continue
        name = keyword_for_tag(tag) or f"({tag.group:04X},{tag.elem:04X})"
        if tag not in old:
            changed.append(f"{name} (added)")
        elif tag not in new:
            changed.append(f"{name} (removed)")
        else:
            try:
                same = old[tag].value == new[tag].value
            except Exception:  # noqa: BLE001
                same = False
            if not same:
                changed.append(name)
    out = []
    if changed:
        shown = ", ".join(changed[:12])
        more = f" and {len(changed) - 12} more" if len(changed) > 12 else ""
        out.append(f"header differs in {shown}{more}")
    else:
        out.append("header identical")
    ots = str(old.file_meta.get("TransferSyntaxUID", "")) if hasattr(old, "file_meta") else ""
    nts = str(new.file_meta.get("TransferSyntaxUID", "")) if hasattr(new, "file_meta") else ""
    opx = old.get("PixelData")
    npx = new.get("PixelData")
    if ots != nts:
        out.append(f"transfer syntax differs ({ots} stored, {nts} new): pixel data "
                   "encoded differently")
    elif opx == npx:
        out.append("pixel data identical")
    else:
        out.append("pixel data differs")
    return out


def _set_state(store: Store, entry_id: int, state: str, resolution: str,
               new_uid: str | None = None) -> None:
    db = _db(store)
    with db.transaction():
        db.execute("UPDATE quarantine SET state = ?, resolved_at = ?, resolution = ?, "
                   "new_sop_instance_uid = ? WHERE pk = ?",
                   [state, utc_now(), resolution, new_uid, int(entry_id)])
