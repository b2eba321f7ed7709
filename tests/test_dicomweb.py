"""DICOMweb (PS3.18) against a real uvicorn server on loopback, with a standard client
(dicomweb-client) wherever it has the operation; values compared with pydicom's decode
of the original files (signed MR, palette, RGB, multi-frame, encapsulated originals)."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

dicomweb_client = pytest.importorskip("dicomweb_client")
from dicomweb_client.api import DICOMwebClient  # noqa: E402

J2K = "1.2.840.10008.1.2.4.90"
ELE = "1.2.840.10008.1.2.1"


def _copy_with_new_uids(src: str, dst: Path, **changes) -> Path:
    """A real file under new UIDs (pixel data untouched), so that it does not clash with
    another test file made from the same source."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.save_as(dst, enforce_file_format=True)
    return dst


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """path -> role: the originals ingested into the store of this module."""
    from server.sample import make_sample_ct

    d = tmp_path_factory.mktemp("dwfiles")
    files = {
        "ct": Path(make_sample_ct(d / "ct", slices=1, size=96, seed=5)[0]),   # unsigned
        "signed": Path(get_testdata_file("MR_small.dcm")),          # int16, native
        "palette": Path(get_testdata_file("examples_palette.dcm")),  # PALETTE COLOR, native
        "rgb": Path(get_testdata_file("SC_rgb.dcm")),                # RGB, native
        "multiframe": Path(get_testdata_file("emri_small.dcm")),     # 10 frames
        # encapsulated originals: JPEG 2000 lossless signed, RLE colour
        "j2k_signed": _copy_with_new_uids(get_testdata_file("MR_small_jp2klossless.dcm"),
                                          d / "mr_j2k.dcm", SeriesNumber=2),
        "rle_rgb": _copy_with_new_uids(get_testdata_file("SC_rgb_rle.dcm"), d / "rgb_rle.dcm",
                                       SeriesNumber=2),
    }
    return files


@pytest.fixture(scope="module")
def dw(corpus, tmp_path_factory):
    from server.embedded import EmbeddedServer
    from server.ingest import ingest_paths
    from server.store import Store

    root = tmp_path_factory.mktemp("dwstore")
    with Store(root) as st:
        report = ingest_paths(list(corpus.values()), st)
        assert len(report.imported) == len(corpus), report.summary() + str(report.skipped)
    srv = EmbeddedServer(str(root)).start()
    sid = requests.post(f"{srv.url}/api/login", json={"username": "local"}).json()["session"]
    client = DICOMwebClient(url=f"{srv.url}/dicomweb",
                            headers={"Authorization": f"Bearer {sid}"})
    srv.sid = sid
    srv.client = client
    srv.h = {"Authorization": f"Bearer {sid}"}
    yield srv
    srv.stop()


def _ds(path) -> pydicom.Dataset:
    return pydicom.dcmread(path)


def _uids(path):
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def _frames_ref(path) -> np.ndarray:
    """pydicom's decode of the original, one array per frame."""
    ds = _ds(path)
    arr = ds.pixel_array
    n = int(ds.get("NumberOfFrames") or 1)
    return arr if n > 1 else arr[None]


def _v(item, keyword):
    from pydicom.datadict import tag_for_keyword

    e = item.get(f"{tag_for_keyword(keyword):08X}")
    if not e or "Value" not in e:
        return None
    v = e["Value"][0]
    return v["Alphabetic"] if isinstance(v, dict) else v


# ------------------------------------------------------------------------------ QIDO-RS

def test_qido_every_supported_key(dw, corpus):
    c = dw.client
    st_mr, se_mr, sop_mr = _uids(corpus["signed"])
    st_pal, se_pal, sop_pal = _uids(corpus["palette"])
    st_rgb, se_rgb, sop_rgb = _uids(corpus["rgb"])
    all_studies = {_v(r, "StudyInstanceUID") for r in c.search_for_studies()}
    assert {st_mr, st_pal, st_rgb} <= all_studies

    def studies(**f):
        return {_v(r, "StudyInstanceUID") for r in c.search_for_studies(search_filters=f)}

    mr = pydicom.dcmread(corpus["signed"], stop_before_pixels=True)
    rgb = pydicom.dcmread(corpus["rgb"], stop_before_pixels=True)
    # single value, case rules, wildcards, ranges, lists, tags
    assert studies(PatientID=mr.PatientID) == {st_mr}
    assert studies(PatientID=mr.PatientID.lower() + "x") == set()
    assert studies(PatientName="compressedsamples^mr1") == {st_mr}        # PN: any case
    assert studies(PatientName="Compressed*MR?") == {st_mr}
    assert studies(StudyDate="20040826") == {st_mr}
    assert studies(StudyDate="20040101-20041231") == {st_mr}
    assert st_mr not in studies(StudyDate="20100101-")
    assert studies(StudyDate="-20040826") == {st_mr, _uids(corpus["multiframe"])[0]}
    assert st_mr in studies(StudyTime="18-19") and st_mr not in studies(StudyTime="-1849")
    assert st_mr in studies(StudyTime="185059") and st_mr in studies(StudyTime="1850")
    assert st_mr in studies(InstanceCreationTime="185434")       # TM from the header
    assert st_mr in studies(InstanceCreationDate="20040801-20040831")
    assert studies(StudyInstanceUID=f"{st_mr}\\{st_rgb}") == {st_mr, st_rgb}
    assert studies(StudyInstanceUID=f"{st_mr},{st_rgb}") == {st_mr, st_rgb}
    assert studies(**{"0020000D": st_rgb}) == {st_rgb}
    assert studies(**{"00100020": rgb.PatientID}) == {st_rgb}
    assert studies(ModalitiesInStudy="US") == {st_pal}
    assert studies(ModalitiesInStudy="US,OT") == {st_pal, st_rgb}
    assert studies(ReferringPhysicianName=str(rgb.ReferringPhysicianName)) >= {st_rgb}
    assert studies(StudyDescription="nothing-like-this") == set()
    if mr.get("StudyTime"):
        assert st_mr in studies(StudyTime=f"{mr.StudyTime[:2]}-")
    if mr.get("StudyID"):
        assert st_mr in studies(StudyID=mr.StudyID)
    if mr.get("AccessionNumber"):
        assert studies(AccessionNumber=mr.AccessionNumber) >= {st_mr}
    # lower-level keys at the study level: studies containing a match
    assert studies(SOPInstanceUID=sop_mr) == {st_mr}
    assert studies(Modality="MR", SeriesNumber=2) >= {st_mr}
    # attributes that only the stored header holds, keyword or tag
    assert studies(RepetitionTime="4000") == {st_mr}
    assert studies(**{"00180080": "4000.0"}) == {st_mr}
    assert studies(ImageType="SECONDARY") >= {st_mr}                 # any of its values
    assert st_mr not in studies(ImageType="secondary")               # CS: case-sensitive
    assert studies(Manufacturer=f"{mr.Manufacturer[:3]}*") >= {st_mr}
    # fuzzymatching is accepted; limit / offset page
    assert studies(PatientName="compressedsamples^mr1", fuzzymatching="true") == {st_mr}
    page1 = c.search_for_studies(limit=2)
    page2 = c.search_for_studies(limit=2, offset=2)
    assert len(page1) == 2 and not ({_v(r, "StudyInstanceUID") for r in page1}
                                    & {_v(r, "StudyInstanceUID") for r in page2})
    # series and instances at root, study and series level
    assert {_v(r, "SeriesInstanceUID") for r in c.search_for_series(
        search_filters={"Modality": "US"})} == {se_pal}
    assert {_v(r, "SeriesInstanceUID") for r in c.search_for_series(
        st_mr, search_filters={"SeriesNumber": 2})} == {_uids(corpus["j2k_signed"])[1]}
    assert {_v(r, "SOPInstanceUID") for r in c.search_for_instances(
        search_filters={"SOPInstanceUID": sop_pal})} == {sop_pal}
    assert {_v(r, "SOPInstanceUID") for r in c.search_for_instances(
        st_rgb, search_filters={"SeriesInstanceUID": se_rgb})} == {sop_rgb}
    # tags at every level
    assert {_v(r, "SeriesInstanceUID") for r in c.search_for_series(
        search_filters={"00080060": "US"})} == {se_pal}
    assert {_v(r, "SOPInstanceUID") for r in c.search_for_instances(
        search_filters={"00080018": sop_rgb})} == {sop_rgb}
    assert {_v(r, "SOPInstanceUID") for r in c.search_for_instances(
        st_mr, search_filters={"00200013": mr.InstanceNumber, "00180080": "4000"})} == {
        sop_mr, _uids(corpus["j2k_signed"])[2]}            # the copy has the same values
    assert {_v(r, "SOPInstanceUID") for r in c.search_for_instances(
        st_mr, search_filters={"00200013": mr.InstanceNumber, "0020000E": se_mr})} == {sop_mr}
    inst = c.search_for_instances(st_mr, se_mr)
    assert [_v(r, "SOPInstanceUID") for r in inst] == [sop_mr]
    assert _v(inst[0], "Rows") == 64 and _v(inst[0], "BitsAllocated") == 16
    assert _v(inst[0], "RetrieveURL").endswith(f"/instances/{sop_mr}")
    assert c.search_for_instances(search_filters={"InstanceNumber": 987654}) == []
    # includefield: a named attribute, and all
    r = c.search_for_instances(st_mr, se_mr, fields=["RepetitionTime"])[0]
    assert _v(r, "RepetitionTime") == pytest.approx(4000.0)
    r = c.search_for_instances(st_mr, se_mr, fields=["all"])[0]
    assert _v(r, "Manufacturer") == mr.Manufacturer and _v(r, "PixelRepresentation") == 1
    pal = c.search_for_instances(st_pal, se_pal, fields=["PhotometricInterpretation"])[0]
    assert _v(pal, "PhotometricInterpretation") == "PALETTE COLOR"     # the original's
    r = c.search_for_studies(search_filters={"StudyInstanceUID": st_mr}, fields=["all"])[0]
    assert _v(r, "NumberOfStudyRelatedSeries") == 2
    assert _v(r, "NumberOfStudyRelatedInstances") == 2


@pytest.mark.parametrize("query, name", [
    ("Nonsense=1", "Nonsense"), ("12345678=1", "12345678"),
    ("StudyInstanceUID=%5C", "StudyInstanceUID"), ("StudyInstanceUID=1.2.*", "StudyInstanceUID"),
    ("StudyDate=2004", "StudyDate"), ("StudyDate=20040231", "StudyDate"),
    ("StudyTime=25", "StudyTime"), ("StudyTime=12*", "StudyTime"), ("Modality=CT%5C", "Modality"), ("StudyDate=20040101-20050101-2006", "StudyDate"),
    ("SeriesNumber=two", "SeriesNumber"), ("InstanceNumber=99999999999999999999", "InstanceNumber"),
    ("limit=99999999999999999999", "limit"), ("offset=-1", "offset"),
    ("PixelData=1", "PixelData"), ("ReferencedStudySequence=1", "ReferencedStudySequence"),
    ("NumberOfStudyRelatedSeries=2", "NumberOfStudyRelatedSeries"),
    ("includefield=NotAnAttribute", "NotAnAttribute"), ("fuzzymatching=maybe", "fuzzymatching"),
    ("00400275.00401001=x", "00400275.00401001"),
])
def test_qido_refuses_what_it_cannot_match(dw, query, name):
    for level in ("studies", "series", "instances"):
        r = requests.get(f"{dw.url}/dicomweb/{level}?{query}", headers=dw.h)
        assert r.status_code == 400, (level, query, r.text)
        assert name in r.json()["error"]


def test_qido_study_key_at_series_and_modalities_rules(dw, corpus):
    st_mr, _, _ = _uids(corpus["signed"])
    r = requests.get(f"{dw.url}/dicomweb/series?ModalitiesInStudy=MR", headers=dw.h)
    assert r.status_code == 400 and "ModalitiesInStudy" in r.json()["error"]
    r = requests.get(f"{dw.url}/dicomweb/studies/{st_mr}/series?PatientName=nobody",
                     headers=dw.h)
    assert r.status_code == 200 and r.json() == []


# ------------------------------------------------------------------------------ WADO-RS

def test_retrieve_study_series_instance_as_stored(dw, corpus):
    c = dw.client
    st, se, sop = _uids(corpus["signed"])
    got = c.retrieve_study(st)
    want = {_uids(corpus["signed"])[2], _uids(corpus["j2k_signed"])[2]}
    assert {d.SOPInstanceUID for d in got} == want
    for d in got:
        path = corpus["signed"] if d.SOPInstanceUID == sop else corpus["j2k_signed"]
        np.testing.assert_array_equal(d.pixel_array, _ds(path).pixel_array)
    (one,) = c.retrieve_series(st, se)
    assert one.SOPInstanceUID == sop
    ds = c.retrieve_instance(st, se, sop)
    assert ds.file_meta.TransferSyntaxUID == ELE
    np.testing.assert_array_equal(ds.pixel_array, _ds(corpus["signed"]).pixel_array)
    # the original bit for bit: one part holding exactly the stored file
    r = requests.get(f"{dw.url}/dicomweb/studies/{st}/series/{se}/instances/{sop}",
                     headers=dw.h)
    assert r.status_code == 200 and r.content == Path(corpus["signed"]).read_bytes()


@pytest.mark.parametrize("role", ["signed", "palette", "rgb", "multiframe", "j2k_signed",
                                  "rle_rgb"])
def test_retrieve_instance_in_transfer_syntaxes(dw, corpus, role):
    st, se, sop = _uids(corpus[role])
    ref = _ds(corpus[role])
    for ts in (ELE, J2K):
        ds = dw.client.retrieve_instance(st, se, sop, media_types=(("application/dicom", ts),))
        assert ds.file_meta.TransferSyntaxUID == ts
        np.testing.assert_array_equal(ds.pixel_array, ref.pixel_array)
        assert ds.PixelRepresentation == ref.PixelRepresentation
        if role == "palette":
            assert ds.PhotometricInterpretation == "PALETTE COLOR"
    url = f"{dw.url}/dicomweb/studies/{st}/series/{se}/instances/{sop}"
    r = requests.get(url, headers={**dw.h, "Accept": 'multipart/related; type="application/dicom"; '
                                                     "transfer-syntax=1.2.840.10008.1.2.4.50"})
    assert r.status_code == 406
    # q-values: the first producible by preference
    r = requests.get(url, headers={**dw.h, "Accept":
                                   'multipart/related; type="application/dicom"; '
                                   "transfer-syntax=1.2.840.10008.1.2.4.50, "
                                   'multipart/related; type="application/dicom"; '
                                   f"transfer-syntax={J2K}; q=0.9, "
                                   'multipart/related; type="application/dicom"; '
                                   f"transfer-syntax={ELE}; q=0.5"})
    assert r.status_code == 200 and f"transfer-syntax={J2K}" in r.text[:300]


def _decode_part(part: bytes, ts: str, ref: pydicom.Dataset) -> np.ndarray:
    if ts == ELE:
        dtype = np.dtype(f"<{'i' if ref.PixelRepresentation else 'u'}{ref.BitsAllocated // 8}")
        shape = (ref.Rows, ref.Columns) + ((ref.SamplesPerPixel,)
                                           if ref.SamplesPerPixel > 1 else ())
        return np.frombuffer(part, dtype).reshape(shape)
    import imagecodecs

    return imagecodecs.jpeg2k_decode(part)


@pytest.mark.parametrize("role", ["signed", "palette", "rgb", "multiframe", "j2k_signed"])
def test_frames_in_transfer_syntaxes(dw, corpus, role):
    st, se, sop = _uids(corpus[role])
    ref = _ds(corpus[role])
    want = _frames_ref(corpus[role])
    nums = [1, 3] if len(want) > 3 else [1]
    for media, ts in (("application/octet-stream", ELE), ("image/jp2", J2K)):
        parts = dw.client.retrieve_instance_frames(st, se, sop, nums,
                                                   media_types=((media, ts),))
        assert len(parts) == len(nums)
        for n, part in zip(nums, parts):
            got = _decode_part(part, ts, ref)
            assert got.dtype.kind == want.dtype.kind          # signed stays signed
            np.testing.assert_array_equal(got, want[n - 1])
    # "*": as stored — the original's fragments when it is encapsulated
    r = requests.get(f"{dw.url}/dicomweb/studies/{st}/series/{se}/instances/{sop}/frames/1",
                     headers={**dw.h, "Accept": 'multipart/related; type="*/*"; '
                                                "transfer-syntax=*"})
    assert r.status_code == 200
    part_ct = r.content.split(b"\r\n\r\n", 1)[0].decode()
    parts = dw.client.retrieve_instance_frames(st, se, sop, [1], media_types=(("*/*", "*"),))
    if role == "j2k_signed":
        from pydicom.encaps import generate_frames

        assert parts[0] == next(generate_frames(ref.PixelData, number_of_frames=1))
        assert J2K in part_ct
    else:
        assert J2K in part_ct
    import imagecodecs

    np.testing.assert_array_equal(imagecodecs.jpeg2k_decode(parts[0]), want[0])


def test_frame_as_stored_is_the_stored_codestream(dw, corpus):
    """Unsigned greyscale with no offset: "*" sends the stored codestream itself."""
    st, se, sop = _uids(corpus["ct"])
    store = dw.app.state.server.store
    (row,) = [r for r in store.catalogue.series_images(se) if r["SOPInstanceUID"] == sop]
    assert row["offset"] == 0
    (part,) = dw.client.retrieve_instance_frames(st, se, sop, [1], media_types=(("image/jp2", "*"),))
    assert part == store.abspath(row["codestream_relpath"]).read_bytes()
    import imagecodecs

    np.testing.assert_array_equal(imagecodecs.jpeg2k_decode(part), _ds(corpus["ct"]).pixel_array)
    # the signed MR needs its offset undone: not the stored codestream, the values signed
    st, se, sop = _uids(corpus["signed"])
    (row,) = [r for r in store.catalogue.series_images(se) if r["SOPInstanceUID"] == sop]
    assert row["offset"] != 0
    (part,) = dw.client.retrieve_instance_frames(st, se, sop, [1], media_types=(("image/jp2", "*"),))
    np.testing.assert_array_equal(imagecodecs.jpeg2k_decode(part), _ds(corpus["signed"]).pixel_array)


def test_frames_negotiation(dw, corpus):
    st, se, sop = _uids(corpus["signed"])
    url = f"{dw.url}/dicomweb/studies/{st}/series/{se}/instances/{sop}/frames/1"
    # a syntax that cannot be produced: 406, never another one
    r = requests.get(url, headers={**dw.h, "Accept": 'multipart/related; type="image/jpeg"'})
    assert r.status_code == 406
    # q-values: the best acceptable one wins; q=0 is refused
    r = requests.get(url, headers={**dw.h, "Accept":
                                   'multipart/related; type="image/jpeg"; q=1, '
                                   'multipart/related; type="image/jp2"; q=0.5, '
                                   'multipart/related; type="application/octet-stream"; q=0.4'})
    assert r.status_code == 200 and 'type="image/jp2"' in r.headers["content-type"]
    r = requests.get(url, headers={**dw.h, "Accept":
                                   'multipart/related; type="image/jp2"; q=0, '
                                   'multipart/related; type="application/octet-stream"; q=0.1'})
    assert 'type="application/octet-stream"' in r.headers["content-type"]
    r = requests.get(url, headers={**dw.h, "Accept": 'multipart/related; type="image/jp2"; q=0'})
    assert r.status_code == 406
    # frame numbers that do not exist
    r = requests.get(url.replace("frames/1", "frames/2"), headers=dw.h)
    assert r.status_code == 404


def test_metadata_and_bulkdata(dw, corpus):
    c = dw.client
    st, se, sop = _uids(corpus["signed"])
    meta = c.retrieve_study_metadata(st)
    assert {_v(m, "SOPInstanceUID") for m in meta} == {sop, _uids(corpus["j2k_signed"])[2]}
    (m,) = c.retrieve_series_metadata(st, se)
    assert _v(m, "PatientID") == _ds(corpus["signed"]).PatientID
    m = c.retrieve_instance_metadata(st, se, sop)       # the client unwraps the list
    assert _v(m, "PixelRepresentation") == 1
    uri = m["7FE00010"]["BulkDataURI"]
    (pixels,) = c.retrieve_bulkdata(uri)
    ref = _ds(corpus["signed"])
    np.testing.assert_array_equal(np.frombuffer(pixels, "<i2").reshape(64, 64), ref.pixel_array)


def test_parents_are_checked(dw, corpus):
    st, se, sop = _uids(corpus["signed"])
    _, se_other, sop_other = _uids(corpus["rgb"])
    base = f"{dw.url}/dicomweb/studies/{st}"
    for path in (f"/series/{se}/instances/{sop_other}", f"/series/{se}/instances/{sop_other}/metadata",
                 f"/series/{se}/instances/{sop_other}/frames/1",
                 f"/series/{se}/instances/{sop_other}/rendered",
                 f"/series/{se_other}/instances/{sop_other}", f"/series/{se_other}",
                 f"/series/{se_other}/metadata", f"/series/{se_other}/instances"):
        r = requests.get(base + path, headers=dw.h)
        assert r.status_code == 404, path


# ------------------------------------------------------------------------------ rendered

def test_rendered_and_thumbnails(dw, corpus):
    from PIL import Image

    c = dw.client
    st, se, sop = _uids(corpus["signed"])
    png = c.retrieve_instance_rendered(st, se, sop, media_types=("image/png",))
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (64, 64)
    # the window asked is applied: values below the window are black, above white
    ref = _ds(corpus["signed"]).pixel_array.astype(float)
    lo = float(np.percentile(ref, 30))
    png = c.retrieve_instance_rendered(st, se, sop, media_types=("image/png",),
                                       params={"window": f"{lo},1"})
    a = np.asarray(Image.open(io.BytesIO(png)))
    slope = float(_ds(corpus["signed"]).get("RescaleSlope", 1))
    inter = float(_ds(corpus["signed"]).get("RescaleIntercept", 0))
    vals = ref * slope + inter
    assert (a[vals <= lo - 0.5] == 0).all() and (a[vals > lo + 0.5] == 255).all()
    jpg = c.retrieve_instance_rendered(st, se, sop, media_types=("image/jpeg",),
                                       params={"viewport": "32,32", "quality": "50"})
    assert Image.open(io.BytesIO(jpg)).size == (32, 32)
    # palette: the colours of its lookup table
    pst, pse, psop = _uids(corpus["palette"])
    png = c.retrieve_instance_rendered(pst, pse, psop, media_types=("image/png",))
    from pydicom.pixels import apply_color_lut

    pal = _ds(corpus["palette"])
    lut = apply_color_lut(pal.pixel_array, pal)
    want = (lut >> 8).astype(np.uint8) if lut.max() > 255 else lut.astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), want)
    # RGB: its own samples
    rst, rse, rsop = _uids(corpus["rgb"])
    png = c.retrieve_instance_rendered(rst, rse, rsop, media_types=("image/png",))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))),
                                  _ds(corpus["rgb"]).pixel_array)
    # frames, series and study thumbnails and rendered
    mst, mse, msop = _uids(corpus["multiframe"])
    jpg = c.retrieve_instance_frames_rendered(mst, mse, msop, [3], media_types=("image/jpeg",))
    assert Image.open(io.BytesIO(jpg)).size == (64, 64)
    for path in (f"/studies/{st}/thumbnail", f"/studies/{st}/series/{se}/thumbnail",
                 f"/studies/{st}/series/{se}/instances/{sop}/thumbnail?viewport=16,16"):
        r = requests.get(f"{dw.url}/dicomweb{path}", headers={**dw.h, "Accept": "image/png"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", path
        assert max(Image.open(io.BytesIO(r.content)).size) <= 128
    r = requests.get(f"{dw.url}/dicomweb/studies/{st}/rendered", headers={**dw.h,
                     "Accept": 'multipart/related; type="image/jpeg"'})
    assert r.status_code == 200 and r.content.count(b"Content-Type: image/jpeg") == 2
    r = requests.get(f"{dw.url}/dicomweb/studies/{st}/series/{se}/instances/{sop}/rendered",
                     headers={**dw.h, "Accept": "image/gif"})
    assert r.status_code == 406
    for bad in ("window=1,0", "window=1,nan", "viewport=0,10", "viewport=1e999,2",
                "quality=101", "annotation=patient", "viewport=10,10,-1,0,5,5"):
        r = requests.get(f"{dw.url}/dicomweb/studies/{st}/series/{se}/instances/{sop}/rendered"
                         f"?{bad}", headers=dw.h)
        assert r.status_code == 400 and bad.split("=")[0] in r.json()["error"], bad
    # viewport with a source region: that part of the image, scaled to fit
    png = c.retrieve_instance_rendered(st, se, sop, media_types=("image/png",),
                                       params={"viewport": "20,10,0,0,32,16"})
    assert Image.open(io.BytesIO(png)).size == (20, 10)


# ------------------------------------------------------------------------------ zip, STOW

def test_study_as_zip(dw, corpus):
    st, _, _ = _uids(corpus["signed"])
    r = requests.get(f"{dw.url}/dicomweb/studies/{st}", headers={**dw.h,
                                                                  "Accept": "application/zip"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        got = {Path(n).stem: z.read(n) for n in z.namelist()}
    for role in ("signed", "j2k_signed"):
        assert got[_uids(corpus[role])[2]] == Path(corpus[role]).read_bytes()


def test_stow(corpus, tmp_path):
    from server.embedded import EmbeddedServer
    from server.rights import Rule

    with EmbeddedServer(str(tmp_path / "store")) as srv:
        auth = srv.app.state.server.auth
        auth.add_user("reader", "pw-reader")
        auth.set_rule(Rule("reader", actions={"browse", "metadata", "fetch", "retrieve"}))
        sid = requests.post(f"{srv.url}/api/login", json={"username": "local"}).json()["session"]
        c = DICOMwebClient(url=f"{srv.url}/dicomweb", headers={"Authorization": f"Bearer {sid}"})
        sent = [_ds(corpus["signed"]), _ds(corpus["rgb"])]
        resp = c.store_instances(sent)
        refs = resp.ReferencedSOPSequence
        assert {x.ReferencedSOPInstanceUID for x in refs} == {d.SOPInstanceUID for d in sent}
        assert "FailedSOPSequence" not in resp
        for x in refs:
            st, se, sop = _uids(corpus["signed"] if x.ReferencedSOPInstanceUID == sent[0].SOPInstanceUID
                                else corpus["rgb"])
            assert x.RetrieveURL.endswith(f"/studies/{st}/series/{se}/instances/{sop}")
            back = c.retrieve_instance(st, se, sop)
            np.testing.assert_array_equal(back.pixel_array, _ds(
                corpus["signed"] if sop == sent[0].SOPInstanceUID else corpus["rgb"]).pixel_array)
        # the same again: already stored, still referenced
        assert len(c.store_instances([sent[0]]).ReferencedSOPSequence) == 1
        # into a named study: another study's instance fails with 0xA900, not stored
        st_mr = sent[0].StudyInstanceUID
        pal = _ds(corpus["palette"])
        boundary = "b0undary"
        body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                + Path(corpus["palette"]).read_bytes() + b"\r\n"
                + f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                + b"not a dicom file at all" + b"\r\n" + f"--{boundary}--\r\n".encode())
        ct = f'multipart/related; type="application/dicom"; boundary={boundary}'
        r = requests.post(f"{srv.url}/dicomweb/studies/{st_mr}", data=body,
                          headers={"Authorization": f"Bearer {sid}", "Content-Type": ct})
        assert r.status_code == 409
        failed = pydicom.Dataset.from_json(r.json()).FailedSOPSequence
        assert [f.FailureReason for f in failed] == [0xA900, 0xC000]
        assert failed[0].ReferencedSOPInstanceUID == pal.SOPInstanceUID
        assert srv.store.catalogue.find_instance(pal.SOPInstanceUID) is None
        # partly stored: 202
        r = requests.post(f"{srv.url}/dicomweb/studies", data=body,
                          headers={"Authorization": f"Bearer {sid}", "Content-Type": ct})
        assert r.status_code == 202
        ans = pydicom.Dataset.from_json(r.json())
        assert ans.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == pal.SOPInstanceUID
        assert ans.FailedSOPSequence[0].FailureReason == 0xC000
        # rights decide who may store
        rid = requests.post(f"{srv.url}/api/login",
                            json={"username": "reader", "password": "pw-reader"}).json()["session"]
        r = requests.post(f"{srv.url}/dicomweb/studies", data=body,
                          headers={"Authorization": f"Bearer {rid}", "Content-Type": ct})
        assert r.status_code == 403
        # a rule on one study takes storing into it away
        auth.add_user("ingester", "pw-ingester")
        auth.set_rule(Rule("ingester", scope=st_mr, actions={"browse"}))
        iid = requests.post(f"{srv.url}/api/login",
                            json={"username": "ingester", "password": "pw-ingester"}).json()["session"]
        ic = DICOMwebClient(url=f"{srv.url}/dicomweb", headers={"Authorization": f"Bearer {iid}"})
        mf = _ds(corpus["multiframe"])
        ans = ic.store_instances([_ds(corpus["j2k_signed"]), mf])     # answered 202
        assert [x.ReferencedSOPInstanceUID for x in ans.ReferencedSOPSequence] == [mf.SOPInstanceUID]
        (f,) = ans.FailedSOPSequence
        assert f.FailureReason == 0x0124
        assert f.ReferencedSOPInstanceUID == _ds(corpus["j2k_signed"]).SOPInstanceUID
        assert srv.store.catalogue.find_instance(f.ReferencedSOPInstanceUID) is None
        r = requests.post(f"{srv.url}/dicomweb/studies", data=b"x",
                          headers={"Authorization": f"Bearer {sid}",
                                   "Content-Type": "application/dicom"})
        assert r.status_code == 415


def test_listings_hide_what_a_rule_takes_away(dw, corpus):
    from server.rights import Rule

    auth = dw.app.state.server.auth
    st_mr, se_mr, _ = _uids(corpus["signed"])
    st_rgb, _, _ = _uids(corpus["rgb"])
    auth.add_user("partial", "pw-partial")
    auth.set_rule(Rule("partial", scope=st_mr, actions={"metadata"}))
    sid = requests.post(f"{dw.url}/api/login",
                        json={"username": "partial", "password": "pw-partial"}).json()["session"]
    c = DICOMwebClient(url=f"{dw.url}/dicomweb", headers={"Authorization": f"Bearer {sid}"})
    studies = {_v(r, "StudyInstanceUID") for r in c.search_for_studies()}
    assert st_rgb in studies and st_mr not in studies
    assert se_mr not in {_v(r, "SeriesInstanceUID") for r in c.search_for_series()}
    r = requests.get(f"{dw.url}/dicomweb/studies/{st_mr}/series",
                     headers={"Authorization": f"Bearer {sid}"})
    assert r.status_code == 403
    # browse without metadata: the default attributes, nothing more from the header
    auth.add_user("lister", "pw-lister")
    auth.set_rule(Rule("lister", actions={"browse"}))
    lid = requests.post(f"{dw.url}/api/login",
                        json={"username": "lister", "password": "pw-lister"}).json()["session"]
    lc = DICOMwebClient(url=f"{dw.url}/dicomweb", headers={"Authorization": f"Bearer {lid}"})
    (row,) = lc.search_for_instances(st_mr, se_mr, fields=["all"])
    assert _v(row, "SOPInstanceUID") and _v(row, "Rows") == 64
    assert _v(row, "Manufacturer") is None and _v(row, "RepetitionTime") is None
    r = requests.get(f"{dw.url}/dicomweb/studies?Manufacturer=TOSHIBA*",
                     headers={"Authorization": f"Bearer {lid}"})
    assert r.status_code == 403 and "Manufacturer" in r.json()["error"]


def test_matching_conditions_unit():
    """The SQL conditions of the catalogue's QIDO engine for the value forms of PS3.4
    C.2.2.2 (no server needed)."""
    from server.catalogue import QueryError, qido_condition, qido_key

    def cond(k, v):
        return qido_condition(qido_key(k), v, "x")

    assert cond("PatientName", "") is None and cond("PatientID", "*") is None   # universal
    assert cond("AcquisitionDateTime", "20040826120000-0500")[1] == [
        "20040826120000", "20040826120000.999999"]                 # a zone, not a range
    assert cond("AcquisitionDateTime", "2004-2005")[1] == [
        "20040101000000", "20051231235959.999999"]                 # a range of years
    assert cond("StudyTime", "10-12")[1] == ["100000", "125959.999999"]
    assert cond("PatientID", "A?C*")[1] == ["A?C*"] and "GLOB" in cond("PatientID", "A?C*")[0]
    assert cond("PatientID", "[x]*")[1] == ["[[]x]*"]               # literal [ stays literal
    assert cond("Modality", "CT,MR")[1] == ["CT", "MR"]
    for k, v in [("StudyInstanceUID", "\\"), ("StudyInstanceUID", "1.2,"), ("StudyDate", "2004-01-01"),
                 ("AcquisitionDateTime", "2004-0500-2005"), ("SeriesNumber", "1.5"),
                 ("RepetitionTime", "inf")]:
        with pytest.raises(QueryError) as e:
            cond(k, v)
        assert k in str(e.value)


def test_series_pixel_data_in_one_answer(dw, corpus):
    """The series' Pixel Data resource: every frame of the series in one multipart
    answer, each part naming its instance and frame, the values those of the frames
    asked one by one; a cut answer is noticed by the client's reader."""
    from client.frames import iter_multipart

    st, se, sop = _uids(corpus["multiframe"])
    want = _frames_ref(corpus["multiframe"])
    r = requests.get(f"{dw.url}/dicomweb/studies/{st}/series/{se}/pixeldata",
                     headers={**dw.h, "Accept": 'multipart/related; '
                              f'type="application/octet-stream"; transfer-syntax={ELE}'})
    assert r.status_code == 200 and r.headers["content-type"].startswith("multipart/related")
    boundary = r.headers["content-type"].split("boundary=")[1].strip('"')
    # read in small uneven pieces, as a network hands them over
    pieces = [r.content[i:i + 977] for i in range(0, len(r.content), 977)]
    parts = list(iter_multipart(pieces, boundary))
    assert len(parts) == len(want)
    ref = _ds(corpus["multiframe"])
    for n, (headers, body) in enumerate(parts, 1):
        assert headers["content-location"].endswith(f"/instances/{sop}/frames/{n}")
        assert ELE in headers["content-type"]
        np.testing.assert_array_equal(_decode_part(body, ELE, ref), want[n - 1])
    with pytest.raises(ValueError, match="ended"):
        list(iter_multipart(pieces[:-2], boundary))
    # a syntax the frames cannot be given in: refused before the answer starts
    bad = requests.get(f"{dw.url}/dicomweb/studies/{st}/series/{se}/pixeldata",
                       headers={**dw.h, "Accept": 'multipart/related; type="image/x-none"'})
    assert bad.status_code == 406
