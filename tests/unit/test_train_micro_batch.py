"""Gradient caching (`train.micro_batch`, vlp3d.train.step.cached_backward): the step on micro-batches
gives the loss and every parameter gradient of one pass over the whole global batch, in one process
and across two gloo processes under DDP: within 1e-5 in float64 (where only the algorithm can differ;
it agrees to ~1e-12), and within 1e-5 of each tensor's largest value in float32 (summation order
alone moves fp32 gradients by ~4e-6 of that). Methods that cannot cache, and micro-batches that do
not divide the per-worker batch, are refused with a reason."""

from __future__ import annotations

import pytest
import torch

from tests.method_overrides import TINY
from tests.unit.test_objectives import gloo
from tests.unit.test_objectives.gloo import WORLD
from vlp3d.config import ConfigError, load_config
from vlp3d.train.step import train_step
from vlp3d.train.tasks.pretrain import (
    build_optimizer,
    build_pretrainer,
    build_scheduler,
    check_micro_batch,
)

TOLERANCE = 1e-5
GLOBAL, SHAPE, TEXT_DIM = 8, (16, 16, 16), 12
CLIP = ["data.shape=[16, 16, 16]", "model.embed_dim=16", "model.text_head=\"linear\"", "train.lr=0.01", "train.warmup_steps=0",
        f"train.global_batch={GLOBAL}"]


def _batch(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"volume": torch.randn(GLOBAL, 1, *SHAPE, generator=g, dtype=dtype),
            "report_embedding": torch.randn(GLOBAL, TEXT_DIM, generator=g, dtype=dtype)}


def _step(micro: int, rows: slice = slice(None), ddp: bool = False, dtype: torch.dtype = torch.float64
          ) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """One train_step of a freshly seeded CLIP pretrainer on `rows` of the batch: (metrics, gradients, weights after)."""
    cfg = load_config(None, [*CLIP, *TINY])
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        module, weights = build_pretrainer(cfg, text_dim=TEXT_DIM)
    finally:
        torch.set_default_dtype(default)
    optimizer, scheduler = build_optimizer(module, cfg), None
    scheduler = build_scheduler(optimizer, cfg)
    wrapped = torch.nn.parallel.DistributedDataParallel(module) if ddp else module
    grads = {}

    def keep_gradients():  # after_step runs once the optimizer stepped: read .grad before it changes
        grads.update({n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None})

    batch = {k: v[rows] for k, v in _batch(dtype).items()}
    metrics = train_step(wrapped, weights, batch, optimizer, scheduler, max_grad_norm=1e9, after_step=keep_gradients,
                         micro_batch=micro)
    return metrics, grads, {n: p.detach().clone() for n, p in module.named_parameters()}


def _assert_same(reference, other, relative: bool = False) -> None:
    """Loss, gradient norm, every gradient and every weight after the step within TOLERANCE (absolute,
    or of the tensor's largest value with `relative`)."""
    (m1, g1, w1), (m2, g2, w2) = reference, other
    assert m2["skipped"] == 0.0
    assert m2["loss"] == pytest.approx(m1["loss"], abs=TOLERANCE) and m2["loss/align"] == pytest.approx(m1["loss/align"], abs=TOLERANCE)
    assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=TOLERANCE, abs=TOLERANCE)
    assert set(g1) == set(g2) and len(g1) > 10  # every trained parameter, the logit scale included
    for name in g1:
        # (weights after AdamW's first step only in float64: Adam divides by the gradient's own size, so
        # a float32 gradient near 0 can flip the sign of its update)
        for a, b in ((g1[name], g2[name]), *(() if relative else ((w1[name], w2[name]),))):
            bound = TOLERANCE * (max(1.0, a.abs().max().item()) if relative else 1.0)
            assert (a - b).abs().max().item() <= bound, (name, (a - b).abs().max().item(), bound)


@pytest.mark.parametrize("micro", [1, 2, 4])
def test_micro_batches_give_the_whole_batch_loss_and_gradients(micro):
    torch.set_num_threads(1)
    _assert_same(_step(0), _step(micro))


def test_in_float32_micro_batches_differ_by_summation_order_only():
    torch.set_num_threads(1)
    _assert_same(_step(0, dtype=torch.float32), _step(2, dtype=torch.float32), relative=True)


def _worker(rank, port, micro, out):
    gloo.start_worker(rank, port)
    torch.set_num_threads(1)
    local = GLOBAL // WORLD
    result = _step(micro, slice(rank * local, (rank + 1) * local), ddp=True)
    if rank == 0:  # a file: megabytes of gradients would fill a queue's pipe before anyone reads it
        torch.save(result, out)
    gloo.end_worker()


def test_two_processes_with_micro_batches_equal_one_process_with_the_global_batch(tmp_path):
    """DDP over 2 gloo workers, 4 rows each (micro 2: two micro-batches per worker, global negatives
    through the all-gather) against one process stepping on all 8 rows at once."""
    gloo.run(_worker, 2, str(tmp_path / "rank0.pt"))
    torch.set_num_threads(1)
    _assert_same(_step(0), torch.load(tmp_path / "rank0.pt"))


def test_what_cannot_be_micro_batched_is_refused_with_the_reason():
    def check(*overrides):
        check_micro_batch(load_config(None, [*TINY, *overrides]))

    check("train.micro_batch=8", "train.global_batch=32", "cluster.num_workers=2")  # 16 per worker: fine
    check("train.micro_batch=0")
    with pytest.raises(ConfigError, match=r"train.micro_batch = 6 must divide the per-worker batch, "
                                          r"train.global_batch / cluster.num_workers = 32 / 2 = 16 \(e.g. 4\)"):
        check("train.micro_batch=6", "train.global_batch=32", "cluster.num_workers=2")
    with pytest.raises(ConfigError, match=r"objective 'mg3d' cannot split its step into micro-batches: .+"):
        check("objective.name=mg3d", *TINY, "train.micro_batch=4")
    with pytest.raises(ConfigError, match=r"objective 'unimedi' cannot split its step into micro-batches: .+"):
        check("objective.name=unimedi", "train.micro_batch=4")


def test_model_flops_counted_on_micro_batches_equal_the_whole_batch():
    """The step's model FLOPs are the same counted on the parts gradient caching runs (the contrastive
    loss on all the embeddings at once) as on the whole batch."""
    from vlp3d.train.flops import model_flops

    cfg = load_config(None, [*CLIP, *TINY])
    torch.manual_seed(0)
    module, _ = build_pretrainer(cfg, text_dim=TEXT_DIM)
    batch = _batch(torch.float32)
    whole = model_flops(module, batch)
    assert whole["flops_per_step"] > 0
    assert model_flops(module, batch, micro_batch=2) == whole
