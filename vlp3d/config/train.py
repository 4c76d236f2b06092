"""`[train]`: the pretraining loop: optimiser, schedule, precision, checkpoints, data loading,
validation and the per-term gradient measurements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vlp3d.config.fields import _f


@dataclass(frozen=True)
class TrainConfig:
    global_batch: int = _f(32, "Batch size summed over all workers.", ge=1)
    micro_batch: int = _f(
        0, "Rows of a worker's batch put through the image encoder at once (sets the memory; 0: the whole "
        "per-worker batch, train.global_batch / cluster.num_workers). Smaller, and the step is the same "
        "step: contrastive terms are computed over the whole global batch with every negative (gradient "
        "caching: all micro-batches embedded without a graph, the loss and its gradient on the embeddings, "
        "then each micro-batch re-run and back-propagated), per-sample terms accumulated; must divide the "
        "per-worker batch. Methods that cannot cache say why (docs/methods.md).",
        ge=0,
    )
    max_steps: int = _f(600, "Optimizer steps to train for.", ge=1)
    lr: float = _f(2e-3, "Peak learning rate (AdamW).", gt=0)
    weight_decay: float = _f(1e-4, "AdamW weight decay.", ge=0)
    warmup_steps: int = _f(20, "Linear warm-up steps before cosine decay.", ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", "Autocast precision (bf16/fp16 on GPU).")
    seed: int = _f(0, "Seed for model init, data order and augmentation.", ge=0, le=2**32 - 1)
    log_every: int = _f(10, "Report metrics every N steps.", ge=1)
    val_every: int = _f(
        0, "Compute the validation loss (`val/loss`, the objective on data.eval_split) every N steps; it is "
        "always computed at the last step (0: only then). Sweeps with tune.scheduler = 'asha' stop trials on it.",
        ge=0,
    )
    val_volumes: int = _f(0, "Held-out volumes used for the validation loss (0: all of data.eval_split).", ge=0)
    checkpoint_every: int = _f(100, "Checkpoint every N steps (and at the end).", ge=1)
    keep_checkpoints: int = _f(2, "Checkpoints kept on storage.", ge=1)
    max_failures: int = _f(2, "Worker-group restarts tolerated; training resumes from the last checkpoint.", ge=0)
    prefetch_batches: int = _f(
        16, "Batches each worker prepares ahead in a background thread (read, shuffle, collate), so the next "
        "batches and each epoch's shuffle-buffer refill overlap training (train/time/data_wait_s and "
        "train/data_wait_share show what is left). On CUDA the batches are pinned and copied to the GPU a step ahead.",
        ge=1,
    )
    augment: bool = _f(True, "Random intensity jitter and small shifts on training volumes (and on each of T3D's crops).")
    sentence_dropout: float = _f(
        0.0, "Ours: share of each report's sentences left out, at random per step, of the report embedding a "
        "training volume is aligned to (text augmentation with a frozen text encoder: the stored sentence "
        "embeddings are re-averaged). 0: the stored report embedding.",
        ge=0, le=1,
    )
    grad_share_every: int = _f(
        50, "Every N steps, measure each weighted loss term's share of the image encoder's gradient norm "
        "(train/grad_share/<term>, train/grad_norm/<term>) with one extra backward pass per term; shows when "
        "one term drowns the others. 0: never. Multi-term objectives only.",
        ge=0,
    )
    balance_terms: bool = _f(
        False, "Ours, not in the papers: at each train.grad_share_every measurement, move a multiplier per term "
        "(EMA, clamped to [0.01, 100]) so that the terms' encoder-gradient shares approach their configured "
        "weights' shares (train/term_multiplier/<term>). Needs train.grad_share_every > 0.",
    )
    max_skipped_steps: int = _f(
        10, "Consecutive steps with a non-finite loss or gradient (skipped on every rank, counted in "
        "train/skipped_steps) after which the run stops, naming the step and the terms.",
        ge=1,
    )
