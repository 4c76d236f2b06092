"""Pretraining as a task of the training loop: the configured method's objective around the embedding
model (`Pretrainer`), its optimizer, its batches (the CT shards, UniMedI's radiographs), augmentation,
sentence dropout, the validation loss on the held-out split, and the checks a run can fail before it
starts (`preflight`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from vlp3d import storage
from vlp3d.config import ConfigError, ExperimentConfig
from vlp3d.data.shards import read_manifest, resolve_shard_dir, shard_files, spec_from_config
from vlp3d.data.splits import expected_rows
from vlp3d.encoders.export import count_parameters
from vlp3d.errors import InputError
from vlp3d.objectives import objective_class
from vlp3d.objectives.model import (
    VisionLanguageModel,
    build_model,
    check_encoder_input,
    term_weights,
    text_dim_for,
)
from vlp3d.train.batches import augment_batch, drop_sentences, to_model_batch
from vlp3d.train.feed import LocalRows, RowSource, device_feed, ordered_batches
from vlp3d.train.loop import Task
from vlp3d.train.runtime import Runtime
from vlp3d.train.step import autocast, warmup_cosine_schedule

VALIDATION_SEED = 20_251_129  # same masks, crops and corruptions at every validation: comparable curves
SHUFFLE_BUFFER_BYTES = 256 * 2**20  # per rank, of stored rows
MIN_VALID_PER_RANK = 2  # the validation loss needs a negative for InfoNCE on every rank


class Pretrainer(nn.Module):
    """The module DDP wraps: the model plus the objective's heads, so both get synchronised gradients
    and several encoder passes per step stay inside one DDP forward."""

    def __init__(self, model: VisionLanguageModel, objective: nn.Module):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: Mapping[str, torch.Tensor], part: str = "all") -> dict[str, torch.Tensor]:
        """The objective's terms of `batch`, or one part of them for gradient caching (`Objective.embed`,
        `batch_terms` of embeddings, `sample_terms`; vlp3d.train.step): every part goes through this
        forward, so through the DDP wrapper."""
        if part == "all":
            return self.objective(self.model, batch)
        return getattr(self.objective, {"embed": "embed", "batch": "batch_terms", "sample": "sample_terms"}[part])(
            self.model, batch)

    def after_step(self, step: int) -> None:
        if hasattr(self.objective, "after_step"):
            self.objective.after_step(self.model, step)

    def degenerate_state(self) -> list[str]:
        return self.objective.degenerate_state(self.model)


def build_pretrainer(cfg: ExperimentConfig, text_dim: int | None = None) -> tuple[Pretrainer, dict[str, float]]:
    """(model + objective heads, weight per active loss term)."""
    text_dim = text_dim or text_dim_for(cfg)
    weights = term_weights(cfg)
    model = build_model(cfg, text_dim=text_dim)
    objective = objective_class(cfg.objective.name)(cfg, model, text_dim)
    return Pretrainer(model, objective), weights


def compile_image_encoder(model: VisionLanguageModel, backend: str = "inductor") -> None:
    """`model.compile`: torch.compile the image encoder in place (`nn.Module.compile`), so the module,
    its parameters and its state-dict keys stay as they are: checkpoints and exports hold the plain
    keys, never an `OptimizedModule`'s `_orig_mod.` prefix. Call it before the DDP wrapper. Tracing
    and compiling happen at the encoder's first call for each input shape and train/eval mode (run
    those calls inside `vlp3d.train.step.compile_errors`). A first call under a TorchDispatchMode
    (FlopCounterMode) runs eager and leaves the encoder uncompiled for good: count FLOPs on a later step."""
    model.image_encoder.compile(backend=backend)


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or "logit_scale" in name


def build_optimizer(module: nn.Module, cfg: ExperimentConfig) -> torch.optim.Optimizer:
    """AdamW; image-encoder parameters at train.lr, every other parameter (projections, objective
    heads) at train.lr x objective.head_lr_mult; no weight decay on biases, norms and tau."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            is_encoder = "image_encoder." in name and "objective." not in name
            groups.setdefault((is_encoder, _no_decay(name, param)), []).append(param)
    param_groups = [
        {"params": params, "lr": cfg.train.lr * (1.0 if is_encoder else cfg.objective.head_lr_mult),
         "weight_decay": 0.0 if no_decay else cfg.train.weight_decay, "name": "encoder" if is_encoder else "heads"}
        for (is_encoder, no_decay), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, lr=cfg.train.lr, betas=(0.9, 0.98), eps=1e-6)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ExperimentConfig):
    return warmup_cosine_schedule(optimizer, cfg.train.warmup_steps, cfg.train.max_steps)


# --- data --------------------------------------------------------------------------------------


def preflight(cfg: ExperimentConfig) -> tuple[Path | str, dict]:
    """Every check a run can fail before it starts (shards for this preprocessing spec, what the
    objective reads, batch split, encoder input, loss weights); returns (shard folder, manifest)."""
    if not cfg.data.shards:
        raise InputError("data.shards is empty: set it to the folder `vlp3d prepare --out` wrote.")
    spec = spec_from_config(cfg)
    shard_dir = resolve_shard_dir(cfg.data.shards, spec.hash)
    manifest = read_manifest(shard_dir)
    if not manifest["spec"].get("text_embeddings"):
        raise InputError(f"{shard_dir}: shards hold no report embeddings; prepare with data.text_embeddings=true.")
    if cfg.train.global_batch % cfg.cluster.num_workers:
        raise InputError(f"train.global_batch={cfg.train.global_batch} must be divisible by "
                         f"cluster.num_workers={cfg.cluster.num_workers}.")
    objective_class(cfg.objective.name).check_shards(cfg, manifest["spec"], shard_dir)
    check_micro_batch(cfg)
    check_encoder_input(cfg)
    term_weights(cfg)
    return shard_dir, manifest


def check_micro_batch(cfg: ExperimentConfig) -> None:
    """train.micro_batch: divides the per-worker batch, and the method can cache its gradients."""
    micro = cfg.train.micro_batch
    if micro < 0:
        raise ConfigError(f"train.micro_batch = {micro} must be >= 0 (0: the whole per-worker batch at once).")
    local = cfg.train.global_batch // max(1, cfg.cluster.num_workers)
    if not micro or micro >= local:
        return
    if local % micro:
        raise ConfigError(f"train.micro_batch = {micro} must divide the per-worker batch, train.global_batch / "
                          f"cluster.num_workers = {cfg.train.global_batch} / {cfg.cluster.num_workers} = {local} "
                          f"(e.g. {max(d for d in range(1, micro + 1) if local % d == 0)}).")
    objective = objective_class(cfg.objective.name)
    if objective.micro_batch_refusal is not None:
        raise ConfigError(f"train.micro_batch = {micro}: objective '{cfg.objective.name}' cannot split its step "
                          f"into micro-batches: {objective.micro_batch_refusal}. Set train.micro_batch = 0 and lower "
                          "train.global_batch, or add workers (cluster.num_workers).")
    if cfg.train.grad_share_every and len(term_weights(cfg)) > 1:
        raise ConfigError(f"train.micro_batch = {micro}: the per-term gradient shares (train.grad_share_every = "
                          f"{cfg.train.grad_share_every}) are not measured on cached gradients; set "
                          "train.grad_share_every = 0.")


def dataset_columns(cfg: ExperimentConfig, modality: str = "ct", held_out: bool = False) -> list[str]:
    """The shard columns a pretraining dataset reads: the objective's (`Objective.columns`) for CT, the
    image and report embedding for radiographs, and the stored sentence embeddings when
    `train.sentence_dropout` re-averages them per step."""
    if modality != "ct":
        return ["image", "report_embedding"]
    columns = list(objective_class(cfg.objective.name).columns)
    if cfg.train.sentence_dropout and not held_out:
        columns += [c for c in ("sentence_embeddings", "sentence_mask") if c not in columns]
    return columns


def has_validation(cfg: ExperimentConfig, manifest: dict, workers: int) -> bool:
    """Whether the held-out split gives every rank at least two volumes (a negative for InfoNCE)."""
    return expected_rows(manifest["counts"]["by_split"], cfg.data.eval_split) >= MIN_VALID_PER_RANK * workers


def local_datasets(cfg: ExperimentConfig, shard_dir: Path | str, manifest: dict) -> dict[str, RowSource]:
    """The datasets of a one-process run (`LocalRuntime`): the training split's `data.fraction` subset,
    the first `train.val_volumes` rows of `data.eval_split` for the validation loss, and UniMedI's
    radiographs, read from the shard files in the order Ray Data keeps (`vlp3d.data.rows`)."""
    files = shard_files(shard_dir, "ct")
    if not files:
        raise InputError(f"{shard_dir}: no CT shard files; re-run `vlp3d prepare`.")
    out: dict[str, RowSource] = {"train": LocalRows(files, dataset_columns(cfg), cfg.data.train_split,
                                                     cfg.data.fraction, materialize=cfg.data.materialize)}
    if has_validation(cfg, manifest, 1):
        out["valid"] = LocalRows(files, dataset_columns(cfg, held_out=True), cfg.data.eval_split,
                                 limit=cfg.train.val_volumes, materialize=cfg.data.materialize)
    xray = shard_files(shard_dir, "xray") if objective_class(cfg.objective.name).uses_2d else []
    if xray:
        out["train_2d"] = LocalRows(xray, dataset_columns(cfg, "xray"), cfg.data.train_split, cfg.data.fraction,
                                    materialize=cfg.data.materialize)
    return out


def shuffle_rows(shard_dir: Path | str, manifest: dict) -> int:
    """Rows of the training shuffle buffer per rank: as many as fit in SHUFFLE_BUFFER_BYTES at the
    shards' average row size (every row of a small corpus: a full shuffle each epoch)."""
    files = shard_files(shard_dir, "ct")
    rows = max(1, int(manifest["counts"].get("by_modality", {}).get("ct", manifest["counts"]["written"])))
    row_bytes = max(1.0, sum(storage.file_sizes(files)) / rows)
    return int(SHUFFLE_BUFFER_BYTES // row_bytes)


# --- the task ------------------------------------------------------------------------------------


class PretrainTask(Task):
    """The configured method (`objective.name`) on the model, over `train.max_steps` steps of
    `train.global_batch`. `meta` is what the checkpoint's meta.json records (spec, label names,
    text width, MLflow run id); `shuffle_rows` the training shuffle buffer per rank."""

    def __init__(self, cfg: ExperimentConfig, meta: Mapping, shuffle_rows: int = 0):
        super().__init__(cfg, meta)
        self.micro_batch = cfg.train.micro_batch
        self.shuffle_rows = shuffle_rows
        self.spec = dict(meta["spec"])

    def build(self, device: torch.device) -> None:
        self.module, self.weights = build_pretrainer(self.cfg, text_dim=int(self.meta["text_dim"]))
        self.module.to(device)
        self.optimizer = build_optimizer(self.module, self.cfg)
        self.scheduler = build_scheduler(self.optimizer, self.cfg)

    def checkpoint_parts(self) -> tuple[nn.Module, nn.Module]:
        return self.module.model, self.module.objective

    def feeds(self, runtime: Runtime, position: dict[str, list[int]], local_batch: int) -> list:
        cfg, device = self.cfg, runtime.device
        common = {"seed": cfg.train.seed, "rank": runtime.rank, "device": device, "prefetch": cfg.train.prefetch_batches}
        feeds = [device_feed(runtime.dataset("train"), position, "train", local_batch,
                             convert=lambda host: to_model_batch(host, device),
                             collate_for=objective_class(cfg.objective.name).collate(cfg, self.spec),
                             shuffle_rows=self.shuffle_rows, **common)]
        radiographs = runtime.dataset("train_2d")
        if radiographs is not None:
            feeds.append(device_feed(radiographs, position, "train_2d", local_batch, **common,
                                     convert=lambda host: to_model_batch(
                                         {"image_2d": host["image"], "report_embedding_2d": host["report_embedding"]},
                                         device)))
        return feeds

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        if self.cfg.train.augment:
            augment_batch(batch, generator)
        if self.cfg.train.sentence_dropout and "sentence_embeddings" in batch:
            batch["report_embedding"] = drop_sentences(batch["sentence_embeddings"], batch["sentence_mask"],
                                                       self.cfg.train.sentence_dropout, generator)
        return batch

    def find_unused_parameters(self) -> bool:
        # e.g. UniMedI's 2D tokenizer gets no gradient in a 3D-only batch (and vice versa)
        return objective_class(self.cfg.objective.name).find_unused_parameters(
            self.weights, self.module.model.image_encoder)

    def measure_params(self) -> Sequence[nn.Parameter]:
        return [p for p in self.module.model.image_encoder.parameters() if p.requires_grad]

    def compile(self) -> bool:
        if self.cfg.model.compile:
            compile_image_encoder(self.module.model)
        return self.cfg.model.compile

    def after_step(self, step: int) -> None:
        self.module.after_step(step)

    def degenerate(self) -> list[str]:
        return self.module.degenerate_state()

    def step_metrics(self) -> dict[str, float]:
        return {"temperature": 1.0 / self.module.model.scale().item()}

    def counts(self) -> dict[str, int]:
        return {"encoder_params": count_parameters(self.module.model.image_encoder),
                "trainable_params": count_parameters(self.module, trainable_only=True)}

    def has_validation(self, runtime: Runtime) -> bool:
        return runtime.dataset("valid") is not None

    def validate(self, module: nn.Module, runtime: Runtime, local_batch: int) -> dict[str, float]:
        return validation_loss(module, self.weights, runtime.dataset("valid"), self.cfg, self.spec, local_batch,
                               runtime.device)


def validation_loss(module: nn.Module, weights: Mapping[str, float], source: RowSource, cfg: ExperimentConfig,
                    spec: Mapping, local_batch: int, device: torch.device) -> dict[str, float]:
    """`val/loss` (weighted, as trained) and `val/loss/<term>` on this rank's part of the held-out
    split, averaged over volumes and ranks. Every rank holds as many rows (Ray's equal split), so the
    objectives' collectives line up; masks and crops are drawn from a fixed seed each time."""
    import torch.distributed as dist

    module.eval()
    names = list(weights)
    sums = torch.zeros(len(names) + 2, dtype=torch.float64)  # weighted loss, terms, volumes
    collate_for = objective_class(cfg.objective.name).collate(cfg, spec)
    collate = collate_for(VALIDATION_SEED) if collate_for else None
    devices = [device] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(VALIDATION_SEED)
        for host in ordered_batches(source, local_batch, collate):
            batch = to_model_batch(host, device)
            rows = len(next(iter(batch.values())))
            if rows < 2:  # a contrastive loss needs a negative; equal splits make this the same on every rank
                continue
            with autocast(device, cfg.train.precision):
                terms = module(batch)
            values = [float(terms[n]) for n in names]
            sums += torch.tensor([sum(weights[n] * v for n, v in zip(names, values, strict=True)), *values, 1.0],
                                 dtype=torch.float64) * rows
    module.train()
    if dist.is_available() and dist.is_initialized():
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    volumes = float(sums[-1])
    if not volumes:
        return {}
    out = {"val/loss": float(sums[0]) / volumes}
    out.update({f"val/loss/{n}": float(sums[i + 1]) / volumes for i, n in enumerate(names)})
    return out
