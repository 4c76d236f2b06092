"""One optimisation step, whatever the task: forward under autocast, backward (through the fp16 grad
scaler), gradient clipping, the non-finite guard every rank agrees on, optimizer and schedule; plus
the per-term gradient shares and their balancing, and the learning-rate schedule."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from vlp3d.config import ConfigError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """`train.precision`'s autocast on `device` (fp32: a no-op context)."""
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(precision, torch.float32),
                          enabled=precision in AUTOCAST_DTYPES)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16's loss scaler on the training device (None for fp32 and bf16, which need none)."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, floor: float = 0.02) -> float:
    """LR multiplier: linear warm-up to 1, cosine decay to `floor` at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int):
    """The schedule of every task: `warmup_cosine` on each parameter group's own learning rate. It
    advances only on steps that update the weights (a skipped step leaves it where it is)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup_steps, max_steps))


def group_lr(optimizer: torch.optim.Optimizer, scheduler, group: str) -> float:
    """The current learning rate of the parameter group named `group` (the first group without one)."""
    names = [g.get("name") for g in optimizer.param_groups]
    return scheduler.get_last_lr()[names.index(group) if group in names else 0]


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


def split_batch(batch: Mapping[str, torch.Tensor], rows: int) -> list[dict]:
    """`batch` as consecutive micro-batches of `rows` rows (every tensor split along its first dimension)."""
    size = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
    return [{k: v[start:start + rows] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            for start in range(0, size, rows)]


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def average_gradients(module: nn.Module) -> None:
    """The gradient average over workers that DDP's backward would have done (gradient caching runs its
    backward passes under `no_sync`); a no-op in one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world_size = torch.distributed.get_world_size()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for every parameter
    torch.distributed.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def cached_backward(module: nn.Module, weights: Mapping[str, float], batch: Mapping[str, torch.Tensor], rows: int,
                    precision: str, scaler: torch.amp.GradScaler | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradient caching (Gao et al. 2021, "GradCache"; open_clip's --accum-freq): the gradient of the
    whole batch's loss with a graph of `rows` samples at a time. (1) every micro-batch's per-sample
    embeddings without a graph; (2) the batch terms (contrastive, with the global batch's negatives)
    on the concatenated embeddings, back-propagated to them; (3) each micro-batch embedded again, with
    the random state of (1), and back-propagated with the cached embedding gradients, together with
    its share of the per-sample terms. The parameters' gradients equal one backward of the whole batch
    (to float rounding); DDP's average happens once, at the end. `module` is a `Pretrainer` (or its DDP
    wrapper) whose forward takes `part`. Returns (the batch's terms, the weighted loss), detached."""
    first = next(v for v in batch.values() if isinstance(v, torch.Tensor))
    device, total = first.device, first.shape[0]
    chunks = split_batch(batch, rows)
    no_sync = module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext()
    scale = (lambda t: scaler.scale(t)) if scaler is not None else (lambda t: t)
    with no_sync:
        states, parts = [], []
        with torch.no_grad(), autocast(device, precision):
            for chunk in chunks:
                states.append(_rng_state(device))
                parts.append(module(chunk, part="embed"))
        leaves = {k: torch.cat([p[k] for p in parts]).detach().requires_grad_(True) for k in parts[0]}
        with autocast(device, precision):
            batch_terms = module(leaves, part="batch")
            batch_loss = sum(weights[name] * value for name, value in batch_terms.items())
        scale(batch_loss).backward()
        cached = {k: leaf.grad for k, leaf in leaves.items()}
        sample_terms: dict[str, torch.Tensor] = {}
        offset = 0
        for chunk, state in zip(chunks, states, strict=True):
            n = next(v for v in chunk.values() if isinstance(v, torch.Tensor)).shape[0]
            _set_rng_state(device, state)
            with autocast(device, precision):
                again = module(chunk, part="embed")
                surrogate = sum((again[k] * cached[k][offset:offset + n]).sum() for k in again)
                terms = module(chunk, part="sample")
                share = sum(weights[name] * value for name, value in terms.items()) * (n / total) if terms else 0.0
            (surrogate + scale(share) if terms else surrogate).backward()
            for name, value in terms.items():
                sample_terms[name] = sample_terms.get(name, 0.0) + value.detach() * (n / total)
            offset += n
    average_gradients(module)
    terms = {**{k: v.detach() for k, v in batch_terms.items()}, **sample_terms}
    return terms, sum(weights[name] * value for name, value in terms.items())


def train_step(module: nn.Module, weights: Mapping[str, float], batch: Mapping[str, torch.Tensor],
               optimizer: torch.optim.Optimizer, scheduler, precision: str = "fp32",
               scaler: torch.amp.GradScaler | None = None, max_grad_norm: float = 1.0,
               after_step: Callable[[], None] | None = None, measure_params: Sequence[nn.Parameter] | None = None,
               lr_group: str = "encoder", micro_batch: int = 0) -> dict:
    """One optimisation step of a (DDP-wrapped) module whose forward takes a batch and returns named,
    unweighted loss terms (`Pretrainer`, fine-tuning's `FinetuneModule`); returns the weighted total
    `loss`, each term (`loss/<term>`), the learning rate of the `lr_group` parameter group, the
    gradient norm and `skipped` (0 or 1). `after_step()` runs after the optimizer step (e.g. the EMA
    teacher update). With `measure_params` (the image encoder's), also each weighted term's gradient
    norm on them (`term_gradient_norms`) under `term_norms`.

    NaN/inf guard: when the loss, a term or the gradient norm is not finite on any rank, every rank
    skips the step together (no weight, optimizer, scheduler or EMA change; under fp16 the grad scaler
    lowers its scale); the names of what was not finite are under `nonfinite`.

    `micro_batch` (rows, smaller than the batch): the same step by gradient caching (`cached_backward`).
    """
    first = next(v for v in batch.values() if isinstance(v, torch.Tensor))
    optimizer.zero_grad(set_to_none=True)
    term_norms = None
    if 0 < micro_batch < first.shape[0]:
        terms, loss = cached_backward(module, weights, batch, micro_batch, precision, scaler)
        if scaler is not None:
            scaler.unscale_(optimizer)
    else:
        with autocast(first.device, precision):
            terms = module(batch)
            loss = sum(weights[name] * value for name, value in terms.items())
        term_norms = term_gradient_norms(terms, weights, measure_params) if measure_params else None
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
            scaler.update()  # lowers the scale (fp16 overflow), steps nothing
        return {"skipped": 1.0, "nonfinite": nonfinite}
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    if after_step is not None:
        after_step()
    metrics = {"loss": float(loss.detach()), "lr": group_lr(optimizer, scheduler, lr_group),
               "grad_norm": float(grad_norm), "skipped": 0.0}
    if scaler is not None:  # fp16: the loss scale after this step's update (halved after an overflow)
        metrics["loss_scale"] = float(scaler.get_scale())
    metrics.update({f"loss/{name}": float(value.detach()) for name, value in terms.items()})
    if term_norms is not None:
        metrics["term_norms"] = term_norms
    return metrics
