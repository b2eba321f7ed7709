"""Diagnosis status and diagnostic information, stored with the images (SPEC V5, V6).

* Status 1-5 per study (1 unread, 2 read, 3 notes, 4 annotations, 5 report; the names
  come from the site policy). A study without a row is unread. Every change is kept in
  ``study_status_history`` (who, when, from what, why).
* Notes (free text), annotations (a shape and an optional measurement in full-resolution
  image coordinates on one image of a series) and the report (one per study) are *items*.
  An item is never overwritten in place: every creation, edit and deletion appends a
  revision (``diag_revision``), so the full history stays readable; the item row holds the
  current revision. Edits name the revision they start from (``base_rev``); a stale one
  is refused (HTTP 409), so two readers never silently overwrite each other.
* With ``auto_advance``, writing a note, an annotation or the report raises the status to
  at least 3, 4 or 5 (never lowers it); the change is recorded like any other.

Annotation body (JSON)::

    {"series": "<Series UID>", "image": "<SOP Instance UID>/<frame>",
     "shape": "point" | "line" | "polyline" | "polygon" | "rect" | "ellipse" | "text",
     "points": [[x, y], ...],          # full-resolution pixels (x = column, y = row)
     "label": "text shown with it",
     "measurement": {"kind": "distance", "value": 12.5, "unit": "mm"} | null}

No HTTP here; the routes in :mod:`server.app` call these methods.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from .dbutil import Db

KINDS = ("note", "annotation", "report")
STATUS_FOR_KIND = {"note": 3, "annotation": 4, "report": 5}
SHAPES = {"point": (1, 1), "text": (1, 1), "line": (2, 2), "rect": (2, 2), "ellipse": (2, 2),
          "polyline": (2, 10_000), "polygon": (3, 10_000)}
MAX_TEXT = 200_000

_DDL = [
    "CREATE TABLE IF NOT EXISTS study_status ("
    " study_uid TEXT PRIMARY KEY, status INTEGER NOT NULL CHECK (status BETWEEN 1 AND 5),"
    " changed_by TEXT, changed_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS study_status_history ("
    " id {PK}, study_uid TEXT NOT NULL, status INTEGER NOT NULL,"
    " previous INTEGER NOT NULL, changed_by TEXT, changed_at REAL NOT NULL, comment TEXT)",
    "CREATE INDEX IF NOT EXISTS study_status_history_study ON study_status_history (study_uid)",
    "CREATE TABLE IF NOT EXISTS diag_item ("
    " id {PK}, study_uid TEXT NOT NULL,"
    " kind TEXT NOT NULL CHECK (kind IN ('note', 'annotation', 'report')),"
    " series_uid TEXT, image_key TEXT, rev INTEGER NOT NULL,"
    " deleted INTEGER NOT NULL DEFAULT 0, body TEXT NOT NULL,"
    " created_by TEXT, created_at REAL NOT NULL, updated_by TEXT, updated_at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS diag_item_study ON diag_item (study_uid, kind)",
    "CREATE UNIQUE INDEX IF NOT EXISTS diag_item_report ON diag_item (study_uid) "
    "WHERE kind = 'report'",
    "CREATE TABLE IF NOT EXISTS diag_revision ("
    " item_id INTEGER NOT NULL REFERENCES diag_item(id) ON DELETE CASCADE,"
    " rev INTEGER NOT NULL, action TEXT NOT NULL, body TEXT NOT NULL, author TEXT,"
    " at REAL NOT NULL, PRIMARY KEY (item_id, rev))",
]
_ITEM_COLS = ("id", "study_uid", "kind", "series_uid", "image_key", "rev", "deleted", "body",
              "created_by", "created_at", "updated_by", "updated_at")


class DiagnosisError(ValueError):
    """A bad or conflicting diagnosis request; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int = 400, **extra):
        super().__init__(message)
        self.status = status
        self.extra = extra


def _finite(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise DiagnosisError(f"coordinates and values must be finite numbers, got {v!r}")
    return float(v)


def _text(body: dict, key: str = "text", required: bool = True) -> str:
    v = body.get(key, "" if not required else None)
    if not isinstance(v, str) or (required and not v.strip()):
        raise DiagnosisError(f"{key!r} must be a non-empty string" if required
                             else f"{key!r} must be a string")
    if len(v) > MAX_TEXT:
        raise DiagnosisError(f"{key!r} is longer than {MAX_TEXT} characters")
    return v


def validate_body(kind: str, body: Any) -> dict:
    """The stored form of an item body, or :class:`DiagnosisError` saying what is wrong."""
    if not isinstance(body, dict):
        raise DiagnosisError("the body must be a JSON object")
    if kind in ("note", "report"):
        return {"text": _text(body)}
    if kind != "annotation":
        raise DiagnosisError(f"unknown kind {kind!r}")
    shape = body.get("shape")
    if shape not in SHAPES:
        raise DiagnosisError(f"shape must be one of {', '.join(SHAPES)}")
    pts = body.get("points")
    lo, hi = SHAPES[shape]
    if not isinstance(pts, list) or not lo <= len(pts) <= hi:
        raise DiagnosisError(f"a {shape} needs {lo}" + (f"-{hi}" if hi != lo else "")
                             + " points [x, y]")
    points = []
    for p in pts:
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise DiagnosisError("each point is [x, y] in full-resolution pixels")
        points.append([_finite(p[0]), _finite(p[1])])
    for key in ("series", "image"):
        if not isinstance(body.get(key), str) or not body[key]:
            raise DiagnosisError(f"an annotation names its {key} "
                                 "(Series Instance UID; image = '<SOP Instance UID>/<frame>')")
    out = {"series": body["series"], "image": body["image"], "shape": shape, "points": points,
           "label": _text(body, "label", required=False) if "label" in body else ""}
    m = body.get("measurement")
    if m is not None:
        if not isinstance(m, dict) or not isinstance(m.get("kind"), str):
            raise DiagnosisError('measurement is {"kind": ..., "value": number, "unit": ...}')
        out["measurement"] = {"kind": m["kind"], "value": _finite(m.get("value")),
                              "unit": str(m.get("unit", ""))}
    else:
        out["measurement"] = None
    return out


class DiagnosisRecords:
    """Status and diagnostic items of studies, in the catalogue database."""

    def __init__(self, db_path: str | Path, clock=time.time) -> None:
        self.db = Db(db_path, component="diagnosis", migrations={1: _DDL})
        self.clock = clock

    def close(self) -> None:
        self.db.close()

    # ---------------------------------------------------------------- status
    def status(self, study_uid: str) -> int:
        row = self.db.one("SELECT status FROM study_status WHERE study_uid = ?", (study_uid,))
        return int(row[0]) if row else 1

    def status_row(self, study_uid: str) -> dict:
        row = self.db.one("SELECT status, changed_by, changed_at FROM study_status "
                          "WHERE study_uid = ?", (study_uid,))
        if row is None:
            return {"status": 1, "changed_by": None, "changed_at": None}
        return {"status": int(row[0]), "changed_by": row[1], "changed_at": row[2]}

    def set_status(self, study_uid: str, status: int, user: str, comment: str | None = None,
                   *, only_raise: bool = False) -> tuple[int, int]:
        """Set the status (1-5); returns (previous, new). ``only_raise`` never lowers it."""
        if isinstance(status, bool) or not isinstance(status, int) or not 1 <= status <= 5:
            raise DiagnosisError("status must be an integer 1-5")
        with self.db.transaction():
            prev = self.status(study_uid)
            new = max(prev, status) if only_raise else status
            if new == prev and self.db.one("SELECT 1 FROM study_status WHERE study_uid = ?",
                                           (study_uid,)) is not None:
                return prev, new
            now = self.clock()
            self.db.execute("INSERT INTO study_status(study_uid, status, changed_by, changed_at) "
                            "VALUES (?,?,?,?) ON CONFLICT(study_uid) DO UPDATE SET "
                            "status = excluded.status, changed_by = excluded.changed_by, "
                            "changed_at = excluded.changed_at", (study_uid, new, user, now))
            self.db.execute("INSERT INTO study_status_history(study_uid, status, previous, "
                            "changed_by, changed_at, comment) VALUES (?,?,?,?,?,?)",
                            (study_uid, new, prev, user, now, comment))
        return prev, new

    def status_history(self, study_uid: str) -> list[dict]:
        return [{"status": s, "previous": p, "changed_by": u, "changed_at": t, "comment": c}
                for s, p, u, t, c in self.db.all(
                    "SELECT status, previous, changed_by, changed_at, comment FROM "
                    "study_status_history WHERE study_uid = ? ORDER BY id", (study_uid,))]

    # ---------------------------------------------------------------- items
    def _item(self, row) -> dict:
        d = dict(zip(_ITEM_COLS, row))
        body = json.loads(d.pop("body"))
        out = {"id": d["id"], "kind": d["kind"], "study": d["study_uid"], "rev": d["rev"],
               "deleted": bool(d["deleted"]), "created_by": d["created_by"],
               "created_at": d["created_at"], "updated_by": d["updated_by"],
               "updated_at": d["updated_at"]}
        out.update(body)
        return out

    def get(self, item_id: int) -> dict:
        row = self.db.one(f"SELECT {', '.join(_ITEM_COLS)} FROM diag_item WHERE id = ?", (item_id,))
        if row is None:
            raise DiagnosisError(f"no diagnostic item {item_id}", 404)
        return self._item(row)

    def items(self, study_uid: str, kind: str | None = None, *, series: str | None = None,
              include_deleted: bool = False) -> list[dict]:
        sql = f"SELECT {', '.join(_ITEM_COLS)} FROM diag_item WHERE study_uid = ?"
        params: list = [study_uid]
        if kind is not None:
            sql += " AND kind = ?"
            params.append(kind)
        if series is not None:
            sql += " AND (series_uid = ? OR series_uid IS NULL)"
            params.append(series)
        if not include_deleted:
            sql += " AND deleted = 0"
        return [self._item(r) for r in self.db.all(sql + " ORDER BY id", params)]

    def _revise(self, item_id: int, rev: int, action: str, body: dict, user: str, now: float) -> None:
        self.db.execute("INSERT INTO diag_revision(item_id, rev, action, body, author, at) "
                        "VALUES (?,?,?,?,?,?)",
                        (item_id, rev, action, json.dumps(body, separators=(",", ":")), user, now))

    def add(self, study_uid: str, kind: str, body: Any, user: str) -> dict:
        """Create a note or an annotation, or the study's report (if it has none yet)."""
        if kind not in KINDS:
            raise DiagnosisError(f"kind must be one of {', '.join(KINDS)}")
        body = validate_body(kind, body)
        now = self.clock()
        with self.db.transaction():
            if kind == "report":
                row = self.db.one("SELECT id, rev FROM diag_item WHERE study_uid = ? AND "
                                  "kind = 'report'", (study_uid,))
                if row is not None:
                    raise DiagnosisError("the study already has a report: edit it", 409,
                                         id=row[0], rev=row[1])
            (item_id,) = self.db.one(
                "INSERT INTO diag_item(study_uid, kind, series_uid, image_key, rev, body,"
                " created_by, created_at, updated_by, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)"
                " RETURNING id",
                (study_uid, kind, body.get("series"), body.get("image"), 1,
                 json.dumps(body, separators=(",", ":")), user, now, user, now))
            self._revise(item_id, 1, "create", body, user, now)
        return self.get(item_id)

    def edit(self, item_id: int, body: Any, user: str, base_rev: int | None) -> dict:
        """Replace an item's content; ``base_rev`` must be its current revision."""
        now = self.clock()
        with self.db.transaction():
            cur = self.get(item_id)
            if cur["deleted"]:
                raise DiagnosisError(f"item {item_id} is deleted", 409, rev=cur["rev"])
            self._check_rev(cur, base_rev)
            body = validate_body(cur["kind"], body)
            rev = cur["rev"] + 1
            self.db.execute("UPDATE diag_item SET rev = ?, body = ?, series_uid = ?, image_key = ?,"
                            " updated_by = ?, updated_at = ? WHERE id = ?",
                            (rev, json.dumps(body, separators=(",", ":")), body.get("series"),
                             body.get("image"), user, now, item_id))
            self._revise(item_id, rev, "edit", body, user, now)
        return self.get(item_id)

    def delete(self, item_id: int, user: str, base_rev: int | None) -> dict:
        """Mark an item deleted (its history stays)."""
        now = self.clock()
        with self.db.transaction():
            cur = self.get(item_id)
            if cur["deleted"]:
                return cur
            self._check_rev(cur, base_rev)
            rev = cur["rev"] + 1
            row = self.db.one("SELECT body FROM diag_item WHERE id = ?", (item_id,))
            self.db.execute("UPDATE diag_item SET rev = ?, deleted = 1, updated_by = ?, "
                            "updated_at = ? WHERE id = ?", (rev, user, now, item_id))
            self._revise(item_id, rev, "delete", json.loads(row[0]), user, now)
        return self.get(item_id)

    @staticmethod
    def _check_rev(cur: dict, base_rev: int | None) -> None:
        if base_rev is None:
            raise DiagnosisError("base_rev (the revision you edited) is required", 400,
                                 rev=cur["rev"])
        if int(base_rev) != cur["rev"]:
            raise DiagnosisError(f"item {cur['id']} changed meanwhile (now revision "
                                 f"{cur['rev']}, you edited {base_rev}): reload it", 409,
                                 rev=cur["rev"], current=cur)

    def history(self, item_id: int) -> list[dict]:
        self.get(item_id)
        return [{"rev": rev, "action": action, "author": author, "at": at, **json.loads(body)}
                for rev, action, body, author, at in self.db.all(
                    "SELECT rev, action, body, author, at FROM diag_revision WHERE item_id = ? "
                    "ORDER BY rev", (item_id,))]

    def record(self, study_uid: str, *, series: str | None = None) -> dict:
        """Everything diagnostic about a study (annotations limited to ``series`` if given)."""
        st = self.status_row(study_uid)
        report = self.items(study_uid, "report")
        return {"study": study_uid, **st,
                "notes": self.items(study_uid, "note"),
                "annotations": self.items(study_uid, "annotation", series=series),
                "report": report[0] if report else None}
