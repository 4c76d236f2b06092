"""MG-3D: multi-grained alignment, text-guided image and image-guided text reconstruction,
inter-patient disentangled aggregation and sentence-based similarity matching (METHODS.md).

Terms (unweighted; weights come from `objective.align_weight` and `objective.mg3d.*_weight`):
- `align`: InfoNCE of pooled volume and report embeddings (global batch, tau 0.1 fixed by default).
- `mim`: 50% of the image tokens are masked *in input space* — each token's receptive cell of
  the volume (its cell on the encoder's token grid) is zeroed, which works for every encoder
  (CNN, Swin, ViT) without patching its internals (ours); the masked volume is encoded,
  fused with the report's text tokens, decoded by the conv decoder; MSE on masked voxels only.
- `mlm`: 15% of words masked whole-word ([MASK] for every word piece of the word), the frozen
  text encoder runs on the masked report, fusion with the clean image tokens, a BERT-style head
  whose output layer is tied to the frozen word embeddings predicts the original ids (CE).
- `sentence_consistency`: 1 - cos(projected mean of the fused masked report, sg(mean of the
  unmasked report's token states)); at report level, since the shards keep no token-to-sentence
  map (ours).
- `disentangled`: the image embedding queries report j's sentence embeddings with gates
  sigma(q.k) (not softmax), 2 layers; the gated mean of values -> report vector r(i, j).
  InfoNCE over patients on <z_i, r(i, j)> for every pair of the global batch, computed as the
  local rows (local images x all reports) and columns (all images x local reports).
- `sentence_match`: report similarity = cosine of the stored report vectors (the normalised
  mean of sentence vectors); pairs >= 0.9 -> 1, <= 0.6 -> 0, others ignored, self-pairs dropped;
  predicted = cosine of 128-d image features; L1 over kept pairs of the global batch.

With `model.gradient_checkpointing` the extra passes are recomputed in backward too
(torch.utils.checkpoint, non-reentrant, only while training with grad enabled): the whole `mim`
branch (masked-view encoder pass, fusion, decoder, loss) as one region that keeps only its
inputs, and the fusion of the clean tokens with the masked report. Inside the `mim` region the
encoder's own block checkpointing still applies, so its blocks run three times; in exchange no
activation of the masked view outlives the forward.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from vlp3d.config import ExperimentConfig, register_method, setting
from vlp3d.encoders.registry import recompute
from vlp3d.encoders.text import TextEncoder, mean_pool
from vlp3d.objectives.base import Objective
from vlp3d.objectives.clip import ClipLoss
from vlp3d.objectives.distributed import all_gather, all_reduce_mean, global_mean, world
from vlp3d.objectives.heads import (
    ConvDecoder,
    FusionModule,
    masked_mse,
    patch_mask,
    probe_encoder,
    upsample_mask,
    zero_like_graph,
)

DISENTANGLED_TEMPERATURE = 0.1  # ours: MG-3D's align temperature
TERMS = ("align", "mim", "mlm", "sentence_consistency", "disentangled", "sentence_match")


@dataclass(frozen=True)
class MG3DConfig:
    """MG-3D's own settings, read when `objective.name = "mg3d"`: term weights, masking, fusion, heads."""

    mim_weight: float = setting(1.0, "MG-3D `mim`: text-guided masked image reconstruction (MSE on masked voxels).", ge=0)
    mlm_weight: float = setting(1.0, "MG-3D `mlm`: image-guided masked language modelling (CE on masked tokens).", ge=0)
    sentence_consistency_weight: float = setting(0.1, "MG-3D `sentence_consistency`: fused masked report stays close (cosine) to the unmasked one.", ge=0)
    disentangled_weight: float = setting(0.1, "MG-3D `disentangled`: InfoNCE between the volume and its sigmoid-gated sentence aggregate.", ge=0)
    sentence_match_weight: float = setting(0.1, "MG-3D `sentence_match`: L1 between image-feature and report similarity of patient pairs.", ge=0)
    mim_mask_ratio: float = setting(0.5, "MG-3D: share of image patch tokens masked for `mim`.", gt=0, lt=1)
    mlm_mask_prob: float = setting(0.15, "MG-3D: share of words masked (whole-word) for `mlm`.", ge=0, lt=1)
    fusion_layers: int = setting(2, "MG-3D: bidirectional cross-attention layers of the fusion module.", ge=1)
    fusion_dim: int = setting(256, "MG-3D: width of the fusion module.", ge=1)
    decoder_dim: int = setting(128, "MG-3D `mim`: channels of the first conv-decoder stage (halved each upsampling).", ge=1)
    disentangled_layers: int = setting(2, "MG-3D: layers of sigmoid-gated sentence aggregation.", ge=1)
    match_thresholds: tuple[float, float] = setting((0.6, 0.9), "MG-3D `sentence_match`: report similarity <= low is target 0, >= high is 1, between ignored.", ge=-1, le=1)
    match_dim: int = setting(128, "MG-3D `sentence_match`: dimension of the image features compared across patients.", ge=1)


def whole_word_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, is_subword: torch.Tensor,
                    special: torch.Tensor, prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool [B, T]: every word piece of ~`prob` of the words (at least one word per report) is masked.

    `is_subword[id]` marks continuation pieces ('##ing'); `special[id]` marks [CLS]/[SEP]/[PAD].
    """
    real = attention_mask.bool() & ~special[input_ids]
    starts = real & ~is_subword[input_ids]
    word = torch.cumsum(starts.long(), dim=1)  # word index of each piece (1-based), 0 before the first
    draw = torch.rand(word.shape[0], word.shape[1] + 1, generator=generator).to(input_ids.device)
    chosen = draw < prob
    # at least one word per report: the word with the smallest draw among existing words
    n_words = word.max(dim=1).values
    exists = torch.arange(word.shape[1] + 1, device=word.device)[None, :].le(n_words[:, None])
    exists[:, 0] = False
    fallback = torch.where(exists, draw, torch.full_like(draw, 2.0)).argmin(dim=1)
    chosen[torch.arange(len(chosen)), fallback] = True
    chosen &= exists
    return real & chosen.gather(1, word)


class DisentangledAggregator(nn.Module):
    """Image-queried, sigmoid-gated aggregation of a report's sentence embeddings (MG-3D)."""

    def __init__(self, query_dim: int, sentence_dim: int, out_dim: int, dim: int = 256, layers: int = 2):
        super().__init__()
        self.query = nn.Linear(query_dim, dim)
        self.keys = nn.ModuleList(nn.Linear(sentence_dim, dim) for _ in range(layers))
        self.values = nn.ModuleList(nn.Linear(sentence_dim, dim) for _ in range(layers))
        # the query is refined between layers (not after the last, whose aggregate is the output)
        self.updates = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(layers - 1))
        self.out = nn.Linear(dim, out_dim)
        self.dim = dim

    def forward(self, image: torch.Tensor, sentences: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Every image against every report: image [I, Dq], sentences [R, S, Ds], mask [R, S] -> [I, R, out]."""
        q = self.query(image)[:, None, :].expand(-1, sentences.shape[0], -1)  # [I, R, d]
        weights = mask.to(sentences.dtype)[None]  # [1, R, S]
        count = weights.sum(-1, keepdim=True).clamp(min=1.0)
        for layer, (key, value) in enumerate(zip(self.keys, self.values, strict=True)):
            k, v = key(sentences), value(sentences)  # [R, S, d]
            gate = torch.sigmoid(torch.einsum("ird,rsd->irs", q, k) / math.sqrt(self.dim)) * weights
            aggregate = torch.einsum("irs,rsd->ird", gate, v) / count  # mean of gated values
            if layer < len(self.updates):
                q = q + self.updates[layer](aggregate)
        return self.out(aggregate)


def masked_token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`mlm`: cross-entropy of the masked tokens' logits [M, V] against their ids [M], averaged over
    the masked tokens of every worker (whole-word masking gives each worker a different count, and
    a per-worker mean would weight them unequally)."""
    return global_mean(F.cross_entropy(logits.float(), targets.long(), reduction="sum"), targets.numel())


@register_method(section=MG3DConfig, defaults={
    # Swin-B on 0.75 x 0.75 x 1.5 mm, 128 x 128 x 96 crops of the body; AdamW 1e-5 (heads 5x), wd 1e-8
    "model.image_encoder": "swin3d", "model.size": "base",
    "data.shape": (128, 128, 96), "data.spacing_mm": (0.75, 0.75, 1.5), "data.foreground_crop": True,
    "data.report_sections": ("Findings_EN", "Impressions_EN"),
    "objective.align_weight": 0.1, "objective.temperature": 0.1, "objective.learnable_temperature": False,
    "objective.head_lr_mult": 5.0, "train.lr": 1e-5, "train.weight_decay": 1e-8,
})
class MG3DObjective(Objective):
    name = "mg3d"
    # (train.micro_batch)
    micro_batch_refusal = ("`mlm` and `mim` are means over every masked token and voxel of the batch (not per "
                           "volume), and `disentangled` and `sentence_match` compare every pair of the batch "
                           "through heads that take both sides; caching only `align` would change the other terms")
    terms = TERMS
    projection_terms = frozenset({"align", "disentangled"})
    shared_head_groups = (frozenset({"mim", "mlm", "sentence_consistency"}),)  # fusion, MLM and consistency heads
    columns = ("image", "report_embedding", "input_ids", "attention_mask", "sentence_embeddings", "sentence_mask")

    def __init__(self, cfg: ExperimentConfig, model: nn.Module, text_dim: int):
        super().__init__()
        o = cfg.objective.mg3d  # the method's own settings ([objective.mg3d])
        self.cfg = o
        self.active = set(self.term_weights(cfg))
        self.clip = ClipLoss(cfg.objective.gather_with_grad, cfg.objective.local_loss)
        self.shape = tuple(cfg.data.shape)
        self.grid, width = probe_encoder(model.image_encoder, self.shape)
        self.embed_dim = cfg.model.embed_dim
        self.checkpointing = cfg.model.gradient_checkpointing
        needs_text = bool(self.active & {"mim", "mlm", "sentence_consistency"})
        if needs_text:
            self.fusion = FusionModule(width, text_dim, o.fusion_dim, o.fusion_layers)
            self._text = [TextEncoder(cfg.model.text_encoder, max_tokens=cfg.data.max_tokens)]  # frozen, not saved
            tokenizer = self._text[0].tokenizer
            vocab = [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
            self.register_buffer("is_subword", torch.tensor([t.startswith("##") for t in vocab]), persistent=False)
            special = torch.zeros(len(vocab), dtype=torch.bool)
            special[tokenizer.all_special_ids] = True
            self.register_buffer("special", special, persistent=False)
            self.mask_id = int(tokenizer.mask_token_id)
        if "mim" in self.active:
            self.decoder = ConvDecoder(o.fusion_dim, self.grid, self.shape, o.decoder_dim)
        if self.active & {"mlm", "sentence_consistency"}:
            embeddings = self._text[0].model.get_input_embeddings().weight
            self.mlm_transform = nn.Sequential(nn.Linear(o.fusion_dim, text_dim), nn.GELU(), nn.LayerNorm(text_dim))
            self.mlm_bias = nn.Parameter(torch.zeros(embeddings.shape[0]))
            self.consistency = nn.Linear(o.fusion_dim, text_dim)
        if "disentangled" in self.active:
            self.aggregator = DisentangledAggregator(width, text_dim, self.embed_dim, o.fusion_dim,
                                                     o.disentangled_layers)
        if "sentence_match" in self.active:
            self.match_head = nn.Linear(width, o.match_dim)

    @property
    def text_encoder(self) -> TextEncoder:
        return self._text[0]

    def _text_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        encoder = self.text_encoder.to(input_ids.device)
        with torch.no_grad():
            return encoder(input_ids.long(), attention_mask.long())[0].float()

    def forward(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        volume, report = batch["volume"], batch["report_embedding"]
        pooled, tokens = model.image_encoder(volume)
        image = F.normalize(model.image_proj(pooled), dim=-1)
        text = model.encode_text(report)
        out: dict[str, torch.Tensor] = {}
        if "align" in self.active:
            out["align"] = self.clip(image, text, model.scale())

        if self.active & {"mim", "mlm", "sentence_consistency"}:
            attention = batch["attention_mask"]
            length = int(attention.sum(1).max())
            ids, attention = batch["input_ids"][:, :length], attention[:, :length]
            clean_states = self._text_states(ids, attention)
        if "mim" in self.active:
            token_mask = patch_mask(self.grid, volume.shape[0], self.cfg.mim_mask_ratio, volume.device)
            voxel_mask = upsample_mask(token_mask, self.grid, self.shape)
            out["mim"] = recompute(self.checkpointing, self, self._mim_loss, model.image_encoder, volume, voxel_mask,
                                          clean_states, attention)
        if self.active & {"mlm", "sentence_consistency"}:
            masked = whole_word_mask(ids, attention, self.is_subword, self.special, self.cfg.mlm_mask_prob)
            masked_states = self._text_states(ids.masked_fill(masked, self.mask_id), attention)
            _, fused_text = recompute(self.checkpointing, self, self.fusion, tokens, masked_states, attention)
            if "mlm" in self.active:
                hidden = self.mlm_transform(fused_text[masked])
                word_embeddings = self.text_encoder.model.get_input_embeddings().weight
                logits = hidden @ word_embeddings.T.to(hidden.dtype) + self.mlm_bias
                out["mlm"] = masked_token_ce(logits, ids[masked])
            if "sentence_consistency" in self.active:
                fused = self.consistency(mean_pool(fused_text, attention))
                target = mean_pool(clean_states, attention)
                out["sentence_consistency"] = (1 - F.cosine_similarity(fused, target, dim=-1)).mean()
        if "disentangled" in self.active:
            out["disentangled"] = self.disentangled_loss(pooled, image, batch)
        if "sentence_match" in self.active:
            out["sentence_match"] = self.sentence_match_loss(pooled, report)
        return out

    def _mim_loss(self, encoder: nn.Module, volume: torch.Tensor, voxel_mask: torch.Tensor,
                  text_states: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """`mim`: encode the masked volume, fuse with the report, decode; MSE on the masked voxels."""
        _, masked_tokens = encoder(volume.masked_fill(voxel_mask, 0.0))
        fused_image, _ = self.fusion(masked_tokens, text_states, attention)
        return masked_mse(self.decoder(fused_image), volume, voxel_mask)

    def disentangled_loss(self, pooled: torch.Tensor, image: torch.Tensor, batch) -> torch.Tensor:
        return disentangled_infonce(self.aggregator, pooled, image, batch["sentence_embeddings"].float(),
                                    batch["sentence_mask"].bool(), 1.0 / DISENTANGLED_TEMPERATURE)

    def sentence_match_loss(self, pooled: torch.Tensor, report: torch.Tensor) -> torch.Tensor:
        return sentence_match(self.match_head(pooled), report, *self.cfg.match_thresholds)


def sentence_match(features: torch.Tensor, report: torch.Tensor, low: float = 0.6, high: float = 0.9) -> torch.Tensor:
    """L1 between cos(image features) and {1 if report cos >= high, 0 if <= low} over the kept,
    non-self pairs of the global batch (local rows x all columns; the mean over workers equals
    the single-process mean over all kept pairs)."""
    rank, world_size = world()
    features = F.normalize(features.float(), dim=-1)
    report = F.normalize(report.float(), dim=-1)
    all_features, all_report = all_gather(features), all_gather(report).detach()
    predicted = features @ all_features.T
    similarity = report @ all_report.T
    b = features.shape[0]
    not_self = torch.ones_like(similarity, dtype=torch.bool)
    not_self[torch.arange(b), torch.arange(b) + rank * b] = False
    keep = ((similarity >= high) | (similarity <= low)) & not_self
    target = (similarity >= high).to(predicted.dtype)
    total = all_reduce_mean(keep.sum().float()) * world_size
    if total.item() == 0:
        return zero_like_graph(predicted)
    # each worker's share, scaled so that averaging over workers gives sum / total
    return ((predicted - target).abs() * keep).sum() * world_size / total


def disentangled_infonce(aggregator: DisentangledAggregator, pooled: torch.Tensor, image: torch.Tensor,
                         sentences: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """InfoNCE over patients on <z_i, r(i, j)>, r(i, j) = report j aggregated with image i's query.

    Each worker computes its rows (local images x all reports) and columns (all images x local
    reports) of the global logit matrix; the mean over workers is the full symmetric loss.
    """
    rank, _ = world()
    all_pooled, all_image = all_gather(pooled), all_gather(image)
    all_sentences, all_mask = all_gather(sentences), all_gather(mask.float()).bool()
    b = image.shape[0]
    labels = torch.arange(b, device=image.device) + rank * b
    rows = F.normalize(aggregator(pooled, all_sentences, all_mask), dim=-1)  # [B, G, e]
    logits_rows = scale * torch.einsum("ie,ije->ij", image, rows)
    cols = F.normalize(aggregator(all_pooled, sentences, mask), dim=-1)  # [G, B, e]
    logits_cols = scale * torch.einsum("ie,ije->ji", all_image, cols)
    return 0.5 * (F.cross_entropy(logits_rows, labels) + F.cross_entropy(logits_cols, labels))
