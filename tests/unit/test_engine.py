"""The training engine without Ray: LR schedule, AdamW parameter groups, one optimisation step.
(The NaN/inf guard of train_step is tests/unit/test_training_guard.py.)"""

import math

import pytest
import torch
from torch.nn import functional as F

from vlp3d.config import load_config
from vlp3d.train.step import train_step, warmup_cosine
from vlp3d.train.tasks.pretrain import build_optimizer, build_pretrainer, build_scheduler

FLOOR = 0.02


def test_warmup_cosine_values():
    # linear warm-up: (step + 1) / warmup, reaching 1 on the last warm-up step
    assert [warmup_cosine(s, 4, 20) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert warmup_cosine(4, 4, 20) == pytest.approx(1.0)  # cosine starts at its top
    assert warmup_cosine(12, 4, 20) == pytest.approx(FLOOR + (1 - FLOOR) * 0.5)  # halfway
    assert warmup_cosine(8, 4, 20) == pytest.approx(FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert warmup_cosine(20, 4, 20) == pytest.approx(FLOOR)
    assert warmup_cosine(500, 4, 20) == pytest.approx(FLOOR)  # past max_steps: stays at the floor
    assert warmup_cosine(0, 0, 10) == pytest.approx(1.0)  # no warm-up
    assert warmup_cosine(10, 0, 10, floor=0.0) == pytest.approx(0.0)
    values = [warmup_cosine(s, 4, 20) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # monotone decay


def _clip(*overrides):
    cfg = load_config(None, ["data.shape=[32,32,32]", "model.text_head='linear'", "model.embed_dim=64",
                             "train.lr=0.001", "train.weight_decay=0.05", "objective.head_lr_mult=10.0",
                             "train.warmup_steps=2", "train.max_steps=10", *overrides])
    pretrainer, weights = build_pretrainer(cfg, text_dim=384)
    return cfg, pretrainer, weights


def test_parameter_groups():
    cfg, pretrainer, _ = _clip()
    optimizer = build_optimizer(pretrainer, cfg)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    trainable = [(n, p) for n, p in pretrainer.named_parameters() if p.requires_grad]
    assert len(group_of) == len(trainable) == sum(len(g["params"]) for g in optimizer.param_groups)
    seen = set()
    for name, param in trainable:
        group = group_of[id(param)]
        encoder = name.startswith("model.image_encoder.")
        no_decay = param.ndim <= 1 or name.endswith(".bias") or name.endswith("logit_scale")
        assert group["lr"] == pytest.approx(0.001 if encoder else 0.001 * 10.0), name
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
        seen.add((encoder, no_decay))
    # every kind is there: encoder/head x decay/none (norms and biases in the encoder, logit_scale in the head)
    assert seen == {(True, True), (True, False), (False, True), (False, False)}
    assert group_of[id(pretrainer.model.logit_scale)]["weight_decay"] == 0.0
    norms = [p for n, p in pretrainer.named_parameters() if "norm" in n or ".bn" in n]
    assert norms and all(group_of[id(p)]["weight_decay"] == 0.0 for p in norms)


def test_one_train_step_moves_the_weights_and_the_schedule():
    cfg, pretrainer, weights = _clip()
    optimizer = build_optimizer(pretrainer, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    assert scheduler.get_last_lr()[-1] == pytest.approx(0.001 * 0.5)  # warm-up step 0 of 2
    before = {n: p.detach().clone() for n, p in pretrainer.named_parameters()}
    g = torch.Generator().manual_seed(0)
    batch = {"volume": torch.rand(4, 1, 32, 32, 32, generator=g),
             "report_embedding": F.normalize(torch.randn(4, 384, generator=g), dim=-1)}
    metrics = train_step(pretrainer, weights, batch, optimizer, scheduler)
    assert metrics["skipped"] == 0.0 and math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert metrics["loss"] == pytest.approx(metrics["loss/align"])  # clip: one term, weight 1
    # warm-up step 1 of 2: every group at its peak; `lr` reports the image encoder's (train.lr)
    assert sorted(scheduler.get_last_lr()) == pytest.approx([0.001, 0.001, 0.01, 0.01])
    assert metrics["lr"] == pytest.approx(0.001)
    moved = {n for n, p in pretrainer.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert any(n.startswith("model.image_encoder.") for n in moved)
    assert {"model.image_proj.0.weight", "model.text_proj.weight", "model.logit_scale"} <= moved


def test_augment_batch_jitters_t3d_crops_one_by_one():
    from vlp3d.train.batches import augment_batch

    crops = torch.rand(2, 3, 1, 8, 8, 8)
    batch = augment_batch({"crops": crops.clone(), "report_embedding": torch.zeros(2, 4)}, torch.Generator().manual_seed(0))
    assert batch["crops"].shape == crops.shape and not torch.equal(batch["crops"], crops)
    # intensity jitter per crop: the ratio of means differs between crops of one volume
    ratios = batch["crops"].flatten(2).mean(-1) / crops.flatten(2).mean(-1)
    assert ratios.std() > 1e-3
    volume = torch.rand(2, 1, 8, 8, 8)
    assert not torch.equal(augment_batch({"volume": volume.clone()}, torch.Generator())["volume"], volume)


def test_term_balancer_reports_shares_and_moves_multipliers_towards_the_weights():
    from vlp3d.train.step import TermBalancer

    off = TermBalancer({"align": 0.1, "mim": 1.0}, every=10)
    assert off.due(10) and not off.due(11) and not TermBalancer({"align": 1.0}, every=10).due(10)  # one term: no shares
    metrics = off.update({"align": 1.0, "mim": 3.0})
    assert metrics == {"grad_share/align": 0.25, "grad_share/mim": 0.75, "grad_norm/align": 1.0, "grad_norm/mim": 3.0}
    assert off.effective() == {"align": 0.1, "mim": 1.0}  # measuring alone changes nothing

    on = TermBalancer({"a": 1.0, "b": 1.0}, every=5, balance=True)
    for _ in range(60):  # term a's gradient is 9x b's at equal weights: its multiplier falls, b's rises
        m = on.multipliers
        on.update({"a": 9.0 * m["a"], "b": 1.0 * m["b"]})
    assert on.multipliers["a"] < 0.25 and on.multipliers["b"] > 1.5  # towards a = 0.2, b = 1.8
    assert sum(on.effective().values()) == pytest.approx(2.0)  # the weights' sum is kept
    shares = {"a": 9.0 * on.multipliers["a"], "b": on.multipliers["b"]}
    assert shares["a"] / (shares["a"] + shares["b"]) == pytest.approx(0.5, abs=0.05)
    resumed = TermBalancer({"a": 1.0, "b": 1.0}, every=5, balance=True)
    resumed.load_state_dict(on.state_dict())
    assert resumed.effective() == on.effective()
    assert on.update({"a": float("nan"), "b": 1.0}) == {}  # a non-finite measurement is ignored


def test_sentence_dropout_re_averages_a_random_subset_of_the_stored_sentences():
    from vlp3d.encoders.text import report_embedding_from_sentences
    from vlp3d.train.batches import drop_sentences

    sentences = F.normalize(torch.randn(3, 4, 8), dim=-1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    kept_all = drop_sentences(sentences, mask, 0.0, torch.Generator().manual_seed(0))
    for i in range(3):  # p = 0: exactly the stored report embedding (padding ignored)
        torch.testing.assert_close(kept_all[i], report_embedding_from_sentences(sentences[i][mask[i]]))
    dropped = drop_sentences(sentences, mask, 0.99, torch.Generator().manual_seed(1))
    # nearly every sentence dropped: one real sentence is kept, never padding
    for i in range(3):
        assert any(torch.allclose(dropped[i], sentences[i, j], atol=1e-6) for j in range(4) if mask[i, j])
    varied = {tuple(drop_sentences(sentences, mask, 0.5, torch.Generator().manual_seed(s))[2].round(decimals=4).tolist())
              for s in range(8)}
    assert len(varied) > 1
