"""Checks of a built config beyond each key's type: value ranges (`RANGES`, also applied to sweep
values), keys that must be local folders, and keys that need each other."""

from __future__ import annotations

from vlp3d.config.experiment import ExperimentConfig
from vlp3d.config.fields import ConfigError, is_uri
from vlp3d.config.schema import get_key
from vlp3d.redact import redact

# (low, high, low included) per key whose type alone does not bound it
RANGES: dict[str, tuple[float, float, bool, str]] = {
    "data.fraction": (0.0, 1.0, False, "the share of training patients used (nested subsets)"),
    "tune.report_share": (0.0, 1.0, False, "the share of held-out patients carved out as the report split"),
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



# keys that must name a local (or mounted) path: what reads or writes them needs a POSIX folder
LOCAL_ONLY = {
    "tracking.workdir": "it holds the local MLflow store (sqlite) and the sweep folders; put checkpoints on "
                        "shared storage with tracking.storage=URI and runs on an MLflow server with "
                        "tracking.tracking_uri (or MLFLOW_TRACKING_URI)",
    "data.corpus": "prepare opens the corpus's volume files by path; mount the bucket (e.g. s3fs, EFS) and give "
                   "the mounted folder (the shards, data.shards / prepare --out, may be a URI)",
}


def check_ranges(cfg: ExperimentConfig) -> None:
    """Raise ConfigError, naming the key, unless `cfg` passes every check above."""
    for key, why in LOCAL_ONLY.items():
        if is_uri(get_key(cfg, key)):
            raise ConfigError(f"{key} = {redact(get_key(cfg, key))!r} must be a local folder, not a URI: {why}.")
    if cfg.train.balance_terms and not cfg.train.grad_share_every:
        raise ConfigError("train.balance_terms = true needs train.grad_share_every > 0 (the steps at which the "
                          "terms' gradient shares are measured and the multipliers move), e.g. 50.")
    for key in RANGES:
        check_value_range(key, get_key(cfg, key))

