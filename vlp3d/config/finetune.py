"""`[finetune]`: fine-tuning a registered pretrained model on a labelled downstream task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vlp3d.config.fields import _f


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
        gt=0, le=1,
    )
    max_steps: int = _f(200, "Optimizer steps of fine-tuning.", ge=1)
    global_batch: int = _f(4, "Volumes (segmentation: crops) per step, summed over cluster.num_workers workers.", ge=1)
    lr: float = _f(1e-3, "Peak learning rate (AdamW) of the decoder/head.", gt=0)
    encoder_lr_mult: float = _f(1.0, "Encoder learning rate = finetune.lr x this (0: the encoder stays frozen).", ge=0, le=1e3)
    weight_decay: float = _f(1e-5, "AdamW weight decay.", ge=0)
    warmup_steps: int = _f(10, "Linear warm-up steps before cosine decay.", ge=0)
    roi_size: tuple[int, ...] = _f(
        (), "Crop (x, y, z) the network sees: random crops in training, the window of sliding-window inference "
        "(segmentation) or the centre crop/pad (classification). Empty: the pretrained encoder's input shape.",
        ge=1,
    )
    sw_overlap: float = _f(0.25, "Overlap of neighbouring windows in sliding-window inference.", ge=0, le=0.95)
    classes: tuple[str, ...] = _f(
        (), "Segmentation: label-map classes to segment (names from the shards' manifest, e.g. [\"lung\", "
        "\"heart\"]); voxels of other classes count as background. Empty: every class.",
    )
    labels: tuple[str, ...] = _f(
        (), "Classification: labels to predict; empty: every label of the shards with a positive training volume.")
    head: Literal["linear", "mlp"] = _f("linear", "Classification head on the pooled encoder features.")
    registered_model: str = _f("", "Registered name of the fine-tuned model; empty: <pretrained name>-<task>.")
