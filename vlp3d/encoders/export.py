"""Encoder weights out to MONAI SwinUNETR / UNETR, parameter counts and step memory (pure torch)."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vlp3d.errors import InputError

IMAGE_ENCODER_PREFIX = "image_encoder."
# wrappers that prepend to every key: DDP ("module.") and torch.compile ("_orig_mod.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def image_encoder_state_dict(
    model_state: Mapping[str, torch.Tensor], prefix: str = IMAGE_ENCODER_PREFIX
) -> dict[str, torch.Tensor]:
    """The image encoder's own state dict out of a full model state dict (e.g. a checkpoint's model.pt).

    Keeps the keys that start with `prefix` (VisionLanguageModel names its encoder
    `image_encoder`) and strips it; DDP "module." and torch.compile "_orig_mod." prefixes are
    removed first.
    """
    out = {}
    for key, value in model_state.items():
        stripped = _strip_wrappers(key)
        if stripped.startswith(prefix):
            out[_strip_wrappers(stripped[len(prefix) :])] = value
    if not out:
        heads = sorted({_strip_wrappers(key).split(".", 1)[0] for key in model_state})
        raise InputError(
            f"no key starts with {prefix!r}; the state dict's top-level names are {heads}."
        )
    return out


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for wrapper in _WRAPPER_PREFIXES:
            if key.startswith(wrapper):
                key, stripped = key[len(wrapper) :], True
    return key


def swinunetr_state_dict(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """`swinViT.*` weights of a `swin3d` encoder for MONAI SwinUNETR.

    Load with `SwinUNETR(**swinunetr_kwargs(encoder), out_channels=K).load_state_dict(sd, strict=False)`:
    every `swinViT.*` key is present, the decoder keys stay as initialised.
    """
    swin = getattr(encoder, "swinViT", None)
    if swin is None:
        raise TypeError(
            f"swinunetr_state_dict needs a swin3d encoder (with .swinViT); got {type(encoder).__name__}."
        )
    return {f"swinViT.{key}": value.detach().clone() for key, value in swin.state_dict().items()}


def swinunetr_kwargs(encoder: nn.Module) -> dict:
    """SwinUNETR constructor arguments whose `swinViT` matches this `swin3d` encoder."""
    return {
        "in_channels": encoder.in_channels,
        "feature_size": encoder.feature_size,
        "depths": encoder.depths,
        "num_heads": encoder.num_heads,
        "patch_size": encoder.patch_size,
        "window_size": encoder.window_size,
    }


# UNETR builds ViT with exactly 12 blocks and patch 16 (MONAI 1.6)
UNETR_DEPTH = 12
UNETR_PATCH = 16


def unetr_state_dict(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """`vit.*` weights of a `vit3d` encoder for MONAI UNETR.

    Load with `UNETR(**unetr_kwargs(encoder), out_channels=K).load_state_dict(sd, strict=False)`.
    """
    vit = getattr(encoder, "vit", None)
    if vit is None:
        raise TypeError(
            f"unetr_state_dict needs a vit3d encoder (with .vit); got {type(encoder).__name__}."
        )
    if encoder.num_layers != UNETR_DEPTH or encoder.patch_size != UNETR_PATCH:
        raise InputError(
            f"MONAI UNETR has {UNETR_DEPTH} blocks and patch {UNETR_PATCH}; this encoder has "
            f"{encoder.num_layers} blocks and patch {encoder.patch_size}."
        )
    return {f"vit.{key}": value.detach().clone() for key, value in vit.state_dict().items()}


def unetr_kwargs(encoder: nn.Module) -> dict:
    """UNETR constructor arguments whose `vit` matches this `vit3d` encoder."""
    return {
        "in_channels": encoder.in_channels,
        "img_size": encoder.img_size,
        "hidden_size": encoder.hidden_size,
        "mlp_dim": encoder.mlp_dim,
        "num_heads": encoder.num_heads,
        "qkv_bias": encoder.qkv_bias,
    }


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@dataclass(frozen=True)
class MemoryReport:
    """Memory of one forward+backward step.

    `step_peak_bytes`: peak of memory allocated during the step above what was allocated just
    before it (activations, gradients, autograd and kernel workspace). `resident_bytes`:
    parameters, buffers and the input, held before the step. `method`: how the peak was measured.
    """

    step_peak_bytes: int
    resident_bytes: int
    method: str

    @property
    def peak_bytes(self) -> int:
        """Resident tensors plus the step's peak: what the step needs in all."""
        return self.step_peak_bytes + self.resident_bytes


def measure_memory(
    encoder: nn.Module, input_shape: Sequence[int], autocast_dtype: torch.dtype | None = None
) -> MemoryReport:
    """Peak memory of one training-mode forward+backward of `encoder` on a random input [B, C, *spatial].

    Runs on the encoder's device. Loss = mean of squared pooled output + mean of squared tokens.
    - CUDA: `torch.cuda.max_memory_allocated()` minus `torch.cuda.memory_allocated()` before the
      step (the caching allocator's reserved-but-free blocks are not counted).
    - CPU: the torch profiler's allocation trace (`profile_memory=True`): every tensor allocation
      and free through the CPU allocator during the step, in time order; the peak of their running
      sum is the same quantity as on CUDA. tracemalloc is not used: it sees only Python's own
      allocator, not torch's, and process RSS includes allocator caching and libraries.
    Gradients are cleared before and after.
    """
    param = next(iter(encoder.parameters()))
    device = param.device
    volume = torch.rand(tuple(input_shape), device=device)
    resident = volume.numel() * volume.element_size() + sum(
        t.numel() * t.element_size() for t in [*encoder.parameters(), *encoder.buffers()]
    )
    was_training = encoder.training
    encoder.train()
    encoder.zero_grad(set_to_none=True)
    gc.collect()
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            train_step(encoder, volume, autocast_dtype)
            torch.cuda.synchronize(device)
            step_peak = torch.cuda.max_memory_allocated(device) - before
            method = "torch.cuda.max_memory_allocated"
        else:
            step_peak = _cpu_step_peak(encoder, volume, autocast_dtype)
            method = "torch.profiler CPU allocation trace"
    finally:
        encoder.zero_grad(set_to_none=True)
        encoder.train(was_training)
    return MemoryReport(step_peak_bytes=int(step_peak), resident_bytes=int(resident), method=method)


def train_step(
    encoder: nn.Module, volume: torch.Tensor, autocast_dtype: torch.dtype | None = None
) -> None:
    """One forward (under autocast to `autocast_dtype` if given) and backward of a mean-square loss."""
    with torch.autocast(
        volume.device.type,
        dtype=autocast_dtype or torch.float32,
        enabled=autocast_dtype is not None,
    ):
        pooled, tokens = encoder(volume)
        loss = pooled.float().square().mean() + tokens.float().square().mean()
    loss.backward()


def _cpu_step_peak(
    encoder: nn.Module, volume: torch.Tensor, autocast_dtype: torch.dtype | None
) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(encoder, volume, autocast_dtype)
    # "[memory]" events carry +bytes for an allocation and -bytes for a free
    try:
        raw = prof.profiler.kineto_results.events()
    except AttributeError as err:  # torch moved its profiler internals
        raise RuntimeError(
            f"measure_memory on CPU reads torch.profiler's allocation events, which torch "
            f"{torch.__version__} does not expose as kineto_results; measure on CUDA instead."
        ) from err
    events = sorted(
        (event.start_ns(), event.nbytes()) for event in raw if event.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def saved_activation_bytes(step: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while `step()` runs (forward only).

    Counted with torch.autograd.graph.saved_tensors_hooks, leaving out the storages of `exclude`
    (pass the parameters: they are resident anyway). Tensors saved inside a non-reentrant
    torch.utils.checkpoint region go to the checkpoint's own hooks and are recomputed in backward,
    so they are not counted: the number is the activation memory held from forward to backward.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(saved.values())
