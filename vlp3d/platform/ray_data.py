"""Ray Data datasets of a training run: the shard files read through `ray.data.read_parquet`, the rows a
task reads (`vlp3d.train.tasks`), held in the object store when they fit. Ray Train splits each one
across the workers (`get_dataset_shard`); the same rows in the same order as `LocalRows` reads them in
one process (`preserve_order`)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from vlp3d import storage
from vlp3d.config import ExperimentConfig
from vlp3d.data.shards import LABEL_MAP, shard_files
from vlp3d.data.splits import parse_split
from vlp3d.errors import InputError
from vlp3d.objectives import objective_class
from vlp3d.train.tasks import finetune as finetune_task
from vlp3d.train.tasks import pretrain as pretrain_task


def filter_split(ds, split: str):
    """Rows of a split, or of a part of one ('valid[0:0.5]': by patient, vlp3d.data.splits); a part needs
    the `patient_id` column. The part's filter asks for a small CPU share: while a trial trains, its
    workers hold the CPUs (a sweep trial keeps only tune.trial_cpus)."""
    from ray.data.expressions import col

    part = parse_split(split)
    ds = ds.filter(expr=col("split") == part.split)
    if not part.whole:
        with warnings.catch_warnings():  # "use 'expr' instead of 'fn'": no expression hashes a patient id
            warnings.filterwarnings("ignore", message="Use 'expr' instead of 'fn'", category=UserWarning)
            ds = ds.filter(lambda row: part.contains(row["patient_id"]), num_cpus=0.1)
    return ds


def shard_dataset(cfg: ExperimentConfig, files: Sequence[str], columns: Sequence[str], split: str,
                  fraction: float = 1.0, limit: int = 0, nonempty: str = ""):
    """`columns` of the rows of `split` inside the nested `fraction` subset (with a non-empty `nonempty`
    column when given), at most `limit`; materialised per `data.materialize` ('auto': when twice the
    files fit in a quarter of the object store)."""
    import ray
    from ray.data.expressions import col

    columns = list(columns)
    fs, paths = storage.for_reading(list(files))
    ds = ray.data.read_parquet(paths, columns=list(dict.fromkeys([*columns, "split", "fraction_rank", "patient_id"])),
                               filesystem=fs)
    ds = filter_split(ds, split)
    if fraction < 1.0:
        ds = ds.filter(expr=col("fraction_rank") < fraction)
    if limit:
        ds = ds.limit(limit)
    ds = ds.select_columns(columns)
    if nonempty:
        # a small CPU share: while training, the workers hold the CPUs (a sweep trial keeps only
        # tune.trial_cpus), and a filter task asking for a whole CPU would wait for ever
        ds = ds.filter(lambda row: row[nonempty] is not None and len(row[nonempty]) > 0, num_cpus=0.1)
    if cfg.data.materialize == "never":
        return ds
    size = sum(storage.file_sizes(list(files)))
    budget = ray.available_resources().get("object_store_memory", 0) / 4
    if cfg.data.materialize == "always" or size * 2 < budget:
        return ds.materialize()
    return ds


def pretraining_datasets(cfg: ExperimentConfig, shard_dir: Path | str, manifest: dict) -> dict:
    """The Ray Data twins of `vlp3d.train.tasks.pretrain.local_datasets`: train, valid (when every worker
    gets two held-out volumes), train_2d (UniMedI's radiographs)."""
    files = shard_files(shard_dir, "ct")
    if not files:
        raise InputError(f"{shard_dir}: no CT shard files; re-run `vlp3d prepare`.")
    out = {"train": shard_dataset(cfg, files, pretrain_task.dataset_columns(cfg), cfg.data.train_split,
                                  cfg.data.fraction)}
    if pretrain_task.has_validation(cfg, manifest, cfg.cluster.num_workers):
        out["valid"] = shard_dataset(cfg, files, pretrain_task.dataset_columns(cfg, held_out=True),
                                     cfg.data.eval_split, limit=cfg.train.val_volumes)
    xray = shard_files(shard_dir, "xray") if objective_class(cfg.objective.name).uses_2d else []
    if xray:
        out["train_2d"] = shard_dataset(cfg, xray, pretrain_task.dataset_columns(cfg, "xray"), cfg.data.train_split,
                                        cfg.data.fraction)
    return out


def finetuning_datasets(cfg: ExperimentConfig, shard_dir: Path | str, task: str) -> dict:
    """The Ray Data twin of `vlp3d.train.tasks.finetune.local_datasets`."""
    return {"train": shard_dataset(cfg, shard_files(shard_dir, "ct"), finetune_task.dataset_columns(task),
                                   cfg.data.train_split, cfg.finetune.label_fraction,
                                   nonempty=LABEL_MAP if task == "segmentation" else "")}
