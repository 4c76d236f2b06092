"""`vlp3d evaluate`: load a registered model, embed a held-out split of the shards, log metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlp3d import logs, storage
from vlp3d.config import ExperimentConfig
from vlp3d.data.patients import (
    PatientKeyError,
    leaked_patients,
    part_patients,
    patient_key,
    split_hash,
    split_patients,
    unkeyed_fingerprint,
)
from vlp3d.data.shards import read_manifest, resolve_shard_dir, shard_files
from vlp3d.data.splits import parse_split
from vlp3d.errors import InputError
from vlp3d.evaluation.metrics import paired_bootstrap
from vlp3d.evaluation.probe import DEFAULT_FRACTIONS, ProbeSplit, compare_probes, linear_probe
from vlp3d.evaluation.prompts import load_prompt_sets
from vlp3d.evaluation.zeroshot import (
    DEFAULT_ENSEMBLE,
    EvaluationResult,
    evaluate_embeddings,
    paired_metric_name,
    per_volume_metric,
)
from vlp3d.platform.mlflow import models, registry, runs, store
from vlp3d.platform.ray_data import filter_split
from vlp3d.platform.runtime import init_ray

logger = logging.getLogger(__name__)

EVAL_COLUMNS = ["image", "image_shape", "report_embedding", "labels", "patient_id", "volume_name"]


@dataclass
class EvaluateReport:
    result: EvaluationResult
    run_id: str | None
    split: str
    shard_dir: Path | str  # a URI when the shards are on one
    patients: np.ndarray | None = None  # per evaluated row (in memory only: resampling by patient, never logged)


def read_split(shard_dir: Path | str, split: str, batch_size: int = 64, columns: list[str] | None = None):
    """Yield numpy batches of one split's evaluation columns (or `columns`) via Ray Data."""
    import ray

    columns = columns or EVAL_COLUMNS
    files = shard_files(shard_dir, "ct")  # not the folder: read_parquet would recurse into xray/
    if not files:
        raise InputError(f"{shard_dir}: no CT shard files (*.parquet)")
    fs, paths = storage.for_reading(files)  # shards on a URI: read through its pyarrow filesystem
    ds = ray.data.read_parquet(paths, columns=list(dict.fromkeys([*columns, "split", "patient_id"])), filesystem=fs)
    ds = filter_split(ds, split)
    yield from ds.select_columns(columns).iter_batches(batch_size=batch_size, batch_format="numpy")


@dataclass
class EmbeddedSplit:
    """One split embedded by one or more models (`images[i]`: model i), rows sorted by volume name."""

    images: list[torch.Tensor]
    reports: list[torch.Tensor]
    labels: np.ndarray
    patients: np.ndarray
    volume_names: np.ndarray
    fraction_rank: np.ndarray | None = None


def embed_split(embedders: list, shard_dir: Path | str, split: str, batch_size: int, manifest: dict,
                reports: bool = True, fraction_rank: bool = False) -> EmbeddedSplit:
    """Every CT row of `split` through each embedder (one read of the shards for all of them)."""
    columns = EVAL_COLUMNS + (["fraction_rank"] if fraction_rank else [])
    images: list[list] = [[] for _ in embedders]
    texts: list[list] = [[] for _ in embedders]
    labels, patients, names, ranks = [], [], [], []
    counts = manifest["counts"]
    # by_split counts every modality; evaluation embeds the CT rows
    total = counts["by_split"].get(split) if not counts.get("by_modality", {}).get("xray") else None
    with logs.progress_bar(total, f"embed {split}" + (f" x{len(embedders)} models" if len(embedders) > 1 else ""),
                           unit="vol") as bar:
        for batch in read_split(shard_dir, split, batch_size, columns):
            for k, embedder in enumerate(embedders):
                highres = embedder.spec.storage == "highres"
                images[k].append(embedder.embed_stored(batch["image"], batch["image_shape"] if highres else None,
                                                       batch_size))
                if reports:
                    texts[k].append(embedder.embed_report_embeddings(batch["report_embedding"]))
            labels.append(batch["labels"])
            patients.append(batch["patient_id"].astype(str))
            names.append(batch["volume_name"].astype(str))
            if fraction_rank:
                ranks.append(batch["fraction_rank"])
            bar.update(len(batch["labels"]))
    if not labels:
        raise InputError(f"{shard_dir}: split '{split}' has no rows (splits: {counts['by_split']}).")
    order = np.argsort(np.concatenate(names), kind="stable")  # Ray Data's order varies; names do not
    index = torch.from_numpy(order)
    return EmbeddedSplit([torch.cat(i)[index] for i in images], [torch.cat(t)[index] for t in texts if t],
                         np.concatenate(labels)[order], np.concatenate(patients)[order],
                         np.concatenate(names)[order], np.concatenate(ranks)[order] if ranks else None)


class LeakageError(ValueError):
    """An evaluated patient was in the model's pretraining split."""


def check_leakage(tracking_uri: str, run_id: str | None, embedder, shard_dir: Path | str, split: str,
                  manifest: dict) -> None:
    """Refuse to score a model on patients it pretrained on. The model's run records keyed fingerprints
    of its pretraining patients (runs.log_pretraining_patients), compared under the same patient key
    (a record of another key is refused: the check could not see anything); for a run without that
    record, the shards' own pretraining split counts when they hold the model's data (same data hash)."""
    evaluated = part_patients(shard_dir, split)
    record = runs.pretraining_patients(tracking_uri, run_id) if run_id else None
    train_split = embedder.cfg.data.train_split
    if record is not None:
        leaked = leaked_patients(evaluated, set(record["fingerprints"]), _record_fingerprint(record, shard_dir, run_id))
        source = f"split '{record['split']}' of the shards it pretrained on (recorded with run {run_id})"
    else:
        data_hash = store.client(tracking_uri).get_run(run_id).data.tags.get("vlp3d.data_hash") if run_id else None
        if data_hash != manifest.get("source_manifest_hash"):
            logger.warning(f"cannot check split '{split}' for patients the model pretrained on: its run records none "
                        "and these shards hold other data; make sure the split is of held-out patients")
            return
        leaked = sorted(evaluated & split_patients(shard_dir).get(train_split, set()))
        source = f"split '{train_split}' of these shards"
    if leaked:  # counted, never named: the message reaches terminals and job logs
        raise LeakageError(
            f"refusing to evaluate on split '{split}' of {shard_dir}: {len(leaked)} of its {len(evaluated)} patients "
            f"were in the model's pretraining data ({source}). Evaluate on a split of held-out "
            f"patients (--split / data.eval_split, not the pretraining split '{train_split}'), or prepare the "
            "corpus so that these patients are in one split only (patient_id and split columns of the manifest).")


def _record_fingerprint(record: dict, shard_dir: Path | str, run_id: str):
    """How the record's fingerprints were made: under the patient key with its `key_id` (the key of
    these shards, or $VLP3D_PATIENT_KEY_FILE's, must be that one), or unkeyed (an older vlp3d: still
    compared, with a warning that the store holds brute-forceable fingerprints)."""
    if "key_id" not in record:
        logger.warning(f"run {run_id} records its pretraining patients with unkeyed fingerprints (vlp3d before "
                       "keyed fingerprints), which anyone who can read the MLflow store can reverse by trying "
                       "ids; delete its artifact data/pretraining_patients.json once evaluations are done, "
                       "or pretrain again (docs/security.md)")
        return unkeyed_fingerprint
    key = patient_key(shard_dir)
    if key.key_id != record["key_id"]:
        raise PatientKeyError(
            f"cannot check the patients of {shard_dir} against those the model pretrained on: run {run_id} fingerprinted "
            f"them with patient key {record['key_id']}, and the key here ({key.source}) is {key.key_id}. Set "
            "VLP3D_PATIENT_KEY_FILE to the key file beside the shards the model pretrained on (docs/security.md)")
    return key.fingerprint


def evaluate(model_uri: str, shards: str, tracking_uri: str, split: str = "valid", batch_size: int = 32,
             n_boot: int = 200, labels: tuple[str, ...] = (), log: bool = True, prompts: str = "",
             prompt_ensemble: tuple[str, ...] = DEFAULT_ENSEMBLE) -> EvaluateReport:
    """Embed `split` of the shards with the model, score zero-shot classification (prompt ensemble
    `prompt_ensemble` of the built-in sets and those in the file `prompts`) and retrieval, and log
    metrics and tables to the model's run; a run with a registered version also gets ROC and
    reliability plots, and its versions' model cards are rewritten. Patients the model pretrained
    on are refused (`check_leakage`)."""
    logs.ensure_configured()
    prompt_sets = load_prompt_sets(prompts)  # a bad prompt file fails before Ray starts
    store.client(tracking_uri)
    model, embedder = models.load_embedder(model_uri)  # a wrong URI fails before Ray starts
    init_ray(None)
    shard_dir = resolve_shard_dir(shards, embedder.spec.hash)
    manifest = read_manifest(shard_dir)
    run_id = model.metadata.run_id
    check_leakage(tracking_uri, run_id, embedder, shard_dir, split, manifest)
    data = embed_split([embedder], shard_dir, split, batch_size, manifest)
    result = evaluate_embeddings(
        data.images[0], data.reports[0], data.labels, list(manifest["label_names"]),
        embedder.embed_reports, embedder.logit_scale, evaluate_labels=labels, n_boot=n_boot,
        prompt_sets=prompt_sets, ensemble=tuple(prompt_ensemble),
    )
    if log and run_id:
        from vlp3d.evaluation.plots import reliability_figure, roc_figure

        name = parse_split(split).key  # 'valid', or 'valid_0.5-1' for a part of a split (vlp3d.data.splits)
        prefix = f"eval/{name}/"
        figures = {}
        # plots belong to a model card: a registered version's run (not every sweep trial's)
        if result.label_names and registry.registered_versions(tracking_uri, run_id):
            figures = {f"{name}_roc": roc_figure(result.targets, result.probabilities, result.label_names,
                                                  f"zero-shot ROC per finding, split '{split}' (n={result.n})"),
                       f"{name}_reliability": reliability_figure(
                           result.targets, result.probabilities, result.label_names,
                           title=f"reliability of zero-shot probabilities, split '{split}'")}
        runs.log_evaluation(
            run_id, tracking_uri, {prefix + k: v for k, v in result.metrics.items()},
            {f"{name}_zero_shot": result.per_label, f"{name}_retrieval": result.retrieval,
             f"{name}_prompt_sets": result.prompt_sets}, figures,
            tags={f"vlp3d.eval.{name}.split_hash": split_hash(shard_dir, split)},
        )
    return EvaluateReport(result, run_id, split, shard_dir, data.patients)


def evaluate_as_configured(cfg: ExperimentConfig, model_uri: str, split: str = "") -> EvaluateReport:
    """`evaluate` on `cfg`'s shards and held-out split (or `split`) with its `eval.*` settings, logged to
    its MLflow store: what the demo and every sweep trial run after training."""
    return evaluate(model_uri, cfg.data.shards, store.uri(cfg), split=split or cfg.data.eval_split,
                    batch_size=cfg.eval.batch_size, n_boot=cfg.eval.bootstrap, labels=cfg.eval.labels,
                    prompts=cfg.eval.prompts, prompt_ensemble=cfg.eval.prompt_ensemble)


@dataclass
class ProbeReport:
    table: object  # pandas DataFrame: macro AUROC per feature source and fraction (compare_probes)
    per_label: object  # pandas DataFrame: every (source, fraction, label) row of linear_probe
    run_id: str | None
    train_split: str
    split: str


PROBE_SOURCES = ("pretrained", "random init")


def probe(model_uri: str, shards: str, tracking_uri: str, train_split: str = "train", split: str = "valid",
          fractions=DEFAULT_FRACTIONS, batch_size: int = 32, n_boot: int = 200, seed: int = 0,
          log: bool = True) -> ProbeReport:
    """Linear probes (vlp3d.evaluation.probe) on the frozen image embeddings of the model and of
    the same architecture randomly initialised: trained on `train_split` at each label fraction
    (nested patient subsets, as data.fraction), tested on `split`; the label-efficiency table and
    plot are logged to the model's run."""
    import pandas as pd

    logs.ensure_configured()
    if train_split == split:
        raise InputError(f"the probe trains on split '{train_split}' and is tested on split '{split}': "
                         "give two different splits (--train-split, --split)")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad or not fractions:
        raise InputError(f"--fractions {list(fractions)}: each must be in (0, 1], e.g. 0.01 0.1 1")
    store.client(tracking_uri)
    model, embedder = models.load_embedder(model_uri)
    init_ray(None)
    shard_dir = resolve_shard_dir(shards, embedder.spec.hash)
    manifest = read_manifest(shard_dir)
    run_id = model.metadata.run_id
    check_leakage(tracking_uri, run_id, embedder, shard_dir, split, manifest)
    embedders = [embedder, embedder.randomly_initialised(seed)]
    train = embed_split(embedders, shard_dir, train_split, batch_size, manifest, reports=False, fraction_rank=True)
    test = embed_split(embedders, shard_dir, split, batch_size, manifest, reports=False)
    names = list(manifest["label_names"])
    tables = {}
    for source, train_images, test_images in zip(PROBE_SOURCES, train.images, test.images, strict=True):
        logger.info(f"linear probe on {source} features: fractions {list(fractions)}, {len(names)} findings")
        tables[source] = linear_probe(
            ProbeSplit(train_images.numpy(), train.labels, train.patients, train.fraction_rank),
            ProbeSplit(test_images.numpy(), test.labels, test.patients), names, fractions, n_boot, seed)
    table = compare_probes(tables)
    per_label = pd.concat([t.assign(features=s) for s, t in tables.items()], ignore_index=True)
    if log and run_id:
        from vlp3d.evaluation.plots import label_efficiency_figure

        metrics = {f"probe/{split}/{r.features.replace(' ', '_')}/fraction_{r.fraction:g}/macro_auroc": r.auroc
                   for r in table.itertuples() if np.isfinite(r.auroc)}
        figure = label_efficiency_figure(table, f"linear probe: trained on '{train_split}', tested on '{split}'")
        runs.log_evaluation(run_id, tracking_uri, metrics,
                            {f"probe_{split}": table, f"probe_{split}_per_label": per_label},
                            {f"probe_{split}": figure})
    return ProbeReport(table, per_label, run_id, train_split, split)


def promote(tracking_uri: str, name: str, version: str, shards: str = "", split: str = "valid",
            metric: str = "macro_auroc", alias: str = "champion", batch_size: int = 32, n_boot: int = 1000,
            seed: int = 0, force: bool = False, prompts: str = "",
            prompt_ensemble: tuple[str, ...] = DEFAULT_ENSEMBLE) -> tuple[bool, str]:
    """Move `alias` of registered model `name` to `version` when nobody holds it, or when `force`,
    or when the version beats the holder on `metric` beyond the paired bootstrap interval of the
    difference: both are evaluated on the same volumes of `split`, resampled together by patient.
    The decision is made and recorded on the version by vlp3d.platform.mlflow.registry.promote, the one
    implementation (this function only evaluates the two versions it compares)."""
    logs.ensure_configured()
    challenger_uri = f"models:/{name}/{version}"
    registry.model_version(tracking_uri, challenger_uri)  # a wrong name/version fails here
    current = registry.alias_holder(tracking_uri, name, alias)
    if current is None or current.version == str(version) or force:
        return registry.promote(tracking_uri, challenger_uri, alias, force=force)
    if not shards:
        raise InputError(f"models:/{name}@{alias} is version {current.version}: comparing version {version} "
                         "with it needs the shards to evaluate both on (--shards, data.shards)")
    metric = paired_metric_name(metric)  # an unknown metric fails before anything is embedded
    prompt_sets = load_prompt_sets(prompts)
    results, patients, names, hashes = [], None, None, []
    loaded = [models.load_embedder(f"models:/{name}/{v}") for v in (current.version, version)]
    init_ray(None)
    for model, embedder in loaded:
        shard_dir = resolve_shard_dir(shards, embedder.spec.hash)
        manifest = read_manifest(shard_dir)
        check_leakage(tracking_uri, model.metadata.run_id, embedder, shard_dir, split, manifest)
        data = embed_split([embedder], shard_dir, split, batch_size, manifest)
        if patients is not None and not np.array_equal(data.volume_names, names):
            raise InputError(f"versions {current.version} and {version} read different volumes of split '{split}' "
                             "(their preprocessing differs and the shards of the two specs hold other rows): prepare "
                             "the same corpus with both specs")
        patients, names = data.patients, data.volume_names
        hashes.append(split_hash(shard_dir, split))
        results.append(evaluate_embeddings(data.images[0], data.reports[0], data.labels, list(manifest["label_names"]),
                                           embedder.embed_reports, embedder.logit_scale, n_boot=0,
                                           prompt_sets=prompt_sets, ensemble=tuple(prompt_ensemble)))
    (targets, champion, fn), (_, challenger, _) = (per_volume_metric(r, metric) for r in results)
    if results[0].label_names != results[1].label_names:
        raise InputError(f"versions {current.version} and {version} were scored on different findings "
                         f"({results[0].label_names} vs {results[1].label_names})")
    comparison = paired_bootstrap(fn, targets, champion, challenger, patients, n_boot, seed)
    return registry.promote(tracking_uri, challenger_uri, alias, comparison, metric=metric, split=split,
                            split_hash="/".join(dict.fromkeys(hashes)))
