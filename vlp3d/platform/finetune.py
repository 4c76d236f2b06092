"""`vlp3d finetune`: a registered pretrained encoder fine-tuned on a labelled downstream task with Ray Train.

The same machinery as pretraining (`vlp3d.platform.train`): a TorchTrainer of `cluster.num_workers` DDP
workers reading the shards through Ray Data (`_training_dataset`, `epoch_batches`, `Prefetched`: exact
resume from the data position in the checkpoint), checkpoints in the format of `vlp3d.checkpoint`,
metrics from rank 0 through `tracking.RankZeroLogger`, a rerun of the same run name resuming from its
last checkpoint. What differs is the network (`vlp3d.downstream.build_network`), the loss and the data:

- segmentation: random crops of `finetune.roi_size` from the volumes and their voxel label maps
  (shard column `label_map`), Dice + cross-entropy (MONAI `DiceCELoss`);
- classification: the volume centre-cropped/padded to the encoder's input, the shards' 0/1 labels,
  BCE with logits.

Only the training patients inside the nested `finetune.label_fraction` subset (the shards'
`fraction_rank`, as `data.fraction` for pretraining) are used. After training the driver evaluates the
final checkpoint on `data.eval_split` (sliding-window inference; per-class Dice and HD95 with the
atlas and everywhere baselines, or per-label AUROC), logs it, and registers the model as a pyfunc
tagged `vlp3d.pretrained_model = models:/NAME/VERSION` of the model it started from.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from torch import nn

import vlp3d
from vlp3d import checkpoint as checkpoints
from vlp3d import logs
from vlp3d.config import ExperimentConfig, from_dict, replace, to_dict
from vlp3d.data.shards import (
    LABEL_MAP,
    count_rows,
    decode_image,
    decode_label_map,
    read_manifest,
    resolve_shard_dir,
    shard_files,
    spec_from_config,
)
from vlp3d.downstream import (
    SEGMENTATION,
    SEGMENTATION_ENCODERS,
    FineTuned,
    NetworkSpec,
)
from vlp3d.platform import tracking

log = logging.getLogger(__name__)

PRETRAINED_TAG = "vlp3d.pretrained_model"  # on the fine-tuning run and model version: models:/NAME/VERSION
TASK_TAG = "vlp3d.task"
PRETRAINED_DIR = "pretrained"  # <workdir>/pretrained/<name>-v<version>: downloaded pretrained checkpoints


@dataclass
class Pretrained:
    """A registered pretrained model, resolved: `uri` = models:/NAME/VERSION, its checkpoint folder, config
    and the image encoder's own state dict."""

    uri: str
    name: str
    version: str
    checkpoint_dir: Path
    cfg: ExperimentConfig
    encoder_state: dict[str, torch.Tensor]


@dataclass
class FinetuneResult:
    run_id: str
    run_name: str
    checkpoint_dir: Path
    model_uri: str  # models:/NAME/VERSION (registered) or the logged model's URI
    pretrained_uri: str
    metrics: dict  # the evaluation on data.eval_split, as logged (eval/<split>/...)
    table: pd.DataFrame  # per class (segmentation) or per label (classification)
    elapsed_s: float
    train_metrics: dict = field(default_factory=dict)


def resolve_pretrained(cfg: ExperimentConfig) -> Pretrained:
    """`finetune.model` (models:/NAME@ALIAS or models:/NAME/VERSION) in the config's MLflow store: the version
    it names, its checkpoint downloaded once to <workdir>/pretrained/<NAME>-v<VERSION>."""
    from vlp3d.encoders.export import image_encoder_state_dict

    model_uri = cfg.finetune.model
    if not model_uri.startswith("models:/") or not ("@" in model_uri or model_uri.count("/") == 2):
        raise ValueError(f"finetune.model (--model) = {model_uri!r}: give a registered model as models:/NAME@ALIAS "
                         "or models:/NAME/VERSION (`vlp3d demo` registers models:/vlp3d-clip@champion).")
    client = tracking.client(cfg)
    path = model_uri.removeprefix("models:/")
    try:
        if "@" in path:
            name, alias = path.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = path.split("/", 1)
            version = client.get_model_version(name, number)
    except mlflow.exceptions.MlflowException as err:
        raise ValueError(f"finetune.model (--model) = {model_uri}: not found in the MLflow store "
                         f"{tracking.uri(cfg)} ({err.message}); set tracking.workdir / tracking.tracking_uri to the "
                         "store the model was registered in.") from None
    folder = Path(cfg.tracking.workdir).resolve() / PRETRAINED_DIR / f"{name}-v{version.version}"
    if not (folder / "MLmodel").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}", dst_path=str(folder),
                                            tracking_uri=tracking.uri(cfg))
    artifacts = mlflow.models.Model.load(str(folder)).flavors.get("python_function", {}).get("artifacts", {})
    checkpoint_dir = folder / str(artifacts.get("checkpoint", {}).get("path", "artifacts/checkpoint"))
    if not (checkpoint_dir / checkpoints.MODEL).is_file():
        raise ValueError(f"{model_uri} (version {version.version}) holds no vlp3d checkpoint (artifacts/checkpoint/"
                         f"{checkpoints.MODEL}); fine-tune a model that `vlp3d pretrain` registered.")
    state = image_encoder_state_dict(checkpoints.load_model_state(checkpoint_dir))
    return Pretrained(f"models:/{name}/{version.version}", name, str(version.version), checkpoint_dir,
                      checkpoints.read_config(checkpoint_dir), state)


def _roi(cfg: ExperimentConfig, pretrained_cfg: ExperimentConfig) -> tuple[int, int, int]:
    from vlp3d.engine import model_input_shape

    roi = tuple(cfg.finetune.roi_size) or tuple(model_input_shape(pretrained_cfg))
    if len(roi) != 3 or any(int(s) < 1 for s in roi):
        raise ValueError(f"finetune.roi_size = {list(cfg.finetune.roi_size)}: give three sizes (x, y, z) in voxels")
    encoder = pretrained_cfg.model.image_encoder
    if encoder == "vit3d" and roi != tuple(model_input_shape(pretrained_cfg)):
        raise ValueError(f"finetune.roi_size = {list(roi)}: the pretrained vit3d's positional embedding is learned "
                         f"for {list(model_input_shape(pretrained_cfg))}; leave finetune.roi_size empty.")
    if encoder == "swin3d" and (any(s % 32 for s in roi) or math.prod(roi) // 32**3 < 2):
        raise ValueError(f"finetune.roi_size = {list(roi)}: swin3d needs sizes divisible by 32 and at least two "
                         "voxels at 1/32 resolution, e.g. [64, 64, 32].")
    return tuple(int(s) for s in roi)


@dataclass
class Plan:
    """Everything a fine-tuning run needs, checked before Ray starts (`plan`)."""

    cfg: ExperimentConfig  # the fine-tuning config, model.* taken from the pretrained model's
    pretrained: Pretrained
    shard_dir: Path
    manifest: dict
    network: NetworkSpec
    names: list[str]  # classes (segmentation, background first) or labels (classification)
    index: list[int]  # per name: its value in the label maps / its column in the shards' labels
    n_train: int


def plan(cfg: ExperimentConfig) -> Plan:
    """Resolve the pretrained model, the shards, the classes or labels and the network, or raise naming the
    config key and the fix."""
    ft = cfg.finetune
    if not cfg.data.shards:
        raise ValueError("data.shards is empty: set it to the folder `vlp3d prepare --out` wrote (with label maps "
                         "for finetune.task = 'segmentation').")
    shard_dir = resolve_shard_dir(cfg.data.shards, spec_from_config(cfg).hash)
    manifest = read_manifest(shard_dir)
    if ft.task == SEGMENTATION:
        maps = manifest.get("label_maps") or {}
        if not maps.get("rows"):
            raise ValueError(f"{shard_dir}: the shards hold no voxel label maps (shard column {LABEL_MAP}); prepare a "
                             "corpus whose manifest has a 'label' column (`vlp3d synth` writes phantom label maps; a "
                             "phantom corpus written before them must be synthesized again, into a new folder), or "
                             "use finetune.task = 'classification'.")
        classes = list(maps.get("classes") or [])
        if not classes:
            raise ValueError(f"{shard_dir}: the label maps have no class names (put classes.json, a JSON list of "
                             "names by value, beside the manifest and prepare again).")
        wanted = list(ft.classes) or classes[1:]
        unknown = [c for c in wanted if c not in classes[1:]]
        if unknown:
            raise ValueError(f"finetune.classes: {unknown} are not classes of the label maps; choose from {classes[1:]}")
        names, index = [classes[0], *wanted], [0, *(classes.index(c) for c in wanted)]
    else:
        labels = list(manifest["label_names"])
        wanted = list(ft.labels) or _labels_with_positives(shard_dir, labels, cfg.data.train_split)
        unknown = [c for c in wanted if c not in labels]
        if unknown or not wanted:
            raise ValueError(f"finetune.labels: {unknown or 'none'} are not labels of the shards; choose from {labels}")
        names, index = wanted, [labels.index(c) for c in wanted]
    if ft.global_batch % cfg.cluster.num_workers:
        raise ValueError(f"finetune.global_batch={ft.global_batch} must be divisible by "
                         f"cluster.num_workers={cfg.cluster.num_workers}.")
    n_train = count_rows(shard_dir, cfg.data.train_split, ft.label_fraction)
    if n_train < ft.global_batch // cfg.cluster.num_workers * cfg.cluster.num_workers:
        raise ValueError(f"finetune.label_fraction = {ft.label_fraction} keeps {n_train} '{cfg.data.train_split}' "
                         f"volumes, fewer than finetune.global_batch = {ft.global_batch}; raise the fraction or lower "
                         "the batch.")
    pretrained = resolve_pretrained(cfg)
    encoder = pretrained.cfg.model.image_encoder
    if ft.task == SEGMENTATION and encoder not in SEGMENTATION_ENCODERS:
        raise ValueError(f"{pretrained.uri} has the image encoder {encoder!r}, for which there is no segmentation "
                         f"decoder ({', '.join(f'{k}: {v}' for k, v in SEGMENTATION_ENCODERS.items())}); use "
                         "finetune.task = 'classification' or a model pretrained with one of those encoders.")
    network = NetworkSpec(ft.task, encoder, pretrained.cfg.model.size, _roi(cfg, pretrained.cfg), len(names), ft.head)
    run_cfg = replace(cfg, model=to_dict(pretrained.cfg.model))
    return Plan(run_cfg, pretrained, shard_dir, manifest, network, names, index, n_train)


def _labels_with_positives(shard_dir, labels: list[str], split: str) -> list[str]:
    """The labels with at least one positive volume in `split` (a label never positive cannot be learned)."""
    import pyarrow.parquet as pq

    positives = np.zeros(len(labels))
    for path in shard_files(shard_dir, "ct"):
        table = pq.read_table(path, columns=["labels", "split"])
        rows = np.asarray(table.column("split").to_pylist()) == split
        if rows.any():
            positives += np.stack(table.column("labels").to_numpy(zero_copy_only=False))[rows].sum(0)
    return [name for name, count in zip(labels, positives, strict=True) if count > 0]


# --- data --------------------------------------------------------------------------------------


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


def collate_for(task: str, roi, index: Sequence[int], storage_dtype: str):
    """`collate_for(seed)` -> a Ray Data collate function: shard rows -> {"volume": [B, 1, *roi] float,
    "target": [B, 1, *roi] int64 classes | [B, L] float labels}; crops drawn from a generator seeded by the
    epoch's seed (a resumed run replays them)."""
    lookup = class_lookup(index) if task == SEGMENTATION else None

    def make(seed: int):
        rng = np.random.default_rng(seed)

        def collate(batch: dict) -> dict:
            volumes, targets = [], []
            for i in range(len(batch["image"])):
                volume = _volume(batch["image"][i], batch["image_shape"][i], storage_dtype)
                if task == SEGMENTATION:
                    labels = lookup[decode_label_map(batch[LABEL_MAP][i], batch["image_shape"][i])]
                    volume, labels = random_crop(volume, labels, roi, rng)
                    targets.append(torch.from_numpy(np.ascontiguousarray(labels))[None])
                else:
                    from vlp3d.downstream import fit_to

                    volume = fit_to(torch.from_numpy(volume), roi).numpy()
                    targets.append(torch.as_tensor(np.asarray(batch["labels"][i])[list(index)], dtype=torch.float32))
                volumes.append(torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None])
            return {"volume": torch.stack(volumes), "target": torch.stack(targets)}

        return collate

    return make


def _dataset(plan_: Plan):
    """Ray Data: the training split's rows inside the label fraction (with a label map, for segmentation)."""
    from vlp3d.platform.train import _training_dataset

    cfg = replace(plan_.cfg, data={"fraction": plan_.cfg.finetune.label_fraction})
    columns = ["image", "image_shape", LABEL_MAP if plan_.network.task == SEGMENTATION else "labels"]
    ds = _training_dataset(cfg, plan_.shard_dir, columns=columns)
    if plan_.network.task == SEGMENTATION:
        from ray.data.dataset import MaterializedDataset

        materialized = isinstance(ds, MaterializedDataset)
        # a small CPU share: while training, the workers hold the CPUs (a sweep trial keeps only
        # tune.trial_cpus), and a filter task asking for a whole CPU would wait for ever
        ds = ds.filter(lambda row: row[LABEL_MAP] is not None and len(row[LABEL_MAP]) > 0, num_cpus=0.1)
        if materialized:  # filtered now, before the workers start
            ds = ds.materialize()
    return ds


# --- the training loop (every Ray Train worker) ----------------------------------------------------


def _optimizer(net: nn.Module, cfg: ExperimentConfig) -> torch.optim.Optimizer:
    """AdamW: encoder weights at finetune.lr x finetune.encoder_lr_mult (frozen at 0), the rest at finetune.lr;
    no weight decay on biases and norms."""
    ft = cfg.finetune
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in net.named_parameters():
        is_encoder = name.startswith(("encoder.", "swinViT.", "vit."))
        if is_encoder and ft.encoder_lr_mult == 0:
            param.requires_grad_(False)
            continue
        groups.setdefault((is_encoder, param.ndim <= 1 or name.endswith(".bias")), []).append(param)
    return torch.optim.AdamW([
        {"params": params, "lr": ft.lr * (ft.encoder_lr_mult if is_encoder else 1.0),
         "weight_decay": 0.0 if no_decay else ft.weight_decay, "name": "encoder" if is_encoder else "head"}
        for (is_encoder, no_decay), params in sorted(groups.items())])


def finetune_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: build the network (pretrained or random), then train it."""
    import ray.train
    import ray.train.torch

    from vlp3d.downstream import build_network
    from vlp3d.engine import AUTOCAST_DTYPES, warmup_cosine
    from vlp3d.platform.train import (
        DeviceBatches,
        Prefetched,
        _gather,
        _quiet_train_reports,
        epoch_batches,
        window_means,
    )

    logs.configure(loop_config.get("log_level"))
    if not logs.is_debug():
        _quiet_train_reports()
    cfg = from_dict(loop_config["experiment"])
    ft = cfg.finetune
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    if not cfg.cluster.use_gpu:
        torch.set_num_threads(max(1, math.floor(cfg.cluster.cpus_per_worker)))
    device = ray.train.torch.get_device()
    spec = NetworkSpec.from_dict(loop_config["network"])
    torch.manual_seed(cfg.train.seed)  # the same decoder/head initialisation for 'pretrained' and 'random'
    net, _ = build_network(spec, loop_config["encoder_state"] if ft.init == "pretrained" else None)
    net.to(device)
    optimizer = _optimizer(net, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, ft.warmup_steps, ft.max_steps))
    if spec.task == SEGMENTATION:
        from monai.losses import DiceCELoss

        criterion = DiceCELoss(to_onehot_y=True, softmax=True)
    else:
        criterion = nn.BCEWithLogitsLoss()
    no_objective = nn.Module()  # the checkpoint format's objective state: fine-tuning has none
    state = checkpoints.TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = checkpoints.restore(folder, net, no_objective, optimizer, scheduler, None, map_location=device)
    if len(state.rng) == world_size:
        checkpoints.restore_rng(state.rng[rank])
    else:
        checkpoints.seed_everything(cfg.train.seed * 1000 + rank + state.step)
    step = resumed_from = state.step
    module = ray.train.torch.prepare_model(net)
    logger = tracking.RankZeroLogger(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None
    local_batch = ft.global_batch // world_size
    shard = ray.train.get_dataset_shard("train")
    collate = collate_for(spec.task, spec.img_size, loop_config["index"], loop_config["storage_dtype"])
    position = state.position
    # as pretraining feeds its batches: pinned on CUDA, the next one copied on a side stream
    batches = DeviceBatches(
        Prefetched(lambda own: epoch_batches(shard, own, "train", local_batch, cfg.train.seed, rank,
                                             collate_for=collate, pin_memory=device.type == "cuda"),
                   position, "train", cfg.train.prefetch_batches),
        lambda host: {key: host[key].to(device, non_blocking=True) for key in ("volume", "target")}, device)
    log_every = max(1, min(cfg.train.log_every, ft.max_steps))
    print_every = max(log_every, ft.max_steps // 10 // log_every * log_every)
    window: list[dict] = []
    started = time.time()
    autocast = AUTOCAST_DTYPES.get(cfg.train.precision)
    while step < ft.max_steps:
        batch = next(batches)
        volume, target = batch["volume"], batch["target"]
        module.train()
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = criterion(module(volume).float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
        else:
            state.skipped_steps += 1
        scheduler.step()
        step += 1
        if finite:
            window.append({"loss": loss.item(), "grad_norm": grad_norm.item()})
        last = step >= ft.max_steps
        if step % log_every and not last:
            continue
        metrics = window_means(window) if window else {}
        window.clear()
        metrics.update(lr=scheduler.get_last_lr()[-1], skipped_steps=state.skipped_steps,
                       samples_per_s=(step - resumed_from) * ft.global_batch / max(1e-9, time.time() - started))
        if logger:
            logger.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step)
            if loop_config.get("print_progress", True) and (step % print_every == 0 or last) and "loss" in metrics:
                log.info(f"finetune step {step}/{ft.max_steps} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.1e} "
                         f"| {metrics['samples_per_s']:.1f} volumes/s")
        metrics["step"] = step
        if step % cfg.train.checkpoint_every == 0 or last:
            bad = checkpoints.nonfinite_parameters(net)
            if bad:
                raise FloatingPointError(f"fine-tuning step {step}: non-finite weights in {', '.join(bad[:5])}; "
                                         "lower finetune.lr or use train.precision = 'fp32'")
            state.step, state.position = step, {k: list(v) for k, v in position.items()}
            state.rng = _gather(checkpoints.capture_rng())
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    logger.flush(2.0)
                    state.unsent_logs = logger.pending()
                    checkpoints.save(tmp, net, no_objective, optimizer, scheduler, None, state, cfg,
                                     loop_config["meta"])
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt)
    if logger:
        logger.flush(30.0)


# --- the driver ------------------------------------------------------------------------------------


def finetune(cfg: ExperimentConfig, run_name: str | None = None, progress=log.info, callbacks: Sequence = (),
             parent_run_id: str | None = None, register: bool = True, tags: dict[str, str] | None = None
             ) -> FinetuneResult:
    """Fine-tune `cfg.finetune.model` on `cfg.finetune.task`; a rerun with the same `run_name` resumes. Sweeps
    pass Tune's `callbacks`, the MLflow `parent_run_id`, extra `tags` and `register=False` (the model is
    logged, not registered), as for `vlp3d.platform.train.pretrain`."""
    logs.ensure_configured()
    from vlp3d.platform.runtime import init_ray
    from vlp3d.platform.train import torch_trainer

    started = time.time()
    plan_ = plan(cfg)
    cfg, ft = plan_.cfg, plan_.cfg.finetune
    init_ray(cfg)
    run_name = run_name or f"{cfg.name}-{ft.task}-{ft.init}-{time.strftime('%Y%m%d-%H%M%S')}"
    extra_tags = {PRETRAINED_TAG: plan_.pretrained.uri, TASK_TAG: ft.task, "vlp3d.init": ft.init,
                  "vlp3d.label_fraction": str(ft.label_fraction),
                  "vlp3d.pretrained_method": plan_.pretrained.cfg.objective.name, **(tags or {})}
    if parent_run_id:
        extra_tags["mlflow.parentRunId"] = parent_run_id
    run_id = tracking.start_or_resume_run(cfg, run_name, plan_.manifest, plan_.shard_dir, extra_tags)
    meta = {"spec": plan_.manifest["spec"], "spec_hash": plan_.manifest["spec_hash"],
            "label_names": plan_.manifest["label_names"], "mlflow_run_id": run_id,
            "finetune": {"network": plan_.network.to_dict(), "names": plan_.names, "index": plan_.index,
                         "overlap": ft.sw_overlap, "pretrained_model": plan_.pretrained.uri, "init": ft.init}}
    trainer = torch_trainer(  # the pretraining launcher's workers, storage, restores and data order
        cfg, finetune_loop_per_worker, run_name, {"train": _dataset(plan_)}, callbacks,
        {"experiment": to_dict(cfg), "tracking_uri": tracking.uri(cfg), "run_id": run_id,
         "network": plan_.network.to_dict(), "index": plan_.index, "meta": meta,
         "encoder_state": plan_.pretrained.encoder_state if ft.init == "pretrained" else None,
         "storage_dtype": plan_.manifest["spec"]["storage_dtype"],
         "print_progress": progress is not None, "log_level": logs.level_name()})
    if progress is not None:
        progress(f"fine-tuning {plan_.pretrained.uri} ({plan_.network.encoder}/{plan_.network.size}, init {ft.init}) "
                 f"for {ft.task} of {len(plan_.names)} {'classes' if ft.task == SEGMENTATION else 'labels'} on "
                 f"{plan_.n_train} '{cfg.data.train_split}' volumes (label fraction {ft.label_fraction}), "
                 f"{ft.max_steps} steps on {cfg.cluster.num_workers} workers; run {run_name}")
    uri = tracking.uri(cfg)
    try:
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"fine-tuning run {run_name} finished without a checkpoint (error: {result.error})")
        folder = Path(cfg.tracking.workdir).resolve() / "finetuned" / run_name
        with result.checkpoint.as_directory() as local:  # a local copy: evaluated and logged with the model
            tracking.deliver(uri, run_id, checkpoints.restore_unsent(local))
            folder.mkdir(parents=True, exist_ok=True)
            for name in (checkpoints.MODEL, checkpoints.CONFIG, checkpoints.META):
                (folder / name).write_bytes((Path(local) / name).read_bytes())
        metrics, table = evaluate_finetuned(folder, plan_, progress)
        tracking.log_summary_metrics(uri, run_id, metrics)
        with tempfile.TemporaryDirectory() as tmp:
            table.to_csv(Path(tmp) / f"{ft.task}.csv", index=False)
            tracking.log_files(uri, run_id, [Path(tmp) / f"{ft.task}.csv"], "eval")
        model_uri = log_finetuned(run_id, cfg, folder, plan_, metrics, register)
    except BaseException as err:  # a failed (or interrupted) run is never left RUNNING in MLflow
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        tracking.end_run_quietly(uri, run_id, status, f"{type(err).__name__}: {err}")
        raise
    return FinetuneResult(run_id, run_name, folder, model_uri, plan_.pretrained.uri, metrics, table,
                          time.time() - started, dict(result.metrics or {}))


def _eval_rows(plan_: Plan, split: str, fraction: float = 1.0) -> list[dict]:
    import pyarrow.parquet as pq

    column = LABEL_MAP if plan_.network.task == SEGMENTATION else "labels"
    rows = []
    for path in shard_files(plan_.shard_dir, "ct"):
        table = pq.read_table(path, columns=["image", "image_shape", column, "split", "fraction_rank"])
        rows += [r for r in table.to_pylist() if r["split"] == split and (fraction >= 1.0 or r["fraction_rank"] < fraction)
                 and (column != LABEL_MAP or r[column])]
    return rows


def evaluate_finetuned(checkpoint_dir: Path, plan_: Plan, progress=log.info) -> tuple[dict[str, float], pd.DataFrame]:
    """The fine-tuned model on `data.eval_split`: segmentation -> per class Dice, HD95 (mm, median over
    volumes) and the Dice of the atlas and everywhere baselines (from the training label maps inside the
    label fraction); classification -> per-label AUROC. Returns (metrics as logged, the per-class/label table)."""
    from vlp3d.evaluation.metrics import auroc

    cfg, split = plan_.cfg, plan_.cfg.data.eval_split
    rows = _eval_rows(plan_, split)
    if not rows:
        raise ValueError(f"{plan_.shard_dir}: no '{split}' volumes{' with label maps' if plan_.network.task == SEGMENTATION else ''} "
                         "to evaluate on (data.eval_split)")
    model = FineTuned(checkpoint_dir)
    dtype = plan_.manifest["spec"]["storage_dtype"]
    volumes = [decode_image(r["image"], r["image_shape"], dtype) for r in rows]
    prefix = f"eval/{split}/"
    with logs.progress_bar(len(volumes), f"evaluate {split}", unit="vol") as bar:
        predictions = []
        for volume in volumes:
            predictions += model.predict([volume])
            bar.update(1)
    if plan_.network.task == SEGMENTATION:
        from vlp3d.evaluation.segmentation import baseline_table, segmentation_table

        lookup = class_lookup(plan_.index)
        target = np.stack([lookup[decode_label_map(r[LABEL_MAP], r["image_shape"])] for r in rows])
        spacing = plan_.manifest["spec"]["spacing_mm"]
        table = segmentation_table(np.stack(predictions), target, plan_.names, spacing)
        train = _eval_rows(plan_, cfg.data.train_split, cfg.finetune.label_fraction)
        if train and len({tuple(r["image_shape"]) for r in train + rows}) == 1:  # fixed-shape storage
            maps = np.stack([lookup[decode_label_map(r[LABEL_MAP], r["image_shape"])] for r in train])
            table = table.merge(baseline_table(maps, target, plan_.names), on="class")
        metrics = {f"{prefix}mean_dice": float(table["dice"].mean())}
        for row in table.to_dict("records"):
            for key in ("dice", "hd95_mm", "dice_atlas", "dice_everywhere"):
                if key in row and np.isfinite(row[key]):
                    metrics[f"{prefix}{key}/{row['class']}"] = float(row[key])
        return metrics, table
    labels = np.stack([np.asarray(r["labels"])[plan_.index] for r in rows])
    scores = np.stack(predictions)
    table = pd.DataFrame([{"label": name, "positives": int(labels[:, i].sum()), "auroc": auroc(labels[:, i], scores[:, i])}
                          for i, name in enumerate(plan_.names)])
    scored = table["auroc"].dropna()
    metrics = {f"{prefix}macro_auroc": float(scored.mean()) if len(scored) else float("nan")}
    metrics.update({f"{prefix}auroc/{r['label']}": float(r["auroc"]) for r in table.to_dict("records")
                    if np.isfinite(r["auroc"])})
    return metrics, table


class FineTunedModel(mlflow.pyfunc.PythonModel):
    """pyfunc of a fine-tuned model: DataFrame with `image` (NIfTI file or DICOM series path) -> segmentation:
    one column `<class>_ml` per class (its volume in millilitres, at the model's preprocessing spacing);
    classification: one column per label (its probability)."""

    def load_context(self, context) -> None:
        self.model = FineTuned(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        paths = [str(p) for p in pd.DataFrame(model_input)["image"]]
        out = self.model.predict_files(paths)
        if self.model.task == SEGMENTATION:
            voxel_ml = float(np.prod(self.model.spec.spacing_mm)) / 1000.0
            return pd.DataFrame([{f"{name}_ml": float((labels == i).sum()) * voxel_ml
                                  for i, name in enumerate(self.model.names) if i} for labels in out])
        return pd.DataFrame([dict(zip(self.model.names, map(float, p), strict=True)) for p in out])


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    return ModelSignature(inputs=Schema([ColSpec(DataType.string, "image")]))


def registered_name(plan_: Plan) -> str:
    return plan_.cfg.finetune.registered_model or f"{plan_.pretrained.name}-{plan_.network.task}"


def log_finetuned(run_id: str, cfg: ExperimentConfig, checkpoint_dir: Path, plan_: Plan, metrics: dict,
                  register: bool = True) -> str:
    """Log the fine-tuned checkpoint as a pyfunc (and register it), tag the run and the version with the
    pretrained model it started from; returns models:/NAME/VERSION (or the logged model's URI)."""
    client = tracking.client(cfg)
    name = registered_name(plan_) if register else None
    metadata = {"vlp3d_version": vlp3d.__version__, "task": plan_.network.task, "names": plan_.names,
                "pretrained_model": plan_.pretrained.uri, "init": cfg.finetune.init,
                "label_fraction": cfg.finetune.label_fraction,
                "image_encoder": f"{plan_.network.encoder}/{plan_.network.size}"}
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=FineTunedModel(), artifacts={"checkpoint": str(checkpoint_dir)},
            code_paths=[str(Path(vlp3d.__file__).parent)],
            pip_requirements=["torch", "monai", "nibabel", "numpy", "pandas", "pyyaml"],
            registered_model_name=name, metadata=metadata, signature=_signature())
    client.set_tag(run_id, PRETRAINED_TAG, plan_.pretrained.uri)
    client.set_terminated(run_id, "FINISHED")
    if not register:
        return info.model_uri
    version = str(info.registered_model_version)
    client.set_model_version_tag(name, version, PRETRAINED_TAG, plan_.pretrained.uri)
    client.set_model_version_tag(name, version, TASK_TAG, plan_.network.task)
    return f"models:/{name}/{version}"
