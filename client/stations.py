"""A reading station (W7): a configured name and cache folder (no Qt).

The server assigns pathology exams to stations (``medview-slide station NAME --cache-dir
DIR``, ``assign ACCESSION NAME``) and ``distribute`` copies their slides ahead of time
into the station's cache folder, one verified pyramid folder per slide
(``<cache>/<slide_uid>/``). The viewer started as ``medview --station NAME`` shows the
station's worklist (``GET /api/stations/{station}/worklist``: the exams assigned to it,
with the slides the user may browse) and opens each slide from the cache first:

* from the cache (:class:`~client.slides.LocalSlide`) when the folder is there, its
  manifest's SHA-256 is the one the server catalogued, it names the same slide, and the
  user's rights on the slide are unlimited — every tile is still checked (CRC-32 of the
  manifest) as it is read;
* from the server (:class:`~client.slides.RemoteSlide`, within the user's rights)
  otherwise, with the reason in plain words (not distributed yet, damaged or different
  copy, rights limited).

The cache folder is the one configured for the station on the server unless the station
gives its own (``--station-cache DIR``: the same folder mounted elsewhere).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from client.slides import LocalSlide, RemoteSlide
from imaging.pyramid import MANIFEST, StoredSlide

log = logging.getLogger("medview.stations")

__all__ = ["Station", "Opened"]


@dataclass
class Opened:
    """A slide opened for the station: its provider, where from (``cache``/``server``)
    and why (plain words)."""

    provider: object
    source: str
    reason: str


class Station:
    """One reading station of a server (blocking calls: use from a worker)."""

    def __init__(self, session, name: str, cache_dir: str | Path | None = None,
                 packet_cache=None) -> None:
        if not name or "/" in name:
            raise ValueError(f"a station name is a plain name, not {name!r}")
        self.session = session
        self.name = name
        self.own_cache_dir = Path(cache_dir) if cache_dir else None
        self.server_cache_dir: Path | None = None
        self.packet_cache = packet_cache

    @property
    def cache_dir(self) -> Path | None:
        return self.own_cache_dir or self.server_cache_dir

    def worklist(self) -> list[dict]:
        """The exams assigned to the station that the user may see (newest assignment
        last), each with ``slides``; every slide gets ``cached`` (True when the
        pre-distributed copy is in place)."""
        from urllib.parse import quote

        body = self.session.get_json(f"/api/stations/{quote(self.name, safe='')}/worklist")
        if body.get("cache_dir"):
            self.server_cache_dir = Path(body["cache_dir"])
        exams = body.get("exams") or []
        for e in exams:
            for s in e.get("slides") or []:
                s["cached"] = self.cached_copy(s)[0] is not None
        return exams

    def cached_copy(self, slide: dict) -> tuple[Path | None, str]:
        """(the pre-distributed folder of ``slide`` when it can be used, why not)."""
        uid = slide.get("slide_uid") or ""
        if self.cache_dir is None:
            return None, "this station has no cache folder"
        if not uid or "/" in uid or uid.startswith("."):
            return None, f"slide UID {uid!r} cannot name a folder"
        folder = self.cache_dir / uid
        try:
            man = (folder / MANIFEST).read_bytes()
        except OSError:
            return None, "not in the station's cache (not distributed yet)"
        if hashlib.sha256(man).hexdigest() != slide.get("manifest_sha256"):
            return None, "the cached copy differs from the server's (damaged or replaced)"
        return folder, ""

    def open(self, slide: dict) -> Opened:
        """Open one worklist slide: the station's cache first, else the server."""
        folder, why = self.cached_copy(slide)
        if folder is not None and not slide.get("unlimited"):
            folder, why = None, "your rights on this slide are limited: read within them"
        if folder is not None:
            try:
                stored = StoredSlide.open(folder)
                if stored.uid != slide["slide_uid"]:
                    raise ValueError(f"the cached folder holds slide {stored.uid}")
                return Opened(LocalSlide(stored, slide), "cache",
                              f"opened from the station's cache {folder}")
            except Exception as e:  # noqa: BLE001 - the server still has it
                why = f"the cached copy cannot be read ({e})"
                log.warning("station %s, slide %s: %s", self.name, slide["slide_uid"], why)
        prov = RemoteSlide(self.session, slide["slide_uid"], cache=self.packet_cache)
        return Opened(prov, "server", f"opened from the server: {why}")
