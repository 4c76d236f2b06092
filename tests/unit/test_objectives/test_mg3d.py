import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from tests.method_overrides import TINY
from tests.unit.test_objectives import gloo
from tests.unit.test_objectives.gloo import WORLD
from vlp3d.config import load_config
from vlp3d.encoders.export import saved_activation_bytes
from vlp3d.objectives.heads import masked_mse, patch_mask, upsample_mask
from vlp3d.objectives.mg3d import (
    DisentangledAggregator,
    MG3DObjective,
    disentangled_infonce,
    masked_token_ce,
    sentence_match,
    whole_word_mask,
)
from vlp3d.objectives.model import term_weights
from vlp3d.train.tasks.pretrain import build_pretrainer


def test_mim_loss_ignores_unmasked_voxels():
    target = torch.zeros(1, 1, 4, 4, 4)
    mask = torch.zeros_like(target, dtype=torch.bool)
    mask[..., :2] = True  # half the voxels
    prediction = torch.zeros_like(target)
    prediction[..., :2] = 1.0  # error 1 on every masked voxel
    assert masked_mse(prediction, target, mask).item() == pytest.approx(1.0)
    prediction[..., 2:] = 100.0  # huge error on unmasked voxels changes nothing
    assert masked_mse(prediction, target, mask).item() == pytest.approx(1.0)
    prediction[0, 0, 0, 0, 0] = 3.0  # one masked voxel with error 3: (31 * 1 + 9) / 32
    assert masked_mse(prediction, target, mask).item() == pytest.approx(40 / 32)


def test_patch_mask_masks_exactly_the_ratio_and_covers_token_cells():
    mask = patch_mask((2, 2, 3), batch=5, ratio=0.5)
    assert mask.shape == (5, 12) and (mask.sum(1) == 6).all()
    voxels = upsample_mask(mask, (2, 2, 3), (8, 8, 12))
    assert voxels.shape == (5, 1, 8, 8, 12)
    assert voxels.float().mean().item() == pytest.approx(0.5)  # each token owns a 4x4x4 cell
    cell = voxels[0, 0, :4, :4, :4]
    assert cell.all() == mask[0, 0] and cell.any() == mask[0, 0]


def _pairs(cosines):
    """Unit report vectors in 2D with the given angles (cos of differences = similarities)."""
    return torch.tensor([[math.cos(a), math.sin(a)] for a in cosines])


def test_sentence_match_ignores_middle_band_and_is_zero_at_targets():
    # report 0 and 1: cos 0.95 (target 1); 0 and 2: cos 0 (target 0); 1 and 2: cos(angle) ~ 0.31 (target 0)
    a = math.acos(0.95)
    report = _pairs([0.0, a, math.pi / 2])
    # image features that already predict those targets: 0 and 1 identical, 2 orthogonal to both
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert sentence_match(features, report).item() == pytest.approx(0.0, abs=1e-6)
    # move report 2 into the middle band w.r.t. report 0 (cos 0.75): that pair is ignored
    report_mid = _pairs([0.0, a, math.acos(0.75)])
    # kept: (0,1),(1,0) predicted 1, target 1 -> 0; (1,2),(2,1): cos(acos .75 - acos .95) = 0.92 -> target 1,
    # predicted 0 -> 1 each; (0,2),(2,0) ignored. Mean over the 4 kept pairs = 2 / 4.
    expected = 0.5
    assert sentence_match(features, report_mid).item() == pytest.approx(expected, abs=1e-6)
    # changing predictions on an ignored pair (0, 2) changes nothing: only feature 2 moves, and
    # (1, 2) stays predicted 0 as long as feature 2 stays orthogonal to feature 1 == feature 0
    features_b = features.clone()
    features_b[2] = torch.tensor([0.0, -1.0])
    assert sentence_match(features_b, report_mid).item() == pytest.approx(expected, abs=1e-6)


def test_whole_word_masking_masks_every_piece_of_a_word_and_no_special_tokens():
    from transformers import AutoTokenizer

    from vlp3d.encoders.text import resolve_text_encoder

    tokenizer = AutoTokenizer.from_pretrained(resolve_text_encoder("minilm"))
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    is_subword = torch.tensor([t.startswith("##") for t in vocab])
    special = torch.zeros(len(vocab), dtype=torch.bool)
    special[tokenizer.all_special_ids] = True
    batch = tokenizer(["bronchiectasis and lymphadenopathy with peribronchial thickening"] * 64,
                      padding="max_length", max_length=24, return_tensors="pt")
    ids, attention = batch["input_ids"], batch["attention_mask"]
    generator = torch.Generator().manual_seed(0)
    masked = whole_word_mask(ids, attention, is_subword, special, prob=0.3, generator=generator)
    assert not masked[special[ids] | ~attention.bool()].any()
    assert (masked.sum(1) >= 1).all()
    starts = (~is_subword[ids]) & attention.bool() & ~special[ids]
    word = torch.cumsum(starts.long(), 1)
    for row in range(ids.shape[0]):
        for w in word[row][masked[row]].unique():
            pieces = (word[row] == w) & attention.bool()[row] & ~special[ids[row]]
            assert masked[row][pieces].all()  # all pieces of a chosen word
    share = masked.float().sum() / (attention.bool() & ~special[ids]).float().sum()
    assert 0.15 < share.item() < 0.5
    none = whole_word_mask(ids, attention, is_subword, special, prob=0.0)
    assert all(len(word[row][none[row]].unique()) == 1 for row in range(64))  # exactly one word each


def test_disentangled_gates_are_sigmoid_not_softmax_and_padding_is_ignored():
    torch.manual_seed(0)
    aggregator = DisentangledAggregator(query_dim=4, sentence_dim=3, out_dim=5, dim=8, layers=1)
    image = torch.randn(2, 4)
    sentence = torch.randn(1, 1, 3)
    one = aggregator(image, sentence, torch.ones(1, 1, dtype=torch.bool))
    # the same sentence twice: a softmax would split the weight, a sigmoid gate mean keeps it
    two = aggregator(image, sentence.repeat(1, 2, 1), torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(one, two)
    padded = torch.cat([sentence, torch.randn(1, 3, 3)], dim=1)
    mask = torch.tensor([[True, False, False, False]])
    torch.testing.assert_close(aggregator(image, padded, mask), one)


def _batch(reports: list[str]) -> dict[str, torch.Tensor]:
    """A 32^3 MG-3D batch of len(reports) volumes with tokenised reports."""
    from vlp3d.encoders.text import TextEncoder

    b = len(reports)
    tokens = TextEncoder("minilm", max_tokens=32).tokenize(reports)
    return {"volume": torch.rand(b, 1, 32, 32, 32), "report_embedding": F.normalize(torch.randn(b, 384), dim=-1),
            "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
            "sentence_embeddings": torch.randn(b, 4, 384), "sentence_mask": torch.ones(b, 4, dtype=torch.bool)}


def test_mg3d_objective_terms_and_ablations():
    cfg = load_config(None, [*TINY, "objective.name=mg3d", "data.shape=[32,32,32]"])
    assert cfg.objective.align_weight == 0.1 and cfg.objective.head_lr_mult == 5.0  # METHODS.md defaults
    assert cfg.objective.temperature == 0.1 and not cfg.objective.learnable_temperature
    pre, weights = build_pretrainer(cfg, text_dim=384)
    assert weights == {"align": 0.1, "mim": 1.0, "mlm": 1.0, "sentence_consistency": 0.1,
                       "disentangled": 0.1, "sentence_match": 0.1}
    batch = _batch(["Small nodule in the left lung.", "No effusion."])
    terms = pre(batch)
    assert set(terms) == set(weights) and all(torch.isfinite(v) for v in terms.values())
    sum(weights[k] * v for k, v in terms.items()).backward()
    assert pre.model.image_encoder.stem[0].weight.grad.abs().sum() > 0
    no_inter = load_config(None, [*TINY, "objective.name=mg3d", "objective.mg3d.disentangled_weight=0",
                                  "objective.mg3d.sentence_match_weight=0"])
    assert set(term_weights(no_inter)) == {"align", "mim", "mlm", "sentence_consistency"}
    with pytest.raises(ValueError, match="weight 0"):
        term_weights(load_config(None, [*TINY, "objective.name=mg3d", *[f"{MG3DObjective.weight_key(t)}=0" for t in weights]]))


def test_checkpointing_the_extra_passes_saves_activations_and_keeps_losses_and_gradients():
    cfg = load_config(None, [*TINY, "objective.name=mg3d", "data.shape=[32,32,32]", "model.gradient_checkpointing=true"])
    pre, weights = build_pretrainer(cfg, text_dim=384)
    assert pre.objective.checkpointing
    pre.model.image_encoder.gradient_checkpointing = False  # measure the objective's own checkpointing alone
    batch = _batch(["Small nodule in the left lung.", "No effusion."])
    runs = {}
    for checkpointing in (False, True):
        pre.objective.checkpointing = checkpointing
        pre.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same MIM and MLM masks
        terms = {}
        saved = saved_activation_bytes(lambda out=terms: out.update(pre(batch)), pre.parameters())
        sum(weights[k] * v for k, v in terms.items()).backward()
        grads = {n: p.grad.clone() for n, p in pre.named_parameters() if p.grad is not None}
        runs[checkpointing] = saved, {k: v.detach() for k, v in terms.items()}, grads
    (plain, plain_terms, plain_grads), (recomputed, terms, grads) = runs[False], runs[True]
    assert recomputed < 0.85 * plain, (recomputed, plain)  # 50 MB instead of 64 MB (torch 2.13 CPU)
    for key in plain_terms:
        torch.testing.assert_close(terms[key], plain_terms[key], msg=key)
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


# --- 2-process parity of the gathered inter-patient terms ---------------------------------------

LOCAL_B = 3


def _setup():
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    aggregator = DisentangledAggregator(query_dim=6, sentence_dim=5, out_dim=4, dim=8, layers=2)
    pooled = torch.randn(WORLD * LOCAL_B, 6, generator=g)
    weight = torch.randn(6, 4, generator=g)
    sentences = torch.randn(WORLD * LOCAL_B, 3, 5, generator=g)
    mask = torch.rand(WORLD * LOCAL_B, 3, generator=g) > 0.3
    mask[:, 0] = True
    mask[:LOCAL_B] = True  # the first worker's rows hold more sentences (and mlm tokens)
    base = torch.randn(1, 5, generator=g)
    report = F.normalize(base + 0.4 * torch.randn(WORLD * LOCAL_B, 5, generator=g), dim=-1)
    return aggregator, pooled, weight.requires_grad_(True), sentences, mask, report


def _losses(aggregator, pooled, weight, sentences, mask, report):
    image = F.normalize(pooled @ weight, dim=-1)
    # mlm-shaped: each row's "tokens" are its sentence slots, masked where `mask` is set, so the
    # workers hold different numbers of masked tokens
    tokens = (sentences @ torch.ones(5, 6) + pooled[:, None]) @ weight  # [rows, 3, 4] logits
    targets = (sentences[..., 0] > 0).long() + 2 * (sentences[..., 1] > 0).long()  # per row, in 0..3
    return (disentangled_infonce(aggregator, pooled @ torch.eye(6), image, sentences, mask, 10.0),
            sentence_match(pooled @ weight, report),
            masked_token_ce(tokens[mask], targets[mask]))


def _worker(rank, port, queue):
    gloo.start_worker(rank, port)
    torch.set_num_threads(1)
    aggregator, pooled, weight, sentences, mask, report = _setup()
    rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    out = []
    for which in range(3):
        weight.grad = None
        loss = _losses(aggregator, pooled[rows], weight, sentences[rows], mask[rows], report[rows])[which]
        loss.backward()
        grad, mean = weight.grad.clone(), loss.detach().clone()
        dist.all_reduce(grad)
        dist.all_reduce(mean)  # (global_mean's value is already the global one on every rank)
        out.append((float(mean) / WORLD, (grad / WORLD).tolist()))
    if rank == 0:
        queue.put(out)
    gloo.end_worker()


def test_inter_patient_terms_and_mlm_mean_match_single_process_across_two_workers():
    aggregator, pooled, weight, sentences, mask, report = _setup()
    reference = []
    for which in range(3):
        weight.grad = None
        loss = _losses(aggregator, pooled, weight, sentences, mask, report)[which]
        loss.backward()
        reference.append((loss.item(), weight.grad.clone()))
    assert reference[1][0] > 0  # some pairs kept, prediction not at target
    rows = [mask[r * LOCAL_B:(r + 1) * LOCAL_B].sum().item() for r in range(WORLD)]
    assert rows[0] != rows[1]  # the masked-token counts differ between the workers
    queue = mp.get_context("spawn").SimpleQueue()
    gloo.run(_worker, queue)
    for (loss, grad), (ref_loss, ref_grad) in zip(queue.get(), reference, strict=True):
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        torch.testing.assert_close(torch.tensor(grad), ref_grad, rtol=1e-4, atol=1e-6)


def test_every_trainable_parameter_gets_a_gradient():
    """DDP without find_unused_parameters fails on any parameter left out of the loss."""
    cfg = load_config("configs/mg3d_demo.toml", ["data.shape=[32,32,32]"])
    pre, weights = build_pretrainer(cfg, text_dim=384)
    batch = _batch(["Small nodule.", "No effusion."])
    sum(weights[k] * v for k, v in pre(batch).items()).backward()
    missing = [n for n, p in pre.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
