"""Experiment configuration: frozen dataclasses, TOML loading, dotted CLI overrides, validation."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and how to fix it."""


# `scheme://...`: a URI (vlp3d.storage opens it with pyarrow); anything else is a local path
URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")


def is_uri(location: str | Path) -> bool:
    """True for `scheme://...` (a Windows drive letter `C:/` is not a scheme: two letters at least)."""
    return isinstance(location, str) and bool(URI_SCHEME.match(location))


def _f(default: Any, help: str, location: bool = False) -> Any:
    """A dataclass field whose help text serves `config show --help` and the docs. A `location`
    (a path or URI of data, storage or a service) is never logged to MLflow (`logged_params`)."""
    if isinstance(default, list | dict):
        raise TypeError("use tuples for sequence defaults so configs stay frozen")
    return field(default=default, metadata={"help": help, "location": location})


@dataclass(frozen=True)
class DataConfig:
    corpus: str = _f("", "Corpus root in CT-RATE layout (`vlp3d synth` writes a phantom one).", location=True)
    shards: str = _f("", "Folder, or pyarrow filesystem URI (s3://bucket/shards), of the Parquet shards `vlp3d "
                     "prepare` writes.", location=True)
    shape: tuple[int, int, int] = _f((48, 48, 48), "Voxels (x, y, z) after RAS reorientation, resampling and crop/pad.")
    spacing_mm: tuple[float, float, float] = _f((8.0, 8.0, 8.0), "Target voxel spacing in mm (x, y, z).")
    hu_window: tuple[float, float] = _f((-1000.0, 1000.0), "HU window clipped and scaled to [0, 1].")
    storage_dtype: Literal["float16", "uint8"] = _f("float16", "Dtype of the stored volume tensor in the shards.")
    storage: Literal["fixed", "highres"] = _f(
        "fixed",
        "'fixed': every CT is resampled and cropped/padded to data.shape (a tensor column). 'highres' (T3D): "
        "resampled to data.spacing_mm and windowed but kept at its own size (padded up to at least "
        "data.shape so train-time crops fit), stored as raw bytes in 'image' with its shape in "
        "'image_shape' (vlp3d.data.shards.decode_image); use with data.foreground_crop=true.",
    )
    foreground_crop: bool = _f(
        False, "Crop CTs to the body's bounding box (voxels above data.body_threshold_hu, plus a small "
        "margin) before the final pad/crop, so stored voxels are body, not air.",
    )
    body_threshold_hu: float = _f(-500.0, "HU above which a voxel counts as body for data.foreground_crop.")
    shape_2d: tuple[int, int] = _f(
        (64, 64), "Pixels (rows, columns) of 2D radiographs (modality 'xray') after scaling to [0, 1] and "
        "resizing; rows run top to bottom of the image as displayed (superior to inferior on a chest film).",
    )
    report_sections: tuple[str, ...] = _f(
        ("Impressions_EN",),
        "Report columns joined into the report text. With a frozen text encoder, impressions (which state "
        "what is present) align far better than findings (which list every absent finding as a negated "
        "sentence); with a trainable one, findings + impression (the papers' choice) is the usual one.",
    )
    max_tokens: int = _f(256, "Token ids kept per report (padded/truncated).")
    text_embeddings: bool = _f(True, "Store frozen text-encoder report and sentence embeddings in the shards (fast training).")
    max_sentences: int = _f(16, "Sentence embeddings stored per report (padded, with a mask); the report embedding uses all.")
    train_split: str = _f("train", "Split used for pretraining.")
    fraction: float = _f(1.0, "Fraction of training patients used, stratified by label; 0.25 within 0.5 within 1.0 (nested).")
    valid_fraction: float = _f(0.1, "Share of patients put in 'valid' when a generic manifest has no split column.")
    eval_split: str = _f("valid", "Held-out split used for evaluation.")
    materialize: Literal["auto", "always", "never"] = _f("auto", "Hold the training shards in Ray's object store ('auto': when they fit in a quarter of it).")


@dataclass(frozen=True)
class ModelConfig:
    image_encoder: str = _f("resnet3d", "Registered image encoder (`vlp3d models` lists them).")
    size: Literal["tiny", "small", "base", "large"] = _f("tiny", "Size preset of the image encoder.")
    gradient_checkpointing: bool = _f(
        False,
        "Recompute image-encoder activations in backward (less memory, ~1.5x compute); MG-3D also "
        "recomputes its masked-view encoder pass, fusion and decoder.",
    )
    attention: Literal["auto", "fused", "manual"] = _f(
        "auto",
        "Attention kernel of transformer image encoders (swin3d, vit3d): 'fused' = "
        "torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels on GPU), "
        "'manual' = MONAI's matmul-softmax-matmul, 'auto' = whichever a short measurement on this device "
        "finds faster. Weights and state-dict keys are the same either way.",
    )
    compile: bool = _f(
        False, "Compile the image encoder with torch.compile (inductor) in each training worker, before the DDP "
        "wrapper; weights and state-dict keys are unchanged. The first step compiles: its time is logged as "
        "train/compile_s and left out of throughput and step times. Needs a C++ compiler on CPU, Triton on CUDA.",
    )
    text_encoder: str = _f("minilm", "'minilm' (offline package) or a Hugging Face model path or hub name.")
    embed_dim: int = _f(384, "Dimension of the shared embedding space ('locked'/'residual' text heads: the text encoder's width).")
    text_head: Literal["locked", "residual", "linear"] = _f(
        "locked",
        "Text side of the shared space: 'locked' = frozen report embedding as is (LiT-style; zero-shot "
        "prompts keep the text encoder's geometry), 'residual' = x + Wx with W zero-initialised, "
        "'linear' = a learned projection to embed_dim.",
    )
    freeze_text: bool = _f(True, "Keep the text encoder frozen (only its projection head trains).")


OBJECTIVES = ("clip", "mg3d", "t3d", "unimedi")


@dataclass(frozen=True)
class MG3DConfig:
    """MG-3D's own settings, read when `objective.name = "mg3d"`: term weights, masking, fusion, heads."""

    mim_weight: float = _f(1.0, "MG-3D `mim`: text-guided masked image reconstruction (MSE on masked voxels).")
    mlm_weight: float = _f(1.0, "MG-3D `mlm`: image-guided masked language modelling (CE on masked tokens).")
    sentence_consistency_weight: float = _f(0.1, "MG-3D `sentence_consistency`: fused masked report stays close (cosine) to the unmasked one.")
    disentangled_weight: float = _f(0.1, "MG-3D `disentangled`: InfoNCE between the volume and its sigmoid-gated sentence aggregate.")
    sentence_match_weight: float = _f(0.1, "MG-3D `sentence_match`: L1 between image-feature and report similarity of patient pairs.")
    mim_mask_ratio: float = _f(0.5, "MG-3D: share of image patch tokens masked for `mim`.")
    mlm_mask_prob: float = _f(0.15, "MG-3D: share of words masked (whole-word) for `mlm`.")
    fusion_layers: int = _f(2, "MG-3D: bidirectional cross-attention layers of the fusion module.")
    fusion_dim: int = _f(256, "MG-3D: width of the fusion module.")
    decoder_dim: int = _f(128, "MG-3D `mim`: channels of the first conv-decoder stage (halved each upsampling).")
    disentangled_layers: int = _f(2, "MG-3D: layers of sigmoid-gated sentence aggregation.")
    match_thresholds: tuple[float, float] = _f((0.6, 0.9), "MG-3D `sentence_match`: report similarity <= low is target 0, >= high is 1, between ignored.")
    match_dim: int = _f(128, "MG-3D `sentence_match`: dimension of the image features compared across patients.")


@dataclass(frozen=True)
class T3DConfig:
    """T3D's own settings, read when `objective.name = "t3d"`: term weights, crops, corruption, heads."""

    text_contrast_weight: float = _f(1.0, "T3D `text_contrast`: InfoNCE between each crop and its report.")
    crop_contrast_weight: float = _f(1.0, "T3D `crop_contrast`: InfoNCE between crops of the same volume (positives).")
    restore_weight: float = _f(1.0, "T3D `restore`: L1 of the report-conditioned restoration of a corrupted crop.")
    crop_shape: tuple[int, int, int] = _f((96, 96, 96), "T3D: sub-volume crop size in voxels of the high-resolution volume.")
    num_crops: int = _f(2, "T3D: crops per volume per step (>= 2 for `crop_contrast`).")
    crop_temperature: float = _f(0.1, "T3D: fixed temperature of `crop_contrast` (ours).")
    crop_dim: int = _f(128, "T3D: projection dimension of `crop_contrast`.")
    decoder_dim: int = _f(128, "T3D `restore`: channels of the first conv-decoder stage (halved each upsampling).")
    corrupt_patch: int = _f(8, "T3D `restore`: side of the local patches that are masked or shuffled (voxels, ours).")
    corrupt_mask_ratio: float = _f(0.25, "T3D `restore`: share of local patches blanked (ours).")
    corrupt_shuffle_ratio: float = _f(0.25, "T3D `restore`: share of local patches whose voxels are shuffled (ours).")
    corrupt_noise_std: float = _f(0.05, "T3D `restore`: std of the Gaussian noise added to the crop (ours).")


@dataclass(frozen=True)
class UniMedIConfig:
    """UniMedI's own settings, read when `objective.name = "unimedi"`: term weights, EMA teacher, DINO/iBOT."""

    vl_contrast_weight: float = _f(1.0, "UniMedI `vl_contrast`: InfoNCE of image [CLS] and report for 3D, pseudo-2D and 2D.")
    distill_cls_weight: float = _f(1.0, "UniMedI `distill_cls`: DINO self-distillation on [CLS].")
    distill_patch_weight: float = _f(1.0, "UniMedI `distill_patch`: iBOT self-distillation on masked patch tokens.")
    ema_momentum: tuple[float, float] = _f((0.996, 1.0), "UniMedI: EMA teacher momentum, cosine schedule from first to second value.")
    top_k_slices: int = _f(4, "UniMedI: slices kept by attentive slice selection (ours: 4), tiled into one pseudo-2D image.")
    student_mask_ratio: float = _f(0.5, "UniMedI: share of patch tokens the student does not see.")
    dino_dim: int = _f(1024, "UniMedI: prototypes of the DINO/iBOT head (paper-scale: 8192+).")
    teacher_temperature: float = _f(0.04, "UniMedI: teacher sharpening temperature.")
    student_temperature: float = _f(0.1, "UniMedI: student temperature.")
    center_momentum: float = _f(0.9, "UniMedI: momentum of the teacher-output centre.")


def _method(cls: type, method: str) -> Any:
    """A sub-table of method settings (the method's defaults when the config does not set it)."""
    return field(default_factory=cls, metadata={"help": f"Settings of the {method} method."})


@dataclass(frozen=True)
class ObjectiveConfig:
    """Loss terms and heads of the pretraining method. Every `*_weight` scales one named term.

    Setting `name` in a config file or override also applies that method's defaults
    (`METHOD_DEFAULTS`, docs/methods.md: encoder, data, objective and optimiser keys) to every key
    the file does not set itself.
    Each method's own settings are in a sub-table: `[objective.mg3d]`, `[objective.t3d]`,
    `[objective.unimedi]` (override: `objective.mg3d.mim_weight=0`).
    """

    name: Literal["clip", "mg3d", "t3d", "unimedi"] = _f("clip", "Pretraining method: clip, mg3d, t3d or unimedi.")
    temperature: float = _f(0.07, "Initial softmax temperature tau of the volume-report InfoNCE logits.")
    learnable_temperature: bool = _f(True, "Learn log(1/tau), clamped at 100 (false: tau stays fixed).")
    gather_with_grad: bool = _f(True, "All-gather embeddings with gradients so negatives are the global batch.")
    local_loss: bool = _f(False, "Compute only the local rows (B x G) of the global logits.")
    head_lr_mult: float = _f(1.0, "Learning rate of every non-encoder parameter = train.lr x this (MG-3D: 5).")
    # clip / mg3d
    align_weight: float = _f(1.0, "Weight of `align`, the volume-report InfoNCE (MG-3D: 0.1).")
    mg3d: MG3DConfig = _method(MG3DConfig, "MG-3D")
    t3d: T3DConfig = _method(T3DConfig, "T3D")
    unimedi: UniMedIConfig = _method(UniMedIConfig, "UniMedI")


# `objective.<method>` sub-tables: each method's own settings
METHOD_SECTIONS: dict[str, type] = {"mg3d": MG3DConfig, "t3d": T3DConfig, "unimedi": UniMedIConfig}


def _moved_keys() -> dict[str, tuple[str, ...]]:
    moved: dict[str, tuple[str, ...]] = {}
    for method, cls in METHOD_SECTIONS.items():
        for f in dataclasses.fields(cls):
            moved[f.name] = (*moved.get(f.name, ()), method)
    return moved


# keys that were flat `objective.<key>` before the sub-tables -> the methods whose tables hold them now
# (decoder_dim: mg3d and t3d)
MOVED_OBJECTIVE_KEYS: dict[str, tuple[str, ...]] = _moved_keys()

# Each method's published set-up (docs/methods.md), as dotted config keys. Applied whenever a
# method is chosen - in a file, by an override or by `replace` - to every key the user did not set;
# explicit keys win (the CPU demo configs set a tiny encoder and coarse data). Budget keys
# (max_steps, warmup_steps, batch), precision and the cluster stay the user's: they depend on the
# hardware, not on the method.
_FINDINGS_AND_IMPRESSIONS = ("Findings_EN", "Impressions_EN")
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": {},
    "mg3d": {
        # Swin-B on 0.75 x 0.75 x 1.5 mm, 128 x 128 x 96 crops of the body; AdamW 1e-5 (heads 5x), wd 1e-8
        "model.image_encoder": "swin3d", "model.size": "base",
        "data.shape": (128, 128, 96), "data.spacing_mm": (0.75, 0.75, 1.5), "data.foreground_crop": True,
        "data.report_sections": _FINDINGS_AND_IMPRESSIONS,
        "objective.align_weight": 0.1, "objective.temperature": 0.1, "objective.learnable_temperature": False,
        "objective.head_lr_mult": 5.0, "train.lr": 1e-5, "train.weight_decay": 1e-8,
    },
    "t3d": {
        # the same Swin-B, on 1 mm isotropic high-resolution volumes cropped into 96^3 sub-volumes
        "model.image_encoder": "swin3d", "model.size": "base",
        "data.storage": "highres", "data.spacing_mm": (1.0, 1.0, 1.0), "data.shape": (96, 96, 96),
        "data.foreground_crop": True, "data.report_sections": _FINDINGS_AND_IMPRESSIONS,
        "objective.temperature": 0.07, "objective.learnable_temperature": True,
        "train.lr": 1e-4, "train.weight_decay": 0.05,
    },
    "unimedi": {
        # one ViT-B for 2D (224^2 radiographs) and 3D; 128 x 128 x 96 volumes
        "model.image_encoder": "unimedi_vit", "model.size": "base",
        "data.shape": (128, 128, 96), "data.spacing_mm": (0.75, 0.75, 1.5), "data.shape_2d": (224, 224),
        "data.report_sections": _FINDINGS_AND_IMPRESSIONS,
        "objective.temperature": 0.07, "objective.learnable_temperature": True,
        "train.lr": 1e-4, "train.weight_decay": 0.05,
    },
}


@dataclass(frozen=True)
class TrainConfig:
    global_batch: int = _f(32, "Batch size summed over all workers.")
    max_steps: int = _f(600, "Optimizer steps to train for.")
    lr: float = _f(2e-3, "Peak learning rate (AdamW).")
    weight_decay: float = _f(1e-4, "AdamW weight decay.")
    warmup_steps: int = _f(20, "Linear warm-up steps before cosine decay.")
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", "Autocast precision (bf16/fp16 on GPU).")
    seed: int = _f(0, "Seed for model init, data order and augmentation.")
    log_every: int = _f(10, "Report metrics every N steps.")
    val_every: int = _f(
        0, "Compute the validation loss (`val/loss`, the objective on data.eval_split) every N steps; it is "
        "always computed at the last step (0: only then). Sweeps with tune.scheduler = 'asha' stop trials on it.",
    )
    val_volumes: int = _f(0, "Held-out volumes used for the validation loss (0: all of data.eval_split).")
    checkpoint_every: int = _f(100, "Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = _f(2, "Checkpoints kept on storage.")
    max_failures: int = _f(2, "Worker-group restarts tolerated; training resumes from the last checkpoint.")
    prefetch_batches: int = _f(
        16, "Batches each worker prepares ahead in a background thread (read, shuffle, collate), so the next "
        "batches and each epoch's shuffle-buffer refill overlap training (train/time/data_wait_s and "
        "train/data_wait_share show what is left). On CUDA the batches are pinned and copied to the GPU a step ahead.",
    )
    augment: bool = _f(True, "Random intensity jitter and small shifts on training volumes (and on each of T3D's crops).")
    sentence_dropout: float = _f(
        0.0, "Ours: share of each report's sentences left out, at random per step, of the report embedding a "
        "training volume is aligned to (text augmentation with a frozen text encoder: the stored sentence "
        "embeddings are re-averaged). 0: the stored report embedding.",
    )
    grad_share_every: int = _f(
        50, "Every N steps, measure each weighted loss term's share of the image encoder's gradient norm "
        "(train/grad_share/<term>, train/grad_norm/<term>) with one extra backward pass per term; shows when "
        "one term drowns the others. 0: never. Multi-term objectives only.",
    )
    balance_terms: bool = _f(
        False, "Ours, not in the papers: at each train.grad_share_every measurement, move a multiplier per term "
        "(EMA, clamped to [0.01, 100]) so that the terms' encoder-gradient shares approach their configured "
        "weights' shares (train/term_multiplier/<term>). Needs train.grad_share_every > 0.",
    )
    max_skipped_steps: int = _f(
        10, "Consecutive steps with a non-finite loss or gradient (skipped on every rank, counted in "
        "train/skipped_steps) after which the run stops, naming the step and the terms.",
    )


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = _f(32, "Volumes per forward pass during evaluation.")
    bootstrap: int = _f(200, "Bootstrap resamples for 95% confidence intervals (0 disables).")
    labels: tuple[str, ...] = _f((), "Labels to evaluate; empty: every label with both classes in the split.")
    prompts: str = _f(
        "", "TOML file of extra zero-shot prompt sets ([sets.NAME] with positive/negative templates or per-label "
        "phrasings; docs/evaluation.md); empty: the built-in sets single, report and heldout.", location=True,
    )
    prompt_ensemble: tuple[str, ...] = _f(
        ("report",), "Prompt sets whose phrasings are averaged (per label and polarity) for the reported zero-shot "
        "scores; every set is also scored alone (prompts/<set>/macro_auroc).",
    )
    probe_fractions: tuple[float, ...] = _f(
        (0.01, 0.1, 1.0), "Shares of the training split's labels the linear probes (`vlp3d probe`) train on: "
        "nested subsets of patients, each in (0, 1].",
    )


@dataclass(frozen=True)
class FinetuneConfig:
    """`vlp3d finetune`: a registered pretrained model's image encoder fine-tuned on a labelled downstream task
    (Ray Train, tracked in MLflow, the result registered with a link to the model it started from)."""

    model: str = _f("", "Pretrained model to start from: models:/NAME@ALIAS or models:/NAME/VERSION (`--model`).")
    task: Literal["segmentation", "classification"] = _f(
        "segmentation", "'segmentation': the shards' voxel label maps (column label_map), MONAI SwinUNETR (swin3d) "
        "or UNETR (vit3d) or a small U-Net decoder (resnet3d) around the encoder, Dice + cross-entropy loss, "
        "sliding-window inference, per-class Dice and HD95; 'classification': the shards' 0/1 labels, encoder + "
        "finetune.head, multi-label BCE, per-label AUROC.",
    )
    init: Literal["pretrained", "random"] = _f(
        "pretrained", "'pretrained': the encoder starts from the model's weights; 'random': the same network from "
        "a fresh random initialisation (the baseline that shows what pretraining is worth).",
    )
    label_fraction: float = _f(
        1.0, "Share of the training patients whose labels are used, stratified; nested like data.fraction "
        "(0.1 within 0.25 within 1.0) and the same patients for every model and init.",
    )
    max_steps: int = _f(200, "Optimizer steps of fine-tuning.")
    global_batch: int = _f(4, "Volumes (segmentation: crops) per step, summed over cluster.num_workers workers.")
    lr: float = _f(1e-3, "Peak learning rate (AdamW) of the decoder/head.")
    encoder_lr_mult: float = _f(1.0, "Encoder learning rate = finetune.lr x this (0: the encoder stays frozen).")
    weight_decay: float = _f(1e-5, "AdamW weight decay.")
    warmup_steps: int = _f(10, "Linear warm-up steps before cosine decay.")
    roi_size: tuple[int, ...] = _f(
        (), "Crop (x, y, z) the network sees: random crops in training, the window of sliding-window inference "
        "(segmentation) or the centre crop/pad (classification). Empty: the pretrained encoder's input shape.",
    )
    sw_overlap: float = _f(0.25, "Overlap of neighbouring windows in sliding-window inference.")
    classes: tuple[str, ...] = _f(
        (), "Segmentation: label-map classes to segment (names from the shards' manifest, e.g. [\"lung\", "
        "\"heart\"]); voxels of other classes count as background. Empty: every class.",
    )
    labels: tuple[str, ...] = _f(
        (), "Classification: labels to predict; empty: every label of the shards with a positive training volume.")
    head: Literal["linear", "mlp"] = _f("linear", "Classification head on the pooled encoder features.")
    registered_model: str = _f("", "Registered name of the fine-tuned model; empty: <pretrained name>-<task>.")


def _table(help: str) -> Any:
    """A TOML-table field (empty by default); its contents are checked by vlp3d.search_space."""
    return field(default_factory=dict, metadata={"help": help})


@dataclass(frozen=True)
class TuneConfig:
    """`vlp3d sweep`: Ray Tune over config keys; every trial pretrains, is evaluated and logged as a
    child run of one MLflow parent run, and scaling laws are fitted over the finished trials."""

    space: dict[str, Any] = _table(
        "Search space: config key -> values. A list (or {grid = [...]}) tries every value; {choice = [...]} "
        "samples one; {uniform = [lo, hi]}, {loguniform = [lo, hi]} (floats) and {randint = [lo, hi]} "
        "(ints, hi exclusive) sample a range. E.g. \"data.fraction\" = [0.25, 0.5, 1.0].",
    )
    variants: dict[str, Any] = _table(
        "Named groups of keys set together, tried as one more grid axis (column 'variant'), e.g. "
        "[tune.variants.no_mim] \"objective.mg3d.mim_weight\" = 0.0; an empty table keeps the base config.",
    )
    search: Literal["grid", "random", "optuna"] = _f(
        "grid", "'grid': every grid value (sampled keys drawn per grid point); 'random': every key sampled, "
        "lists as choices; 'optuna': Optuna's TPE over the space (pip install optuna), guided by tune.metric.",
    )
    trial: Literal["pretrain", "finetune"] = _f(
        "pretrain", "What a trial runs: 'pretrain' (pretraining, then zero-shot evaluation) or 'finetune' (`vlp3d "
        "finetune` of finetune.model, evaluated on data.eval_split: label-efficiency sweeps over "
        "finetune.label_fraction x finetune.init, plotted as label_efficiency.png on the parent run).",
    )
    num_samples: int = _f(1, "Trials per grid point ('grid') or in all ('random', 'optuna').")
    metric: str = _f("eval/macro_auroc", "Trial metric that ranks trials and guides Optuna (reported at the end of a trial).")
    mode: Literal["max", "min"] = _f("max", "Optimisation direction of `tune.metric`.")
    scheduler: Literal["none", "asha"] = _f(
        "none", "'asha': stop poor trials early on tune.asha_metric, reported every train.val_every steps.")
    asha_metric: str = _f("val/loss", "Metric ASHA compares at its rungs (reported during training).")
    asha_mode: Literal["max", "min"] = _f("min", "Direction of tune.asha_metric.")
    asha_grace_steps: int = _f(0, "Steps every trial runs before ASHA may stop it (0: train.max_steps // 4).")
    asha_reduction_factor: int = _f(2, "ASHA keeps 1/reduction_factor of the trials at each rung.")
    max_concurrent_trials: int = _f(
        0, "Trials run at once (0: as many as the cluster's CPUs/GPUs hold, keeping one CPU for Ray Data; set "
        "it on an autoscaling cluster, whose resources grow only once trials ask).",
    )
    trial_cpus: float = _f(0.1, "CPUs of each trial's driver process (its Train workers take cluster.* resources).")
    seed: int = _f(0, "Seed of random/Optuna sampling and of the scaling-fit bootstrap.")
    fit_bootstrap: int = _f(1000, "Bootstrap resamples for the 95% intervals of fitted scaling exponents.")


@dataclass(frozen=True)
class TrackingConfig:
    workdir: str = _f("vlp3d-runs/default", "Local folder for the local MLflow store, sweep folders and (without "
                      "tracking.storage) Ray results and checkpoints; never a URI.", location=True)
    storage: str = _f(
        "", "Where Ray Train keeps run state and checkpoints (pretraining and sweep trials; a rerun of a run name "
        "resumes from there): a folder or a pyarrow filesystem URI (s3://bucket/prefix, gs://bucket/prefix, "
        "file:///shared/runs) every node can reach; credentials come from the environment, never the URI "
        "(docs/cluster.md). Empty: <workdir>/ray_results.", location=True,
    )
    tracking_uri: str = _f("", "MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db.",
                           location=True)
    experiment: str = _f("", "MLflow experiment; empty: the config name.")
    registered_model: str = _f("", "Registered model name; empty: vlp3d-<objective>.")
    model_allowed_root: str = _f(
        "", "Folder the logged model may read image paths from (symlinks resolved; other paths are refused, "
        "arrays still accepted); empty: any path. Set it for a model that will be served. Recorded in the model "
        "as model_config allowed_root; replaced at load time by mlflow.pyfunc.load_model(uri, "
        "model_config={'allowed_root': DIR}) or, e.g. under `mlflow models serve`, $VLP3D_ALLOWED_ROOT.")


@dataclass(frozen=True)
class ClusterConfig:
    address: str = _f("", "Ray address; empty: $RAY_ADDRESS, else a local Ray.", location=True)
    num_workers: int = _f(2, "Ray Train DDP workers.")
    use_gpu: bool = _f(False, "One GPU per worker.")
    cpus_per_worker: float = _f(0.5, "CPUs reserved per worker (leave some for Ray Data on small machines).")


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = _f("demo", "Experiment name (MLflow experiment and run-name prefix).")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


SECTIONS: dict[str, type] = {
    f.name: f.type if isinstance(f.type, type) else globals()[f.type]
    for f in dataclasses.fields(ExperimentConfig)
    if f.name != "name"
}


def did_you_mean(key: str, valid: typing.Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    if close:
        return f" Did you mean '{prefix}{close[0]}'?"
    return f" Valid keys: {', '.join(prefix + v for v in sorted(valid))}."


def coerce_value(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field annotation; lists become tuples, ints become floats."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}.")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce_value(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r}).")
        return tuple(coerce_value(v, a, where) for v, a in zip(value, args, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table ({{...}} or a [section] header), got {value!r}.")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if type(value) is not annotation:
            raise ConfigError(
                f"{where}: expected {annotation.__name__}, got {type(value).__name__} {value!r}."
            )
        return value
    if isinstance(annotation, types.UnionType):
        raise TypeError(f"unsupported annotation {annotation}")
    return value


def sub_tables(cls: type) -> dict[str, type]:
    """{name: dataclass} of the fields of `cls` that are sub-tables (ExperimentConfig: its sections;
    ObjectiveConfig: the methods' `objective.<method>` tables)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def leaf_fields(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field]]:
    """(dotted key, field) of every key of `cls`, in the dataclasses' order, sub-tables walked."""
    tables = sub_tables(cls)
    for f in dataclasses.fields(cls):
        if f.name in tables:
            yield from leaf_fields(tables[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def moved_key_message(key: str) -> str | None:
    """The error for a flat `objective.<key>` that moved into a method's sub-table (naming the new
    key or keys); None for any other key."""
    section, _, name = key.partition(".")
    if section != "objective" or name not in MOVED_OBJECTIVE_KEYS:
        return None
    methods = MOVED_OBJECTIVE_KEYS[name]
    if len(methods) == 1:
        return (f"objective.{name} moved to objective.{methods[0]}.{name} "
                f"(a [objective.{methods[0]}] table in a config file).")
    return (f"objective.{name} moved to {' and '.join(f'objective.{m}.{name}' for m in methods)} (one per "
            f"method: {' and '.join(f'[objective.{m}]' for m in methods)} tables in a config file).")


def _unknown_key(cls: type, key: str, where: str) -> str:
    """The error for `key`, not a field of `cls` (at `where`, e.g. 'objective.'): moved, another
    method's setting, or the closest valid key (sub-tables' keys included)."""
    full = f"{where}{key}"
    moved = moved_key_message(full)
    if moved:
        return moved
    if cls in METHOD_SECTIONS.values() and key in MOVED_OBJECTIVE_KEYS:
        homes = " and ".join(f"objective.{m}.{key}" for m in MOVED_OBJECTIVE_KEYS[key])
        return f"unknown key '{full}': {key} is a setting of another method ({homes})."
    names = [f.name for f in dataclasses.fields(cls)]
    candidates = {name: name for name in names}
    for table, table_cls in sub_tables(cls).items():
        for f in dataclasses.fields(table_cls):
            candidates.setdefault(f.name, f"{table}.{f.name}")
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    if close:
        return f"unknown key '{full}'. Did you mean '{where}{candidates[close[0]]}'?"
    return f"unknown key '{full}'. Valid keys: {', '.join(where + v for v in sorted(names))}."


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    tables = sub_tables(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(_unknown_key(cls, key, where))
        if key in tables:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key}: expected a table ([{where}{key}] in a config file, or "
                                  f"{where}{key}.KEY=VALUE overrides), got {value!r}.")
            kwargs[key] = _build(tables[key], value, f"{where}{key}.")
        else:
            kwargs[key] = coerce_value(value, hints[key], f"{where}{key}")
    return cls(**kwargs)


def key_annotation(key: str) -> Any:
    """The annotation of config key `key` ('train.lr', 'objective.mg3d.mim_weight'); a ConfigError
    naming the key otherwise (unknown: the closest valid one; moved: its new name; a table)."""
    section, *names = key.split(".")
    if section not in SECTIONS:
        raise ConfigError(f"unknown section '{section}'.{did_you_mean(section, SECTIONS)}")
    cls, where = SECTIONS[section], f"{section}."
    if not names:
        raise ConfigError(f"'{key}' is a section; name one of its keys, e.g. '{next(leaf_fields(cls, where))[0]}'.")
    for i, name in enumerate(names):
        hints, tables = typing.get_type_hints(cls), sub_tables(cls)
        if name not in hints:
            raise ConfigError(_unknown_key(cls, name, where))
        last = i == len(names) - 1
        if name in tables:
            cls, where = tables[name], f"{where}{name}."
            if last:
                raise ConfigError(f"'{key}' is a table; name one of its keys, e.g. '{next(leaf_fields(cls, where))[0]}'.")
        elif not last:
            raise ConfigError(f"'{where}{name}' is a key, not a table: '{key}' does not exist.")
        else:
            return hints[name]
    raise AssertionError("unreachable")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-3` -> (['train', 'lr'], 0.001). Values use TOML syntax; bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. train.lr=1e-3).")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def _merge(cls: type, base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """`base` with `updates` applied: sub-tables of `cls` merged key by key, other values replaced
    (a table-valued key such as tune.space is replaced whole)."""
    tables = sub_tables(cls)
    out = dict(base)
    for key, value in updates.items():
        if key in tables and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(tables[key], out[key], value)
        else:
            out[key] = value
    return out


def _find(raw: dict[str, Any], key: str) -> tuple[bool, Any]:
    """(present, value) of dotted `key` in nested `raw`."""
    value: Any = raw
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _assign(raw: dict[str, Any], key: str, value: Any) -> None:
    *tables, name = key.split(".")
    for part in tables:
        raw = raw.setdefault(part, {})
    raw[name] = value


def chosen_method(raw: dict[str, Any]) -> str | None:
    """The method a raw (parsed TOML + overrides) config names, if it is one with defaults."""
    present, name = _find(raw, "objective.name")
    return name if present and isinstance(name, str) and name in METHOD_DEFAULTS else None


def method_defaults_applied(raw: dict[str, Any]) -> dict[str, str]:
    """{dotted key: method} of the keys `from_dict(raw)` takes from the chosen method's defaults
    (those `raw` does not set), for `vlp3d config show`."""
    method = chosen_method(raw)
    if method is None:
        return {}
    return {key: method for key in METHOD_DEFAULTS[method] if not _find(raw, key)[0]}


def with_method_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` plus the chosen method's defaults for every key it does not set."""
    applied = method_defaults_applied(raw)
    if not applied:
        return raw
    out = json.loads(json.dumps(raw))
    for key, method in applied.items():
        value = METHOD_DEFAULTS[method][key]
        _assign(out, key, list(value) if isinstance(value, tuple) else value)
    return out


def from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Build and validate a config from nested dicts; the chosen method's defaults fill the keys
    `raw` does not set (`METHOD_DEFAULTS`)."""
    raw = with_method_defaults(raw)
    top = [f.name for f in dataclasses.fields(ExperimentConfig)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in top:
            raise ConfigError(f"unknown section '{key}'.{did_you_mean(key, top)}")
        if key == "name":
            kwargs["name"] = coerce_value(value, str, "name")
        else:
            if not isinstance(value, dict):
                raise ConfigError(f"'{key}' must be a table ([{key}]), got {value!r}.")
            kwargs[key] = _build(SECTIONS[key], value, f"{key}.")
    cfg = ExperimentConfig(**kwargs)
    check_ranges(cfg)
    return cfg


# (low, high, low included) per key whose type alone does not bound it
RANGES: dict[str, tuple[float, float, bool, str]] = {
    "data.fraction": (0.0, 1.0, False, "the share of training patients used (nested subsets)"),
    "data.valid_fraction": (0.0, 1.0, True, "the share of patients held out when a manifest has no split"),
    "train.max_skipped_steps": (1, 1e9, True, "consecutive non-finite steps tolerated"),
    "train.grad_share_every": (0, 1e9, True, "steps between per-term gradient measurements, 0 = never"),
    "train.prefetch_batches": (1, 1e6, True, "batches prepared ahead per worker"),
    "train.sentence_dropout": (0.0, 1.0, True, "the share of sentences left out of a training report embedding"),
    "finetune.label_fraction": (0.0, 1.0, False, "the share of training patients whose labels fine-tuning uses"),
    "finetune.max_steps": (1, 1e9, True, "fine-tuning steps"),
    "finetune.global_batch": (1, 1e9, True, "volumes per fine-tuning step"),
    "finetune.sw_overlap": (0.0, 0.95, True, "the overlap of sliding windows"),
    "finetune.encoder_lr_mult": (0.0, 1e3, True, "the encoder's learning-rate multiplier"),
}


def check_value_range(key: str, value: float) -> None:
    """Raise ConfigError unless `value` lies in the range RANGES gives `key` (if any)."""
    if key not in RANGES:
        return
    low, high, low_included, meaning = RANGES[key]
    if not (low <= value <= high if low_included else low < value <= high):
        bracket = "[" if low_included else "("
        raise ConfigError(f"{key} = {value!r} must be in {bracket}{low:g}, {high:g}] ({meaning}).")


def get_key(cfg: Any, key: str) -> Any:
    """The value of the dotted config key `key` in `cfg` (e.g. 'objective.mg3d.mim_weight')."""
    value = cfg
    for name in key.split("."):
        value = getattr(value, name)
    return value


# keys that must name a local (or mounted) path: what reads or writes them needs a POSIX folder
LOCAL_ONLY = {
    "tracking.workdir": "it holds the local MLflow store (sqlite) and the sweep folders; put checkpoints on "
                        "shared storage with tracking.storage=URI and runs on an MLflow server with "
                        "tracking.tracking_uri (or MLFLOW_TRACKING_URI)",
    "data.corpus": "prepare opens the corpus's volume files by path; mount the bucket (e.g. s3fs, EFS) and give "
                   "the mounted folder (the shards, data.shards / prepare --out, may be a URI)",
}


def check_ranges(cfg: ExperimentConfig) -> None:
    for key, why in LOCAL_ONLY.items():
        if is_uri(get_key(cfg, key)):
            raise ConfigError(f"{key} = {get_key(cfg, key)!r} must be a local folder, not a URI: {why}.")
    if cfg.train.balance_terms and not cfg.train.grad_share_every:
        raise ConfigError("train.balance_terms = true needs train.grad_share_every > 0 (the steps at which the "
                          "terms' gradient shares are measured and the multipliers move), e.g. 50.")
    for key in RANGES:
        check_value_range(key, get_key(cfg, key))


def read_toml(path: str | Path, missing: str, where: str = "") -> dict[str, Any]:
    """The parsed TOML file `path`; ConfigError `missing` when it is not a file, or naming the file
    (after `where`, e.g. "eval.prompts = ") and the parse error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(missing)
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where}{path}: invalid TOML: {err}") from err


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> ExperimentConfig:
    """Defaults < the chosen method's defaults < TOML file < `section.key=value` overrides."""
    return load_config_with_sources(path, overrides)[0]


def load_config_with_sources(path: str | Path | None = None, overrides: typing.Sequence[str] = ()
                             ) -> tuple[ExperimentConfig, dict[str, str]]:
    """`load_config`, and {dotted key: method} of the keys taken from the method's defaults."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        raw = read_toml(path, f"config file '{path}' not found (see configs/ for examples).")
        raw.setdefault("name", path.stem)
    for text in overrides:
        keys, value = parse_override(text)
        if len(keys) == 1 and keys[0] == "name":
            raw["name"] = value
            continue
        if len(keys) < 2:
            raise ConfigError(f"override '{text}': use section.key=value, e.g. train.lr=1e-3 "
                              "(objective.mg3d.mim_weight=0 for a method's table).")
        section = keys[0]
        if section not in SECTIONS:
            raise ConfigError(f"override '{text}': unknown section '{section}'.{did_you_mean(section, SECTIONS)}")
        table = raw
        for depth, name in enumerate(keys[:-1]):
            table = table.setdefault(name, {})
            if not isinstance(table, dict):
                raise ConfigError(f"override '{text}': '{'.'.join(keys[:depth + 1])}' is not a table.")
        table[keys[-1]] = value
    try:
        return from_dict(raw), method_defaults_applied(raw)
    except ConfigError as err:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{err}") from None


def replace(cfg: ExperimentConfig, **sections: dict[str, Any]) -> ExperimentConfig:
    """A copy with some keys of some sections changed, validated like an override. A method's keys
    go in a nested dict: `replace(cfg, objective={"mg3d": {"mim_weight": 0.0}})` (its other keys stay).

    Changing `objective.name` switches method defaults like a file would: every key of the old or
    the new method's defaults that still holds the value the old method gave it (so the user did
    not choose it) and that this call does not set takes the new method's default, or the plain
    default when the new method has none."""
    raw = to_dict(cfg)
    for section, values in sections.items():
        raw[section] = _merge(SECTIONS[section], raw[section], values)
    old, new = cfg.objective.name, raw["objective"]["name"]
    if new != old and new in METHOD_DEFAULTS:
        given = {f"{section}.{key}" for section, values in sections.items() for key in _dotted(values)}
        plain = to_dict(ExperimentConfig())
        for key in set(METHOD_DEFAULTS.get(old, {})) | set(METHOD_DEFAULTS[new]):
            if key in given:
                continue
            before = _find(plain, key)[1]
            before = METHOD_DEFAULTS.get(old, {}).get(key, before)
            if json.dumps(_find(raw, key)[1]) == json.dumps(list(before) if isinstance(before, tuple) else before):
                after = METHOD_DEFAULTS[new].get(key, _find(plain, key)[1])
                _assign(raw, key, list(after) if isinstance(after, tuple) else after)
    return from_dict(raw)


def _dotted(values: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in values.items():
        if isinstance(value, dict) and key in METHOD_SECTIONS and not prefix:
            out += _dotted(value, f"{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def migrate_stored(raw: dict[str, Any]) -> dict[str, Any]:
    """A stored config (`raw`, parsed TOML) written before the methods' settings moved into
    `[objective.<method>]` tables, with its flat method keys moved there (decoder_dim into both
    MG-3D's and T3D's), and flat `objective.<key>` keys of tune.space / tune.variants renamed (to
    the configured method's table where two hold the key). Other configs are returned unchanged."""
    objective = raw.get("objective")
    if not isinstance(objective, dict):
        return raw
    method = objective.get("name")

    def new_key(key: Any) -> Any:
        section, _, name = str(key).partition(".")
        if section != "objective" or name not in MOVED_OBJECTIVE_KEYS:
            return key
        homes = MOVED_OBJECTIVE_KEYS[name]
        return f"objective.{method if method in homes else homes[0]}.{name}"

    objective = {k: dict(v) if isinstance(v, dict) else v for k, v in objective.items()}
    for name in [k for k in objective if k in MOVED_OBJECTIVE_KEYS]:
        value = objective.pop(name)
        for home in MOVED_OBJECTIVE_KEYS[name]:
            table = objective.setdefault(home, {})
            if isinstance(table, dict):
                table.setdefault(name, value)
    out = {**raw, "objective": objective}
    tune = raw.get("tune")
    if isinstance(tune, dict):
        tune = dict(tune)
        if isinstance(tune.get("space"), dict):
            tune["space"] = {new_key(k): v for k, v in tune["space"].items()}
        if isinstance(tune.get("variants"), dict):
            tune["variants"] = {n: {new_key(k): v for k, v in keys.items()} if isinstance(keys, dict) else keys
                                for n, keys in tune["variants"].items()}
        out["tune"] = tune
    return out


def load_stored_config(path: str | Path) -> ExperimentConfig:
    """A config vlp3d stored itself (`to_toml`: a checkpoint's or model's config.toml, a sweep's
    sweep.toml). Flat method keys of configs stored before the `[objective.<method>]` tables are
    moved there silently (`migrate_stored`); files people write get `load_config`'s error instead."""
    path = Path(path)
    raw = read_toml(path, f"stored config '{path}' not found.")
    raw.setdefault("name", path.stem)
    try:
        return from_dict(migrate_stored(raw))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flatten(cfg: ExperimentConfig) -> dict[str, str]:
    """`{"train.lr": "0.002", "objective.mg3d.mim_weight": "1.0", ...}`: every key (MLflow
    receives `logged_params`)."""
    raw = to_dict(cfg)
    out = {}
    for key, _field in leaf_fields(ExperimentConfig):
        value = _find(raw, key)[1]
        out[key] = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return out


# what MLflow receives as params: the training-relevant sections, every field but locations
LOGGED_SECTIONS = ("data", "model", "objective", "train", "eval", "finetune", "tune", "cluster")
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


def redact_userinfo(text: str) -> str:
    """`https://user:secret@host/x` -> `https://host/x` (any URI inside `text`)."""
    return _USERINFO.sub(r"\1", text)


def logged_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The allow-list of MLflow params: `name` and the keys of LOGGED_SECTIONS except locations
    (corpus, shard and work folders, tracking and Ray addresses), URIs without user-info."""
    flat = flatten(cfg)
    allowed = {"name"} | {key for key, f in leaf_fields(ExperimentConfig)
                          if key.split(".", 1)[0] in LOGGED_SECTIONS and not f.metadata.get("location")}
    return {k: redact_userinfo(v) for k, v in flat.items() if k in allowed}


def public_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` as it may be stored with a run or a model: locations emptied, URIs without user-info."""
    raw = to_dict(cfg)
    changed = False
    for key, f in leaf_fields(ExperimentConfig):
        if "." not in key:  # the top-level name
            continue
        *path, name = key.split(".")
        table = _find(raw, ".".join(path))[1]
        value = table[name]
        new = "" if f.metadata.get("location") else redact_userinfo(value) if isinstance(value, str) else value
        if new != value:
            table[name], changed = new, True
    return from_dict(raw) if changed else cfg


def to_toml(cfg: ExperimentConfig, notes: dict[str, str] | None = None) -> str:
    """`cfg` as TOML (it loads back to `cfg`); `notes` {dotted key: text} become end-of-line comments."""
    notes = notes or {}

    def fmt(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, list):
            return "[" + ", ".join(fmt(v) for v in value) + "]"
        if isinstance(value, dict):  # an inline table; keys quoted (search-space keys hold dots)
            items = ", ".join(f"{json.dumps(k)} = {fmt(v)}" for k, v in value.items())
            return f"{{ {items} }}" if items else "{}"
        return json.dumps(value)

    def table(header: str, cls: type, values: dict[str, Any]) -> None:
        """`[header]` with its keys, then its sub-tables (`[objective.mg3d]`, ...)."""
        tables = sub_tables(cls)
        lines.append(f"\n[{header}]")
        for key, value in values.items():
            if key not in tables:
                note = notes.get(f"{header}.{key}")
                lines.append(f"{key} = {fmt(value)}" + (f"  # {note}" if note else ""))
        for key, table_cls in tables.items():
            table(f"{header}.{key}", table_cls, values[key])

    raw = to_dict(cfg)
    lines = [f"name = {fmt(raw.pop('name'))}"]
    for section, values in raw.items():
        table(section, SECTIONS[section], values)
    return "\n".join(lines) + "\n"


def config_hash(obj: Any) -> str:
    """Short stable hash of a dataclass or JSON-able value."""
    payload = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def describe() -> list[tuple[str, str, str]]:
    """(key, default, help) for every config key (`objective.mg3d.mim_weight`: a method's table), for
    `--help` texts."""
    rows = []
    for section, cls in SECTIONS.items():
        for key, f in leaf_fields(cls, f"{section}."):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rows.append((key, repr(default), f.metadata.get("help", "")))
    return rows
