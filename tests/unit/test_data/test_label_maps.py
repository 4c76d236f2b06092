"""Voxel label maps: written by the phantom, carried by prepare through the CT's own transforms."""

import json

import nibabel as nib
import numpy as np
import pytest

from vlp3d.data.corpus import read_ctrate
from vlp3d.data.phantom import LABEL_MAP_CLASSES, axcodes_affine, nifti_gz_bytes, synthesize
from vlp3d.data.shards import LABEL_MAP, decode_label_map, preprocess_row
from vlp3d.data.volume import PreprocessSpec, preprocess_hu, preprocess_volume

ORIENTATIONS = ["RAS", "LPS", "LAS", "RPI", "PSL"]


def _hand_made(axcodes: str, spacing, shape):
    """A volume whose HU value names its class (class k = -1000 + 250 k HU) and the label map of those
    classes: boxes placed in world millimetres, so every orientation shows the same patient."""
    affine = axcodes_affine(axcodes, spacing, shape)
    ijk = np.indices(shape).reshape(3, -1).astype(float)
    x, y, z = affine[:3, :3] @ ijk + affine[:3, 3:4]
    labels = np.zeros(x.shape, dtype=np.uint8)
    labels[(np.abs(x) < 60) & (np.abs(y) < 50) & (np.abs(z) < 70)] = 1  # body
    labels[(x > 10) & (x < 45) & (np.abs(y) < 30) & (z > -40) & (z < 50)] = 2  # right, anterior-posterior centred
    labels[(x < -5) & (x > -35) & (y > 0) & (y < 40) & (z > -60) & (z < -10)] = 3  # left, anterior, inferior
    labels[(np.abs(x + 20) < 12) & (np.abs(y + 30) < 12) & (np.abs(z - 40) < 12)] = 4  # left, posterior, superior
    labels = labels.reshape(shape)
    return (-1000.0 + 250.0 * labels).astype(np.float32), labels, affine


def _class_of(image01: np.ndarray) -> np.ndarray:
    hu = np.asarray(image01, dtype=np.float32) * 2000.0 - 1000.0  # window (-1000, 1000)
    return np.round((hu + 1000.0) / 250.0).astype(np.uint8)


@pytest.mark.parametrize("storage,crop", [("fixed", False), ("fixed", True), ("highres", True)])
@pytest.mark.parametrize("axcodes", ORIENTATIONS)
def test_label_map_stays_aligned_voxelwise(axcodes, storage, crop):
    # anisotropic source spacing, resampled to 8 mm: every orientation, spacing, crop and pad step
    shape = (34, 27, 23)
    hu, labels, affine = _hand_made(axcodes, (4.0, 5.0, 6.5), shape)
    spec = PreprocessSpec(shape=(16, 16, 16), spacing_mm=(8.0, 8.0, 8.0), hu_window=(-1000.0, 1000.0),
                          interpolation="nearest", storage=storage, foreground_crop=crop,
                          body_threshold_hu=-900.0)
    image, carried = preprocess_volume(hu, affine, spec, labels)
    assert carried.dtype == np.uint8 and carried.shape == image.shape
    # with nearest interpolation for the CT too, both took the very same voxels: equal everywhere
    np.testing.assert_array_equal(carried, _class_of(image))
    assert set(np.unique(carried)) == {0, 1, 2, 3, 4}
    # and the CT is what preprocess_hu gives without a label map (one chain, the label map rides along)
    np.testing.assert_array_equal(image, preprocess_hu(hu, affine, spec))


@pytest.mark.parametrize("axcodes", ORIENTATIONS)
def test_label_map_lands_in_ras_where_its_world_position_says(axcodes):
    # the default bilinear CT interpolation: the label map is still resampled with nearest neighbours
    hu, labels, affine = _hand_made(axcodes, (4.0, 5.0, 6.5), (34, 27, 23))
    spec = PreprocessSpec(shape=(16, 16, 16), spacing_mm=(8.0, 8.0, 8.0), hu_window=(-1000.0, 1000.0))
    _, carried = preprocess_volume(hu, affine, spec, labels)
    assert set(np.unique(carried)) <= {0, 1, 2, 3, 4}  # no interpolated (in-between) classes
    ras = np.argwhere(carried == 2).mean(0)
    centre = (np.asarray(carried.shape) - 1) / 2
    # class 2 is on the patient's right (+x in RAS), class 3 anterior (+y) and inferior (-z), class 4 superior
    assert ras[0] > centre[0] + 2
    left_anterior = np.argwhere(carried == 3).mean(0)
    assert left_anterior[0] < centre[0] and left_anterior[1] > centre[1] and left_anterior[2] < centre[2]
    assert np.argwhere(carried == 4).mean(0)[2] > centre[2] + 2


def test_label_map_must_lie_on_the_ct_grid():
    hu, labels, affine = _hand_made("RAS", (4.0, 4.0, 4.0), (20, 20, 20))
    with pytest.raises(ValueError, match="label map shape"):
        preprocess_volume(hu, affine, PreprocessSpec(), labels[:-1])
    with pytest.raises(ValueError, match="integer classes"):
        preprocess_volume(hu, affine, PreprocessSpec(), labels - 1.5)


def test_phantom_label_maps_reach_the_shard_row(tmp_path):
    synthesize(tmp_path, 4, seed=1, workers=1)
    table = read_ctrate(tmp_path)
    assert table.attrs["label_map_classes"] == list(LABEL_MAP_CLASSES)
    assert json.loads((tmp_path / "label_maps" / "classes.json").read_text()) == list(LABEL_MAP_CLASSES)
    spec = PreprocessSpec(shape=(32, 32, 32), spacing_mm=(10.0, 10.0, 10.0))
    for row in json.loads(table.to_json(orient="records")):
        row["row"], row["fraction_rank"] = 0, 0.5
        label = nib.load(row["label"])
        ct = nib.load(row["image"])
        assert label.shape == ct.shape and np.allclose(label.affine, ct.affine)
        shard = preprocess_row(row, spec, list(table.attrs["label_names"]))
        carried = decode_label_map(shard[LABEL_MAP], shard["image_shape"])
        image = np.asarray(shard["image"], dtype=np.float32)
        names = {name: index for index, name in enumerate(LABEL_MAP_CLASSES)}
        assert (carried == names["lung"]).sum() > 200 and (carried == names["heart"]).sum() > 50
        # lungs are air-filled, the heart is contrast-enhanced blood: the CT agrees with the labels
        assert image[carried == names["lung"]].mean() < 0.25 < 0.55 < image[carried == names["heart"]].mean()
        assert (image[carried == 0] < 0.1).mean() > 0.95


def test_a_corpus_without_label_maps_gives_rows_without_the_column(tmp_path):
    hu, _, affine = _hand_made("LPS", (4.0, 4.0, 4.0), (20, 20, 20))
    path = tmp_path / "a.nii.gz"
    path.write_bytes(nifti_gz_bytes(np.round(hu).astype(np.int16), affine))
    row = {"row": 0, "image": str(path), "patient_id": "p", "split": "train", "fraction_rank": 0.5,
           "report": "No acute abnormality."}
    assert LABEL_MAP not in preprocess_row(row, PreprocessSpec(), [])
    row["label"] = None  # the corpus has the column, this row has no label map
    assert decode_label_map(preprocess_row(row, PreprocessSpec(), [])[LABEL_MAP], (48, 48, 48)) is None
