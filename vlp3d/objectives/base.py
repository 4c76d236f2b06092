"""What a pretraining objective declares about itself, so that training, the shard checks,
evaluation and the demo read one contract instead of testing the method's name."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from vlp3d.config import ExperimentConfig, ObjectiveConfig, get_key
from vlp3d.errors import InputError

MIN_LOGIT_SCALE = 1e-2  # below it (temperature above 100) the contrastive softmax is flat: diverged


class Objective(nn.Module):
    """A pretraining method: `forward(model, batch)` returns its named, unweighted loss terms.

    Subclasses set the class attributes and override the class methods where they differ.
    """

    name: ClassVar[str]
    terms: ClassVar[tuple[str, ...]]
    # shard columns the CT training dataset reads
    columns: ClassVar[tuple[str, ...]] = ("image", "report_embedding")
    # storage mode the shards must have been prepared with (data.storage)
    storage: ClassVar[Literal["fixed", "highres"]] = "fixed"
    # trains on 2D radiographs (the shards' xray/ rows) besides the CTs
    uses_2d: ClassVar[bool] = False
    # how evaluation embeds a stored volume: the whole volume, or the mean over tiles of the model input
    evaluation: ClassVar[Literal["volume", "tiles"]] = "volume"
    # the setting that gives the image encoder's spatial input (`input_shape`)
    input_setting: ClassVar[str] = "data.shape"
    # terms that contrast volume with report through the model's projections and logit scale
    projection_terms: ClassVar[frozenset[str]] = frozenset()
    # terms sharing heads: with only some of a group active, some of its heads get no gradient
    shared_head_groups: ClassVar[tuple[frozenset[str], ...]] = ()
    # gradient caching (train.micro_batch): None when the method splits its step into `embed`,
    # `batch_terms` and `sample_terms` (below), else why it cannot (shown to the user)
    micro_batch_refusal: ClassVar[str | None] = "it does not split its loss into per-sample embeddings and batch terms"

    @classmethod
    def weight_key(cls, term: str) -> str:
        """The config key of a term's weight: `objective.<term>_weight` for a general one (align),
        else `objective.<name>.<term>_weight` in the method's table (`objective.mg3d.mim_weight`)."""
        key = f"{term}_weight"
        general = {f.name for f in dataclasses.fields(ObjectiveConfig)}
        return f"objective.{key}" if key in general else f"objective.{cls.name}.{key}"

    @classmethod
    def term_weights(cls, cfg: ExperimentConfig) -> dict[str, float]:
        """{term: weight} of the terms whose weight (`weight_key`) is > 0 (the others are not computed)."""
        weights = {term: float(get_key(cfg, cls.weight_key(term))) for term in cls.terms}
        active = {term: w for term, w in weights.items() if w > 0}
        if not active:
            raise InputError(f"every loss term of objective '{cls.name}' has weight 0 "
                             f"({', '.join(cls.weight_key(t) for t in cls.terms)}); set at least one > 0.")
        return active

    @classmethod
    def input_shape(cls, cfg: ExperimentConfig) -> tuple[int, int, int]:
        """Spatial input [X, Y, Z] of the image encoder."""
        return tuple(cfg.data.shape)

    @classmethod
    def check_shards(cls, cfg: ExperimentConfig, spec: Mapping, shard_dir: Path) -> None:
        """Raise ValueError, naming the data.* setting that fixes it, unless shards prepared with
        `spec` (a manifest's) hold what this objective reads."""
        if spec.get("storage", "fixed") != cls.storage:
            why = ("samples crops from high-resolution volumes" if cls.storage == "highres"
                   else "needs fixed-shape volumes")
            raise InputError(f"{shard_dir}: objective '{cls.name}' {why}; prepare the corpus with "
                             f"data.storage = \"{cls.storage}\".")

    @classmethod
    def collate(cls, cfg: ExperimentConfig, spec: Mapping) -> Callable[[int], Callable] | None:
        """A factory `seed -> collate function` for batches of `columns` (None: Ray's default)."""
        return None

    @classmethod
    def find_unused_parameters(cls, active: Collection[str], image_encoder: nn.Module) -> bool:
        """Whether DDP must look for parameters without a gradient in a step, given the active terms
        (heads are built for active terms only): an image encoder with input-specific parameters
        (UniMedI's 2D and 3D tokenizers) leaves some idle in every step; without a projection term the
        model's projections and logit scale idle; a partly active group leaves shared heads idle."""
        active = set(active)
        return (bool(getattr(image_encoder, "input_specific_parameters", False))
                or not active & cls.projection_terms
                or any(0 < len(active & group) < len(group) for group in cls.shared_head_groups))

    def forward(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every term of one batch. A method that caches (micro_batch_refusal None) computes exactly
        `batch_terms(model, embed(model, batch))` and `sample_terms(model, batch)`."""
        if self.micro_batch_refusal is None:
            return {**self.batch_terms(model, self.embed(model, batch)), **self.sample_terms(model, batch)}
        raise NotImplementedError

    def degenerate_state(self, model: nn.Module) -> list[str]:
        """After an optimizer step, before `after_step`: what is degenerate (the training loop stops the
        run as diverged). Here: the model's logit scale not finite or below `MIN_LOGIT_SCALE` (a
        temperature of 100: every softmax flat; at 0 the temperature is infinite), and the objective's
        own non-finite buffers (centres, queues). Methods with an EMA teacher add the weights it reads."""
        bad = []
        scale = model.scale().detach()
        if not bool(torch.isfinite(scale)) or float(scale) < MIN_LOGIT_SCALE:
            bad.append(f"logit scale {float(scale):.3g} (minimum {MIN_LOGIT_SCALE:g})")
        flags = [(name, torch.isfinite(b).all()) for name, b in self.named_buffers() if b.is_floating_point()]
        if flags and not bool(torch.stack([f for _, f in flags]).all()):
            bad += [f"objective buffer {name}" for name, flag in flags if not bool(flag)]
        return bad

    # --- gradient caching (vlp3d.train.step): three parts whose composition is `forward`

    def embed(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-sample representations [B, ...] the batch terms compare across the batch (e.g. the
        normalised image and report embeddings); each row depends on its own sample only."""
        raise NotImplementedError

    def batch_terms(self, model: nn.Module, embeddings: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The terms that compare samples (contrastive, with the global batch's negatives), from the
        whole worker batch's `embed` output."""
        raise NotImplementedError

    def sample_terms(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The terms that are means over samples (reconstruction): accumulated over micro-batches."""
        return {}
