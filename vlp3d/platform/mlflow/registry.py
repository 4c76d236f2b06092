"""The model registry: registered names, the versions of a run, versions by number or alias, and `promote`
(the one implementation: `vlp3d promote`/`register` and the demo reach it through
vlp3d.platform.evaluate.promote, which first compares the two versions)."""

from __future__ import annotations

import mlflow

from vlp3d.config import ExperimentConfig
from vlp3d.errors import InputError
from vlp3d.platform.mlflow.card import PROMOTION_TAG, update_model_card
from vlp3d.platform.mlflow.store import client
from vlp3d.redact import redact

__all__ = ["PROMOTION_TAG", "alias_holder", "finetuned_name", "model_version", "promote", "registered_name",
           "registered_versions"]


def registered_name(cfg: ExperimentConfig) -> str:
    return cfg.tracking.registered_model or f"vlp3d-{cfg.objective.name}"


def finetuned_name(pretrained_name: str, task: str, cfg: ExperimentConfig) -> str:
    """The registered name of a fine-tuned model: `finetune.registered_model`, else `<pretrained name>-<task>`."""
    return cfg.finetune.registered_model or f"{pretrained_name}-{task}"


def registered_versions(uri_: str, run_id: str) -> list:
    """The registered model versions logged by a run (none for a sweep trial)."""
    return list(client(uri_).search_model_versions(f"run_id = '{run_id}'"))


def model_version(uri_: str, model_uri: str):
    """`models:/NAME/VERSION` or `models:/NAME@ALIAS` -> its ModelVersion; a ValueError naming the store otherwise."""
    mlflow_client = client(uri_)
    reference = model_uri.removeprefix("models:/")
    try:
        if "@" in reference:
            name, alias = reference.split("@", 1)
            return mlflow_client.get_model_version_by_alias(name, alias)
        name, version = reference.rsplit("/", 1)
        return mlflow_client.get_model_version(name, version)
    except (ValueError, mlflow.exceptions.MlflowException) as err:
        message = getattr(err, "message", str(err))
        raise InputError(redact(f"no registered model version {model_uri} in the MLflow store {uri_} "
                                f"({message}); list them with `mlflow models` or the MLflow UI")) from None


def alias_holder(uri_: str, name: str, alias: str):
    """The version holding `alias` of registered model `name`, or None."""
    try:
        return client(uri_).get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def promote(uri_: str, model_uri: str, alias: str = "champion", comparison=None, metric: str = "",
            split: str = "", split_hash: str = "", force: bool = False) -> tuple[bool, str]:
    """Give `alias` to `models:/NAME/VERSION` when nobody holds it, when `force`, or when the
    challenger beat the holder beyond the paired bootstrap interval of the difference (`comparison`:
    vlp3d.evaluation.metrics.PairedDifference, its lower bound > 0). The decision, both figures, the
    interval and the split hash are recorded as tags of the challenger version (`vlp3d.promotion.*`)."""
    mlflow_client = client(uri_)
    challenger = model_version(uri_, model_uri)
    name, version = challenger.name, challenger.version
    current = alias_holder(uri_, name, alias)
    record = {"alias": alias, "metric": metric, "split": split, "split_hash": split_hash}
    if current is None or current.version == version or force:
        reason = ("forced" if force and current is not None and current.version != version else
                  "already holds it" if current is not None and current.version == version else "no previous holder")
        moved = current is None or current.version != version
        decision = "promoted" if moved else "kept"
        message = f"models:/{name}@{alias} -> version {version} ({reason})"
    elif comparison is None:
        raise InputError(f"models:/{name}@{alias} is version {current.version}: moving it to version {version} needs "
                         f"both evaluated on the same split (`vlp3d promote {name} --challenger {version} --shards ...`)"
                         " or --force")
    else:
        moved = comparison.better
        decision = "promoted" if moved else "rejected"
        level = f"{comparison.level:.0%}"
        figures = (f"{metric} v{version} {comparison.challenger:.4f} vs v{current.version} {comparison.champion:.4f}: "
                   f"difference {comparison.difference:+.4f}, {level} paired bootstrap interval "
                   f"[{comparison.ci_low:+.4f}, {comparison.ci_high:+.4f}] on split '{split}' ({split_hash})")
        reason = ("the interval is above zero" if moved else
                  "the interval is below zero (the challenger is worse)" if comparison.ci_high < 0 else
                  "the interval includes zero (no difference beyond chance)" if comparison.ci_low <= 0 else
                  "no finite resample")
        message = (f"{figures}; {reason}: " + (f"models:/{name}@{alias} -> version {version}" if moved
                                                else f"{alias} stays at version {current.version}"))
        record.update({"champion_version": current.version, "champion_value": f"{comparison.champion:.6g}",
                       "challenger_value": f"{comparison.challenger:.6g}",
                       "difference": f"{comparison.difference:.6g}", "ci_low": f"{comparison.ci_low:.6g}",
                       "ci_high": f"{comparison.ci_high:.6g}", "ci_level": level,
                       "bootstrap": str(comparison.n_boot)})
        reason = message
    record.update({"decision": decision, "reason": reason})
    record = {f"{PROMOTION_TAG}.{key}": str(value) for key, value in record.items() if value != ""}
    for key in challenger.tags:  # an earlier decision's figures must not mix with this one's
        if key.startswith(PROMOTION_TAG + ".") and key not in record:
            mlflow_client.delete_model_version_tag(name, version, key)
    for key, value in record.items():
        mlflow_client.set_model_version_tag(name, version, key, value)
    if moved:
        mlflow_client.set_registered_model_alias(name, alias, version)
    update_model_card(uri_, name, version)
    return moved, message
