import nibabel as nib
import numpy as np
import pytest

from vlp3d.data.hounsfield import HUDecision, not_ct_reason, to_hounsfield
from vlp3d.data.phantom import axcodes_affine, nifti_gz_bytes
from vlp3d.data.volume import PreprocessSpec, load_nifti_hu, preprocess_hu


def _write(path, raw, affine, slope=None, inter=None):
    path.write_bytes(nifti_gz_bytes(raw.astype(np.int16), affine, slope, inter))
    proxy = nib.load(path).dataobj  # nibabel keeps the header scaling on the array proxy
    assert (proxy.slope, proxy.inter) == ((slope, inter) if slope is not None else (1.0, 0.0))
    return str(path)


HU = np.array([[[-1000, -500], [0, 40]], [[200, 1000], [-1024, 3000]]], dtype=np.float32)


def test_header_slope_intercept_applied_once(tmp_path):
    # stored = (HU + 1024) / 2 with slope 2, intercept -1024 in the header
    raw = (HU + 1024) / 2
    path = _write(tmp_path / "h.nii.gz", raw, np.eye(4), slope=2.0, inter=-1024.0)
    hu, _, decision = load_nifti_hu(path, metadata_scaling=(2.0, -1024.0))
    np.testing.assert_allclose(hu, HU)
    assert decision.source == "header"


def test_metadata_slope_intercept_when_header_is_unscaled(tmp_path):
    path = _write(tmp_path / "m.nii.gz", HU + 1024, np.eye(4))
    hu, _, decision = load_nifti_hu(path, metadata_scaling=(1.0, -1024.0))
    np.testing.assert_allclose(hu, HU)
    assert decision.source == "metadata"


def test_data_already_in_hu_is_not_shifted_again(tmp_path):
    path = _write(tmp_path / "hu.nii.gz", HU, np.eye(4))
    hu, _, decision = load_nifti_hu(path, metadata_scaling=(1.0, -1024.0))
    np.testing.assert_allclose(hu, HU)
    assert decision.source == "already_hu"
    assert "already HU" in decision.warnings[0]


def test_no_scaling_anywhere_is_identity_with_warning_when_unshifted():
    hu, decision = to_hounsfield(HU + 1024, (None, None), (None, None))
    np.testing.assert_allclose(hu, HU + 1024)
    assert decision.source == "none" and "may not be in HU" in decision.warnings[0]


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "LAS", "RPI", "PSL"])
def test_known_affine_ends_up_in_ras_with_known_voxel(tmp_path, axcodes):
    # one bright voxel at world (+20 R, -10 P, +30 S) mm; output grid is RAS, 10 mm, centred
    spacing, shape = (5.0, 5.0, 5.0), (21, 21, 21)
    affine = axcodes_affine(axcodes, spacing, shape)
    world = np.array([20.0, -10.0, 30.0, 1.0])
    ijk = np.round(np.linalg.inv(affine) @ world).astype(int)[:3]
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[tuple(ijk)] = 1000.0
    spec = PreprocessSpec(shape=(11, 11, 11), spacing_mm=(10.0, 10.0, 10.0), hu_window=(-1000.0, 1000.0),
                          storage_dtype="float16", interpolation="nearest")
    out = preprocess_hu(hu, affine, spec).astype(np.float32)
    assert out.shape == (11, 11, 11)
    peak = np.unravel_index(np.argmax(out), out.shape)
    # RAS voxel index of world point: centre (5, 5, 5) + world / 10 mm
    assert peak == (7, 4, 8), (axcodes, peak)


def test_quantisation_error_stated_in_spec():
    assert PreprocessSpec(storage_dtype="uint8").quantisation_error_hu == pytest.approx(3.922, abs=1e-3)
    assert PreprocessSpec(storage_dtype="float16").quantisation_error_hu < 0.5
    assert PreprocessSpec().hash != PreprocessSpec(shape=(32, 32, 32)).hash


def test_nan_volume_is_rejected(tmp_path):
    img = nib.Nifti1Image(np.full((4, 4, 4), np.nan, dtype=np.float32), np.eye(4))
    nib.save(img, tmp_path / "nan.nii.gz")
    with pytest.raises(ValueError, match="NaN"):
        load_nifti_hu(str(tmp_path / "nan.nii.gz"))


def _reason(raw, metadata=(None, None), header=(None, None), modality=""):
    hu, decision = to_hounsfield(np.asarray(raw), header, metadata)
    decision.modality = modality
    return not_ct_reason(hu, decision)


def test_not_ct_rule_keeps_ct_and_names_what_is_not():
    rng = np.random.default_rng(0)
    ct = np.clip(rng.normal(-300, 500, (16, 16, 16)), -1024, 3000).round()
    assert _reason(ct) is None  # already HU
    assert _reason(ct + 1024, metadata=(1.0, -1024.0)) is None  # raw CT, rescale in the metadata
    assert _reason((ct + 1024) / 2, header=(2.0, -1024.0)) is None  # raw CT, rescale in the header
    assert _reason(np.tile(HU, (8, 8, 8))) is None  # 8 distinct values, but negative ones: not a mask
    hand_made = np.full((16, 16, 16), -1000.0)
    hand_made[4:12, 4:12, 4:12] = 40
    assert _reason(hand_made) is None
    assert "every voxel holds the same value" in _reason(np.full((16, 16, 16), -1000.0))  # degenerate
    assert _reason(ct, modality="CT") is None

    assert "DICOM Modality is MR, not CT" == _reason(ct, modality="MR")
    assert "modality 'xray'" in _reason(ct, modality="DX")
    mask = np.zeros((16, 16, 16), dtype=np.uint8)
    mask[3:7, 3:7, 3:7] = 1
    assert "label mask" in _reason(mask) and "[0, 1]" in _reason(mask)
    labels = mask * 3
    labels[0, 0, 0] = 7
    # CT-RATE-style metadata lists intercept -1024 for every volume: a mask is still a mask
    assert "[0, 3, 7]" in _reason(labels, metadata=(1.0, -1024.0))
    unshifted = _reason(ct + 1024)  # raw CT without any rescale: not HU
    assert unshifted.startswith("no value below 0 HU (range [0, ") and "RescaleIntercept" in unshifted
    assert "no value below 0 HU" in _reason(rng.uniform(0, 900, (16, 16, 16)))  # MR-like intensities
    assert "far narrower than a CT" in not_ct_reason(rng.uniform(0, 1, (16, 16, 16)), HUDecision("header", 1.0, 0.0))


def test_require_ct_marks_the_case_a_rescale_would_fix():
    from vlp3d.data.hounsfield import NotCTError, require_ct

    rng = np.random.default_rng(0)
    ct = np.clip(rng.normal(-300, 500, (16, 16, 16)), -1024, 3000).round()

    def check(raw, metadata=(None, None), header=(None, None)):
        hu, decision = to_hounsfield(np.asarray(raw), header, metadata)
        require_ct(hu, decision)

    check(ct)
    check(ct + 1024, metadata=(1.0, -1024.0))
    with pytest.raises(NotCTError, match="no value below 0 HU") as raw:
        check(ct + 1024)  # CT-RATE's raw values without their metadata row
    assert raw.value.uncertain_hu
    with pytest.raises(NotCTError) as shifted_mr:  # a rescale was given: it is not the missing one
        check(rng.uniform(1024, 1900, (16, 16, 16)), metadata=(1.0, -1024.0))
    assert not shifted_mr.value.uncertain_hu
    mask = np.zeros((16, 16, 16), dtype=np.uint8)
    mask[3:7, 3:7, 3:7] = 1
    with pytest.raises(NotCTError, match="label mask") as masked:
        check(mask)
    assert not masked.value.uncertain_hu


def test_a_corrupt_nifti_is_a_value_error_naming_the_file(tmp_path):
    """Prepare records it as a failed row and the served model answers 400, rather than a traceback."""
    from vlp3d.inference import VolumeInput, load_ct

    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a volume")
    with pytest.raises(ValueError, match="not a readable NIfTI file"):
        load_nifti_hu(str(bad))
    with pytest.raises(ValueError, match=r"broken\.nii\.gz.*not a readable NIfTI file"):
        load_ct(VolumeInput(path=str(bad), name=str(bad)))
