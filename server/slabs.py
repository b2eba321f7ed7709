"""A series offered as a slab pyramid through the packet protocol (P10: thick to thin).

The images of a series (one grey-level frame each, one size, one orientation, one
rescale) are sorted along the slice normal, decoded losslessly, and turned into a slab
pyramid by :mod:`codestream.slabs` (integer average/difference along the slice axis).
Every band image — the thickest slabs first, then the details level by level — is encoded
like any stored frame (layered, precinct-partitioned, lossless last layer) and becomes one
JPIP component of a *slab target*. A client asks for the thick slabs, then for the
details that make them thinner; nothing is sent twice, the total is close to the plain
series (the details of neighbouring slices compress well), and the thin slices come back
bit for bit.

The routes (``/api/series/{series}/slabs``, ``/jpip/slabs/{series}``) are
:mod:`server.slab_routes`.

The pyramid is built on first use and kept under ``STORE/derived/slabs/<series>/``
(written atomically, manifest last, each file checked by SHA-256 when read). The folder
is a cache outside ``originals/`` and ``j2k/``: deleting it only costs a rebuild, and
``fsck`` does not look at it. A pyramid whose source frames changed is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass

import numpy as np

from codestream import slabs as transform
from codestream.encode import EncodeError, decode_full, encode_frame
from codestream.index import PacketIndex

from .packets import ImageSource, RequestError
from .store import StoreError, safe_component

log = logging.getLogger("medview.slabs")

__all__ = ["SlabUnavailable", "SlabSeries", "SlabCatalogue", "DERIVED_DIR"]

DERIVED_DIR = "derived/slabs"
MANIFEST = "manifest.json"
FORMAT = 1


class SlabUnavailable(RequestError):
    """The series cannot be offered as a slab pyramid (with the reason)."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message, status=status)


@dataclass
class SlabSeries:
    """A built pyramid: the layout JSON and the packet sources of its band images."""

    series_uid: str
    layout: dict
    sources: list[ImageSource]


def _normal(orientation) -> np.ndarray:
    r = np.asarray(orientation[:3], float)
    c = np.asarray(orientation[3:6], float)
    n = np.cross(r, c)
    return n / np.linalg.norm(n)


class SlabCatalogue:
    """Builds, caches and serves the slab pyramids of a server's series."""

    def __init__(self, srv) -> None:
        self.srv = srv
        self.store = srv.store
        self._lock = threading.Lock()
        self._series_locks: dict[str, threading.Lock] = {}
        self._built: dict[str, SlabSeries] = {}

    # ------------------------------------------------------------------ public
    def get(self, series_uid: str) -> SlabSeries:
        """The pyramid of a series (built on first use; rebuilt when the series changed)."""
        rows = self.srv.catalogue.series_images(series_uid)
        if not rows:
            raise SlabUnavailable(f"unknown series {series_uid}", status=404)
        fingerprint = hashlib.sha256(
            "|".join(r["codestream_sha256"] for r in rows).encode()).hexdigest()
        with self._lock:
            lock = self._series_locks.setdefault(series_uid, threading.Lock())
        with lock:
            have = self._built.get(series_uid)
            if have is not None and have.layout["pyramid"]["fingerprint"] == fingerprint:
                return have
            built = self._load(series_uid, fingerprint) or self._build(series_uid, rows, fingerprint)
            self._built[series_uid] = built
            return built

    # ------------------------------------------------------------------ building
    def _folder(self, series_uid: str) -> str:
        return f"{DERIVED_DIR}/{safe_component(series_uid)}"

    def _check(self, rows: list[dict]) -> tuple[list[int], dict]:
        """Validate the series; returns the thin-slice order (series image indices along
        the normal) and the common pixel facts."""
        if len(rows) < 2:
            raise SlabUnavailable("a slab pyramid needs at least 2 images")
        first = rows[0]
        for r in rows:
            if (r.get("SamplesPerPixel") or 1) != 1:
                raise SlabUnavailable("colour images cannot form slabs")
            if (r["Rows"], r["Columns"]) != (first["Rows"], first["Columns"]):
                raise SlabUnavailable("the images differ in size")
            if not r.get("ImagePositionPatient") or not r.get("ImageOrientationPatient"):
                raise SlabUnavailable("an image has no position or orientation")
            if not np.allclose(r["ImageOrientationPatient"], first["ImageOrientationPatient"], atol=1e-3):
                raise SlabUnavailable("the images differ in orientation")
            if ((r.get("RescaleSlope") or 1.0), (r.get("RescaleIntercept") or 0.0)) != (
                    (first.get("RescaleSlope") or 1.0), (first.get("RescaleIntercept") or 0.0)):
                raise SlabUnavailable("the images differ in rescale slope/intercept")
            if bool(r["signed"]) != bool(first["signed"]):
                raise SlabUnavailable("signed and unsigned images are mixed")
        n = _normal(first["ImageOrientationPatient"])
        order = sorted(range(len(rows)), key=lambda k: float(np.dot(rows[k]["ImagePositionPatient"], n)))
        facts = {"signed": bool(first["signed"]), "bits_stored": int(first["bits_stored"]),
                 "rows": int(first["Rows"]), "columns": int(first["Columns"]),
                 "rescale": [float(first.get("RescaleSlope") or 1.0),
                             float(first.get("RescaleIntercept") or 0.0)]}
        return order, facts

    def _build(self, series_uid: str, rows: list[dict], fingerprint: str) -> SlabSeries:
        order, facts = self._check(rows)
        srcs = {s.csn: s for s in self.srv.sources(series_uid)}
        stack = np.empty((len(order), facts["rows"], facts["columns"]), np.int32)
        for t, csn in enumerate(order):
            r = rows[csn]
            src = srcs[csn]
            # the whole codestream: recalled from the archive when its lossless layers
            # were migrated (tiered storage), else as stored
            load = getattr(src, "recall", None) or src.load
            stack[t] = decode_full(load(), r["offset"], bool(r["signed"]),
                                   bits_stored=int(r["bits_stored"]))
        slab_levels = transform.default_levels(len(order))
        pyr = transform.forward(stack, slab_levels)
        folder = self._folder(series_uid)
        images, files = [], []
        for comp, (kind, slab_level, slab, img) in enumerate(pyr.bands()):
            lo, hi = int(img.min()), int(img.max())
            signed = kind == "high" or facts["signed"] or lo < 0
            bits = min(16, facts["bits_stored"] + (1 if kind == "high" else 0))
            if (signed and (lo < -32768 or hi > 32767)) or hi - lo > 65535:
                raise SlabUnavailable("the slice differences need more than 16 bits")
            try:
                enc = encode_frame(img, signed=signed, bits_stored=bits)
            except EncodeError as e:
                raise SlabUnavailable(f"band {kind} {slab_level}/{slab} cannot be encoded: "
                                      f"{e}") from e
            rel = f"{folder}/{fingerprint[:16]}.{comp}.j2k"
            sha = self.store.atomic_write(rel, enc.codestream)
            files.append({"path": rel, "sha256": sha, "size": len(enc.codestream)})
            images.append(self._image_dict(series_uid, fingerprint, comp, kind, slab_level, slab,
                                           len(order), enc.index, enc.offset, signed, bits,
                                           facts))
        slab_counts, detail_counts = transform.counts(len(order), slab_levels)
        pyramid = {
            "format": FORMAT, "fingerprint": fingerprint, "levels": slab_levels,
            "count": len(order),
            "order": order, "bands": [[im["band"], im["level"], im["slab"]] for im in images],
            "slab_counts": slab_counts, "detail_counts": detail_counts,
            "total_bytes": sum(im["total_bytes"] for im in images),
            "series_bytes": sum(srcs[c].index.total_bytes for c in srcs),
            **facts,
        }
        layout = {"series": self.srv.catalogue.get_series(series_uid) or {"SeriesInstanceUID": series_uid},
                  "images": images, "pyramid": pyramid}
        manifest = {"layout": layout, "files": files}
        self.store.atomic_write(f"{folder}/{MANIFEST}", json.dumps(manifest).encode())
        log.info("slab pyramid of %s: %d images, %d levels, %d bytes (series %d bytes)", series_uid,
                 len(order), slab_levels, pyramid["total_bytes"], pyramid["series_bytes"])
        return self._series(series_uid, manifest)

    def _image_dict(self, series_uid, fingerprint, comp, kind, slab_level, slab, n,
                    ix: PacketIndex, offset, signed, bits, facts) -> dict:
        """The facts of one band image (JSON: ``level`` is its slab level, ``slab`` the
        slab it holds or splits)."""
        start, stop = transform.slab_span(n, slab_level, slab)   # the slab it holds or splits
        return {
            "index": comp, "key": f"{series_uid}#slabs/{fingerprint[:16]}/{comp}",
            "band": kind, "level": slab_level, "slab": slab, "span": [start, stop],
            "Rows": facts["rows"], "Columns": facts["columns"], "SamplesPerPixel": 1,
            "PhotometricInterpretation": "MONOCHROME2", "frame": 1,
            "RescaleSlope": facts["rescale"][0], "RescaleIntercept": facts["rescale"][1],
            "offset": offset, "signed": int(signed), "bits_stored": bits,
            "numres": ix.numres, "nlayers": ix.nlayers, "ncomp": ix.ncomp,
            "total_bytes": ix.total_bytes,
            "layer_bytes": [ix.bytes_at(q + 1, ix.numres - 1) for q in range(ix.nlayers)],
        }

    def _load(self, series_uid: str, fingerprint: str) -> SlabSeries | None:
        try:
            manifest = json.loads(self.store.read_file(f"{self._folder(series_uid)}/{MANIFEST}"))
        except (OSError, ValueError, StoreError):
            return None
        pyr = manifest.get("layout", {}).get("pyramid", {})
        if pyr.get("fingerprint") != fingerprint or pyr.get("format") != FORMAT:
            return None
        for f in manifest["files"]:
            if self.store.check_file(f["path"], f["sha256"], f["size"]) is not None:
                log.warning("slab pyramid of %s is damaged (%s): rebuilding", series_uid, f["path"])
                return None
        return self._series(series_uid, manifest)

    def _series(self, series_uid: str, manifest: dict) -> SlabSeries:
        sources = []
        for comp, (f, im) in enumerate(zip(manifest["files"], manifest["layout"]["images"])):
            data = self.store.read_verified(f["path"], f["sha256"], f["size"])
            sources.append(ImageSource(comp, im["key"], PacketIndex.parse(data),
                                       self._loader(f["path"], f["sha256"], f["size"])))
        return SlabSeries(series_uid, manifest["layout"], sources)

    def _loader(self, rel: str, sha: str, size: int):
        def load() -> bytes:
            return self.store.read_verified(rel, sha, size)
        return load


# --------------------------------------------------------------------------- rights
def allowed_bands(layout: dict, images: set[int] | None) -> set[int] | None:
    """The band images (slab components) a grant limited to series ``images`` may see:
    those whose slab holds only allowed images (a slab mixes every thin slice of its
    span); None = all of them."""
    if images is None:
        return None
    order = layout["pyramid"]["order"]
    return {im["index"] for im in layout["images"]
            if all(order[t] in images for t in range(*im["span"]))}


def slab_grant(grant, layout: dict):
    """The grant on the slab target: the series grant with its image ranges translated
    into the band images it allows (:func:`allowed_bands`)."""
    if grant is None or getattr(grant, "images", None) is None:
        return grant
    import dataclasses

    return dataclasses.replace(grant, images=allowed_bands(layout, grant.images))


def visible_layout(layout: dict, images: set[int] | None) -> dict:
    """The layout as a user limited to series ``images`` sees it: only the band images
    they may fetch."""
    bands = allowed_bands(layout, images)
    if bands is None:
        return layout
    return {**layout, "images": [im for im in layout["images"] if im["index"] in bands],
            "rights": {"allowed_bands": sorted(bands)}}
