"""Fine-tuning pieces without Ray: crops keep volume and label map aligned, classes are remapped, the
label-efficiency table summarises trials per initialisation and fraction."""

import math

import numpy as np
import pandas as pd
import pytest

from vlp3d.data.shards import encode_image
from vlp3d.platform.sweep_results import label_efficiency_table
from vlp3d.train.tasks.finetune import class_lookup, collate_for, random_crop


def test_random_crop_takes_the_same_window_of_volume_and_labels():
    rng = np.random.default_rng(0)
    volume = rng.random((20, 16, 12)).astype(np.float32)
    labels = (volume * 5).astype(np.uint8)  # the label is a function of the voxel value: alignment is checkable
    for _ in range(5):
        v, lab = random_crop(volume, labels, (8, 16, 16), rng)  # smaller in x, equal in y, larger in z (padded)
        assert v.shape == lab.shape == (8, 16, 16)
        np.testing.assert_array_equal(lab, (v * 5).astype(np.uint8))
        assert (v[:, :, :2] == 0).all() and (lab[:, :, :2] == 0).all()  # centred zero padding of z: 12 -> 16


def test_collate_remaps_classes_and_decodes_label_maps():
    volume = np.zeros((8, 8, 8), dtype=np.float16)
    labels = np.zeros((8, 8, 8), dtype=np.uint8)
    labels[:4], labels[4:6], labels[6:] = 1, 2, 3  # body, lung, heart
    volume[labels == 2] = 0.1
    batch = {"image": np.stack([volume]), "image_shape": np.array([[8, 8, 8]], dtype=np.int32),
             "label_map": np.array([encode_image(labels)], dtype=object), "row": np.array([0])}
    # segment lung and heart only (background 0, lung 1, heart 2): body becomes background
    out = collate_for("segmentation", (8, 8, 8), [0, 2, 3], "float16")(seed=0)(batch)
    assert out["volume"].shape == (1, 1, 8, 8, 8) and out["target"].shape == (1, 1, 8, 8, 8)
    target = out["target"][0, 0].numpy()
    np.testing.assert_array_equal(target, class_lookup([0, 2, 3])[labels])
    assert set(np.unique(target[:4])) == {0} and set(np.unique(target[4:6])) == {1} and set(np.unique(target[6:])) == {2}
    assert np.allclose(out["volume"][0, 0].numpy()[target == 1], 0.1, atol=1e-3)


def test_label_efficiency_table_means_and_intervals_per_initialisation():
    rows = []
    for init, base in (("pretrained", 0.8), ("random", 0.6)):
        for fraction in (0.1, 1.0):
            for seed in (0, 1):
                rows.append({"trial_id": f"{init}-{fraction}-{seed}", "status": "finished", "finetune.init": init,
                             "finetune.label_fraction": fraction, "train.seed": seed,
                             "eval_mean_dice": base + fraction / 10 + 0.02 * seed})
    rows.append({**rows[0], "trial_id": "failed", "status": "error", "eval_mean_dice": math.nan})
    table = label_efficiency_table(pd.DataFrame(rows), "eval_mean_dice").set_index(["features", "fraction"])
    assert len(table) == 4 and (table["trials"] == 2).all()
    assert table.loc[("pretrained", 0.1), "value"] == pytest.approx(0.82)
    assert table.loc[("random", 1.0), "value"] == pytest.approx(0.71)
    half = 12.706 * 0.02 / math.sqrt(2) / math.sqrt(2)  # t(0.975, 1) x sd / sqrt(n); sd of {x, x + 0.02}
    assert table.loc[("random", 0.1), "value"] == pytest.approx(0.62)
    assert table.loc[("random", 0.1), "value_ci_high"] - 0.62 == pytest.approx(half, rel=1e-3)
