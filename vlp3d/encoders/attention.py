"""`model.attention`: the fused (SDPA) or manual attention path of the swin3d and vit3d encoders.

- 'fused': torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels on
  GPU, in training too). swin3d's MONAI WindowAttention modules become `FusedWindowAttention`
  (same parameters and buffers, so the same state-dict keys); vit3d switches MONAI's own
  `SABlock.use_flash_attention`.
- 'manual': MONAI's matmul-softmax-matmul.
- 'auto': the first training-mode forward with grad enabled times one batch-1 forward+backward of the
  encoder on both paths (a few repetitions each, on the run's device, input shape and autocast
  dtype) and keeps the faster; the choice is cached per (device type, encoder configuration,
  input shape, autocast dtype) in this process, logged, and readable as `encoder.attention_path`
  (`encoder.attention_timings` holds the seconds per step of each path). Until then (e.g. in
  eval mode or under no_grad) 'auto' runs the fused path, as MONAI does at inference. Each DDP
  worker measures for itself; the two paths compute the same function, so workers may differ.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Hashable

import torch
from monai.networks.nets.swin_unetr import WindowAttention
from torch import nn
from torch.nn import functional as F

from vlp3d.errors import InputError

ATTENTION_MODES = ("auto", "fused", "manual")
ATTENTION_PATHS = ("fused", "manual")
MEASURE_REPS = 3

log = logging.getLogger(__name__)
_CHOICES: dict[Hashable, tuple[str, dict[str, float]]] = {}


class FusedWindowAttention(WindowAttention):
    """MONAI's WindowAttention with a training-capable SDPA path (`fused = True`).

    Swapped in place for WindowAttention instances (`fuse_window_attention`), so parameters,
    buffers and state-dict keys stay MONAI's. The relative-position bias [heads, N, N] plus, for
    shifted windows, the shift mask [nW, N, N] form one additive float mask [nW * heads, N, N];
    the windows of a volume are consecutive in the batch (MONAI's window_partition), so q, k, v
    are viewed as [B, nW * heads, N, d] and the mask broadcasts over the B volumes instead of
    being expanded per window batch. Attention dropout applies only in training.
    """

    fused: bool = True

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if not self.fused:
            return super().forward(x, mask)
        b, n, c = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        index = self.relative_position_index[:n, :n].reshape(-1)  # type: ignore[index]
        bias = self.relative_position_bias_table[index].reshape(n, n, heads).permute(2, 0, 1)  # [heads, N, N]
        windows = 1
        if mask is not None:
            windows = mask.shape[0]
            bias = bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)  # [nW, heads, N, N]
        q, k, v = (t.reshape(b // windows, windows * heads, n, c // heads) for t in qkv.unbind(0))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias.reshape(1, windows * heads, n, n).to(q.dtype),
            dropout_p=self.attn_drop.p if self.training else 0.0,
            scale=self.scale,
        )
        out = out.reshape(b, heads, n, c // heads).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


def fuse_window_attention(module: nn.Module) -> list[FusedWindowAttention]:
    """Make every MONAI WindowAttention inside `module` a FusedWindowAttention (in place); returns them."""
    found = []
    for child in module.modules():
        if isinstance(child, WindowAttention):
            if type(child) is WindowAttention:
                child.__class__ = FusedWindowAttention
            found.append(child)
    return found


def check_mode(attention: str) -> str:
    if attention not in ATTENTION_MODES:
        raise InputError(f"model.attention = {attention!r}: choose one of {list(ATTENTION_MODES)}.")
    return attention


class AttentionPaths:
    """Mixin for encoders with both attention paths.

    The encoder implements `_use_fused(bool)` (switch every attention module), `_attention_probe
    (volume) -> tensor` (its forward without resolving) and `attention_key` (its configuration).
    """

    attention: str = "manual"
    attention_path: str | None = "manual"
    attention_timings: dict[str, float] | None = None

    def _init_attention(self, attention: str) -> None:
        self.attention = check_mode(attention)
        self.attention_path = None if attention == "auto" else attention
        self._use_fused(attention != "manual")

    def set_attention_path(self, path: str) -> None:
        if path not in ATTENTION_PATHS:
            raise InputError(f"attention path {path!r}: choose one of {list(ATTENTION_PATHS)}.")
        self.attention_path = path
        self._use_fused(path == "fused")

    def _use_fused(self, fused: bool) -> None:
        raise NotImplementedError

    def _attention_probe(self, volume: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def attention_key(self) -> Hashable:
        raise NotImplementedError

    def _resolve_attention(self, volume: torch.Tensor) -> None:
        """Pick the path for 'auto' on the first training-mode forward that builds a graph."""
        if (self.attention_path is None and self.training and torch.is_grad_enabled()
                and not torch.is_inference_mode_enabled()):
            resolve_auto(self, volume)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


@torch.compiler.disable
def resolve_auto(encoder: AttentionPaths, volume: torch.Tensor) -> str:
    """Time both paths on `volume[:1]` (forward + backward), set and return the faster; cached."""
    device = volume.device
    key = (device.type, encoder.attention_key, tuple(volume.shape[1:]), _autocast_dtype(device.type))
    if key not in _CHOICES:
        timings = measure_paths(encoder, volume[:1].detach())
        _CHOICES[key] = (min(timings, key=timings.get), timings)
        log.info(
            "model.attention auto on %s for %s, input %s: fused %.2f ms, manual %.2f ms per step -> %s",
            device.type, key[1], list(volume.shape[1:]), 1e3 * timings["fused"], 1e3 * timings["manual"],
            _CHOICES[key][0],
        )
    path, timings = _CHOICES[key]
    encoder.set_attention_path(path)
    encoder.attention_timings = dict(timings)
    return path


def measure_paths(encoder: AttentionPaths, probe: torch.Tensor, reps: int = MEASURE_REPS) -> dict[str, float]:
    """Median seconds of one forward+backward of `encoder` on `probe` per path (after one warm-up).

    Gradients come from torch.autograd.grad, so nothing accumulates into `.grad` and no gradient
    hook (DDP's all-reduce) runs; the RNG state (dropout) is restored afterwards.
    """
    params = [p for p in encoder.parameters() if p.requires_grad]
    device = probe.device

    def step() -> None:
        out = encoder._attention_probe(probe)
        torch.autograd.grad(out.float().square().mean(), params, allow_unused=True)

    cuda = [device] if device.type == "cuda" else []
    timings: dict[str, float] = {}
    with torch.random.fork_rng(devices=cuda):
        for path in ATTENTION_PATHS:
            encoder._use_fused(path == "fused")
            timings[path] = _median_time(step, device, reps)
    return timings


def _median_time(step: Callable[[], None], device: torch.device, reps: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    step()  # warm-up (kernel selection, allocator)
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
