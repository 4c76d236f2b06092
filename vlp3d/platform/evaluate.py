"""`vlp3d evaluate`: load a registered model, embed a held-out split of the shards, log metrics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlp3d import logs, storage
from vlp3d.config import ExperimentConfig
from vlp3d.data.shards import read_manifest, resolve_shard_dir, shard_files
from vlp3d.evaluation.prompts import load_prompt_sets
from vlp3d.evaluation.zeroshot import DEFAULT_ENSEMBLE, EvaluationResult, evaluate_embeddings
from vlp3d.platform import tracking
from vlp3d.platform.runtime import init_ray

EVAL_COLUMNS = ["image", "image_shape", "report_embedding", "labels"]


@dataclass
class EvaluateReport:
    result: EvaluationResult
    run_id: str | None
    split: str
    shard_dir: Path | str  # a URI when the shards are on one


def read_split(shard_dir: Path | str, split: str, batch_size: int = 64):
    """Yield numpy batches of one split's evaluation columns via Ray Data."""
    import ray
    from ray.data.expressions import col

    files = shard_files(shard_dir, "ct")  # not the folder: read_parquet would recurse into xray/
    if not files:
        raise ValueError(f"{shard_dir}: no CT shard files (*.parquet)")
    fs, paths = storage.for_reading(files)  # shards on a URI: read through its pyarrow filesystem
    ds = ray.data.read_parquet(paths, columns=EVAL_COLUMNS + ["split"], filesystem=fs)
    ds = ds.filter(expr=col("split") == split)
    yield from ds.select_columns(EVAL_COLUMNS).iter_batches(batch_size=batch_size, batch_format="numpy")


def evaluate(model_uri: str, shards: str, tracking_uri: str, split: str = "valid", batch_size: int = 32,
             n_boot: int = 200, labels: tuple[str, ...] = (), log: bool = True, prompts: str = "",
             prompt_ensemble: tuple[str, ...] = DEFAULT_ENSEMBLE) -> EvaluateReport:
    """Embed `split` of the shards with the model, score zero-shot classification (prompt ensemble
    `prompt_ensemble` of the built-in sets and those in the file `prompts`) and retrieval, and log
    metrics and tables to the model's run."""
    logs.ensure_configured()
    prompt_sets = load_prompt_sets(prompts)  # a bad prompt file fails before Ray starts
    tracking.client(tracking_uri)
    model, embedder = tracking.load_embedder(model_uri)  # a wrong URI fails before Ray starts
    init_ray(None)
    shard_dir = resolve_shard_dir(shards, embedder.spec.hash)
    manifest = read_manifest(shard_dir)
    images, reports, label_rows = [], [], []
    counts = manifest["counts"]
    # by_split counts every modality; evaluation embeds the CT rows
    total = counts["by_split"].get(split) if not counts.get("by_modality", {}).get("xray") else None
    with logs.progress_bar(total, f"embed {split}", unit="vol") as bar:
        for batch in read_split(shard_dir, split, batch_size):
            highres = embedder.spec.storage == "highres"
            images.append(embedder.embed_stored(batch["image"], batch["image_shape"] if highres else None, batch_size))
            reports.append(embedder.embed_report_embeddings(batch["report_embedding"]))
            label_rows.append(batch["labels"])
            bar.update(len(batch["labels"]))
    if not images:
        raise ValueError(f"{shard_dir}: split '{split}' has no rows (splits: {manifest['counts']['by_split']}).")
    result = evaluate_embeddings(
        torch.cat(images), torch.cat(reports), np.concatenate(label_rows), list(manifest["label_names"]),
        embedder.embed_reports, embedder.logit_scale, evaluate_labels=labels, n_boot=n_boot,
        prompt_sets=prompt_sets, ensemble=tuple(prompt_ensemble),
    )
    run_id = model.metadata.run_id
    if log and run_id:
        prefix = f"eval/{split}/"
        tracking.log_evaluation(
            run_id, tracking_uri, {prefix + k: v for k, v in result.metrics.items()},
            {f"{split}_zero_shot": result.per_label, f"{split}_retrieval": result.retrieval,
             f"{split}_prompt_sets": result.prompt_sets},
        )
    return EvaluateReport(result, run_id, split, shard_dir)


def evaluate_as_configured(cfg: ExperimentConfig, model_uri: str) -> EvaluateReport:
    """`evaluate` on `cfg`'s shards and held-out split with its `eval.*` settings, logged to its
    MLflow store: what the demo and every sweep trial run after training."""
    return evaluate(model_uri, cfg.data.shards, tracking.uri(cfg), split=cfg.data.eval_split,
                    batch_size=cfg.eval.batch_size, n_boot=cfg.eval.bootstrap, labels=cfg.eval.labels,
                    prompts=cfg.eval.prompts, prompt_ensemble=cfg.eval.prompt_ensemble)
