"""The model card of a registered version: a markdown description and `vlp3d.*` tags, written from its run
(tags, params, metrics), the evaluation tables logged to it and the version's promotion record."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from vlp3d.platform.mlflow.store import PRETRAINED_TAG, TASK_TAG, client

PROMOTION_TAG = "vlp3d.promotion"  # tags vlp3d.promotion.* of a version: the last promotion decision


def _eval_tables(mlflow_client: MlflowClient, run_id: str) -> dict[str, pd.DataFrame]:
    """The CSV tables an evaluation logged under `eval/` of a run, by name."""
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    saved = os.environ.get(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name)
    os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = "false"  # a bar per small CSV buries the output
    try:
        return _download_tables(mlflow_client, run_id)
    finally:
        if saved is None:
            os.environ.pop(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name, None)
        else:
            os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = saved


def _download_tables(mlflow_client: MlflowClient, run_id: str) -> dict[str, pd.DataFrame]:
    tables: dict[str, pd.DataFrame] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            files = [f.path for f in mlflow_client.list_artifacts(run_id, "eval") if f.path.endswith(".csv")]
        except (OSError, mlflow.exceptions.MlflowException):
            return tables
        for path in files:
            try:
                tables[Path(path).stem] = pd.read_csv(mlflow_client.download_artifacts(run_id, path, tmp))
            except pd.errors.EmptyDataError:  # e.g. no finding with both classes in the split
                continue
    return tables


def _fmt(value, digits: int = 3) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "" if number != number else f"{number:.{digits}f}"


def _interval(low, high) -> str:
    return f"[{_fmt(low)}, {_fmt(high)}]" if _fmt(low) else ""


def _markdown(rows: list[list], headers: list[str]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])


def model_card(name: str, version: str, run, tables: dict[str, pd.DataFrame], version_tags: dict[str, str]
               ) -> tuple[str, dict[str, str]]:
    """The markdown description and the tags of a registered version, from its run (tags, params,
    metrics) and the evaluation tables logged to it (a fine-tuned model's: `finetuned_card`)."""
    params, run_tags, metrics = run.data.params, run.data.tags, run.data.metrics
    if PRETRAINED_TAG in run_tags:
        return finetuned_card(name, version, run, tables, version_tags)
    steps, flops_per_step = params.get("train.max_steps", ""), params.get("compute/flops_per_step", "")
    try:
        flops = f"{float(steps) * float(flops_per_step):.3g}"
    except ValueError:
        flops = ""
    facts = {
        "method": run_tags.get("vlp3d.method", ""),
        "image_encoder": f"{params.get('model.image_encoder', '')}/{params.get('model.size', '')}",
        "text_encoder": params.get("model.text_encoder", ""),
        "preprocess_hash": run_tags.get("vlp3d.preprocess_hash", ""),
        "data_hash": run_tags.get("vlp3d.data_hash", ""),
        "train_steps": steps,
        "train_flops": flops,
        "git_commit": run_tags.get("vlp3d.git_commit", ""),
    }
    preprocessing = (f"{params.get('data.shape', '')} voxels at {params.get('data.spacing_mm', '')} mm (RAS), "
                     f"HU window {params.get('data.hu_window', '')}, stored {params.get('data.storage_dtype', '')} "
                     f"({params.get('data.storage', '')}); spec hash `{facts['preprocess_hash']}`")
    lines = [f"# {name} version {version}", "",
             f"A 3D CT vision-language embedding model pretrained with vlp3d (MLflow run `{run.info.run_id}`): "
             f"`mlflow.pyfunc.load_model(\"models:/{name}/{version}\")` embeds CT volumes and report texts into "
             "one space.", "",
             _markdown([["method", facts["method"]], ["image encoder", facts["image_encoder"]],
                        ["text encoder", facts["text_encoder"]], ["preprocessing", preprocessing],
                        ["data (source manifest hash)", f"`{facts['data_hash']}`, pretraining split "
                                                        f"'{params.get('data.train_split', '')}'"],
                        ["training", f"{steps} steps x global batch {params.get('train.global_batch', '')}, "
                                     f"{flops or '?'} FLOPs"],
                        ["code", f"vlp3d {run_tags.get('vlp3d.version', '')}, git `{facts['git_commit']}`"]],
                       ["", ""])]
    tags = {f"vlp3d.{k}": str(v) for k, v in facts.items() if v not in ("", "/")}
    splits = sorted({k.split("/")[1] for k in metrics if k.startswith("eval/") and k.endswith("/macro_auroc")})
    for split in splits:
        zero_shot, retrieval = tables.get(f"{split}_zero_shot"), tables.get(f"{split}_retrieval")
        zero_shot = zero_shot if zero_shot is not None and "n" in zero_shot else pd.DataFrame(columns=["n"])
        prefix = f"eval/{split}/"
        macro, low, high = (metrics.get(prefix + k) for k in ("macro_auroc", "macro_auroc_ci_low", "macro_auroc_ci_high"))
        n = int(zero_shot["n"].iloc[0]) if len(zero_shot) else int(metrics.get(prefix + "retrieval_pool", 0))
        split_hash = run_tags.get(f"vlp3d.eval.{split}.split_hash", "")
        rows = [[r.label, _fmt(r.auroc), _interval(r.auroc_ci_low, r.auroc_ci_high), _fmt(r.f1), r.positives]
                for r in zero_shot.itertuples()]
        rows.append(["**macro**", _fmt(macro), _interval(low, high), _fmt(metrics.get(prefix + "macro_f1")), ""])
        lines += ["", f"## Zero-shot classification, split '{split}' ({n} volumes"
                      + (f", split hash `{split_hash}`" if split_hash else "") + ")", "",
                  _markdown(rows, ["finding", "AUROC", "95% CI", "F1", "positives"])]
        tags[f"vlp3d.eval.{split}.macro_auroc"] = f"{_fmt(macro)} {_interval(low, high)}".strip()
        if split_hash:
            tags[f"vlp3d.eval.{split}.split_hash"] = split_hash
        if retrieval is not None and len(retrieval):
            pool = int(retrieval["pool"].iloc[0])
            lines += ["", f"Retrieval among all {pool} volumes and reports of the split (pool size {pool}):", "",
                      _markdown([[r.direction, _fmt(r._2), _fmt(r._3), _fmt(r._4), _fmt(r.MAP)]
                                 for r in retrieval.itertuples()], ["direction", "R@1", "R@5", "R@10", "MAP"])]
            tags[f"vlp3d.eval.{split}.retrieval_pool"] = str(pool)
        lines += ["", f"Plots (run artifacts): `eval/{split}_roc.png` (ROC per finding), "
                      f"`eval/{split}_reliability.png` (reliability of the zero-shot probabilities)."]
    for key in sorted(k for k in tables if k.startswith("probe_") and not k.endswith("_per_label")):
        probe = tables[key]
        split = key.removeprefix("probe_")
        rows = [[r.features, f"{r.fraction:.0%}", r.train_volumes, _fmt(r.auroc), _interval(r.auroc_ci_low, r.auroc_ci_high),
                 int(r.labels) if r.labels == r.labels else "", r.skipped if isinstance(r.skipped, str) else ""]
                for r in probe.itertuples()]
        lines += ["", f"## Linear probe on frozen image features, tested on '{split}'", "",
                  _markdown(rows, ["features", "labels used", "training volumes", "macro AUROC", "95% CI",
                                   "findings", "skipped"]),
                  "", f"Plot: `eval/{key}.png`; per finding: `eval/{key}_per_label.csv`."]
        for r in probe.itertuples():
            tags[f"vlp3d.probe.{split}.{r.features.replace(' ', '_')}.{r.fraction:g}"] = (
                f"{_fmt(r.auroc)} {_interval(r.auroc_ci_low, r.auroc_ci_high)}".strip())
    return "\n".join(lines + _promotion(version_tags)) + "\n", tags


def _promotion(version_tags: dict[str, str]) -> list[str]:
    promotion = {k.removeprefix(PROMOTION_TAG + "."): v for k, v in version_tags.items() if k.startswith(PROMOTION_TAG)}
    if not promotion:
        return []
    return ["", "## Promotion", "", f"{promotion.get('decision', '')}: {promotion.get('reason', '')}"]


def finetuned_card(name: str, version: str, run, tables: dict[str, pd.DataFrame], version_tags: dict[str, str]
                   ) -> tuple[str, dict[str, str]]:
    """The model card of a fine-tuned version (its run is tagged with the pretrained model it started from):
    what it predicts, where it came from, how it was trained, and its evaluation table (`eval/<task>.csv`)."""
    params, run_tags, metrics = run.data.params, run.data.tags, run.data.metrics
    task, split = run_tags.get(TASK_TAG, ""), params.get("data.eval_split", "")
    facts = {
        "task": task,
        "pretrained_model": run_tags.get(PRETRAINED_TAG, ""),
        "init": run_tags.get("vlp3d.init", ""),
        "label_fraction": run_tags.get("vlp3d.label_fraction", ""),
        "image_encoder": f"{params.get('model.image_encoder', '')}/{params.get('model.size', '')}",
        "preprocess_hash": run_tags.get("vlp3d.preprocess_hash", ""),
        "data_hash": run_tags.get("vlp3d.data_hash", ""),
        "train_steps": params.get("finetune.max_steps", ""),
        "git_commit": run_tags.get("vlp3d.git_commit", ""),
    }
    predicts = ("the volume in millilitres of each class (columns `<class>_ml`)" if task == "segmentation" else
                "the probability of each label (one column per label)")
    lines = [f"# {name} version {version}", "",
             f"A 3D CT model fine-tuned for {task or '?'} with vlp3d from `{facts['pretrained_model']}` (MLflow run "
             f"`{run.info.run_id}`): `mlflow.pyfunc.load_model(\"models:/{name}/{version}\")` reads CT volumes "
             f"(column `image`: a NIfTI file or DICOM series path) and predicts {predicts}.", "",
             _markdown([["task", task], ["pretrained model", f"`{facts['pretrained_model']}` (method "
                                                            f"{run_tags.get('vlp3d.pretrained_method', '')})"],
                        ["initialisation", f"{facts['init']}, label fraction {facts['label_fraction']}"],
                        ["image encoder", facts["image_encoder"]],
                        ["preprocessing", f"{params.get('data.shape', '')} voxels at "
                                          f"{params.get('data.spacing_mm', '')} mm (RAS); spec hash "
                                          f"`{facts['preprocess_hash']}`"],
                        ["data (source manifest hash)", f"`{facts['data_hash']}`, training split "
                                                        f"'{params.get('data.train_split', '')}'"],
                        ["training", f"{facts['train_steps']} steps x global batch "
                                     f"{params.get('finetune.global_batch', '')}"],
                        ["code", f"vlp3d {run_tags.get('vlp3d.version', '')}, git `{facts['git_commit']}`"]],
                       ["", ""])]
    tags = {f"vlp3d.{k}": str(v) for k, v in facts.items() if v not in ("", "/")}
    table = tables.get(task)
    if table is not None and len(table):
        lines += ["", f"## Evaluation on split '{split}'", "",
                  _markdown([[_fmt(v) if isinstance(v, float) else v for v in row]
                             for row in table.itertuples(index=False)], list(table.columns))]
    for key in ("mean_dice", "macro_auroc"):
        if f"eval/{split}/{key}" in metrics:
            tags[f"vlp3d.eval.{split}.{key}"] = _fmt(metrics[f"eval/{split}/{key}"])
    return "\n".join(lines + _promotion(version_tags)) + "\n", tags


def update_model_card(uri_: str, name: str, version: str) -> None:
    """Rewrite a registered version's description (markdown model card) and its `vlp3d.*` tags from
    what its run holds now."""
    mlflow_client = client(uri_)
    model_version_ = mlflow_client.get_model_version(name, version)
    run = mlflow_client.get_run(model_version_.run_id)
    description, tags = model_card(name, version, run, _eval_tables(mlflow_client, run.info.run_id),
                                   dict(model_version_.tags))
    mlflow_client.update_model_version(name, version, description=description)
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, version, key, value[:5000])


def registered_evaluation(uri_: str, model_uri: str) -> dict:
    """What an export's model card takes from a registered version (models:/NAME/VERSION or models:/NAME@ALIAS):
    `model_uri` resolved to models:/NAME/VERSION, the version's markdown description, the data hash and per
    evaluated split the zero-shot AUROC, macro and per finding, with its 95% bootstrap interval and the number
    of volumes (`evaluations`: dicts with split, label, value, ci_low, ci_high, n)."""
    from vlp3d.platform.mlflow.registry import model_version

    version = model_version(uri_, model_uri)
    mlflow_client = client(uri_)
    run = mlflow_client.get_run(version.run_id)
    tables, metrics = _eval_tables(mlflow_client, run.info.run_id), run.data.metrics
    evaluations = []
    for split in sorted({k.split("/")[1] for k in metrics if k.startswith("eval/") and k.endswith("/macro_auroc")}):
        prefix, table = f"eval/{split}/", tables.get(f"{split}_zero_shot")
        rows = list(table.itertuples()) if table is not None and "n" in table else []
        n = int(rows[0].n) if rows else int(metrics.get(prefix + "retrieval_pool", 0))
        evaluations.append({"split": split, "label": "macro", "value": metrics[prefix + "macro_auroc"],
                            "ci_low": metrics.get(prefix + "macro_auroc_ci_low", float("nan")),
                            "ci_high": metrics.get(prefix + "macro_auroc_ci_high", float("nan")), "n": n})
        evaluations += [{"split": split, "label": r.label, "value": float(r.auroc), "ci_low": float(r.auroc_ci_low),
                         "ci_high": float(r.auroc_ci_high), "n": int(r.n)} for r in rows]
    return {"model_uri": f"models:/{version.name}/{version.version}", "description": version.description or "",
            "data_hash": run.data.tags.get("vlp3d.data_hash", ""), "evaluations": evaluations}
