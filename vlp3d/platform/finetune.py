"""`vlp3d finetune`: a registered pretrained encoder fine-tuned on a labelled downstream task with Ray Train.

The training loop of pretraining (`vlp3d.train.loop`) runs the fine-tuning task
(`vlp3d.train.tasks.finetune`: network, loss, crops) on `cluster.num_workers` Ray Train workers or in this
process (`--local`): exact resume from the checkpoint's data position, fp16 grad scaling, the non-finite
skip, metrics from rank 0 through `vlp3d.platform.mlflow.logger.RankZeroLogger`, a rerun of the same run
name resuming from its last checkpoint.

Only the training patients inside the nested `finetune.label_fraction` subset (the shards'
`fraction_rank`, as `data.fraction` for pretraining) are used. After training the driver evaluates the
final checkpoint on `data.eval_split` (sliding-window inference; per-class Dice and HD95 with the
atlas and everywhere baselines, or per-label AUROC), logs it, and registers the model as a pyfunc
(vlp3d.platform.pyfunc.FineTunedModel, logged by vlp3d.platform.mlflow.models.log_finetuned as pretraining's
model is) tagged `vlp3d.pretrained_model = models:/NAME/VERSION` of the model it started from.
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

from vlp3d import logs
from vlp3d.config import ExperimentConfig, replace, to_dict
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
from vlp3d.errors import InputError
from vlp3d.platform.launch import (
    RUNTIME_TAG,
    base_loop_config,
    end_interrupted,
    interruptible,
    run_local,
    run_on_ray,
)
from vlp3d.platform.mlflow import models, runs, store
from vlp3d.platform.mlflow.store import PRETRAINED_TAG, TASK_TAG
from vlp3d.platform.pyfunc import FineTunedModel  # noqa: F401 - models logged before it moved pickled it here
from vlp3d.platform.runtime import init_ray
from vlp3d.redact import redact
from vlp3d.train import checkpoint as checkpoints
from vlp3d.train.tasks.finetune import class_lookup, local_datasets

log = logging.getLogger(__name__)

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
        raise InputError(f"finetune.model (--model) = {model_uri!r}: give a registered model as models:/NAME@ALIAS "
                         "or models:/NAME/VERSION (`vlp3d demo` registers models:/vlp3d-clip@champion).")
    client = store.client(cfg)
    path = model_uri.removeprefix("models:/")
    try:
        if "@" in path:
            name, alias = path.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = path.split("/", 1)
            version = client.get_model_version(name, number)
    except mlflow.exceptions.MlflowException as err:
        raise InputError(redact(f"finetune.model (--model) = {model_uri}: not found in the MLflow store "
                                f"{store.uri(cfg)} ({err.message}); set tracking.workdir / tracking.tracking_uri "
                                "to the store the model was registered in.")) from None
    folder = Path(cfg.tracking.workdir).resolve() / PRETRAINED_DIR / f"{name}-v{version.version}"
    if not (folder / "MLmodel").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}", dst_path=str(folder),
                                            tracking_uri=store.uri(cfg))
    artifacts = mlflow.models.Model.load(str(folder)).flavors.get("python_function", {}).get("artifacts", {})
    checkpoint_dir = folder / str(artifacts.get("checkpoint", {}).get("path", "artifacts/checkpoint"))
    if not (checkpoint_dir / checkpoints.MODEL).is_file():
        raise InputError(f"{model_uri} (version {version.version}) holds no vlp3d checkpoint (artifacts/checkpoint/"
                         f"{checkpoints.MODEL}); fine-tune a model that `vlp3d pretrain` registered.")
    state = image_encoder_state_dict(checkpoints.load_model_state(checkpoint_dir))
    return Pretrained(f"models:/{name}/{version.version}", name, str(version.version), checkpoint_dir,
                      checkpoints.read_config(checkpoint_dir), state)


def _roi(cfg: ExperimentConfig, pretrained_cfg: ExperimentConfig) -> tuple[int, int, int]:
    from vlp3d.objectives.model import model_input_shape

    roi = tuple(cfg.finetune.roi_size) or tuple(model_input_shape(pretrained_cfg))
    if len(roi) != 3 or any(int(s) < 1 for s in roi):
        raise InputError(f"finetune.roi_size = {list(cfg.finetune.roi_size)}: give three sizes (x, y, z) in voxels")
    encoder = pretrained_cfg.model.image_encoder
    if encoder == "vit3d" and roi != tuple(model_input_shape(pretrained_cfg)):
        raise InputError(f"finetune.roi_size = {list(roi)}: the pretrained vit3d's positional embedding is learned "
                         f"for {list(model_input_shape(pretrained_cfg))}; leave finetune.roi_size empty.")
    if encoder == "swin3d" and (any(s % 32 for s in roi) or math.prod(roi) // 32**3 < 2):
        raise InputError(f"finetune.roi_size = {list(roi)}: swin3d needs sizes divisible by 32 and at least two "
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
        raise InputError("data.shards is empty: set it to the folder `vlp3d prepare --out` wrote (with label maps "
                         "for finetune.task = 'segmentation').")
    shard_dir = resolve_shard_dir(cfg.data.shards, spec_from_config(cfg).hash)
    manifest = read_manifest(shard_dir)
    if ft.task == SEGMENTATION:
        maps = manifest.get("label_maps") or {}
        if not maps.get("rows"):
            raise InputError(f"{shard_dir}: the shards hold no voxel label maps (shard column {LABEL_MAP}); prepare a "
                             "corpus whose manifest has a 'label' column (`vlp3d synth` writes phantom label maps; a "
                             "phantom corpus written before them must be synthesized again, into a new folder), or "
                             "use finetune.task = 'classification'.")
        classes = list(maps.get("classes") or [])
        if not classes:
            raise InputError(f"{shard_dir}: the label maps have no class names (put classes.json, a JSON list of "
                             "names by value, beside the manifest and prepare again).")
        wanted = list(ft.classes) or classes[1:]
        unknown = [c for c in wanted if c not in classes[1:]]
        if unknown:
            raise InputError(f"finetune.classes: {unknown} are not classes of the label maps; choose from {classes[1:]}")
        names, index = [classes[0], *wanted], [0, *(classes.index(c) for c in wanted)]
    else:
        labels = list(manifest["label_names"])
        wanted = list(ft.labels) or _labels_with_positives(shard_dir, labels, cfg.data.train_split)
        unknown = [c for c in wanted if c not in labels]
        if unknown or not wanted:
            raise InputError(f"finetune.labels: {unknown or 'none'} are not labels of the shards; choose from {labels}")
        names, index = wanted, [labels.index(c) for c in wanted]
    if ft.global_batch % cfg.cluster.num_workers:
        raise InputError(f"finetune.global_batch={ft.global_batch} must be divisible by "
                         f"cluster.num_workers={cfg.cluster.num_workers}.")
    n_train = count_rows(shard_dir, cfg.data.train_split, ft.label_fraction)
    if n_train < ft.global_batch // cfg.cluster.num_workers * cfg.cluster.num_workers:
        raise InputError(f"finetune.label_fraction = {ft.label_fraction} keeps {n_train} '{cfg.data.train_split}' "
                         f"volumes, fewer than finetune.global_batch = {ft.global_batch}; raise the fraction or lower "
                         "the batch.")
    pretrained = resolve_pretrained(cfg)
    encoder = pretrained.cfg.model.image_encoder
    if ft.task == SEGMENTATION and encoder not in SEGMENTATION_ENCODERS:
        raise InputError(f"{pretrained.uri} has the image encoder {encoder!r}, for which there is no segmentation "
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


# --- the driver ------------------------------------------------------------------------------------


@interruptible
def finetune(cfg: ExperimentConfig, run_name: str | None = None, progress=log.info, callbacks: Sequence = (),
             parent_run_id: str | None = None, register: bool = True, tags: dict[str, str] | None = None,
             local: bool = False, on_report=None) -> FinetuneResult:
    """Fine-tune `cfg.finetune.model` on `cfg.finetune.task`; a rerun with the same `run_name` resumes. `local`
    runs the loop in this process (no Ray), else on Ray Train workers. Sweeps pass Tune's `callbacks` (or a
    local trial's `on_report`), the MLflow `parent_run_id`, extra `tags` and `register=False` (the model is
    logged, not registered), as for `vlp3d.platform.pretrain.pretrain`."""
    logs.ensure_configured()
    from vlp3d.platform.pretrain import NonFiniteTrainingError

    started = time.time()
    plan_ = plan(cfg)
    cfg, ft = plan_.cfg, plan_.cfg.finetune
    if not local:
        init_ray(cfg)
    run_name = run_name or f"{cfg.name}-{ft.task}-{ft.init}-{time.strftime('%Y%m%d-%H%M%S')}"
    extra_tags = {PRETRAINED_TAG: plan_.pretrained.uri, TASK_TAG: ft.task, "vlp3d.init": ft.init,
                  "vlp3d.label_fraction": str(ft.label_fraction),
                  "vlp3d.pretrained_method": plan_.pretrained.cfg.objective.name, **(tags or {})}
    if parent_run_id:
        extra_tags["mlflow.parentRunId"] = parent_run_id
    run_id = runs.start_or_resume_run(cfg, run_name, plan_.manifest, plan_.shard_dir, extra_tags)
    uri = store.uri(cfg)
    store.client(uri).set_tag(run_id, RUNTIME_TAG, "local" if local else "ray_train")
    meta = {"spec": plan_.manifest["spec"], "spec_hash": plan_.manifest["spec_hash"],
            "label_names": plan_.manifest["label_names"], "mlflow_run_id": run_id,
            "finetune": {"network": plan_.network.to_dict(), "names": plan_.names, "index": plan_.index,
                         "overlap": ft.sw_overlap, "pretrained_model": plan_.pretrained.uri, "init": ft.init}}
    loop_config = {**base_loop_config(cfg, "finetune", run_id, uri, meta, progress is not None),
                   "encoder_state": plan_.pretrained.encoder_state if ft.init == "pretrained" else None}
    if progress is not None:
        where = "this process (local runtime)" if local else f"{cfg.cluster.num_workers} workers"
        progress(f"fine-tuning {plan_.pretrained.uri} ({plan_.network.encoder}/{plan_.network.size}, init {ft.init}) "
                 f"for {ft.task} of {len(plan_.names)} {'classes' if ft.task == SEGMENTATION else 'labels'} on "
                 f"{plan_.n_train} '{cfg.data.train_split}' volumes (label fraction {ft.label_fraction}), "
                 f"{ft.max_steps} steps on {where}; run {run_name}")
    try:
        if local:
            finished = run_local(cfg, run_name, loop_config, local_datasets(cfg, plan_.shard_dir, ft.task), on_report)
        else:
            from vlp3d.platform.ray_data import finetuning_datasets

            finished = run_on_ray(cfg, run_name, loop_config, finetuning_datasets(cfg, plan_.shard_dir, ft.task),
                                  callbacks)
        if finished.interrupted:
            end_interrupted(uri, run_id, run_name, finished)
        if finished.stopped:
            raise NonFiniteTrainingError(f"run {run_name}: {finished.stopped}")
        if finished.checkpoint is None:
            raise RuntimeError(f"fine-tuning run {run_name} finished without a checkpoint (error: {finished.error})")
        folder = Path(cfg.tracking.workdir).resolve() / "finetuned" / run_name
        with finished.local_checkpoint() as local_copy:  # evaluated and logged with the model
            runs.deliver(uri, run_id, checkpoints.restore_unsent(local_copy))
            folder.mkdir(parents=True, exist_ok=True)
            for name in (checkpoints.MODEL, checkpoints.CONFIG, checkpoints.META):
                (folder / name).write_bytes((Path(local_copy) / name).read_bytes())
        metrics, table = evaluate_finetuned(folder, plan_, progress)
        runs.log_summary_metrics(uri, run_id, metrics)
        with tempfile.TemporaryDirectory() as tmp:
            table.to_csv(Path(tmp) / f"{ft.task}.csv", index=False)
            runs.log_files(uri, run_id, [Path(tmp) / f"{ft.task}.csv"], "eval")
        model_uri = models.log_finetuned(run_id, cfg, folder, plan_, metrics, register)
    except BaseException as err:  # a failed (or interrupted) run is never left RUNNING in MLflow
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"  # TrainingInterrupted too
        runs.end_run_quietly(uri, run_id, status, f"{type(err).__name__}: {err}")
        raise
    return FinetuneResult(run_id, run_name, folder, model_uri, plan_.pretrained.uri, metrics, table,
                          time.time() - started, finished.metrics)


def _eval_rows(plan_: Plan, split: str, fraction: float = 1.0) -> list[dict]:
    """The `split` rows (inside the label `fraction`) of the shards, as Ray Data would hand them over, read
    without Ray; segmentation keeps those with a label map."""
    from vlp3d.data.rows import block_rows, read_blocks

    column = LABEL_MAP if plan_.network.task == SEGMENTATION else "labels"
    names = ["image", "image_shape", column]
    rows = []
    for block in read_blocks(shard_files(plan_.shard_dir, "ct"), names, split, fraction,
                             nonempty=column if column == LABEL_MAP else ""):
        rows += [{name: block[name][i] for name in names} for i in range(block_rows(block))]
    return rows


def evaluate_finetuned(checkpoint_dir: Path, plan_: Plan, progress=log.info) -> tuple[dict[str, float], pd.DataFrame]:
    """The fine-tuned model on `data.eval_split`: segmentation -> per class Dice, HD95 (mm, median over
    volumes) and the Dice of the atlas and everywhere baselines (from the training label maps inside the
    label fraction); classification -> per-label AUROC. Returns (metrics as logged, the per-class/label table)."""
    from vlp3d.evaluation.metrics import auroc

    cfg, split = plan_.cfg, plan_.cfg.data.eval_split
    rows = _eval_rows(plan_, split)
    if not rows:
        raise InputError(f"{plan_.shard_dir}: no '{split}' volumes{' with label maps' if plan_.network.task == SEGMENTATION else ''} "
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
