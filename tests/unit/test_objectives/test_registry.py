"""The objective registry and each objective's contract (what training, the shard checks,
evaluation and the demo read instead of the method's name)."""

import typing
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.method_overrides import TINY
from vlp3d.config import OBJECTIVES, ObjectiveConfig, key_annotation, load_config
from vlp3d.encoders.unimedi import UniMedIViT
from vlp3d.errors import InputError
from vlp3d.objectives import REGISTRY, objective_class
from vlp3d.objectives.base import Objective
from vlp3d.objectives.model import model_input_shape


def test_config_method_names_and_registry_agree():
    literal = typing.get_args(typing.get_type_hints(ObjectiveConfig)["name"])
    assert set(literal) == set(REGISTRY) == set(OBJECTIVES)
    for name in REGISTRY:
        cls = objective_class(name)
        assert issubclass(cls, Objective) and cls.name == name
        # each term's weight: objective.align_weight or the method's table (objective.mg3d.mim_weight)
        assert all(key_annotation(cls.weight_key(t)) is float for t in cls.terms), name
        assert "image" in cls.columns and "report_embedding" in cls.columns
    with pytest.raises(InputError, match="not one of clip, mg3d, t3d, unimedi"):
        objective_class("simclr")


def test_contracts():
    t3d, clip, unimedi = objective_class("t3d"), objective_class("clip"), objective_class("unimedi")
    assert (t3d.storage, t3d.evaluation, "row" in t3d.columns) == ("highres", "tiles", True)
    assert (clip.storage, clip.evaluation, clip.uses_2d, unimedi.uses_2d) == ("fixed", "volume", False, True)
    cfg = load_config(None, [*TINY, "objective.name=t3d", "objective.t3d.crop_shape=[16,16,16]", "data.shape=[32,32,32]"])
    assert model_input_shape(cfg) == (16, 16, 16)
    assert model_input_shape(load_config(None, ["data.shape=[32,32,24]"])) == (32, 32, 24)
    assert clip.collate(cfg, {}) is None and callable(t3d.collate(cfg, {"storage": "highres"}))


def test_shard_checks_name_the_setting():
    where = Path("shards")
    cfg = load_config(None, [*TINY, "objective.name=t3d", "objective.t3d.crop_shape=[16,16,16]", "data.shape=[32,32,32]"])
    objective_class("t3d").check_shards(cfg, {"storage": "highres"}, where)
    with pytest.raises(ValueError, match='data.storage = "highres"'):
        objective_class("t3d").check_shards(cfg, {"storage": "fixed"}, where)
    with pytest.raises(ValueError, match='data.storage = "fixed"'):
        objective_class("mg3d").check_shards(cfg, {"storage": "highres"}, where)
    objective_class("clip").check_shards(cfg, {}, where)  # an old manifest without `storage`: fixed
    small = load_config(None, [*TINY, "objective.name=t3d", "objective.t3d.crop_shape=[48,48,48]", "data.shape=[32,32,32]"])
    with pytest.raises(ValueError, match="exceeds data.shape"):
        objective_class("t3d").check_shards(small, {"storage": "highres"}, where)


def test_ddp_finds_unused_parameters_from_the_active_terms():
    plain, vit = SimpleNamespace(), SimpleNamespace(input_specific_parameters=True)
    assert UniMedIViT.input_specific_parameters
    clip, mg3d = objective_class("clip"), objective_class("mg3d")
    assert not clip.find_unused_parameters({"align"}, plain) and clip.find_unused_parameters({"align"}, vit)
    every = set(mg3d.terms)
    assert not mg3d.find_unused_parameters(every, plain)
    assert mg3d.find_unused_parameters(every - {"mlm"}, plain)  # the consistency head idles
    assert mg3d.find_unused_parameters({"sentence_match"}, plain)  # the projections idle
    assert not mg3d.find_unused_parameters({"disentangled"}, plain)


@pytest.mark.parametrize("active", [("text_contrast", "crop_contrast", "restore"), ("text_contrast",), ("restore",)])
def test_find_unused_parameters_matches_the_gradients(active):
    """What DDP would meet: a parameter without a gradient exactly when the contract says so."""
    import torch
    from torch.nn import functional as F

    from vlp3d.train.tasks.pretrain import build_pretrainer

    terms = objective_class("t3d").terms
    cfg = load_config(None, [*TINY, "objective.name=t3d", "objective.t3d.crop_shape=[16,16,16]", "data.shape=[32,32,32]",
                             "objective.t3d.num_crops=2", "objective.t3d.corrupt_patch=4",
                             *[f"objective.t3d.{t}_weight={1.0 if t in active else 0.0}" for t in terms]])
    pre, weights = build_pretrainer(cfg, text_dim=384)
    batch = {"crops": torch.rand(2, 2, 1, 16, 16, 16), "report_embedding": F.normalize(torch.randn(2, 384), dim=-1)}
    sum(weights[k] * v for k, v in pre(batch).items()).backward()
    idle = [n for n, p in pre.named_parameters() if p.requires_grad and p.grad is None]
    assert pre.objective.find_unused_parameters(weights, pre.model.image_encoder) == bool(idle), idle
