"""The slide tables of the one catalogue: pathology exam → slide, under the same patients
as radiology (W4).

They live in the store's ``catalogue.sqlite`` beside the DICOM tables (one database, one
access layer: :class:`server.dbutil.Db`); WAL, ``foreign_keys=ON``.

Tables
------
``patient``        the catalogue's own patient table (PatientID, PatientName, ...), to
                   which the slide module adds ``status`` (``inpatient`` / ``outpatient``
                   / ``discharged``) and ``discharged_at``. A pathology patient is the
                   radiology patient with the same PatientID (and name, when given).
``exam``           one pathology exam (accession) of a patient; ``patient_pk`` REFERENCES
                   patient ON DELETE RESTRICT.
``slide``          one slide of an exam: ``state`` ``low`` / ``high`` (scanned at low
                   resolution — shown with super-resolution — or at high resolution),
                   ``tier`` ``recent`` / ``mid`` / ``long``, ``path`` (folder inside the
                   tier), ``acquired_at``, geometry, microns per pixel, QC result
                   (``qc_status`` ``pass`` / ``flagged`` / ``unchecked`` and the measures as
                   JSON); ``exam_pk`` REFERENCES exam ON DELETE RESTRICT.
``tier_move``      journal of tier moves (copy → verify → commit → delete) for recovery.
``temp_tile``      generated (super-resolved) tiles cached in the temporary tier;
                   ``slide_pk`` REFERENCES slide ON DELETE CASCADE.
``station``        reading stations and their cache folders; ``assignment`` says which
                   exams go to which station (both REFERENCES, CASCADE on delete of the
                   assignment's station or exam).

Every write is one transaction; a slide row is inserted only after its pyramid folder is
complete and durable (see :mod:`server.slide_store`).

Stores made before the one catalogue kept these tables (and a patient table of their own)
in ``slides/slides.sqlite``: :func:`upgrade_slide_catalogue` (``medview-server upgrade``,
also run when such a store is opened) moves every row into the catalogue in one
transaction, checks the counts, and keeps the old file as ``slides.sqlite.migrated``.
"""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from server.catalogue import Catalogue
from server.dbutil import Db, IntegrityError, ddl_for, is_postgres
from imaging.files import fsync_dir

TIERS = ("recent", "mid", "long")
STATES = ("low", "high")
PATIENT_STATUS = ("inpatient", "outpatient", "discharged")

_DDL = [
    "CREATE TABLE IF NOT EXISTS exam ("
    " pk {PK},"
    " patient_pk INTEGER NOT NULL REFERENCES patient(pk) ON DELETE RESTRICT,"
    " accession TEXT NOT NULL UNIQUE,"
    " exam_date TEXT,"
    " description TEXT)",
    "CREATE INDEX IF NOT EXISTS exam_patient ON exam(patient_pk)",
    "CREATE TABLE IF NOT EXISTS slide ("
    " pk {PK},"
    " slide_uid TEXT NOT NULL UNIQUE,"
    " exam_pk INTEGER NOT NULL REFERENCES exam(pk) ON DELETE RESTRICT,"
    " label TEXT,"
    " stain TEXT,"
    " state TEXT NOT NULL CHECK (state IN ('low', 'high')),"
    " tier TEXT NOT NULL CHECK (tier IN ('recent', 'mid', 'long')),"
    " path TEXT NOT NULL,"
    " acquired_at TEXT,"
    " ingested_at TEXT NOT NULL,"
    " width INTEGER NOT NULL, height INTEGER NOT NULL,"
    " levels INTEGER NOT NULL, tile_size INTEGER NOT NULL,"
    " mpp REAL,"
    " bytes INTEGER NOT NULL,"
    " manifest_sha256 TEXT NOT NULL,"
    " source TEXT,"
    " qc_status TEXT NOT NULL DEFAULT 'unchecked'"
    "   CHECK (qc_status IN ('pass', 'flagged', 'unchecked')),"
    " qc TEXT)",
    "CREATE INDEX IF NOT EXISTS slide_exam ON slide(exam_pk)",
    "CREATE TABLE IF NOT EXISTS tier_move ("
    " pk {PK},"
    " slide_pk INTEGER NOT NULL REFERENCES slide(pk) ON DELETE CASCADE,"
    " from_tier TEXT NOT NULL, to_tier TEXT NOT NULL,"
    " state TEXT NOT NULL CHECK (state IN ('copying', 'committed', 'done', 'failed')),"
    " started_at TEXT NOT NULL, finished_at TEXT, detail TEXT)",
    "CREATE TABLE IF NOT EXISTS temp_tile ("
    " slide_pk INTEGER NOT NULL REFERENCES slide(pk) ON DELETE CASCADE,"
    " key TEXT NOT NULL,"
    " path TEXT NOT NULL,"
    " sha256 TEXT NOT NULL,"
    " size INTEGER NOT NULL,"
    " created_at TEXT NOT NULL,"
    " PRIMARY KEY (slide_pk, key))",
    "CREATE TABLE IF NOT EXISTS station ("
    " pk {PK},"
    " name TEXT NOT NULL UNIQUE,"
    " cache_dir TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS assignment ("
    " station_pk INTEGER NOT NULL REFERENCES station(pk) ON DELETE CASCADE,"
    " exam_pk INTEGER NOT NULL REFERENCES exam(pk) ON DELETE CASCADE,"
    " assigned_at TEXT NOT NULL,"
    " distributed_at TEXT,"
    " PRIMARY KEY (station_pk, exam_pk))",
]


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class CatalogueError(ValueError):
    """A catalogue operation is refused (unknown patient, integrity rule...)."""


def _rows(cur) -> list[dict]:
    cols = [c[0] for c in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


# the columns the slide module adds to the catalogue's patient table
_PATIENT_COLUMNS = (
    ("status", "TEXT NOT NULL DEFAULT 'outpatient'"
               " CHECK (status IN ('inpatient', 'outpatient', 'discharged'))"),
    ("discharged_at", "TEXT"),
)
# the patient as the slide module sees it (the catalogue's columns under their old names)
_PATIENT_SELECT = ("SELECT pk, PatientID AS patient_id, NULLIF(PatientName, '') AS name,"
                   " status, discharged_at FROM patient")


def _add_patient_columns(db: Db) -> None:
    with db.transaction():
        have = set(db.columns("patient"))
        for name, decl in _PATIENT_COLUMNS:
            if name not in have:
                db.execute(f"ALTER TABLE patient ADD COLUMN {name} {decl}")


class SlideCatalogue:
    """The slide tables of the catalogue database at ``path`` (``catalogue.sqlite``)."""

    def __init__(self, path: str | Path) -> None:
        """``path``: the SQLite file or a PostgreSQL URL (server.database)."""
        self.path = path if is_postgres(path) else Path(path)
        if not is_postgres(path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        Catalogue(self.path).close()           # the catalogue's own schema (patients) first
        self.db = Db(self.path, component="slides",
                     migrations={1: _DDL, 2: _add_patient_columns,
                                 # the order in which exams were assigned (portable: no rowid)
                                 3: ["ALTER TABLE assignment ADD COLUMN seq INTEGER"]})

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ patients/exams
    def _patient_pk(self, patient_id: str, name: str | None, create: bool) -> int | None:
        """The catalogue patient with this ID (and name, when given). Several radiology
        patients may share an ID under different names (the catalogue keeps them apart);
        without a name that is ambiguous and refused rather than guessed."""
        rows = self.db.all("SELECT pk, PatientName FROM patient WHERE PatientID = ?",
                           [patient_id])
        if name:
            same = [r for r in rows if r[1] == name]
            if same:
                return same[0][0]
            unnamed = [r for r in rows if not r[1]]
            if unnamed:
                self.db.execute("UPDATE patient SET PatientName = ? WHERE pk = ?",
                                [name, unnamed[0][0]])
                return unnamed[0][0]
            if rows and not create:
                return None
        elif len(rows) == 1:
            return rows[0][0]
        elif len(rows) > 1:
            raise CatalogueError(
                f"several patients have the ID {patient_id!r} under different names "
                f"({', '.join(repr(r[1]) for r in rows)}): give the patient's name")
        if not create:
            return None
        return self.db.insert(
            "INSERT INTO patient(PatientID, PatientName, status) VALUES (?,?,?)",
            [patient_id, name or "", "outpatient"])

    def ensure_patient(self, patient_id: str, name: str | None = None,
                       status: str | None = None) -> int:
        if not patient_id:
            raise CatalogueError("a patient ID is required")
        if status is not None and status not in PATIENT_STATUS:
            raise CatalogueError(f"patient status must be one of {', '.join(PATIENT_STATUS)}")
        with self.db.transaction():
            pk = self._patient_pk(patient_id, name, create=True)
            if status is not None:
                self.set_patient_status(patient_id, status)
            return pk

    def set_patient_status(self, patient_id: str, status: str) -> None:
        """A patient's status is the person's: every catalogue row with the ID gets it."""
        if status not in PATIENT_STATUS:
            raise CatalogueError(f"patient status must be one of {', '.join(PATIENT_STATUS)}")
        with self.db.transaction():
            cur = self.db.execute(
                "UPDATE patient SET status = ?, discharged_at = ? WHERE PatientID = ?",
                [status, now_iso() if status == "discharged" else None, patient_id])
            if cur.rowcount == 0:
                raise CatalogueError(f"unknown patient {patient_id!r}")

    def ensure_exam(self, patient_id: str, accession: str, exam_date: str | None = None,
                    description: str | None = None) -> int:
        if not accession:
            raise CatalogueError("an accession number is required")
        with self.db.transaction():
            ppk = self.ensure_patient(patient_id)
            row = self.db.one("SELECT pk, patient_pk FROM exam WHERE accession = ?", [accession])
            if row:
                if row[1] != ppk:
                    raise CatalogueError(f"exam {accession} belongs to another patient")
                return row[0]
            return self.db.insert(
                "INSERT INTO exam(patient_pk, accession, exam_date, description) VALUES (?,?,?,?)",
                [ppk, accession, exam_date, description])

    def patient(self, patient_id: str) -> dict | None:
        r = _rows(self.db.execute(_PATIENT_SELECT + " WHERE PatientID = ? ORDER BY pk",
                                  [patient_id]))
        return r[0] if r else None

    def patients(self) -> list[dict]:
        """The patients that have pathology exams (radiology-only patients are the DICOM
        catalogue's business)."""
        return _rows(self.db.execute(
            _PATIENT_SELECT + " WHERE pk IN (SELECT patient_pk FROM exam) ORDER BY PatientID"))

    def delete_patient(self, patient_id: str) -> None:
        """Refused while the patient has exams (ON DELETE RESTRICT) or studies."""
        try:
            with self.db.transaction():
                if self.db.one("SELECT 1 FROM study st JOIN patient p ON p.pk = st.patient_pk"
                               " WHERE p.PatientID = ?", [patient_id]):
                    raise CatalogueError(f"patient {patient_id} still has radiology studies")
                self.db.execute("DELETE FROM patient WHERE PatientID = ?", [patient_id])
        except IntegrityError as e:
            raise CatalogueError(f"patient {patient_id} still has exams: {e}") from e

    # ------------------------------------------------------------------ slides
    def add_slide(self, *, slide_uid: str, exam_pk: int, state: str, tier: str, path: str,
                  acquired_at: str | None, width: int, height: int, levels: int,
                  tile_size: int, mpp: float | None, nbytes: int, manifest_sha256: str,
                  label: str | None = None, stain: str | None = None,
                  source: str | None = None, qc: dict | None = None) -> int:
        if state not in STATES:
            raise CatalogueError(f"state must be low or high, not {state!r}")
        if tier not in TIERS:
            raise CatalogueError(f"tier must be one of {', '.join(TIERS)}")
        qc_status = "unchecked" if qc is None else ("flagged" if qc.get("flags") else "pass")
        try:
            with self.db.transaction():
                return self.db.insert(
                    "INSERT INTO slide(slide_uid, exam_pk, label, stain, state, tier, path,"
                    " acquired_at, ingested_at, width, height, levels, tile_size, mpp, bytes,"
                    " manifest_sha256, source, qc_status, qc)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    [slide_uid, exam_pk, label, stain, state, tier, path, acquired_at,
                     now_iso(), width, height, levels, tile_size, mpp, nbytes,
                     manifest_sha256, source, qc_status,
                     json.dumps(qc) if qc is not None else None])
        except IntegrityError as e:
            raise CatalogueError(f"cannot catalogue slide {slide_uid}: {e}") from e

    _SLIDE_COLS = ("s.*, e.accession, e.exam_date, e.description AS exam_description,"
                   " p.PatientID AS patient_id, NULLIF(p.PatientName, '') AS patient_name,"
                   " p.status AS patient_status")
    _SLIDE_FROM = ("slide s JOIN exam e ON e.pk = s.exam_pk JOIN patient p ON p.pk = e.patient_pk")

    def _decode(self, rows: list[dict]) -> list[dict]:
        for r in rows:
            r["qc"] = json.loads(r["qc"]) if r.get("qc") else None
        return rows

    def slide(self, ref: str | int) -> dict | None:
        """A slide by UID or by its number (pk)."""
        key = "s.slide_uid"
        if isinstance(ref, int) or str(ref).isdigit():
            key, ref = "s.pk", int(ref)
            if not 0 < ref < 1 << 63:        # no such key (and no 64-bit overflow)
                return None
        rows = _rows(self.db.execute(f"SELECT {self._SLIDE_COLS} FROM {self._SLIDE_FROM} "
                                     f"WHERE {key} = ?", [ref]))
        return self._decode(rows)[0] if rows else None

    def slides(self, *, patient_id: str | None = None, accession: str | None = None,
               tier: str | None = None, flagged: bool | None = None) -> list[dict]:
        where, params = [], []
        for col, v in (("p.PatientID", patient_id), ("e.accession", accession), ("s.tier", tier)):
            if v is not None:
                where.append(f"{col} = ?")
                params.append(v)
        if flagged is not None:
            where.append("s.qc_status " + ("= 'flagged'" if flagged else "!= 'flagged'"))
        sql = f"SELECT {self._SLIDE_COLS} FROM {self._SLIDE_FROM}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return self._decode(_rows(self.db.execute(sql + " ORDER BY s.pk", params)))

    def set_qc(self, slide_pk: int, qc: dict) -> None:
        with self.db.transaction():
            self.db.execute("UPDATE slide SET qc = ?, qc_status = ? WHERE pk = ?",
                            [json.dumps(qc), "flagged" if qc.get("flags") else "pass", slide_pk])

    def set_tier(self, slide_pk: int, tier: str, path: str) -> None:
        if tier not in TIERS:
            raise CatalogueError(f"tier must be one of {', '.join(TIERS)}")
        with self.db.transaction():
            self.db.execute("UPDATE slide SET tier = ?, path = ? WHERE pk = ?", [tier, path, slide_pk])

    # ------------------------------------------------------------------ tier journal
    def begin_move(self, slide_pk: int, src: str, dst: str) -> int:
        with self.db.transaction():
            return self.db.insert(
                "INSERT INTO tier_move(slide_pk, from_tier, to_tier, state, started_at)"
                " VALUES (?,?,?,'copying',?)", [slide_pk, src, dst, now_iso()])

    def end_move(self, move_pk: int, state: str, detail: str | None = None) -> None:
        with self.db.transaction():
            self.db.execute("UPDATE tier_move SET state = ?, finished_at = ?, detail = ? WHERE pk = ?",
                            [state, now_iso(), detail, move_pk])

    def open_moves(self) -> list[dict]:
        return _rows(self.db.execute(
            "SELECT * FROM tier_move WHERE state IN ('copying', 'committed') ORDER BY pk"))

    def moves(self, slide_pk: int | None = None) -> list[dict]:
        if slide_pk is None:
            return _rows(self.db.execute("SELECT * FROM tier_move ORDER BY pk"))
        return _rows(self.db.execute("SELECT * FROM tier_move WHERE slide_pk = ? ORDER BY pk",
                                     [slide_pk]))

    # ------------------------------------------------------------------ temp tier
    def add_temp_tile(self, slide_pk: int, key: str, path: str, sha256: str, size: int) -> None:
        with self.db.transaction():
            self.db.execute("INSERT INTO temp_tile(slide_pk, key, path, sha256, size,"
                            " created_at) VALUES (?,?,?,?,?,?) ON CONFLICT (slide_pk, key) DO"
                            " UPDATE SET path = excluded.path, sha256 = excluded.sha256,"
                            " size = excluded.size, created_at = excluded.created_at",
                            [slide_pk, key, path, sha256, size, now_iso()])

    def temp_tile(self, slide_pk: int, key: str) -> dict | None:
        r = _rows(self.db.execute("SELECT * FROM temp_tile WHERE slide_pk = ? AND key = ?",
                                  [slide_pk, key]))
        return r[0] if r else None

    def temp_tiles(self, slide_pks: list[int] | None = None) -> list[dict]:
        if slide_pks is None:
            return _rows(self.db.execute("SELECT * FROM temp_tile"))
        if not slide_pks:
            return []
        q = ",".join("?" * len(slide_pks))
        return _rows(self.db.execute(f"SELECT * FROM temp_tile WHERE slide_pk IN ({q})", slide_pks))

    def drop_temp_tiles(self, slide_pk: int) -> None:
        with self.db.transaction():
            self.db.execute("DELETE FROM temp_tile WHERE slide_pk = ?", [slide_pk])

    # ------------------------------------------------------------------ stations
    def add_station(self, name: str, cache_dir: str) -> int:
        with self.db.transaction():
            row = self.db.one("SELECT pk FROM station WHERE name = ?", [name])
            if row:
                self.db.execute("UPDATE station SET cache_dir = ? WHERE pk = ?", [cache_dir, row[0]])
                return row[0]
            return self.db.insert("INSERT INTO station(name, cache_dir) VALUES (?,?)",
                                   [name, cache_dir])

    def station(self, name: str) -> dict | None:
        r = _rows(self.db.execute("SELECT * FROM station WHERE name = ?", [name]))
        return r[0] if r else None

    def stations(self) -> list[dict]:
        return _rows(self.db.execute("SELECT * FROM station ORDER BY name"))

    def assign(self, accession: str, station: str) -> None:
        with self.db.transaction():
            st = self.db.one("SELECT pk FROM station WHERE name = ?", [station])
            ex = self.db.one("SELECT pk FROM exam WHERE accession = ?", [accession])
            if st is None:
                raise CatalogueError(f"unknown reading station {station!r}")
            if ex is None:
                raise CatalogueError(f"unknown exam {accession!r}")
            self.db.execute("INSERT INTO assignment(station_pk, exam_pk, assigned_at, seq)"
                            " VALUES (?,?,?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM assignment))"
                            " ON CONFLICT DO NOTHING", [st[0], ex[0], now_iso()])

    def assignments(self, station: str | None = None, pending_only: bool = False) -> list[dict]:
        sql = ("SELECT st.name AS station, st.cache_dir, e.accession, e.pk AS exam_pk,"
               " a.assigned_at, a.distributed_at FROM assignment a"
               " JOIN station st ON st.pk = a.station_pk JOIN exam e ON e.pk = a.exam_pk")
        where, params = [], []
        if station:
            where.append("st.name = ?")
            params.append(station)
        if pending_only:
            where.append("a.distributed_at IS NULL")
        if where:
            sql += " WHERE " + " AND ".join(where)
        return _rows(self.db.execute(sql + " ORDER BY a.assigned_at, a.seq, a.exam_pk, a.station_pk", params))

    def mark_distributed(self, station: str, accession: str) -> None:
        with self.db.transaction():
            self.db.execute(
                "UPDATE assignment SET distributed_at = ? WHERE station_pk = (SELECT pk FROM"
                " station WHERE name = ?) AND exam_pk = (SELECT pk FROM exam WHERE accession = ?)",
                [now_iso(), station, accession])


def age_days(iso: str | None, now: float | None = None) -> float | None:
    if not iso:
        return None
    try:
        t = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return ((now or time.time()) - t.timestamp()) / 86400.0


# --------------------------------------------------------------------------- upgrade
LEGACY_FILE = "slides.sqlite"
# the patient table of the separate slide catalogue (stores made before the one catalogue)
LEGACY_PATIENT_DDL = (
    "CREATE TABLE IF NOT EXISTS patient ("
    " pk {PK},"
    " patient_id TEXT NOT NULL UNIQUE,"
    " name TEXT,"
    " status TEXT NOT NULL DEFAULT 'outpatient'"
    "   CHECK (status IN ('inpatient', 'outpatient', 'discharged')),"
    " discharged_at TEXT)")
# the separate SQLite slide catalogue of earlier versions (tests build one to upgrade)
LEGACY_DDL = [ddl_for("sqlite", s) for s in [LEGACY_PATIENT_DDL] + _DDL]


def upgrade_slide_catalogue(slides_root: str | Path, catalogue_path: str | Path) -> dict | None:
    """Move the separate slide catalogue ``slides_root/slides.sqlite`` into the catalogue
    database: one transaction, every row (patients joined to the catalogue's patients by
    PatientID and name), counts checked, then the old file is kept beside as
    ``slides.sqlite.migrated``. Idempotent: rows already moved (same slide UID and manifest
    checksum) are not copied twice; a slide UID present with another manifest is refused.
    Returns the counts moved, or None when there is nothing to upgrade."""
    legacy = Path(slides_root) / LEGACY_FILE
    if not legacy.is_file():
        return None
    old = _read_legacy(legacy)
    cat = SlideCatalogue(catalogue_path)
    try:
        with cat.db.transaction():
            move = _LegacyMove(cat, old)
            move.patients()
            move.exams()
            move.slides()
            move.tier_moves()
            move.temp_tiles()
            move.stations()
            move.assignments()
            move.check_arrived()
            moved = move.moved
    finally:
        cat.close()
    done = legacy.with_name(LEGACY_FILE + ".migrated")
    os.replace(legacy, done)
    for suffix in ("-wal", "-shm"):
        Path(str(legacy) + suffix).unlink(missing_ok=True)
    fsync_dir(legacy.parent)
    return moved


_LEGACY_TABLES = ("patient", "exam", "slide", "tier_move", "temp_tile", "station", "assignment")


def _read_legacy(legacy: Path) -> dict[str, list[dict]]:
    """Every row of the old slide catalogue's tables, in insertion order (a table it does
    not have: no rows)."""
    import sqlite3

    src = sqlite3.connect(str(legacy), timeout=30.0)
    try:
        src.row_factory = sqlite3.Row
        tables = {r[0] for r in src.execute("SELECT name FROM sqlite_master WHERE type='table'")}

        def rows(table: str) -> list[dict]:
            if table not in tables:
                return []
            return [dict(r) for r in src.execute(f"SELECT * FROM {table} ORDER BY rowid")]

        return {t: rows(t) for t in _LEGACY_TABLES}
    finally:
        src.close()                      # the last connection: SQLite checkpoints its WAL


class _LegacyMove:
    """The rows of the old slide catalogue copied into the catalogue database, table by
    table inside the caller's transaction; old primary keys mapped to the new ones, and
    ``moved`` counting what was copied (rows already there are not)."""

    def __init__(self, cat: "SlideCatalogue", old: dict[str, list[dict]]) -> None:
        self.cat = cat
        self.db = cat.db
        self.old = old
        self.moved = {t: 0 for t in old}
        self.patient_pk: dict = {}
        self.exam_pk: dict = {}
        self.slide_pk: dict = {}
        self.station_pk: dict = {}
        self.fresh: set = set()           # old slide pks copied now (their tier moves follow)

    def patients(self) -> None:
        """Joined to the catalogue's patients by PatientID and name."""
        for p in self.old["patient"]:
            pk = self.cat._patient_pk(p["patient_id"], p["name"], create=True)
            self.db.execute("UPDATE patient SET status = ?, discharged_at = ? WHERE pk = ?",
                            [p["status"], p["discharged_at"], pk])
            self.patient_pk[p["pk"]] = pk
            self.moved["patient"] += 1

    def exams(self) -> None:
        db = self.db
        for e in self.old["exam"]:
            have = db.one("SELECT pk, patient_pk FROM exam WHERE accession = ?",
                          [e["accession"]])
            if have is not None:
                if have[1] != self.patient_pk[e["patient_pk"]]:
                    raise CatalogueError(f"upgrade: exam {e['accession']} exists for "
                                         "another patient in the catalogue")
                self.exam_pk[e["pk"]] = have[0]
                continue
            self.exam_pk[e["pk"]] = db.insert(
                "INSERT INTO exam(patient_pk, accession, exam_date, description)"
                " VALUES (?,?,?,?)", [self.patient_pk[e["patient_pk"]], e["accession"],
                                      e["exam_date"], e["description"]])
            self.moved["exam"] += 1

    def slides(self) -> None:
        """Every column but the keys; a slide UID present with the same manifest is not
        copied twice, with another one refused."""
        db, old = self.db, self.old
        cols = [c for c in (old["slide"][0].keys() if old["slide"] else ())
                if c not in ("pk", "exam_pk")]
        for s in old["slide"]:
            have = db.one("SELECT pk, manifest_sha256 FROM slide WHERE slide_uid = ?",
                          [s["slide_uid"]])
            if have is not None:
                if have[1] != s["manifest_sha256"]:
                    raise CatalogueError(f"upgrade: slide {s['slide_uid']} is catalogued "
                                         "already with another manifest")
                self.slide_pk[s["pk"]] = have[0]
                continue
            self.slide_pk[s["pk"]] = db.insert(
                f"INSERT INTO slide(exam_pk, {', '.join(cols)}) VALUES "
                f"({', '.join('?' * (len(cols) + 1))})",
                [self.exam_pk[s["exam_pk"]]] + [s[c] for c in cols])
            self.fresh.add(s["pk"])
            self.moved["slide"] += 1

    def tier_moves(self) -> None:
        for m in self.old["tier_move"]:
            if m["slide_pk"] in self.fresh:
                self.db.execute("INSERT INTO tier_move(slide_pk, from_tier, to_tier, state,"
                                " started_at, finished_at, detail) VALUES (?,?,?,?,?,?,?)",
                                [self.slide_pk[m["slide_pk"]], m["from_tier"], m["to_tier"],
                                 m["state"], m["started_at"], m["finished_at"], m["detail"]])
                self.moved["tier_move"] += 1

    def temp_tiles(self) -> None:
        for t in self.old["temp_tile"]:
            cur = self.db.execute("INSERT INTO temp_tile(slide_pk, key, path, sha256,"
                                  " size, created_at) VALUES (?,?,?,?,?,?)"
                                  " ON CONFLICT DO NOTHING",
                                  [self.slide_pk[t["slide_pk"]], t["key"], t["path"],
                                   t["sha256"], t["size"], t["created_at"]])
            self.moved["temp_tile"] += cur.rowcount

    def stations(self) -> None:
        db = self.db
        for st in self.old["station"]:
            have = db.one("SELECT pk FROM station WHERE name = ?", [st["name"]])
            self.station_pk[st["pk"]] = have[0] if have else db.insert(
                "INSERT INTO station(name, cache_dir) VALUES (?,?)",
                [st["name"], st["cache_dir"]])
            self.moved["station"] += have is None

    def assignments(self) -> None:
        for a in self.old["assignment"]:
            cur = self.db.execute("INSERT INTO assignment(station_pk, exam_pk,"
                                  " assigned_at, distributed_at) VALUES (?,?,?,?)"
                                  " ON CONFLICT DO NOTHING",
                                  [self.station_pk[a["station_pk"]], self.exam_pk[a["exam_pk"]],
                                   a["assigned_at"], a["distributed_at"]])
            self.moved["assignment"] += cur.rowcount

    def check_arrived(self) -> None:
        """Nothing lost: every old slide is reachable in the catalogue."""
        for s in self.old["slide"]:
            if self.db.one("SELECT 1 FROM slide WHERE slide_uid = ?", [s["slide_uid"]]) is None:
                raise CatalogueError(f"upgrade: slide {s['slide_uid']} did not arrive")
