"""High-resolution storage (T3D) and the body (foreground) crop, on hand-made volumes."""

import dataclasses

import nibabel as nib
import numpy as np
import pytest

from vlp3d.config import load_config
from vlp3d.data.shards import decode_image, preprocess_row, spec_from_config
from vlp3d.data.volume import FOREGROUND_MARGIN_MM, PreprocessSpec, preprocess_hu

SHAPE = (40, 30, 20)  # voxels of the hand-made volume, 2 mm isotropic, RAS
BODY = (slice(10, 30), slice(5, 25), slice(4, 16))  # soft tissue inside air


def _volume():
    hu = np.full(SHAPE, -1000, dtype=np.int16)
    hu[BODY] = 40
    return hu


def _row(tmp_path, hu, affine, name="hand.nii.gz"):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(hu, affine), path)
    return {"row": 0, "image": str(path), "patient_id": "p", "split": "train", "fraction_rank": 0.5,
            "Impressions_EN": "No acute abnormality.", "modality": "ct"}


def _centre_extent(n_in, s_in, s_out):
    # MONAI Spacing keeps the first and last voxel centres: (n - 1) * s_in / s_out + 1 voxels
    return int(np.floor((n_in - 1) * s_in / s_out + 1e-6)) + 1


def test_new_keys_are_in_the_spec_hash():
    base = spec_from_config(load_config(None))
    for override in ("data.storage=\"highres\"", "data.foreground_crop=true", "data.body_threshold_hu=-300.0",
                     "data.shape_2d=[32, 32]"):
        assert spec_from_config(load_config(None, [override])).hash != base.hash, override


def test_highres_keeps_the_field_of_view_at_target_spacing(tmp_path):
    spec = PreprocessSpec(shape=(16, 16, 16), spacing_mm=(1.0, 1.0, 1.0), storage="highres")
    row = _row(tmp_path, _volume(), np.diag([-2.0, -2.0, 2.0, 1.0]))  # LPS storage: reoriented to RAS
    out = preprocess_row(row, spec, [])
    assert isinstance(out["image"], bytes) and out["image_shape"].dtype == np.int32
    image = decode_image(out["image"], out["image_shape"], spec.storage_dtype)
    assert image.dtype == np.float16 and not image.flags.writeable  # a view of the bytes, no copy
    assert image.shape == tuple(_centre_extent(n, 2.0, 1.0) for n in SHAPE) == (79, 59, 39)
    assert len(out["image"]) == image.size * 2
    body = np.argwhere(image > 0.5)
    # body voxels 10..29 at 2 mm -> 20..58 at 1 mm (x flipped twice: LPS file, RAS output)
    assert body.min(0).tolist() == [20, 10, 8] and body.max(0).tolist() == [58, 48, 30]


def test_highres_pads_small_volumes_up_to_shape_and_uint8(tmp_path):
    spec = PreprocessSpec(shape=(96, 64, 48), spacing_mm=(1.0, 1.0, 1.0), storage="highres", storage_dtype="uint8")
    out = preprocess_row(_row(tmp_path, _volume(), np.diag([2.0, 2.0, 2.0, 1.0])), spec, [])
    image = decode_image(out["image"], out["image_shape"], "uint8")
    assert image.shape == (96, 64, 48) and image.dtype == np.uint8  # x, y: 79, 59 padded; z: 39 padded


def test_foreground_crop_removes_air_margins(tmp_path):
    margin = int(np.ceil(FOREGROUND_MARGIN_MM / 2.0))  # 3 voxels at 2 mm
    spec = PreprocessSpec(shape=(16, 16, 16), spacing_mm=(1.0, 1.0, 1.0), storage="highres", foreground_crop=True)
    out = preprocess_row(_row(tmp_path, _volume(), np.diag([2.0, 2.0, 2.0, 1.0])), spec, [])
    image = decode_image(out["image"], out["image_shape"], spec.storage_dtype)
    kept = [min(b.stop + margin, n) - max(b.start - margin, 0) for b, n in zip(BODY, SHAPE, strict=True)]
    assert kept == [26, 26, 18]
    assert image.shape == tuple(_centre_extent(n, 2.0, 1.0) for n in kept) == (51, 51, 35)
    body = np.argwhere(image > 0.5)
    assert body.min(0).tolist() == [2 * margin] * 3  # only the margin of air is left on each side
    assert (np.asarray(image.shape) - 1 - body.max(0)).tolist() == [2 * margin] * 3


def test_foreground_crop_in_fixed_mode_centres_the_body():
    hu = np.full((60, 60, 60), -1000, dtype=np.float32)
    hu[0:20, 0:20, 0:20] = 40  # body in a corner: the plain centre crop would miss most of it
    spec = PreprocessSpec(shape=(16, 16, 16), spacing_mm=(2.0, 2.0, 2.0))
    affine = np.eye(4)
    plain = preprocess_hu(hu, affine, spec)
    cropped = preprocess_hu(hu, affine, dataclasses.replace(spec, foreground_crop=True))
    assert plain.shape == cropped.shape == (16, 16, 16)
    assert (cropped > 0.5).sum() > 4 * (plain > 0.5).sum()
    assert (cropped > 0.5).sum() == pytest.approx(10**3, rel=0.35)  # 20 mm cube at 2 mm


def test_all_air_volume_is_left_uncropped():
    hu = np.full((20, 20, 20), -1000, dtype=np.float32)
    spec = PreprocessSpec(shape=(8, 8, 8), spacing_mm=(4.0, 4.0, 4.0), storage="highres", foreground_crop=True)
    assert preprocess_hu(hu, np.eye(4), spec).shape == (8, 8, 8)


def test_decode_image_accepts_arrays_and_rejects_wrong_sizes():
    array = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    assert decode_image(array, None, "float16") is array
    raw = array.astype("<f2").tobytes()
    np.testing.assert_array_equal(decode_image(raw, [2, 3, 4], "float16"), array)
    np.testing.assert_array_equal(decode_image(np.frombuffer(raw, np.uint8), [2, 3, 4], "float16"), array)
    with pytest.raises(ValueError, match="shape"):
        decode_image(raw, [2, 3, 5], "float16")
