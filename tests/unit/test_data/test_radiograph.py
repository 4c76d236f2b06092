"""2D radiographs: phantom projections, radiographs.csv rows, PNG/DICOM reading and resizing."""

import hashlib
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vlp3d.data.corpus import CorpusError, fraction_ranks, read_ctrate
from vlp3d.data.phantom import (
    _voxel_shape,
    axcodes_affine,
    draw_case,
    png_bytes,
    radiograph,
    render_hu,
    synthesize,
)
from vlp3d.data.radiograph import load_radiograph, resize_2d
from vlp3d.data.shards import decode_image, preprocess_row
from vlp3d.data.volume import PreprocessSpec


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("xray_phantom")
    synthesize(root, 6, seed=2, workers=1, radiographs=True)
    return root


def _case_image(findings, orientation="LPS"):
    case = draw_case(np.random.default_rng(0), "train_1_a_1", "train_1", "train", prevalence=0.0)
    case.findings, case.orientation = findings, orientation
    shape = _voxel_shape(case)
    affine = axcodes_affine(case.orientation, case.spacing_mm, shape)
    return radiograph(render_hu(case, affine, shape, np.random.default_rng(1)), affine)


def test_projection_shows_effusion_and_keeps_display_orientation():
    normal = _case_image({})
    effusion = _case_image({"Pleural effusion": {"sides": ["right", "left"]}})
    assert normal.shape == effusion.shape and normal.dtype == np.float32
    assert 0.0 <= normal.min() and normal.max() <= 1.0
    rows, cols = normal.shape
    lungs = (slice(rows // 4, 3 * rows // 4), slice(cols // 5, 2 * cols // 5))  # patient's right lung
    assert effusion[lungs].mean() > normal[lungs].mean() + 0.03  # fluid is denser than aerated lung
    # same patient in another voxel orientation: same film (RAS canonical frame, display convention)
    assert np.abs(_case_image({}, orientation="RAS") - normal).mean() < 0.02
    # heart (at patient's left, x = -22 mm) lies on the image's right half
    heart = _case_image({"Cardiomegaly": {}}) - normal
    assert heart[:, cols // 2:].sum() > 2 * heart[:, : cols // 2].sum()


def test_radiographs_flag_adds_files_and_keeps_ct_corpus(corpus, tmp_path):
    synthesize(tmp_path / "plain", 6, seed=2, workers=1)
    plain = {p.relative_to(tmp_path / "plain"): p.read_bytes() for p in (tmp_path / "plain").rglob("*") if p.is_file()}
    for relative, data in plain.items():
        assert hashlib.sha256((corpus / relative).read_bytes()).digest() == hashlib.sha256(data).digest()
    pngs = sorted(corpus.glob("radiographs/*/*/*.png"))
    assert len(pngs) == 6 and (corpus / "radiographs.csv").is_file()
    modes = {Image.open(p).mode for p in pngs}
    assert modes == {"I;16", "L"}  # both bit depths are exercised


def test_xray_rows_share_patient_split_report_labels(corpus):
    table = read_ctrate(corpus)
    ct, xray = table[table.modality == "ct"], table[table.modality == "xray"]
    assert len(ct) == 6 and len(xray) == 6
    assert list(ct.index) == list(range(6))  # CT rows first: their row ids do not move
    by_name = ct.set_index("VolumeName")
    labels = table.attrs["label_names"]
    for row in xray.itertuples():
        source = by_name.loc[row.source_volume]
        assert row.image.endswith(".png") and row.VolumeName.endswith("_pa.png")
        assert (row.patient_id, row.split) == (source.patient_id, source.split)
        assert (row.Findings_EN, row.Impressions_EN) == (source.Findings_EN, source.Impressions_EN)
        assert [getattr(xray.loc[row.Index], n) for n in labels] == [source[n] for n in labels]
    ranks = pd.Series(fraction_ranks(table, labels), index=table.index)
    assert (table.assign(r=ranks).groupby("patient_id")["r"].nunique() == 1).all()


def test_radiographs_csv_errors_name_the_file(corpus, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(corpus, root)
    table = pd.read_csv(root / "radiographs.csv")
    table.loc[0, "source_volume"] = "nope.nii.gz"
    table.to_csv(root / "radiographs.csv", index=False)
    with pytest.raises(CorpusError, match=r"radiographs.csv.*nope"):
        read_ctrate(root)


def test_png_scaling_orientation_and_resize(tmp_path):
    image = np.zeros((40, 20), dtype=np.float32)
    image[:4, :4] = 1.0  # top-left marker
    image[-4:, :] = 0.5
    for bits, tol in ((16, 1e-4), (8, 3e-3)):
        path = tmp_path / f"img{bits}.png"
        path.write_bytes(png_bytes(image, bits))
        loaded, info = load_radiograph(path)
        assert info.source == "png" and loaded.shape == (40, 20)
        np.testing.assert_allclose(loaded, image, atol=tol)
        resized = resize_2d(loaded, (32, 32))  # too tall: padded to 40 x 40 first, then resized
        assert resized.shape == (32, 32)
        assert resized[:3, 8:11].mean() > 0.5 and resized[:3, -6:].max() < 0.05  # marker top-left of the content
        assert resized[:, :5].max() < 0.05  # black side bars of the letterbox


def test_png_that_is_not_an_image_fails_with_path(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("this is not an image")
    with pytest.raises(ValueError, match="bad.png.*not a PNG"):
        load_radiograph(bad)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(png_bytes(np.random.default_rng(0).random((64, 64)), 16)[:60])
    with pytest.raises(ValueError, match="cut.png"):
        load_radiograph(truncated)


def test_preprocess_row_xray_fixed_shape_and_decode(corpus):
    table = read_ctrate(corpus)
    row = {**table[table.modality == "xray"].iloc[0].to_dict(), "row": 6, "fraction_rank": 0.5}
    spec = PreprocessSpec(shape_2d=(24, 32), storage="highres", storage_dtype="uint8")
    out = preprocess_row(row, spec, table.attrs["label_names"])
    assert out["modality"] == "xray" and out["image"].shape == (24, 32) and out["image"].dtype == np.uint8
    assert list(out["image_shape"]) == [24, 32] and out["hu_source"] == "png"
    assert decode_image(out["image"], out["image_shape"], "uint8") is out["image"]


def _dicom(path, pixels, photometric="MONOCHROME2", window=None, slope=1.0, intercept=0.0):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "DX", pixels.shape[0], pixels.shape[1]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelSpacing = [0.2, 0.3]
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_radiograph_window_and_monochrome1(tmp_path):
    pixels = np.tile(np.arange(16) * 250, (8, 1))
    plain, info = load_radiograph(_dicom(tmp_path / "a.dcm", pixels))
    assert info.source == "dicom" and info.spacing_mm == (0.2, 0.3)
    np.testing.assert_allclose(plain[0], np.linspace(0, 1, 16), atol=1e-5)  # no window: min..max
    windowed, _ = load_radiograph(_dicom(tmp_path / "b.dcm", pixels, window=(1000, 1000)))
    assert windowed[0, 0] == 0 and windowed[0, -1] == 1 and 0 < windowed[0, 4] < 1
    inverted, _ = load_radiograph(_dicom(tmp_path / "c.dcm", pixels, photometric="MONOCHROME1"))
    np.testing.assert_allclose(inverted, 1 - plain, atol=1e-6)


def test_dicom_without_pydicom_names_file_and_extra(tmp_path, monkeypatch):
    path = tmp_path / "x.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match=r'x.dcm.*pip install "vlp3d\[dicom\]"'):
        load_radiograph(path)
