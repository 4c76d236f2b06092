"""The registry of 3D image encoders. Each encoder returns (pooled [B, C], tokens [B, N, C]).

Each encoder module registers its builder with `@register(name)`. `IMAGE_ENCODERS` imports an
encoder's module the first time that encoder is asked for (`ENCODER_MODULES`), and every module
when it is listed: swin3d and vit3d build on MONAI, which takes seconds to import, and a training
worker that builds a resnet3d never needs it. This module imports no encoder, so encoder modules
import it without a circle.

Registered names (`model.image_encoder`), each with size presets tiny/small/base/large
(`model.size`):

- `resnet3d`     3D ResNet (vlp3d.encoders.resnet), any input shape.
- `swin3d`       MONAI Swin Transformer, the `swinViT` of SwinUNETR (vlp3d.encoders.swin).
- `vit3d`        MONAI ViT, the `vit` of UNETR (vlp3d.encoders.vit).
- `unimedi_vit`  one ViT shared by 2D images and 3D volumes (vlp3d.encoders.unimedi).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable, Iterator, MutableMapping, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from vlp3d.errors import InputError

# model.image_encoder -> the module that registers it (imported on first use)
ENCODER_MODULES = {
    "resnet3d": "vlp3d.encoders.resnet",
    "swin3d": "vlp3d.encoders.swin",
    "vit3d": "vlp3d.encoders.vit",
    "unimedi_vit": "vlp3d.encoders.unimedi",
}


class _Registry(MutableMapping):
    """name -> builder; a name in ENCODER_MODULES is imported when it is looked up, all of them when
    the registry is iterated or counted. Builders registered from elsewhere (`@register`) work too."""

    def __init__(self) -> None:
        self._builders: dict[str, Callable[..., nn.Module]] = {}

    def _load(self, name: str) -> None:
        if name not in self._builders and name in ENCODER_MODULES:
            importlib.import_module(ENCODER_MODULES[name])

    def __getitem__(self, name: str) -> Callable[..., nn.Module]:
        self._load(name)
        return self._builders[name]

    def __contains__(self, name: object) -> bool:
        return name in ENCODER_MODULES or name in self._builders

    def __setitem__(self, name: str, builder: Callable[..., nn.Module]) -> None:
        self._builders[name] = builder

    def __delitem__(self, name: str) -> None:
        del self._builders[name]

    def __iter__(self) -> Iterator[str]:
        for name in ENCODER_MODULES:
            self._load(name)
        return iter(dict(self._builders))

    def __len__(self) -> int:
        return sum(1 for _ in self)


IMAGE_ENCODERS: MutableMapping[str, Callable[..., nn.Module]] = _Registry()
SIZES = ("tiny", "small", "base", "large")


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: add a builder `builder(size=..., **kwargs) -> nn.Module` under `name`."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        IMAGE_ENCODERS[name] = builder
        return builder

    return wrap


def build_image_encoder(name: str, size: str = "tiny", **kwargs) -> nn.Module:
    """Build the encoder registered as `name` (config `model.image_encoder`) at preset `size`.

    Keyword arguments go to the builder; every builder accepts `img_size` (the input volume
    shape (X, Y, Z), i.e. `data.shape`; only `vit3d` and `unimedi_vit` need it, for their
    positional embeddings) and `gradient_checkpointing`.
    """
    if name not in IMAGE_ENCODERS:
        raise InputError(
            f"model.image_encoder = {name!r} is not registered; choose one of {sorted(IMAGE_ENCODERS)}."
        )
    builder = IMAGE_ENCODERS[name]
    params = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(kwargs) - set(params))
    if unknown and not takes_any:
        valid = sorted(k for k in params if k != "size")
        raise TypeError(
            f"model.image_encoder = {name!r} does not take {unknown}; it takes {valid}."
        )
    return builder(size=size, **kwargs)


def accepted_options(name: str, options: dict) -> dict:
    """The subset of `options` that the builder registered as `name` takes (e.g. `image_size_2d`,
    read only by encoders of 2D images too); {} for an unknown name (build_image_encoder says why)."""
    if name not in IMAGE_ENCODERS:
        return {}
    params = inspect.signature(IMAGE_ENCODERS[name]).parameters
    return {k: v for k, v in options.items() if k in params}


def check_size(name: str, size: str, presets: Sequence[str]) -> None:
    """Raise an InputError naming `model.size` when `size` is not one of `presets`."""
    if size not in presets:
        raise InputError(f"model.size = {size!r}: {name} presets are {sorted(presets)}.")


def require_einops(name: str) -> None:
    """MONAI's Swin and ViT blocks need the optional package einops; fail early with the fix."""
    if importlib.util.find_spec("einops") is None:
        raise ImportError(
            f"model.image_encoder = {name!r} uses MONAI blocks that need the package 'einops' "
            "(a MONAI optional dependency): pip install einops."
        )


def recompute(enabled: bool, module: nn.Module, function: Callable, *args):
    """`function(*args)`, under activation checkpointing (non-reentrant torch.utils.checkpoint: only
    the inputs are kept, the activations are recomputed in backward) when `enabled` and `module` is
    training with grad enabled; a plain call otherwise (evaluation, no_grad)."""
    if enabled and module.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
    return function(*args)
