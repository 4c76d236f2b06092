"""Real DICOM / NIfTI files that ship inside wheels (pydicom, pydicom-data, nibabel, dipy):
HU applied exactly once, affines in nibabel's RAS convention, orientation to RAS."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.unit.test_data.helpers import package_file, to_ras
from vlp3d.data.volume import PreprocessSpec, load_volume_hu, preprocess_hu

pydicom = pytest.importorskip("pydicom")

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
CT_SMALL = PYDICOM_FILES / "CT_small.dcm"
# five 16x16 slices of one CT series, InstanceNumber 6..10, z = 8.7625 .. -1.2375 mm (LPS), 2.5 mm apart
CT_SERIES = PYDICOM_FILES / "dicomdirtests" / "98892001" / "CT5N"
LOWEST_SLICE = "3353"  # z = -1.2375, InstanceNumber 10




# ---------------------------------------------------------------- single-frame CT (pydicom)

def test_ct_small_rescale_applied_once():
    ds = pydicom.dcmread(CT_SMALL)
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)  # pydicom's own HU
    assert ds.pixel_array.min() == 128 and ds.pixel_array.max() == 2191  # stored values

    hu, affine, decision = load_volume_hu(CT_SMALL)
    assert hu.shape == (128, 128, 1) and hu.dtype == np.float32
    assert (decision.source, decision.slope, decision.intercept) == ("header", 1.0, -1024.0)
    np.testing.assert_array_equal(hu[:, :, 0], expected.T)  # axes (column, row, slice)
    assert (hu.min(), hu.max()) == (-896.0, 1167.0)  # 128 - 1024, 2191 - 1024: once, not twice
    # IOP = identity rows/columns, PixelSpacing 0.661468, IPP (-158.1358, -179.0358, -75.7) LPS,
    # SliceThickness 5 -> RAS: x and y flip sign
    np.testing.assert_allclose(affine, [[-0.661468, 0, 0, 158.135803], [0, -0.661468, 0, 179.035797],
                                        [0, 0, 5.0, -75.699997], [0, 0, 0, 1]], atol=1e-6)

    # the same metadata scaling is not applied a second time; a different one is reported, not used
    same, _, decision_same = load_volume_hu(CT_SMALL, (1.0, -1024.0))
    np.testing.assert_array_equal(same, hu)
    assert decision_same.source == "header" and not decision_same.warnings
    other, _, decision_other = load_volume_hu(CT_SMALL, (1.0, -1000.0))
    np.testing.assert_array_equal(other, hu)
    assert "differ from header" in decision_other.warnings[0]


def test_ct_small_agrees_with_monai_pydicom_reader():
    from monai.data import PydicomReader

    reader = PydicomReader()  # applies RescaleSlope/Intercept itself, LPS -> RAS, swap_ij
    image, meta = reader.get_data(reader.read(str(CT_SMALL)))
    hu, affine, _ = load_volume_hu(CT_SMALL)
    np.testing.assert_array_equal(hu[:, :, 0], np.asarray(image))
    # MONAI puts 1.0 in the slice column of a single slice; in-plane axes and origin agree
    np.testing.assert_allclose(affine[:, [0, 1, 3]], np.asarray(meta["affine"])[:, [0, 1, 3]], atol=1e-6)


# ---------------------------------------------------------------- series folder

def test_series_folder_geometry_and_values():
    hu, affine, decision = load_volume_hu(CT_SERIES)
    assert hu.shape == (16, 16, 5) and decision.source == "header" and not decision.warnings
    np.testing.assert_allclose(nib.affines.voxel_sizes(affine), [0.488281, 0.488281, 2.5], atol=1e-6)
    # slices sorted along the normal (+z): voxel (0, 0, 0) is the first pixel of the lowest slice
    lowest = pydicom.dcmread(CT_SERIES / LOWEST_SLICE)
    np.testing.assert_allclose(affine @ [0, 0, 0, 1], [72.2, 143.0, -1.2375, 1], atol=1e-5)
    np.testing.assert_array_equal(hu[:, :, 0], lowest.pixel_array.T - 1024.0)
    np.testing.assert_allclose(affine[:3, 2], [0, 0, 2.5], atol=1e-6)

    # RAS: x and y flip, so DICOM pixel (row 0, column 0) of the lowest slice -- the patient's
    # right-anterior corner -- lands at the last index of both in-plane axes
    ras, ras_affine = to_ras(hu, affine)
    assert nib.aff2axcodes(ras_affine) == ("R", "A", "S")
    assert ras[15, 15, 0] == lowest.pixel_array[0, 0] - 1024.0
    np.testing.assert_allclose(ras_affine @ [15, 15, 0, 1], [72.2, 143.0, -1.2375, 1], atol=1e-5)

    # through preprocess_hu at the source grid: same voxel, window-scaled
    spec = PreprocessSpec(shape=(16, 16, 5), spacing_mm=(0.488281, 0.488281, 2.5), hu_window=(-1024.0, 1024.0))
    out = preprocess_hu(hu, affine, spec).astype(np.float32)
    expected = (np.clip(ras, -1024, 1024) + 1024) / 2048
    np.testing.assert_allclose(out, expected, atol=spec.quantisation_error_hu / 2048 + 1e-3)
    assert abs(out[15, 15, 0] - (lowest.pixel_array[0, 0] - 1024.0 + 1024) / 2048) < 1e-3


def test_series_agrees_with_monai_by_world_position():
    """MONAI stacks by InstanceNumber (here z descending); every world point holds the same HU."""
    from monai.data import PydicomReader

    reader = PydicomReader()
    image, meta = reader.get_data(reader.read(str(CT_SERIES)))
    image, monai_affine = np.asarray(image), np.asarray(meta["affine"])
    hu, affine, _ = load_volume_hu(CT_SERIES)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in hu.shape], indexing="ij"), -1).reshape(-1, 3)
    world = affine @ np.c_[ijk, np.ones(len(ijk))].T
    monai_ijk = np.rint(np.linalg.solve(monai_affine, world)[:3].T).astype(int)
    assert (monai_ijk >= 0).all() and (monai_ijk < np.array(image.shape)).all()
    np.testing.assert_array_equal(hu[tuple(ijk.T)], image[tuple(monai_ijk.T)])


def _copy_series(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "series"
    folder.mkdir()
    copies = []
    for index, source in enumerate(sorted(CT_SERIES.iterdir())):
        copies.append(folder / f"IM{index:04d}")
        shutil.copy(source, copies[-1])
    return copies


def test_series_order_is_by_position_not_instance_number(tmp_path):
    reference, reference_affine, _ = load_volume_hu(CT_SERIES)
    copies = _copy_series(tmp_path)
    for path, number in zip(copies, [3, 1, 5, 2, 4], strict=True):  # scrambled InstanceNumber
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = number
        ds.save_as(path)
    (copies[0].parent / "notes.txt").write_text("not DICOM\n")  # ignored
    hu, affine, _ = load_volume_hu(copies[0].parent)
    np.testing.assert_array_equal(hu, reference)
    np.testing.assert_allclose(affine, reference_affine)


def test_per_slice_rescale_applied_per_slice_once(tmp_path):
    reference, _, _ = load_volume_hu(CT_SERIES)
    copies = _copy_series(tmp_path)
    for index, path in enumerate(copies):
        ds = pydicom.dcmread(path)
        shift = 10 * index
        ds.PixelData = (ds.pixel_array.astype(np.int16) - shift).astype(np.int16).tobytes()
        ds.RescaleIntercept = -1024 + shift
        ds.save_as(path)
    hu, _, decision = load_volume_hu(copies[0].parent)
    np.testing.assert_array_equal(hu, reference)
    assert decision.source == "header" and "vary per slice" in decision.warnings[0]


def test_unusable_series_raise_with_reason(tmp_path):
    series = _copy_series(tmp_path)[0].parent
    other = PYDICOM_FILES / "dicomdirtests" / "98892001" / "CT2N" / "6293"
    shutil.copy(other, series / "other")
    with pytest.raises(ValueError, match="holds 2 series"):
        load_volume_hu(series)
    # InstanceNumber 18 at z = -99.5 mm, then three slices 1.25 mm apart near z = +104 mm
    with pytest.raises(ValueError, match="uneven slice spacing"):
        load_volume_hu(PYDICOM_FILES / "dicomdirtests" / "77654033" / "CT2")
    # one series of three localizer planes
    with pytest.raises(ValueError, match="different orientations"):
        load_volume_hu(PYDICOM_FILES / "dicomdirtests" / "98892003" / "MR700")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no DICOM images"):
        load_volume_hu(empty)


def test_missing_pydicom_names_file_and_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    with pytest.raises(ImportError, match=r"CT_small\.dcm.*pip install \"vlp3d\[dicom\]\""):
        load_volume_hu(CT_SMALL)
    with pytest.raises(ImportError, match="CT5N"):
        load_volume_hu(CT_SERIES)


# ---------------------------------------------------------------- enhanced multi-frame CT (pydicom-data)

def test_enhanced_multiframe_ct():
    path = package_file("data_store", "data", "eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID.name == "Enhanced CT Image Storage" and int(ds.NumberOfFrames) == 2
    assert "RescaleIntercept" not in ds  # it lives in the functional groups
    stored = ds.pixel_array  # (frame, row, column), frame 0 at z = -159, frame 1 at z = -149 (LPS)
    hu, affine, decision = load_volume_hu(path)
    assert hu.shape == (512, 512, 2)
    assert (decision.source, decision.slope, decision.intercept) == ("header", 1.0, -1024.0)
    assert (hu.min(), hu.max()) == (float(stored.min()) - 1024, float(stored.max()) - 1024) == (-1024.0, 172.0)
    # IOP (-1,0,0, 0,1,0): normal (0,0,-1), so the frame at z=-149 comes first and k steps -10 mm in z
    np.testing.assert_array_equal(hu[:, :, 0], stored[1].T - 1024.0)
    np.testing.assert_array_equal(hu[:, :, 1], stored[0].T - 1024.0)
    np.testing.assert_allclose(affine, [[0.388672, 0, 0, -99.5], [0, -0.388672, 0, 301.5],
                                        [0, 0, -10.0, -149.0], [0, 0, 0, 1]], atol=1e-6)
    ras, ras_affine = to_ras(hu, affine)
    assert nib.aff2axcodes(ras_affine) == ("R", "A", "S")
    assert ras[0, 511, 1] == hu[0, 0, 0]  # y and z flip, x already runs to the right


def test_shard_row_from_dicom_series_folder():
    """A manifest row whose `image` is a DICOM series folder becomes a shard row like a NIfTI one."""
    from vlp3d.data.shards import preprocess_row

    row = {"row": 3, "image": str(CT_SERIES), "patient_id": "p3", "split": "train", "fraction_rank": 0.5,
           "modality": "ct", "Findings_EN": "No pulmonary nodule.", "Impressions_EN": "Normal chest CT.",
           "RescaleSlope": 1.0, "RescaleIntercept": -1024.0}
    spec = PreprocessSpec(shape=(16, 16, 5), spacing_mm=(0.488281, 0.488281, 2.5))
    shard = preprocess_row(row, spec, [])
    assert (shard["hu_source"], shard["hu_slope"], shard["hu_intercept"]) == ("header", 1.0, -1024.0)
    np.testing.assert_allclose(shard["spacing_mm_source"], [0.488281, 0.488281, 2.5], atol=1e-5)
    assert shard["image"].shape == (16, 16, 5) and shard["source_path"] == str(CT_SERIES)
    hu, affine, _ = load_volume_hu(CT_SERIES)
    np.testing.assert_array_equal(shard["image"], preprocess_hu(hu, affine, spec))


def test_non_ct_dicom_loads_but_is_rejected_as_a_shard_row():
    """MR_small.dcm (pydicom): Modality MR, stored 127..2145 without rescale."""
    from vlp3d.data.hounsfield import NotCTError
    from vlp3d.data.shards import preprocess_row

    path = PYDICOM_FILES / "MR_small.dcm"
    hu, _, decision = load_volume_hu(path)
    assert decision.modality == "MR" and hu.min() > 0
    assert load_volume_hu(CT_SMALL)[2].modality == "CT"
    row = {"row": 0, "image": str(path), "patient_id": "p", "split": "train", "fraction_rank": 0.5,
           "modality": "ct", "Impressions_EN": "Normal."}
    with pytest.raises(NotCTError, match="DICOM Modality is MR, not CT"):
        preprocess_row(row, PreprocessSpec(shape=(8, 8, 8), spacing_mm=(4.0, 4.0, 4.0)), [])
