"""Fine-tuning as a task of the training loop: a downstream network around a pretrained (or randomly
initialised) image encoder (`vlp3d.downstream.build_network`), its loss, optimizer, schedule and
batches; the loop gives it every guard pretraining has (fp16 grad scaling, the non-finite skip with
the schedule held, the divergence stop, exact resume).

- segmentation: random crops of `finetune.roi_size` from the volumes and their voxel label maps
  (shard column `label_map`), Dice + cross-entropy (MONAI `DiceCELoss`), term `dice_ce`;
- classification: the volume centre-cropped/padded to the encoder's input, the shards' 0/1 labels,
  BCE with logits, term `bce`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlp3d.config import ExperimentConfig
from vlp3d.data.shards import LABEL_MAP, decode_image, decode_label_map, shard_files
from vlp3d.downstream import SEGMENTATION, NetworkSpec, build_network, fit_to
from vlp3d.train.feed import LocalRows, RowSource, device_feed
from vlp3d.train.loop import Task
from vlp3d.train.runtime import Runtime
from vlp3d.train.step import warmup_cosine_schedule

ENCODER_PREFIXES = ("encoder.", "swinViT.", "vit.")  # the pretrained encoder's weights inside each network


def _volume(image, shape, storage_dtype: str) -> np.ndarray:
    from vlp3d.data.volume import dequantise

    stored = decode_image(image, shape, storage_dtype)
    return dequantise(torch.from_numpy(np.array(stored))).numpy()


def class_lookup(index: Sequence[int]) -> np.ndarray:
    """uint8 table: label-map value -> training class (0 for values not segmented)."""
    table = np.zeros(256, dtype=np.int64)
    for new, old in enumerate(index):
        table[old] = new
    return table


def random_crop(volume: np.ndarray, labels: np.ndarray, roi, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same random `roi` crop of a volume and its label map (both zero-padded, centred, to at least `roi`)."""
    pad = [(max(0, r - s) // 2, max(0, r - s) - max(0, r - s) // 2) for s, r in zip(volume.shape, roi, strict=True)]
    volume, labels = np.pad(volume, pad), np.pad(labels, pad)
    start = [int(rng.integers(0, s - r + 1)) for s, r in zip(volume.shape, roi, strict=True)]
    window = tuple(slice(a, a + r) for a, r in zip(start, roi, strict=True))
    return volume[window], labels[window]


def dataset_columns(task: str) -> list[str]:
    """The shard columns fine-tuning reads (`row` seeds each volume's crop)."""
    return ["image", "image_shape", LABEL_MAP if task == SEGMENTATION else "labels", "row"]


def collate_for(task: str, roi, index: Sequence[int], storage_dtype: str):
    """`collate_for(seed)` -> a collate function: shard rows -> {"volume": [B, 1, *roi] float, "target":
    [B, 1, *roi] int64 classes | [B, L] float labels}; each volume's crop drawn from a generator seeded by
    (the epoch's seed, its row id), so a resumed run replays it whatever batches it skips."""
    lookup = class_lookup(index) if task == SEGMENTATION else None

    def make(seed: int):
        def collate(batch: dict) -> dict:
            volumes, targets = [], []
            for i in range(len(batch["image"])):
                volume = _volume(batch["image"][i], batch["image_shape"][i], storage_dtype)
                if task == SEGMENTATION:
                    labels = lookup[decode_label_map(batch[LABEL_MAP][i], batch["image_shape"][i])]
                    rng = np.random.default_rng([seed, int(batch["row"][i])])
                    volume, labels = random_crop(volume, labels, roi, rng)
                    targets.append(torch.from_numpy(np.ascontiguousarray(labels))[None])
                else:
                    volume = fit_to(torch.from_numpy(volume), roi).numpy()
                    targets.append(torch.as_tensor(np.asarray(batch["labels"][i])[list(index)], dtype=torch.float32))
                volumes.append(torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None])
            return {"volume": torch.stack(volumes), "target": torch.stack(targets)}

        return collate

    return make


def local_datasets(cfg: ExperimentConfig, shard_dir: Path | str, task: str) -> dict[str, RowSource]:
    """The training rows of a one-process fine-tuning run: the training split inside
    `finetune.label_fraction` (with a label map, for segmentation)."""
    return {"train": LocalRows(shard_files(shard_dir, "ct"), dataset_columns(task), cfg.data.train_split,
                               cfg.finetune.label_fraction, materialize=cfg.data.materialize,
                               nonempty=LABEL_MAP if task == SEGMENTATION else "")}


def build_optimizer(net: nn.Module, cfg: ExperimentConfig) -> torch.optim.Optimizer:
    """AdamW: encoder weights at finetune.lr x finetune.encoder_lr_mult (frozen at 0), the rest at finetune.lr;
    no weight decay on biases and norms."""
    ft = cfg.finetune
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in net.named_parameters():
        is_encoder = name.startswith(ENCODER_PREFIXES)
        if is_encoder and ft.encoder_lr_mult == 0:
            param.requires_grad_(False)
            continue
        groups.setdefault((is_encoder, param.ndim <= 1 or name.endswith(".bias")), []).append(param)
    return torch.optim.AdamW([
        {"params": params, "lr": ft.lr * (ft.encoder_lr_mult if is_encoder else 1.0),
         "weight_decay": 0.0 if no_decay else ft.weight_decay, "name": "encoder" if is_encoder else "head"}
        for (is_encoder, no_decay), params in sorted(groups.items())])


class FinetuneModule(nn.Module):
    """The module DDP wraps: the downstream network and its loss, one named term."""

    def __init__(self, net: nn.Module, criterion: nn.Module, term: str):
        super().__init__()
        self.net, self.criterion, self.term = net, criterion, term

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.term: self.criterion(self.net(batch["volume"]).float(), batch["target"])}


class FinetuneTask(Task):
    """`finetune.task` on the network `meta["finetune"]["network"]`, `finetune.max_steps` steps of
    `finetune.global_batch`; the encoder starts from `encoder_state` (finetune.init = 'pretrained')."""

    label = "fine-tuning"
    progress_prefix = "finetune "
    steps_key = "finetune.max_steps"
    lr_group = "head"
    image_keys = ("volume",)

    def __init__(self, cfg: ExperimentConfig, meta: Mapping, encoder_state: dict[str, torch.Tensor] | None = None):
        super().__init__(cfg, meta)
        info = meta["finetune"]
        self.network = NetworkSpec.from_dict(info["network"])
        self.index = list(info["index"])
        self.storage_dtype = meta["spec"]["storage_dtype"]
        self.encoder_state = encoder_state if cfg.finetune.init == "pretrained" else None
        self.max_steps, self.global_batch = cfg.finetune.max_steps, cfg.finetune.global_batch
        self.no_objective = nn.Module()  # the checkpoint format's objective state: fine-tuning has none

    def build(self, device: torch.device) -> None:
        torch.manual_seed(self.cfg.train.seed)  # the same decoder/head initialisation for 'pretrained' and 'random'
        net, _ = build_network(self.network, self.encoder_state)
        if self.network.task == SEGMENTATION:
            from monai.losses import DiceCELoss

            criterion, term = DiceCELoss(to_onehot_y=True, softmax=True), "dice_ce"
        else:
            criterion, term = nn.BCEWithLogitsLoss(), "bce"
        self.module = FinetuneModule(net, criterion, term).to(device)
        self.weights = {term: 1.0}
        self.optimizer = build_optimizer(net, self.cfg)
        ft = self.cfg.finetune
        self.scheduler = warmup_cosine_schedule(self.optimizer, ft.warmup_steps, ft.max_steps)

    def checkpoint_parts(self) -> tuple[nn.Module, nn.Module]:
        return self.module.net, self.no_objective

    def feeds(self, runtime: Runtime, position: dict[str, list[int]], local_batch: int) -> list:
        device = runtime.device
        collate = collate_for(self.network.task, self.network.img_size, self.index, self.storage_dtype)
        return [device_feed(runtime.dataset("train"), position, "train", local_batch, self.cfg.train.seed,
                            runtime.rank, convert=lambda host: {k: host[k].to(device, non_blocking=True)
                                                                for k in ("volume", "target")},
                            device=device, prefetch=self.cfg.train.prefetch_batches, collate_for=collate)]

    def counts(self) -> dict[str, int]:
        from vlp3d.encoders.export import count_parameters

        return {"trainable_params": count_parameters(self.module, trainable_only=True)}
