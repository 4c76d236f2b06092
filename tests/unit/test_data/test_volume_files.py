"""Real NIfTI files that ship inside wheels (nibabel, dipy) through `load_volume_hu`:
scaling applied exactly once, orientation to RAS lands known voxels where expected."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from tests.unit.test_data.helpers import package_file, to_ras
from vlp3d.data.volume import PreprocessSpec, load_volume_hu, preprocess_hu


def test_nibabel_scaled_image_applied_once(tmp_path):
    """nibabel's functional.nii: int16 with scl_slope 0.0754, scl_inter 3100.76 (first volume as 3D)."""
    from nibabel.testing import data_path

    source = nib.load(Path(data_path) / "functional.nii")
    slope, inter = float(source.dataobj.slope), float(source.dataobj.inter)
    assert (round(slope, 6), round(inter, 4)) == (0.075407, 3100.7617)
    raw = np.asanyarray(source.dataobj.get_unscaled())[..., 0]
    header = source.header.copy()
    header.set_data_shape(raw.shape)
    header["scl_slope"], header["scl_inter"] = slope, inter
    path = tmp_path / "functional0.nii"
    with path.open("wb") as handle:  # header + raw int16 bytes: keeps the stored scaling
        header.write_to(handle)
        handle.seek(int(header["vox_offset"]))
        handle.write(raw.astype(header.get_data_dtype()).tobytes(order="F"))

    hu, affine, decision = load_volume_hu(path)
    expected = source.get_fdata()[..., 0]  # nibabel applies its scaling once
    assert (decision.source, decision.slope, decision.intercept) == ("header", slope, inter)
    np.testing.assert_allclose(hu, expected, rtol=1e-6)
    np.testing.assert_allclose(hu.min(), raw.min() * slope + inter, rtol=1e-6)
    np.testing.assert_allclose(affine, source.affine)
    again, _, _ = load_volume_hu(path, (slope, inter))  # the metadata table repeats it: still once
    np.testing.assert_array_equal(again, hu)


def test_dipy_anisotropic_lps_volumeto_ras():
    path = package_file("dipy", "data", "files", "aniso_vox.nii.gz")
    img = nib.load(path)
    assert img.shape == (58, 58, 24) and nib.aff2axcodes(img.affine) == ("L", "P", "S")
    np.testing.assert_allclose(nib.affines.voxel_sizes(img.affine), [4.0, 4.0, 5.0], atol=1e-3)
    hu, affine, decision = load_volume_hu(path)
    assert decision.source == "none"  # no scaling anywhere: values kept as stored
    np.testing.assert_array_equal(hu, np.asanyarray(img.dataobj))

    # the brightest voxel: L->R and P->A flip the first two axes, world position unchanged
    i, j, k = np.unravel_index(np.argmax(hu), hu.shape)
    ras, ras_affine = to_ras(hu, affine)
    assert nib.aff2axcodes(ras_affine) == ("R", "A", "S")
    assert ras[57 - i, 57 - j, k] == hu[i, j, k]
    np.testing.assert_allclose(ras_affine @ [57 - i, 57 - j, k, 1], affine @ [i, j, k, 1], atol=1e-4)

    # preprocess_hu of the LPS file equals preprocess_hu of nibabel's RAS-canonical copy
    canonical = nib.as_closest_canonical(img)
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    spec = PreprocessSpec(shape=(32, 32, 16), spacing_mm=(8.0, 8.0, 8.0), hu_window=(0.0, float(hu.max())))
    from_lps = preprocess_hu(hu, affine, spec).astype(np.float32)
    from_ras = preprocess_hu(np.asanyarray(canonical.dataobj).astype(np.float32), canonical.affine, spec)
    np.testing.assert_allclose(from_lps, from_ras.astype(np.float32), atol=1e-3)
    assert from_lps.max() > 0.5  # the head is inside the field of view
