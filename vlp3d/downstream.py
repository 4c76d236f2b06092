"""Downstream networks built from a pretrained image encoder, and their inference (pure torch + MONAI).

- segmentation: `swin3d` -> MONAI SwinUNETR, `vit3d` -> MONAI UNETR, both initialised through the
  exports of `vlp3d.encoders.export` (every `swinViT.*` / `vit.*` key loaded, the decoder as
  initialised); `resnet3d` -> `ResNetUNet`, the encoder plus a small U-Net decoder (ours: MONAI has
  no decoder for it). Other encoders (`unimedi_vit`) have none: a clear error.
- classification: the encoder's pooled output -> a linear or MLP head (`Classifier`), multi-label.

`init = "random"` builds the same network with every weight freshly initialised (the comparison
that tells what pretraining is worth). `FineTuned` loads a fine-tuning checkpoint folder and
predicts label maps (sliding-window inference) or label probabilities.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlp3d.errors import InputError

SEGMENTATION, CLASSIFICATION = "segmentation", "classification"
UNETR_FEATURE_SIZE = 16  # the decoder width of UNETR around a vit3d encoder
SEGMENTATION_ENCODERS = {"swin3d": "MONAI SwinUNETR", "vit3d": "MONAI UNETR", "resnet3d": "ResNetUNet (ours)"}


@dataclass(frozen=True)
class NetworkSpec:
    """What builds a downstream network: the task, the pretrained encoder (`model.image_encoder`,
    `model.size`), its input shape `img_size` (the crop the network sees; ViT's positional grid), the
    number of outputs (segmentation classes incl. background, or classification labels) and the head."""

    task: str
    encoder: str
    size: str
    img_size: tuple[int, int, int]
    out_channels: int
    head: str = "linear"

    @classmethod
    def from_dict(cls, raw: dict) -> NetworkSpec:
        return cls(**{**raw, "img_size": tuple(int(v) for v in raw["img_size"])})

    def to_dict(self) -> dict:
        return {**asdict(self), "img_size": list(self.img_size)}


def _block(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(in_ch, out_ch, 3, padding=1, bias=False), nn.GroupNorm(min(8, out_ch), out_ch),
                         nn.GELU(), nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=False),
                         nn.GroupNorm(min(8, out_ch), out_ch), nn.GELU())


class ResNetUNet(nn.Module):
    """`resnet3d` encoder (attribute `encoder`, its own state-dict keys) + a U-Net decoder (ours): each
    level upsamples (trilinear, to the skip's size: any input shape) and fuses the encoder feature of that
    resolution, down to the input's; a 1x1x1 convolution gives `out_channels` logits per voxel."""

    def __init__(self, encoder: nn.Module, out_channels: int):
        super().__init__()
        self.encoder = encoder
        widths = [encoder.stem[0].out_channels] + [stage[0].conv1.out_channels for stage in encoder.stages]
        self.up = nn.ModuleList()
        for deep, skip in zip(widths[:0:-1], widths[-2::-1], strict=True):  # (128, 64), (64, 32), ... (16, stem)
            self.up.append(_block(deep + skip, skip))
        self.full = _block(widths[0] + encoder.stem[0].in_channels, widths[0])
        self.out = nn.Conv3d(widths[0], out_channels, 1)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        h = self.encoder.stem(volume)
        features = [h]
        for stage in self.encoder.stages:
            h = stage(h)
            features.append(h)
        for block, skip in zip(self.up, features[-2::-1], strict=True):
            h = nn.functional.interpolate(h, size=skip.shape[2:], mode="trilinear", align_corners=False)
            h = block(torch.cat([h, skip], 1))
        h = nn.functional.interpolate(h, size=volume.shape[2:], mode="trilinear", align_corners=False)
        return self.out(self.full(torch.cat([h, volume], 1)))


class Classifier(nn.Module):
    """Encoder (attribute `encoder`) -> pooled features -> `head` (linear, or MLP: Linear-GELU-Linear of the
    feature width) -> one logit per label."""

    def __init__(self, encoder: nn.Module, out_channels: int, head: str = "linear"):
        super().__init__()
        self.encoder = encoder
        width = encoder.out_dim
        if head == "linear":
            self.head = nn.Linear(width, out_channels)
        elif head == "mlp":
            self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, out_channels))
        else:
            raise InputError(f"finetune.head must be 'linear' or 'mlp', got {head!r}")

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.encoder(volume)
        return self.head(pooled)


@dataclass
class EncoderLoad:
    """Which of the network's encoder weights came from the pretrained encoder: `loaded` keys (in the
    network's names) and `missing` encoder keys that were left as initialised (empty when every one loaded)."""

    loaded: list[str]
    missing: list[str]


def build_network(spec: NetworkSpec, encoder_state: dict[str, torch.Tensor] | None = None
                  ) -> tuple[nn.Module, EncoderLoad]:
    """The downstream network of `spec`; with `encoder_state` (the pretrained image encoder's own state
    dict, `vlp3d.encoders.export.image_encoder_state_dict`) its encoder starts from those weights, without
    it from a fresh random initialisation. Raises ValueError when the encoder has no segmentation decoder,
    or the pretrained weights do not fit (a key missing or unexpected)."""
    from vlp3d.encoders import build_image_encoder

    encoder = build_image_encoder(spec.encoder, spec.size, img_size=spec.img_size)
    if encoder_state is not None:
        try:
            result = encoder.load_state_dict(encoder_state, strict=False)
        except RuntimeError as err:  # a shape mismatch
            raise InputError(f"the pretrained weights do not fit {spec.encoder}/{spec.size}: "
                             f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}") from None
        if result.missing_keys or result.unexpected_keys:
            raise InputError(f"the pretrained {spec.encoder}/{spec.size} weights do not fit the encoder: missing "
                             f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    if spec.task == CLASSIFICATION:
        net = Classifier(encoder, spec.out_channels, spec.head)
        return net, _encoder_load(net, "encoder.", encoder, encoder_state is not None)
    if spec.task != SEGMENTATION:
        raise InputError(f"finetune.task must be '{SEGMENTATION}' or '{CLASSIFICATION}', got {spec.task!r}")
    if spec.encoder == "resnet3d":
        net = ResNetUNet(encoder, spec.out_channels)
        return net, _encoder_load(net, "encoder.", encoder, encoder_state is not None)
    if spec.encoder == "swin3d":
        from monai.networks.nets import SwinUNETR

        from vlp3d.encoders.export import swinunetr_kwargs, swinunetr_state_dict

        encoder.check_input(spec.img_size)
        if int(np.prod(spec.img_size)) // 32**3 < 2:
            raise InputError(f"SwinUNETR needs a crop (finetune.roi_size) of at least 2 voxels at 1/32 resolution "
                             f"(its bottleneck normalises over them), e.g. (64, 32, 32); got {list(spec.img_size)}")
        net = SwinUNETR(out_channels=spec.out_channels, **swinunetr_kwargs(encoder))
        return net, _load_export(net, swinunetr_state_dict(encoder) if encoder_state is not None else None, "swinViT.")
    if spec.encoder == "vit3d":
        from monai.networks.nets import UNETR

        from vlp3d.encoders.export import unetr_kwargs, unetr_state_dict

        net = UNETR(out_channels=spec.out_channels, feature_size=UNETR_FEATURE_SIZE, **unetr_kwargs(encoder))
        return net, _load_export(net, unetr_state_dict(encoder) if encoder_state is not None else None, "vit.")
    raise InputError(f"finetune.task = 'segmentation' has no decoder for model.image_encoder = {spec.encoder!r}: "
                     f"use a model pretrained with one of {sorted(SEGMENTATION_ENCODERS)} "
                     f"({', '.join(f'{k}: {v}' for k, v in SEGMENTATION_ENCODERS.items())}), or "
                     "finetune.task = 'classification'.")


def _encoder_load(net: nn.Module, prefix: str, encoder: nn.Module, pretrained: bool) -> EncoderLoad:
    keys = [prefix + k for k in encoder.state_dict()]
    return EncoderLoad(loaded=keys if pretrained else [], missing=[] if pretrained else keys)


def _load_export(net: nn.Module, exported: dict | None, prefix: str) -> EncoderLoad:
    encoder_keys = [k for k in net.state_dict() if k.startswith(prefix)]
    if exported is None:
        return EncoderLoad(loaded=[], missing=encoder_keys)
    result = net.load_state_dict(exported, strict=False)
    missing = [k for k in result.missing_keys if k.startswith(prefix)]
    if result.unexpected_keys or missing:
        raise InputError(f"exporting the encoder into {type(net).__name__} left {len(missing)} encoder weights "
                         f"missing ({missing[:5]}) and {len(result.unexpected_keys)} unexpected "
                         f"({result.unexpected_keys[:5]})")
    return EncoderLoad(loaded=sorted(exported), missing=[])


def fit_to(volume: torch.Tensor, shape) -> torch.Tensor:
    """[..., X, Y, Z] centre-cropped or zero-padded (centred) to `shape`."""
    for axis, size in enumerate(shape, start=volume.ndim - 3):
        have = volume.shape[axis]
        if have > size:
            start = (have - size) // 2
            volume = volume.narrow(axis, start, size)
        elif have < size:
            before = (size - have) // 2
            pad = [0, 0] * (volume.ndim - 1 - axis) + [before, size - have - before]
            volume = nn.functional.pad(volume, pad)
    return volume


def sliding_window_logits(net: nn.Module, volume: torch.Tensor, roi: tuple[int, int, int], overlap: float = 0.25,
                          batch_size: int = 4) -> torch.Tensor:
    """Segmentation logits [B, C, X, Y, Z] of volumes [B, 1, X, Y, Z] of any size: MONAI's sliding-window
    inference with windows of `roi` (Gaussian-weighted where they overlap; padded where the volume is smaller)."""
    from monai.inferers import sliding_window_inference

    return sliding_window_inference(volume, roi_size=tuple(roi), sw_batch_size=batch_size, predictor=net,
                                    overlap=overlap, mode="gaussian")


class FineTuned:
    """A fine-tuning checkpoint folder (model.pt, config.toml, meta.json with a `finetune` entry: network,
    classes or labels, preprocessing spec, sliding-window settings) as a predictor."""

    def __init__(self, checkpoint_dir: str | Path, device: str = "cpu"):
        from vlp3d.data.volume import PreprocessSpec
        from vlp3d.train import checkpoint as checkpoints

        checkpoint_dir = Path(checkpoint_dir)
        self.meta = checkpoints.read_meta(checkpoint_dir)
        info = self.meta["finetune"]
        self.network = NetworkSpec.from_dict(info["network"])
        self.names: list[str] = list(info["names"])  # classes (segmentation, 0 = background) or labels
        self.overlap = float(info.get("overlap", 0.25))
        self.spec = PreprocessSpec.from_dict(self.meta["spec"])
        self.device = torch.device(device)
        self.net, _ = build_network(self.network)
        self.net.load_state_dict(checkpoints.load_model_state(checkpoint_dir, map_location=self.device))
        self.net.to(self.device).eval()

    @property
    def task(self) -> str:
        return self.network.task

    @torch.no_grad()
    def predict(self, volumes: list[np.ndarray]) -> list[np.ndarray]:
        """Preprocessed volumes (stored dtype or [0, 1] floats, axes x, y, z) -> per volume: the label map
        (uint8, same shape) for segmentation, the label probabilities [L] for classification."""
        from vlp3d.data.volume import dequantise

        out = []
        for stored in volumes:
            volume = dequantise(torch.from_numpy(np.array(stored)))[None, None].to(self.device)
            if self.task == SEGMENTATION:
                logits = sliding_window_logits(self.net, volume, self.network.img_size, self.overlap)
                out.append(logits.argmax(1)[0].to(torch.uint8).cpu().numpy())
            else:
                logits = self.net(fit_to(volume, self.network.img_size))
                out.append(torch.sigmoid(logits)[0].float().cpu().numpy())
        return out

    def predict_inputs(self, items: list, limits=None) -> list[np.ndarray]:
        """Volume inputs (`vlp3d.inference.VolumeInput`: NIfTI files or DICOM series, with their rescale),
        preprocessed with the spec the model was fine-tuned on -> `predict`: the HU and not-CT rules and the
        `limits` (vlp3d.data.limits.VolumeLimits) of the embedding model (`vlp3d.inference.preprocess_input`)."""
        from vlp3d.inference import preprocess_input

        return self.predict([preprocess_input(item, self.spec, limits=limits) for item in items])
