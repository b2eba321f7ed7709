"""Slide pyramids in the image store's object store (an S3 bucket, issue 16).

When the image store keeps its data in a remote object store (``STORE/objects.json``,
:mod:`server.objects`), the slide store keeps its pyramids there too, one object per
file of the pyramid folder (:mod:`imaging.pyramid`)::

    slides/<slide_uid>/level-<k>.j2kp
    slides/<slide_uid>/assoc-<name>.png
    slides/<slide_uid>/manifest.json            uploaded last

— store-relative keys like the series' ``j2k/<series>/<sop>.<frame>.j2k``, each PUT
checked (size, MD5 ETag, SHA-256 metadata) before the next one, and the slide's row
committed only after the manifest is up: never a row without its objects. An upload
that dies leaves at worst objects no row refers to (orphans, listed and removed by the
slide ``fsck --repair``).

Tiles are HTTP range reads at the manifest's offsets (each checked by its CRC-32). A
level file no larger than :attr:`SlideObjects.whole_read_max` is read whole instead,
checked against its SHA-256 and kept in the store's local :class:`ReadCache` (and a
small in-memory cache), as the series' whole codestreams are.

The bucket is the one place of every slide tier: the tier of a slide stays a catalogue
fact (policy, ages), a tier move does not move its objects (see
:mod:`server.slide_tiers`).
"""
from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

from imaging.files import write_atomic
from imaging.pyramid import FORMAT, MANIFEST, PyramidError, StoredSlide

from . import faults
from .objects import ObjectError, ObjectMissing, ObjectStore, ReadCache, open_objects
from .store import sha256_hex

PREFIX = "slides"


def store_objects(store_root: str | Path) -> ObjectStore | None:
    """The remote object store an image store records in ``objects.json`` (None: the
    store keeps its data on its own disk)."""
    from .store import OBJECTS_FILE

    rec = Path(store_root) / OBJECTS_FILE
    if not rec.is_file():
        return None
    try:
        recorded = json.loads(rec.read_text())
    except ValueError as e:
        raise ObjectError(f"{rec} is not JSON: {e}") from None
    endpoint = os.environ.get("MEDVIEW_S3_ENDPOINT") or recorded.get("endpoint")
    objects = open_objects(recorded["url"], endpoint=endpoint)
    return objects if objects.remote else None


def store_cache(store_root: str | Path) -> ReadCache | None:
    """The image store's local read cache of remote objects (None: disabled)."""
    from .store import READ_CACHE_BYTES, READ_CACHE_DIR

    budget = int(os.environ.get("MEDVIEW_READ_CACHE_BYTES", READ_CACHE_BYTES))
    return ReadCache(Path(store_root) / READ_CACHE_DIR, budget) if budget > 0 else None


class SlideObjects:
    """The slide pyramids in a remote object store (see the module text)."""

    whole_read_max = 1 << 20          # level files up to this size are read whole
    MEMORY_BYTES = 64 << 20           # whole level files kept in memory

    def __init__(self, objects: ObjectStore, cache: ReadCache | None = None) -> None:
        self.objects = objects
        self.cache = cache
        self._mem: OrderedDict[str, bytes] = OrderedDict()
        self._mem_bytes = 0
        self._lock = threading.Lock()
        self.range_reads = 0

    @staticmethod
    def key(uid: str, name: str) -> str:
        return f"{PREFIX}/{uid}/{name}"

    def label(self, uid: str) -> str:
        return f"{self.objects.url}/{PREFIX}/{uid}"

    # ------------------------------------------------------------------ writing
    def upload(self, folder: Path, uid: str) -> str:
        """Put every file of a local pyramid folder, manifest last (each PUT checked
        by the object store before the next); returns the manifest's SHA-256."""
        man_bytes = (folder / MANIFEST).read_bytes()
        manifest = json.loads(man_bytes)
        st = StoredSlide(folder, manifest)
        for f in st.files():
            self._put(uid, f["file"], (folder / f["file"]).read_bytes(), f["sha256"])
        man_sha = sha256_hex(man_bytes)
        self._put(uid, MANIFEST, man_bytes, man_sha)
        return man_sha

    def _put(self, uid: str, name: str, data: bytes, sha: str) -> None:
        if sha256_hex(data) != sha:
            raise PyramidError(f"{name} of slide {uid} changed before its upload")
        faults.point("objects.put")
        self.objects.put(self.key(uid, name), data)      # checked: size, MD5, SHA-256

    def delete(self, uid: str) -> int:
        """Remove every object of a slide; returns how many there were."""
        n = 0
        for k in list(self.objects.keys(f"{PREFIX}/{uid}")):
            n += bool(self.objects.delete(k))
        return n

    # ------------------------------------------------------------------ reading
    def open(self, uid: str, manifest_sha256: str | None = None) -> StoredSlide:
        """The stored pyramid of a slide, its tiles read from the object store."""
        try:
            man_bytes = self.objects.get(self.key(uid, MANIFEST))
        except ObjectMissing:
            raise PyramidError(f"{self.label(uid)} holds no slide pyramid (no {MANIFEST})") from None
        except ObjectError as e:
            raise PyramidError(f"cannot read the manifest of slide {uid}: {e}") from None
        if manifest_sha256 and sha256_hex(man_bytes) != manifest_sha256:
            raise PyramidError(f"the manifest of slide {uid} does not match the catalogue")
        try:
            m = json.loads(man_bytes)
        except ValueError as e:
            raise PyramidError(f"the manifest of slide {uid} is not JSON: {e}") from None
        if m.get("format") != FORMAT:
            raise PyramidError(f"slide {uid}: unknown pyramid format {m.get('format')!r}")
        files = {f["file"]: f for f in StoredSlide(uid, m, lambda *a: b"").files()}
        return StoredSlide(self.label(uid), m, self._reader(uid, files))

    def _reader(self, uid: str, files: dict[str, dict]):
        def read(name: str, offset: int, length: int) -> bytes:
            f = files.get(name)
            if f is not None and f["size"] <= self.whole_read_max:
                data = self._whole(uid, f)
                return data[offset:offset + length]
            self.range_reads += 1
            try:
                return self.objects.get_range(self.key(uid, name), offset, offset + length)
            except ObjectMissing:
                raise PyramidError(f"{self.label(uid)}/{name} is missing") from None
            except ObjectError as e:
                raise PyramidError(f"cannot read {name} of slide {uid}: {e}") from None
        return read

    def _whole(self, uid: str, f: dict) -> bytes:
        sha = f["sha256"]
        with self._lock:
            data = self._mem.get(sha)
            if data is not None:
                self._mem.move_to_end(sha)
                return data
        data = self.cache.get(sha, f["size"]) if self.cache is not None else None
        if data is None:
            try:
                data = self.objects.get(self.key(uid, f["file"]))
            except ObjectMissing:
                raise PyramidError(f"{self.label(uid)}/{f['file']} is missing") from None
            except ObjectError as e:
                raise PyramidError(f"cannot read {f['file']} of slide {uid}: {e}") from None
            if len(data) != f["size"] or sha256_hex(data) != sha:
                raise PyramidError(f"{self.label(uid)}/{f['file']} is damaged (size or "
                                   "SHA-256 differs from the manifest)")
            if self.cache is not None:
                self.cache.put(sha, data)
        with self._lock:
            if sha not in self._mem:
                self._mem[sha] = data
                self._mem_bytes += len(data)
            while self._mem_bytes > self.MEMORY_BYTES and len(self._mem) > 1:
                _k, old = self._mem.popitem(last=False)
                self._mem_bytes -= len(old)
        return data

    # ------------------------------------------------------------------ checking
    def verify(self, uid: str, manifest_sha256: str | None = None) -> list[str]:
        """Problems of a stored slide (missing objects, wrong size or SHA-256), read from
        the object store itself (never the read cache); empty when intact."""
        try:
            st = self.open(uid, manifest_sha256)
        except PyramidError as e:
            return [str(e)]
        problems = []
        for f in st.files():
            try:
                data = self.objects.get(self.key(uid, f["file"]))
            except ObjectMissing:
                problems.append(f"{f['file']}: missing")
                continue
            except ObjectError as e:
                problems.append(f"{f['file']}: cannot read: {e}")
                continue
            if len(data) != f["size"]:
                problems.append(f"{f['file']}: {len(data)} bytes, manifest says {f['size']}")
            elif sha256_hex(data) != f["sha256"]:
                problems.append(f"{f['file']}: SHA-256 mismatch")
        return problems

    def fetch_into(self, uid: str, folder: Path, manifest_sha256: str | None = None) -> None:
        """Write the files of a stored slide into the local ``folder``, each checked
        against the manifest, the manifest last (a staging folder of
        :func:`server.slide_tiers.copy_verified`, which verifies and renames it)."""
        st = self.open(uid, manifest_sha256)
        for f in st.files():
            write_atomic(folder / f["file"], self._whole(uid, f), sync_dir=False)
        write_atomic(folder / MANIFEST, self.objects.get(self.key(uid, MANIFEST)), sync_dir=False)

    def uids(self) -> set[str]:
        """Every slide UID that has objects in the store."""
        return {k.split("/")[1] for k in self.objects.keys(PREFIX) if k.count("/") >= 2}
