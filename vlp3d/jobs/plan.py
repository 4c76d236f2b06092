"""`--dry-run` of pretrain, finetune, sweep and submit: the resolved config with where each value
came from, and the plan (steps, epochs, trials, FLOPs, Ray resources, the store, the upload), with no
side effect: nothing imports Ray or MLflow here, no run is started and no folder is created."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vlp3d.config import ExperimentConfig, to_toml

log = logging.getLogger(__name__)

DRY_RUN_HELP = ("print the resolved config (where each value came from) and the plan (steps, epochs, FLOPs, "
                "Ray resources, the MLflow store) and exit: nothing is started, written or logged")


def add_dry_run_argument(parser: argparse.ArgumentParser, help: str = DRY_RUN_HELP) -> None:
    parser.add_argument("--dry-run", action="store_true", help=help)


def config_text(cfg: ExperimentConfig, sources: dict[str, str], config: str | None) -> str:
    """The resolved config as TOML; each value that is not a plain default says where it came from."""
    origin = f"defaults < {config} < command-line overrides" if config else "defaults < command-line overrides"
    return (f"# resolved config ({origin}); '# ...' says where a value came from: config file, override, "
            f"a method's default or $VLP3D_WORKDIR (unmarked: the plain default)\n{to_toml(cfg, sources)}")


def training_volumes(cfg: ExperimentConfig, fraction: float) -> tuple[int | None, str]:
    """Training volumes the run would read (counted in local shards prepared for this config), or
    None with the reason it is not known before the run."""
    from vlp3d import storage

    shards = cfg.data.shards
    if not shards:
        return None, "data.shards is empty"
    if storage.is_uri(shards):
        return None, f"shards on {shards.split('://')[0]}:// are not read by a dry run"
    if not Path(shards).is_dir():
        return None, f"no folder {shards} yet (prepare writes it)"
    try:
        from vlp3d.data.shards import count_rows, resolve_shard_dir, spec_from_config

        shard_dir = resolve_shard_dir(shards, spec_from_config(cfg).hash)
        return count_rows(shard_dir, cfg.data.train_split, fraction), str(shard_dir)
    except (OSError, ValueError) as err:
        return None, str(err).splitlines()[0]


def encoder_flops(cfg: ExperimentConfig) -> tuple[int, float] | None:
    """(parameters, forward FLOPs per volume) of the image encoder at data.shape, counted by torch on
    the meta device (no memory, no compute); None when the encoder does not build there."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vlp3d.encoders.registry import build_image_encoder

    try:
        with torch.device("meta"):
            encoder = build_image_encoder(cfg.model.image_encoder, cfg.model.size, img_size=tuple(cfg.data.shape))
            volume = torch.zeros(1, 1, *cfg.data.shape)
            with FlopCounterMode(display=False) as counter:
                encoder(volume)
        return sum(p.numel() for p in encoder.parameters()), float(counter.get_total_flops())
    except Exception as err:  # noqa: BLE001 - an estimate only: say why there is none
        log.debug("no FLOP estimate for %s: %s", cfg.model.image_encoder, err)
        return None


def resources(cfg: ExperimentConfig) -> str:
    gpu = " + 1 GPU" if cfg.cluster.use_gpu else ""
    where = cfg.cluster.address or "$RAY_ADDRESS, else a local Ray"
    return (f"{cfg.cluster.num_workers} Ray Train workers x ({cfg.cluster.cpus_per_worker:g} CPU{gpu}) on {where}")


def training_rows(cfg: ExperimentConfig, steps: int, global_batch: int, fraction: float,
                  steps_key: str, batch_key: str) -> list[list[str]]:
    """Plan rows of a training run: steps, volumes seen, epochs, FLOPs, Ray resources."""
    seen = steps * global_batch
    volumes, where = training_volumes(cfg, fraction)
    epochs = f"{seen / volumes:.1f} over {volumes} training volumes ({where})" if volumes else f"unknown: {where}"
    rows = [["steps", f"{steps} ({steps_key}) x global batch {global_batch} ({batch_key}) = {seen} volumes"],
            ["epochs", epochs]]
    counted = encoder_flops(cfg)
    if counted:
        params, forward = counted
        rows.append(["image encoder", f"{cfg.model.image_encoder} {cfg.model.size}: {params / 1e6:.2f} M parameters, "
                                      f"{forward / 1e9:.2f} GFLOPs forward per {'x'.join(map(str, cfg.data.shape))} volume"])
        rows.append(["training FLOPs", f"~{3 * forward * seen:.2e} (image encoder only: 3 x forward x volumes seen)"])
    rows.append(["Ray resources", resources(cfg)])
    return rows


def print_plan(title: str, rows: list[list[str]]) -> None:
    width = max(len(key) for key, _ in rows)
    print(f"\ndry run: {title} (nothing started, written or logged)")
    for key, value in rows:
        print(f"  {key.ljust(width)}  {value}")
