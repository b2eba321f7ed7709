"""Test helper: a store holding one patient's current CT study (two series) and earlier
ones (an earlier CT and an earlier MR-labelled study of another body part), small and
quick."""
from __future__ import annotations

from pathlib import Path

import pydicom

CURRENT_DATE = "20240115"          # server.sample.STUDY_DATE
PRIOR_CT_DATE = "20230110"
PRIOR_MR_DATE = "20230601"


def _retag(files, **attrs) -> None:
    for f in files:
        ds = pydicom.dcmread(f)
        for k, v in attrs.items():
            setattr(ds, k, v)
        if "StudyDate" in attrs:
            ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = attrs["StudyDate"]
        ds.save_as(f)


def make_priors_store(root: Path, slices: int = 8, prior_slices: int = 6, size: int = 128) -> dict:
    """Ingest the three studies; returns their Study and Series Instance UIDs."""
    from server.ingest import ingest_paths
    from server.sample import make_sample_ct
    from server.store import Store

    current = make_sample_ct(root / "cur", slices=slices, size=size, seed=31)
    prior = make_sample_ct(root / "prior", slices=prior_slices, size=size, seed=32)
    _retag(prior, StudyDate=PRIOR_CT_DATE)
    other = make_sample_ct(root / "other", slices=4, size=size, seed=33)
    _retag(other, StudyDate=PRIOR_MR_DATE, Modality="MR", BodyPartExamined="HEAD",
           StudyDescription="MR HEAD")
    # a second series of the current study, hung after it (Series Number 3)
    study = pydicom.dcmread(current[0], stop_before_pixels=True).StudyInstanceUID
    nxt = make_sample_ct(root / "next", slices=3, size=size, seed=34)
    _retag(nxt, StudyInstanceUID=study, SeriesNumber=3, SeriesDescription="Axial next")
    store = Store(root / "store")
    rep = ingest_paths([*current, *prior, *other, *nxt], store)
    assert len(rep.imported) == slices + prior_slices + 4 + 3, rep
    out = {}
    for name, files in (("current", current), ("prior", prior), ("other", other), ("next", nxt)):
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        out[name] = {"study": ds.StudyInstanceUID, "series": ds.SeriesInstanceUID,
                     "date": ds.StudyDate, "patient": ds.PatientID}
    store.close()
    out["store"] = root / "store"
    return out
