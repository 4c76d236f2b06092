"""Pure torch training engine: model, objective, optimizer, schedule, one train step, AMP."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from vlp3d.config import ConfigError, ExperimentConfig
from vlp3d.data.volume import dequantise
from vlp3d.encoders import accepted_options, build_image_encoder, resolve_text_encoder
from vlp3d.objectives import objective_class

MAX_LOGIT_SCALE = 100.0


class ResidualLinear(nn.Module):
    """x + Wx with W zero-initialised: starts as the frozen text space, learns a correction."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x)


def build_text_head(kind: str, text_dim: int, embed_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(text_dim, embed_dim)
    if embed_dim != text_dim:
        raise ValueError(
            f"model.text_head = {kind!r} keeps the text encoder's space, so model.embed_dim must equal its "
            f"width ({text_dim}), got {embed_dim}; set model.embed_dim = {text_dim} or model.text_head = \"linear\"."
        )
    return nn.Identity() if kind == "locked" else ResidualLinear(text_dim)


class VisionLanguageModel(nn.Module):
    """Image encoder + projection heads into a shared, L2-normalised embedding space.

    The frozen text encoder stays outside this module (its pooled report embeddings are
    computed at prepare time or by the caller); only `text_proj` trains on the text side.
    """

    def __init__(self, image_encoder: nn.Module, text_dim: int, embed_dim: int = 384,
                 temperature: float = 0.07, learnable_temperature: bool = True, text_head: str = "locked"):
        super().__init__()
        width = image_encoder.out_dim
        self.image_encoder = image_encoder
        self.image_proj = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, embed_dim))
        self.text_proj = build_text_head(text_head, text_dim, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)),
                                        requires_grad=learnable_temperature)

    def encode_image(self, volume: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.image_encoder(volume)
        return F.normalize(self.image_proj(pooled), dim=-1)

    def encode_text(self, report_embedding: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(report_embedding), dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(log(1/tau)) clamped at 100."""
        return self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()

    def forward(self, volume: torch.Tensor, report_embedding: torch.Tensor):
        return self.encode_image(volume), self.encode_text(report_embedding), self.scale()


def text_dim_for(cfg: ExperimentConfig) -> int:
    """Hidden size of the configured text encoder (reads its config only, no weights)."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(resolve_text_encoder(cfg.model.text_encoder)).hidden_size)


def model_input_shape(cfg: ExperimentConfig) -> tuple[int, int, int]:
    """Spatial input of the image encoder, as the objective declares it (T3D: its crops)."""
    return objective_class(cfg.objective.name).input_shape(cfg)


def check_encoder_input(cfg: ExperimentConfig) -> None:
    """Raise ConfigError unless `model.image_encoder` at `model.size` takes the model input shape;
    the message lists the presets that do. Builds on the meta device where the encoder allows it
    (no memory; MONAI's Swin reads a tensor value while building, so it is built on the CPU)."""
    from vlp3d.encoders import SIZES

    shape = model_input_shape(cfg)

    def build(size: str, device: str) -> None:
        with torch.device(device):
            build_image_encoder(cfg.model.image_encoder, size, img_size=shape)

    def fits(size: str) -> str:
        try:
            try:
                build(size, "meta")
            except RuntimeError:
                build(size, "cpu")
        except (ValueError, KeyError) as err:
            return str(err).strip("'\"")
        return ""

    problem = fits(cfg.model.size)
    if problem:
        working = [size for size in SIZES if size != cfg.model.size and not fits(size)]
        where = objective_class(cfg.objective.name).input_setting
        raise ConfigError(
            f"model.size = {cfg.model.size!r} of model.image_encoder = {cfg.model.image_encoder!r} cannot take "
            f"{where} = {shape}: {problem} Presets that can: {working or 'none'}."
        )


def build_model(cfg: ExperimentConfig, text_dim: int | None = None) -> VisionLanguageModel:
    torch.manual_seed(cfg.train.seed)
    # for the encoders that take them: 2D image size (unimedi_vit), attention path (swin3d, vit3d)
    options = {"image_size_2d": cfg.data.shape_2d, "attention": cfg.model.attention}
    encoder = build_image_encoder(cfg.model.image_encoder, cfg.model.size, img_size=model_input_shape(cfg),
                                  gradient_checkpointing=cfg.model.gradient_checkpointing,
                                  **accepted_options(cfg.model.image_encoder, options))
    return VisionLanguageModel(
        encoder,
        text_dim=text_dim or text_dim_for(cfg),
        embed_dim=cfg.model.embed_dim,
        temperature=cfg.objective.temperature,
        learnable_temperature=cfg.objective.learnable_temperature,
        text_head=cfg.model.text_head,
    )


def term_weights(cfg: ExperimentConfig) -> dict[str, float]:
    """{term: weight} of the configured method's terms with a weight > 0 (`Objective.term_weights`)."""
    return objective_class(cfg.objective.name).term_weights(cfg)


class Pretrainer(nn.Module):
    """The module DDP wraps: the model plus the objective's heads, so both get synchronised gradients
    and several encoder passes per step stay inside one DDP forward."""

    def __init__(self, model: VisionLanguageModel, objective: nn.Module):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.objective(self.model, batch)

    def after_step(self, step: int) -> None:
        if hasattr(self.objective, "after_step"):
            self.objective.after_step(self.model, step)


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
    those calls inside `compile_errors`). A first call under a TorchDispatchMode (FlopCounterMode)
    runs eager and leaves the encoder uncompiled for good: count FLOPs on a later step."""
    model.image_encoder.compile(backend=backend)


@contextlib.contextmanager
def compile_errors():
    """torch.compile's backend failures (no working C++ compiler for its CPU code, no Triton for its
    GPU kernels) as a ConfigError that names `model.compile` and the fix."""
    from torch._dynamo.exc import BackendCompilerFailed

    try:
        yield
    except BackendCompilerFailed as err:
        cause = getattr(err, "inner_exception", None) or err
        raise ConfigError(
            f"model.compile = true: torch.compile could not compile the image encoder on this machine "
            f"({type(cause).__name__}: {str(cause).strip()[:500]}). Install what it needs (a C++ compiler such as "
            "g++ for CPU training, Triton for CUDA GPUs, e.g. `apt-get install g++` / `pip install triton`), "
            "or set model.compile = false."
        ) from err


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


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, floor: float = 0.02) -> float:
    """LR multiplier: linear warm-up to 1, cosine decay to `floor` at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ExperimentConfig):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, cfg.train.warmup_steps, cfg.train.max_steps)
    )


def augment(volume: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Intensity jitter and a small random translation; no flips (reports name sides)."""
    batch = volume.shape[0]
    scale = 1 + 0.1 * (torch.rand(batch, 1, 1, 1, 1, generator=generator) - 0.5) * 2
    offset = 0.03 * (torch.rand(batch, 1, 1, 1, 1, generator=generator) - 0.5) * 2
    volume = volume * scale.to(volume) + offset.to(volume)
    shifts = torch.randint(-max_shift, max_shift + 1, (3,), generator=generator).tolist()
    return torch.roll(volume, shifts=shifts, dims=(2, 3, 4))


def augment_batch(batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`augment` every 3D input of a model batch in place: whole volumes, and T3D's sub-volume crops
    [B, K, 1, X, Y, Z] (each crop its own intensity jitter)."""
    if "volume" in batch:
        batch["volume"] = augment(batch["volume"], generator)
    if "crops" in batch:
        crops = batch["crops"]
        batch["crops"] = augment(crops.flatten(0, 1), generator).reshape(crops.shape)
    return batch


def drop_sentences(sentence_embeddings: torch.Tensor, sentence_mask: torch.Tensor, p: float,
                   generator: torch.Generator) -> torch.Tensor:
    """Report embeddings [B, H] from a random subset of each report's stored sentence embeddings
    [B, S, H] (`sentence_mask` [B, S] marks the real ones): each sentence is left out with
    probability `p`, at least one is kept; L2-normalised mean, as the stored report embedding is
    built (`vlp3d.encoders.text.report_embedding_from_sentences`). Text augmentation for frozen
    text encoders (ours)."""
    present = sentence_mask.bool()
    keep = (torch.rand(present.shape, generator=generator) >= p).to(present.device) & present
    # a report whose every sentence was dropped keeps one of them at random
    empty = ~keep.any(1)
    if empty.any():
        scores = torch.rand(present.shape, generator=generator).to(present.device).masked_fill(~present, -1.0)
        keep[empty] |= F.one_hot(scores[empty].argmax(1), present.shape[1]).bool()
    weights = keep.to(sentence_embeddings.dtype).unsqueeze(-1)
    mean = (sentence_embeddings * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return F.normalize(mean, dim=-1)


def to_model_batch(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Shard columns -> model inputs: volume [B, 1, X, Y, Z] (or T3D crops [B, K, 1, X, Y, Z], or
    2D images [B, 1, H, W] under `image_2d`) as float32 in [0, 1]; text columns as they are."""
    out = {}
    for key, name in (("image", "volume"), ("crops", "crops"), ("image_2d", "image_2d")):
        if key in batch:
            # copied as stored (uint8 / float16: 2-4x less than float32), then dequantised on the device
            out[name] = dequantise(batch[key].to(device, non_blocking=True)).unsqueeze(-4 if key == "crops" else 1)
    for key in ("report_embedding", "report_embedding_2d", "input_ids", "attention_mask", "labels",
                "sentence_embeddings", "sentence_mask"):
        if key in batch:
            out[key] = batch[key].to(device, non_blocking=True)
    for key in ("report_embedding", "report_embedding_2d", "sentence_embeddings"):
        if key in out:
            out[key] = out[key].float()
    return out


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _encoder_lr(optimizer: torch.optim.Optimizer, scheduler) -> float:
    """The image encoder's learning rate (`train.lr` on the schedule); heads run at a multiple."""
    names = [group.get("name") for group in optimizer.param_groups]
    return scheduler.get_last_lr()[names.index("encoder") if "encoder" in names else 0]


def term_gradient_norms(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float],
                        params: Sequence[nn.Parameter]) -> dict[str, float]:
    """The norm of each weighted term's gradient on `params` (the image encoder), averaged over
    workers: one extra backward pass per term, through the step's graph (kept for the real
    backward). Every rank must call it with the same terms in the same order (the gathers of the
    contrastive terms run collectives in backward). Not scaled under fp16: small gradients may
    round to 0 there."""
    norms = []
    for name, value in terms.items():
        grads = torch.autograd.grad(weights[name] * value, params, retain_graph=True, allow_unused=True)
        norms.append(torch.sqrt(sum((g.detach().float() ** 2).sum() for g in grads if g is not None)
                                + torch.zeros((), device=value.device)))
    stacked = torch.stack(norms)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(stacked)
        stacked /= torch.distributed.get_world_size()
    return dict(zip(terms, stacked.tolist(), strict=True))


class TermBalancer:
    """Per-term encoder-gradient shares (`train/grad_share/<term>`) and, optionally (ours, not in the
    papers), balancing: every `every` steps it measures how much of the image encoder's gradient
    each weighted term contributes; with `balance` it moves a multiplier per term (EMA, momentum
    0.9, clamped to [0.01, 100], the weighted sum of multipliers kept at the sum of weights) so
    that the shares approach the configured weights' shares. Training uses `effective()`.
    Multipliers are the same on every rank (the norms are averaged) and saved with checkpoints."""

    MOMENTUM = 0.9
    LIMITS = (0.01, 100.0)

    def __init__(self, weights: Mapping[str, float], every: int, balance: bool = False):
        self.weights = dict(weights)
        self.every = every if len(weights) > 1 else 0
        self.balance = balance and self.every > 0
        self.multipliers = {name: 1.0 for name in weights}

    def due(self, step: int) -> bool:
        """Whether step `step` (1-based, the one about to run) measures the shares."""
        return self.every > 0 and step % self.every == 0

    def effective(self) -> dict[str, float]:
        return {name: weight * self.multipliers[name] for name, weight in self.weights.items()}

    def update(self, norms: Mapping[str, float]) -> dict[str, float]:
        """Shares from the measured norms (of the effective weighted terms); moves the multipliers
        when balancing. Returns the metrics to log."""
        total = sum(norms.values())
        if not math.isfinite(total) or total <= 0:
            return {}
        shares = {name: norm / total for name, norm in norms.items()}
        metrics = {f"grad_share/{name}": share for name, share in shares.items()}
        metrics.update({f"grad_norm/{name}": norm for name, norm in norms.items()})
        if self.balance:
            weight_sum = sum(self.weights[name] for name in norms)
            for name, share in shares.items():
                target = self.weights[name] / weight_sum
                wanted = self.multipliers[name] * target / max(share, 1e-8)
                self.multipliers[name] = self.MOMENTUM * self.multipliers[name] + (1 - self.MOMENTUM) * wanted
            scale = weight_sum / sum(self.weights[n] * self.multipliers[n] for n in norms)
            for name in norms:
                self.multipliers[name] = min(max(self.multipliers[name] * scale, self.LIMITS[0]), self.LIMITS[1])
            metrics.update({f"term_multiplier/{name}": self.multipliers[name] for name in norms})
        return metrics

    def state_dict(self) -> dict[str, float]:
        return dict(self.multipliers)

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.multipliers.update({k: float(v) for k, v in state.items() if k in self.multipliers})


def train_step(module: nn.Module, weights: Mapping[str, float], batch: Mapping[str, torch.Tensor],
               optimizer: torch.optim.Optimizer, scheduler, precision: str = "fp32",
               scaler: torch.amp.GradScaler | None = None, max_grad_norm: float = 1.0,
               after_step=None, measure_params: Sequence[nn.Parameter] | None = None) -> dict[str, float]:
    """One optimisation step of a (DDP-wrapped) `Pretrainer`; returns the total loss, each term
    (`loss/<term>`, unweighted), lr, grad norm and `skipped` (0 or 1). `after_step()` runs after
    the optimizer step (e.g. the EMA teacher update). With `measure_params` (the image encoder's),
    also each weighted term's gradient norm on them (`term_gradient_norms`) under `term_norms`.

    NaN/inf guard: when the loss, a term or the gradient norm is not finite on any rank, every
    rank skips the step together (no weight, optimizer, scheduler or EMA change; under fp16 the
    grad scaler lowers its scale); the names of what was not finite are under `nonfinite`.
    """
    first = next(iter(batch.values()))
    with torch.autocast(first.device.type, dtype=AUTOCAST_DTYPES.get(precision, torch.float32),
                        enabled=precision in AUTOCAST_DTYPES):
        terms = module(batch)
        loss = sum(weights[name] * value for name, value in terms.items())
    term_norms = term_gradient_norms(terms, weights, measure_params) if measure_params else None
    optimizer.zero_grad(set_to_none=True)
    # backward on every rank even for a non-finite loss: DDP's gradient all-reduce must line up
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_grad_norm)
    names = [*terms, "gradients"]
    flags = torch.stack([~torch.isfinite(terms[n].detach().float()) for n in terms]
                        + [~torch.isfinite(grad_norm.detach().float())]).float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    nonfinite = [name for name, flag in zip(names, flags.tolist(), strict=True) if flag]
    if nonfinite:
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        return {"skipped": 1.0, "nonfinite": nonfinite}
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    if after_step is not None:
        after_step()
    metrics = {"loss": float(loss.detach()), "lr": _encoder_lr(optimizer, scheduler), "grad_norm": float(grad_norm),
               "skipped": 0.0}
    metrics.update({f"loss/{name}": float(value.detach()) for name, value in terms.items()})
    if term_norms is not None:
        metrics["term_norms"] = term_norms
    return metrics
