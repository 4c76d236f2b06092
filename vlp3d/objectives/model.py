"""The model every method trains: an image encoder and projection heads into one L2-normalised space
with the (frozen) text encoder's report embeddings, built from the config; the checks a config's
encoder and input must pass before a run starts."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from vlp3d.config import ConfigError, ExperimentConfig
from vlp3d.encoders import accepted_options, build_image_encoder, resolve_text_encoder
from vlp3d.errors import InputError
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
        raise InputError(
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


