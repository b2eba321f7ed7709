"""Headless fetch: one packet request for a series, each image decoded to .npy.

Used by ``medview fetch``. Writes ``NNNN.npy`` per image (stored pixel values: the
codestream offset undone, before rescale) and ``images.json`` saying, per image, its SOP
Instance UID, frame, layers and resolution received, and bytes. Images are numbered from
1 in series order, as the viewer shows them ("Im: N / total") and as ``medview snapshot
--slice N`` takes them: ``0001.npy`` is image 1 (``"image": 1``; ``"codestream"`` is the
0-based JPIP codestream number of the protocol).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from .cache import PacketCache
from .series import Callbacks, ImageProgress, SeriesData
from .session import Session


def fetch_series(session: Session, series_uid: str, out_dir: str | Path, *,
                 layers: int | None = None, level: int | None = None,
                 region: tuple[int, int, int, int] | None = None,
                 cache: PacketCache | None = None, order: str = "quality",
                 log: Callable[[str], None] = lambda s: None) -> dict:
    """``level`` is the resolution reduction (0 = full resolution, as OpenJPEG's reduce)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = SeriesData(session, cache, series_uid)
    received: dict[int, int] = {}

    def on_image(p: ImageProgress) -> None:
        received[p.csn] = p.received

    def on_announce(m: dict) -> None:
        log(f"announced: {m['bytes']} bytes of {m['total_bytes']} for {len(m['images'])} images")

    t = sd.transfer(layers=layers, reduce=level, region=region, order=order,
                    callbacks=Callbacks(on_announce=on_announce, on_image=on_image))
    end = t.run()
    images = []
    for csn, im in enumerate(sd.images):
        want_layers = min(layers or im["nlayers"], im["nlayers"])
        red = min(level or 0, im["numres"] - 1)
        area = None
        if region is not None:
            x, y, w, h = region
            area = (x, y, min(w, im["Columns"] - x), min(h, im["Rows"] - y))
        d = sd.decode(csn, reduce=red, layers=want_layers, area=area)
        name = f"{csn + 1:04d}.npy"
        np.save(out / name, d.pixels)
        images.append({
            "file": name, "image": csn + 1, "codestream": csn,
            "SOPInstanceUID": im["SOPInstanceUID"],
            "frame": im["frame"], "layers": d.layers, "max_layers": im["nlayers"],
            "reduce": d.reduce, "resolution": d.res, "shape": list(d.pixels.shape),
            "dtype": str(d.pixels.dtype), "region": list(area) if area else None,
            "bytes_received": received.get(csn, 0), "bytes_held": sd.held_bytes(csn),
            "bytes_total": im["total_bytes"],
        })
    summary = {"series": series_uid, "server": session.base_url,
               "bytes_received": t.received, "bytes_announced": t.requested,
               "bytes_total": t.total, "end": end, "images": images}
    (out / "images.json").write_text(json.dumps(summary, indent=1))
    return summary
