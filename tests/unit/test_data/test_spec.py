"""PreprocessSpec: built from the data config in one place, defaults from one source, and the one
body level in stored units (T3D's crops at train time, its tiles at evaluation)."""

import dataclasses

import numpy as np
import pytest
import torch

from vlp3d.config import DataConfig, load_config
from vlp3d.data.shards import spec_from_config
from vlp3d.data.volume import PreprocessSpec, body_level, dequantise, quantise


def test_spec_defaults_are_the_config_defaults():
    assert PreprocessSpec() == spec_from_config(load_config(None))
    data = DataConfig()
    shared = {f.name for f in dataclasses.fields(PreprocessSpec)} & {f.name for f in dataclasses.fields(DataConfig)}
    assert {"report_sections", "hu_window", "storage_dtype", "body_threshold_hu"} <= shared
    for name in shared:
        assert getattr(PreprocessSpec(), name) == getattr(data, name), name


def test_spec_from_config_takes_every_shared_setting():
    cfg = load_config(None, ["data.report_sections=['Findings_EN']", "data.hu_window=[-200.0, 300.0]",
                             "data.storage_dtype='uint8'", "data.body_threshold_hu=-300.0", "model.text_encoder='x'"])
    spec = spec_from_config(cfg)
    assert (spec.report_sections, spec.hu_window, spec.storage_dtype) == (("Findings_EN",), (-200.0, 300.0), "uint8")
    assert (spec.body_threshold_hu, spec.text_encoder) == (-300.0, "x")


def test_from_dict_round_trips_a_stored_spec():
    spec = PreprocessSpec(shape=(8, 8, 8), storage="highres", storage_dtype="uint8")
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    assert PreprocessSpec.from_dict(spec.to_dict()).hash == spec.hash


@pytest.mark.parametrize("dtype", ["float16", "uint8"])
def test_body_level_is_the_threshold_in_stored_units(dtype):
    spec = PreprocessSpec(hu_window=(-1000.0, 1000.0), storage_dtype=dtype, body_threshold_hu=-500.0)
    # voxels 1 HU either side of the threshold, stored as prepare stores them
    stored = torch.from_numpy(quantise(np.array([(-510.0 + 1000) / 2000, (-490.0 + 1000) / 2000]), dtype))
    assert (stored.float() > body_level(spec)).tolist() == [False, True]
    assert (dequantise(stored) > body_level(spec, dequantised=True)).tolist() == [False, True]
    assert body_level(spec, dequantised=True) == pytest.approx(0.25)
    assert body_level(spec, -1000.0) == 0.0
