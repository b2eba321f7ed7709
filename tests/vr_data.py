"""Small CT series with bone (a ball of 1000 HU in soft tissue) for the VR tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def make_ball_ct(folder: Path, *, slices: int = 20, size: int = 64, seed: int = 41,
                 window: tuple[str, str] | None = None) -> list[Path]:
    """A synthetic CT series whose pixels are a bright ball (1000 HU) inside a soft-tissue
    cylinder (40 HU) in air; ``window`` sets WindowCenter/WindowWidth (as strings)."""
    import pydicom

    from server.sample import make_sample_ct

    files = make_sample_ct(folder, slices=slices, size=size, seed=seed)
    n = len(files)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    for k, f in enumerate(sorted(files)):
        ds = pydicom.dcmread(f)
        zz = (k - (n - 1) / 2) * float(ds.SliceThickness) / float(ds.PixelSpacing[0])
        r = np.sqrt(xx ** 2 + yy ** 2 + zz ** 2)
        hu = np.where(np.sqrt(xx ** 2 + yy ** 2) < size * 0.45, 40.0, -1000.0)
        hu[r < size * 0.3] = 1000.0
        stored = np.rint(hu - float(ds.RescaleIntercept)).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        ds.save_as(f)
    return files


def ingest_folder(files: list[Path], store_dir: Path) -> str:
    """Ingest ``files`` into a new store; returns the series UID."""
    from server.ingest import ingest_paths
    from server.store import Store

    with Store(store_dir) as st:
        report = ingest_paths(files, st)
        assert len(report.imported) == len(files), report
        (series,) = st.catalogue.query_series()
        return series["SeriesInstanceUID"]
