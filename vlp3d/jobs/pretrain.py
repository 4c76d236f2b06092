"""Job: pretrain on Ray Train (DDP) and log the model to MLflow."""

from __future__ import annotations

import argparse

from vlp3d.jobs.common import (
    add_config_arguments,
    config_keys_epilog,
    resolve_config_with_sources,
    run_main,
    run_store,
)
from vlp3d.jobs.plan import add_dry_run_argument, config_text, print_plan, training_rows


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = (
        "Pretrain with Ray Train: cluster.num_workers DDP workers read disjoint parts of the shards "
        "(data.shards), train the image encoder against frozen report embeddings with a global-batch "
        "CLIP loss, checkpoint every train.checkpoint_every steps and survive train.max_failures worker "
        "failures. The run (params, tags, metrics) and the final model (pyfunc, registered) go to MLflow."
    )
    parser.epilog = config_keys_epilog()
    add_config_arguments(parser, config_required=False)
    parser.add_argument("--run-name", help="Ray Train / MLflow run name; re-use one to resume it from its last checkpoint")
    parser.add_argument("--local", action="store_true",
                        help="run the training loop in this process without Ray (one rank; the same task, loop and "
                             "losses as one Ray Train worker): for debugging a step with pdb or a profiler, and for "
                             "tests. cluster.num_workers and train.max_failures are ignored; checkpoints still go "
                             "under tracking.storage/<run name>/ and a rerun with --local --run-name resumes")
    add_dry_run_argument(parser)
    return parser


def registered_name(cfg) -> str:
    return cfg.tracking.registered_model or f"vlp3d-{cfg.objective.name}"  # = platform.mlflow.registry's


def run(args: argparse.Namespace) -> int:
    cfg, sources = resolve_config_with_sources(args)
    if args.dry_run:
        print(config_text(cfg, sources, args.config))
        rows = training_rows(cfg, cfg.train.max_steps, cfg.train.global_batch, cfg.data.fraction,
                             "train.max_steps", "train.global_batch")
        if args.local:
            rows[-1] = ["Ray resources", "none: --local runs one rank in this process"]
        print_plan("pretrain", [["objective", cfg.objective.name], *rows, *run_store(cfg, args, sources, dry_run=True),
                                ["registered model", f"{registered_name(cfg)} (a new version)"]])
        return 0
    from vlp3d.platform.pretrain import pretrain

    run_store(cfg, args, sources)  # logs the store it writes to
    result = pretrain(cfg, run_name=args.run_name, local=args.local)
    print(f"run {result.run_name} (mlflow {result.run_id}) finished in {result.elapsed_s:.0f} s; "
          f"final loss {result.metrics.get('loss', float('nan')):.3f}")
    print(f"checkpoint: {result.checkpoint_dir}")
    if result.model_uri.startswith("models:/"):
        name, version = result.model_uri.removeprefix("models:/").rsplit("/", 1)
        print(f"registered: {result.model_uri} (aliases unchanged; to make it @champion when it beats the holder: "
              f"vlp3d promote {name} --challenger {version} --shards {result.shard_dir})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
