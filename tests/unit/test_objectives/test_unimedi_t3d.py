import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.method_overrides import TINY
from vlp3d.config import load_config
from vlp3d.encoders import build_image_encoder
from vlp3d.objectives.t3d import corrupt, sample_crops, tile_corners
from vlp3d.objectives.unimedi import (
    apply_center,
    dino_loss,
    ema_momentum,
    ema_update,
    select_slices,
    slice_mosaic,
    teacher_mean,
)
from vlp3d.train.tasks.pretrain import build_pretrainer


def test_ema_update_matches_the_formula():
    teacher, student = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t, t0, s in zip(teacher.parameters(), before, student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s.detach())
    assert ema_momentum(0, 100) == pytest.approx(0.996)
    assert ema_momentum(100, 100) == pytest.approx(1.0)
    assert ema_momentum(50, 100) == pytest.approx(0.998)  # cosine midpoint


def test_dino_center_update_matches_the_formula():
    center = torch.tensor([[1.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.0, 3.0, 3.0], [2.0, 1.0, 3.0]])  # batch mean [1, 2, 3]
    apply_center(center, teacher_mean(teacher), momentum=0.9)
    torch.testing.assert_close(center, torch.tensor([[0.9 * 1 + 0.1 * 1, 0.1 * 2, -0.9 + 0.1 * 3]]))


def test_dino_loss_hand_computed():
    k = 4
    # a uniform student against any teacher target: cross-entropy = ln K
    assert dino_loss(torch.randn(5, k), torch.zeros(5, k), torch.zeros(1, k), 0.04, 0.1).item() == pytest.approx(math.log(k))
    # centring: a teacher that equals its centre is uniform -> target 1/K; student logits [s, 0, 0, 0] / T
    teacher = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    student = torch.tensor([[0.1, 0.0, 0.0, 0.0]])
    log_p = F.log_softmax(student / 0.1, dim=-1)
    assert dino_loss(teacher, student, teacher, 0.04, 0.1).item() == pytest.approx(-(log_p.mean()).item() * 1.0, rel=1e-6)


def test_slice_selection_returns_the_slices_where_the_attention_is():
    encoder = build_image_encoder("unimedi_vit", "tiny", img_size=(32, 32, 24))
    grid = encoder.token_grid((1, 1, 32, 32, 24))  # (2, 2, 6): slabs of 4 slices along z
    attention = torch.full((1, *grid), 0.01)
    attention[..., 4] = 1.0  # slab 4 = slices 16..19
    attention[..., 1] += 0.2  # slab 1 = slices 4..7 (second)
    scores = encoder.attention_by_slice(attention.flatten(1), (1, 1, 32, 32, 24))
    # the best slab's centre first, then the other attended slab, each slice >= 4 (a slab) apart
    chosen = select_slices(scores, 2, min_gap=4)[0].tolist()
    assert chosen[1] in (17, 18) and chosen[0] in (5, 6)
    four = select_slices(scores, 4, min_gap=4)[0].tolist()
    assert len(set(four)) == 4 and min(b - a for a, b in zip(four, four[1:], strict=False)) >= 4
    assert {s // 4 for s in four} >= {1, 4}  # both attended slabs, never four slices of one slab


def test_slice_selection_ranks_by_score_with_a_gap_and_fills_up_short_volumes():
    scores = torch.tensor([[0.0, 0.1, 0.9, 1.0, 0.95, 0.2, 0.3, 0.0, 0.5, 0.0]])
    assert select_slices(scores, 1).tolist() == [[3]]
    assert select_slices(scores, 3, min_gap=1).tolist() == [[2, 3, 4]]  # plain top-k
    # 3 (1.0) rules out 1-5, 8 (0.5) rules out 6-7 and 9: only 0 is left
    assert select_slices(scores, 3, min_gap=3).tolist() == [[0, 3, 8]]
    # 10 slices cannot hold 5 slices 4 apart: the best remaining ones fill up, all distinct
    five = select_slices(scores, 5, min_gap=4)[0].tolist()
    assert len(set(five)) == 5 and {3, 8} <= set(five)
    batch = torch.stack([scores[0], scores[0].flip(0)])
    assert select_slices(batch, 1).tolist() == [[3], [6]]


def test_slice_mosaic_tiles_the_chosen_axial_slices():
    volume = torch.arange(2 * 2 * 5, dtype=torch.float32).reshape(1, 1, 2, 2, 5)
    mosaic = slice_mosaic(volume, torch.tensor([[1, 3, 4]]))  # 3 slices -> 2 x 2 tiles, last empty
    assert mosaic.shape == (1, 1, 4, 4)
    torch.testing.assert_close(mosaic[0, 0, :2, :2], volume[0, 0, :, :, 1])
    torch.testing.assert_close(mosaic[0, 0, :2, 2:], volume[0, 0, :, :, 3])
    torch.testing.assert_close(mosaic[0, 0, 2:, :2], volume[0, 0, :, :, 4])
    assert mosaic[0, 0, 2:, 2:].abs().sum() == 0


def test_unimedi_objective_mixed_2d_3d_and_teacher_follows_student():
    cfg = load_config(None, ["objective.name=unimedi", "model.size=tiny", "data.shape=[32,32,16]",
                             "objective.unimedi.dino_dim=64", "train.max_steps=10"])
    pre, weights = build_pretrainer(cfg, text_dim=384)
    assert set(weights) == {"vl_contrast", "distill_cls", "distill_patch"}
    assert not any(p.requires_grad for p in pre.objective.teacher_encoder.parameters())
    report = F.normalize(torch.randn(3, 384), dim=-1)
    batch = {"volume": torch.rand(3, 1, 32, 32, 16), "report_embedding": report,
             "image_2d": torch.rand(3, 1, 32, 32), "report_embedding_2d": report}
    terms = pre(batch)
    assert set(terms) == set(weights) and all(torch.isfinite(v) for v in terms.values())
    assert pre.objective.center_cls.abs().sum() == 0  # the centres move after the step, not in forward
    sum(terms.values()).backward()
    assert pre.model.image_encoder.patch_embed_2d.weight.grad.abs().sum() > 0
    assert pre.model.image_encoder.patch_embed_3d.weight.grad.abs().sum() > 0
    student = pre.model.image_encoder.cls_token
    with torch.no_grad():
        student.add_(1.0)
    teacher_before = pre.objective.teacher_encoder.cls_token.detach().clone()
    pre.after_step(1)
    assert pre.objective.center_cls.abs().sum() > 0  # centre moved
    m = ema_momentum(1, 10)
    torch.testing.assert_close(pre.objective.teacher_encoder.cls_token, m * teacher_before + (1 - m) * student.detach())


def test_unimedi_needs_the_shared_vit():
    with pytest.raises(ValueError, match="unimedi_vit"):
        build_pretrainer(load_config(None, [*TINY, "objective.name=unimedi"]), text_dim=384)


@pytest.mark.parametrize("method", ["mg3d", "t3d", "unimedi"])
def test_choosing_a_method_alone_gives_a_runnable_config(method):
    """objective.name applies the method's encoder, data and optimiser defaults, so the encoder
    takes the model input (checked on the meta device: no weights are allocated)."""
    from vlp3d.objectives.model import check_encoder_input

    cfg = load_config(None, [f"objective.name={method}"])
    assert cfg.model.image_encoder == {"mg3d": "swin3d", "t3d": "swin3d", "unimedi": "unimedi_vit"}[method]
    assert cfg.data.report_sections == ("Findings_EN", "Impressions_EN")
    check_encoder_input(cfg)


def test_corruption_blanks_and_shuffles_local_patches():
    crop = torch.rand(2, 1, 8, 8, 8)
    assert corrupt(crop, 4, 1.0, 0.0, 0.0).abs().sum() == 0  # every patch blanked
    shuffled = corrupt(crop, 4, 0.0, 1.0, 0.0)  # every patch shuffled within itself
    assert not torch.equal(shuffled, crop)
    for x in (0, 4):
        for z in (0, 4):
            a = crop[0, 0, x:x + 4, :4, z:z + 4].flatten().sort().values
            b = shuffled[0, 0, x:x + 4, :4, z:z + 4].flatten().sort().values
            torch.testing.assert_close(a, b)
    noisy = corrupt(torch.zeros(1, 1, 8, 8, 8), 4, 0.0, 0.0, 0.1, torch.Generator().manual_seed(0))
    assert 0.05 < noisy.std().item() < 0.15


def test_crops_are_centred_in_the_body_and_tiles_cover_the_volume():
    volume = np.zeros((40, 30, 20), dtype=np.float16)
    volume[25:35, 5:25, 5:15] = 0.8  # the "body"
    crops = sample_crops(volume, (8, 8, 8), 20, np.random.default_rng(0), body_level=0.25)
    assert crops.shape == (20, 8, 8, 8)
    assert (crops[:, 4, 4, 4] > 0.25).all()
    small = sample_crops(volume[:6], (8, 8, 8), 1, np.random.default_rng(0), 0.25)
    assert small.shape == (1, 8, 8, 8)  # zero-padded
    corners = tile_corners((40, 30, 20), (16, 16, 16))
    assert {c[0] for c in corners} == {0, 16, 24} and {c[2] for c in corners} == {0, 4}
    covered = np.zeros((40, 30, 20), dtype=bool)
    for c in corners:
        covered[c[0]:c[0] + 16, c[1]:c[1] + 16, c[2]:c[2] + 16] = True
    assert covered.all()


def test_t3d_objective_terms():
    cfg = load_config(None, [*TINY, "objective.name=t3d", "objective.t3d.crop_shape=[16,16,16]", "objective.t3d.corrupt_patch=4"])
    pre, weights = build_pretrainer(cfg, text_dim=384)
    terms = pre({"crops": torch.rand(3, 2, 1, 16, 16, 16), "report_embedding": F.normalize(torch.randn(3, 384), dim=-1)})
    assert set(terms) == {"text_contrast", "crop_contrast", "restore"} == set(weights)
    sum(terms.values()).backward()
    assert not [n for n, p in pre.named_parameters() if p.requires_grad and p.grad is None]  # DDP-safe
    with pytest.raises(ValueError, match="num_crops"):
        build_pretrainer(load_config(None, [*TINY, "objective.name=t3d", "objective.t3d.num_crops=1"]), text_dim=384)


@pytest.mark.parametrize("with_2d", [False, True])
def test_unimedi_gives_every_parameter_a_gradient_so_ddp_needs_no_unused_search(with_2d):
    """The pseudo-2D mosaic uses the 2D tokenizer even without radiographs: with every term on,
    no parameter idles, so DDP runs without find_unused_parameters; an idle head needs it."""
    from vlp3d.objectives import objective_class

    cfg = load_config(None, ["objective.name=unimedi", "model.size=tiny", "data.shape=[32,32,16]",
                             "data.shape_2d=[32,32]", "objective.unimedi.dino_dim=32"])
    pre, weights = build_pretrainer(cfg, text_dim=384)
    unimedi = objective_class("unimedi")
    assert not unimedi.find_unused_parameters(weights, pre.model.image_encoder)
    assert unimedi.find_unused_parameters({"vl_contrast"}, pre.model.image_encoder)  # DINO head idle
    assert unimedi.find_unused_parameters({"distill_cls"}, pre.model.image_encoder)  # projections idle
    report = F.normalize(torch.randn(2, 384), dim=-1)
    batch = {"volume": torch.rand(2, 1, 32, 32, 16), "report_embedding": report}
    if with_2d:
        batch.update(image_2d=torch.rand(2, 1, 32, 32), report_embedding_2d=report)
    sum(weights[k] * v for k, v in pre(batch).items()).backward()
    assert not [n for n, p in pre.named_parameters() if p.requires_grad and p.grad is None]


def test_unimedi_2d_positions_are_learned_on_data_shape_2d_and_old_checkpoints_load():
    small = build_pretrainer(load_config(None, ["objective.name=unimedi", "model.size=tiny", "data.shape=[32,32,16]",
                                                "data.shape_2d=[64,64]", "objective.unimedi.dino_dim=32"]),
                             text_dim=384)[0].model.image_encoder
    assert small.grid_2d == (4, 4) and small.pos_embed_2d.shape[1] == 16  # not a 224^2 grid resampled
    old = build_image_encoder("unimedi_vit", "tiny", img_size=(32, 32, 16))  # the 14 x 14 table of 224^2
    assert old.pos_embed_2d.shape[1] == 196
    with torch.no_grad():
        old.pos_embed_2d.copy_(torch.randn_like(old.pos_embed_2d))
    small.load_state_dict(old.state_dict())
    expected = F.interpolate(old.pos_embed_2d.reshape(1, 14, 14, -1).movedim(-1, 1), size=(4, 4), mode="bicubic",
                             align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(small.pos_embed_2d.detach(), expected.detach())
