"""Job: fine-tune a registered pretrained encoder on a downstream task (Ray Train), tracked in MLflow."""

from __future__ import annotations

import argparse
import math

from vlp3d.jobs.common import (
    add_config_arguments,
    config_keys_epilog,
    resolve_config_with_sources,
    run_main,
    run_store,
)
from vlp3d.jobs.plan import add_dry_run_argument, config_text, print_plan, training_rows
from vlp3d.table import format_table


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = (
        "Fine-tune the image encoder of a registered pretrained model on a labelled task with Ray Train: "
        "finetune.task = 'segmentation' (the shards' voxel label maps; MONAI SwinUNETR for swin3d, UNETR for "
        "vit3d, a small U-Net decoder for resnet3d; Dice + cross-entropy; sliding-window inference; per-class "
        "Dice and HD95 next to trivial baselines) or 'classification' (the shards' labels; encoder + linear/MLP "
        "head; BCE; per-label AUROC). finetune.init = 'random' trains the same network from scratch, "
        "finetune.label_fraction uses a nested share of the training patients. The run is tracked in MLflow "
        "and the fine-tuned model registered (finetune.registered_model, default <pretrained name>-<task>) "
        "with the tag vlp3d.pretrained_model = models:/NAME/VERSION it started from. For label-efficiency "
        "curves, sweep finetune.label_fraction x finetune.init with `vlp3d sweep` (configs/sweeps/"
        "label_efficiency.toml)."
    )
    parser.epilog = config_keys_epilog()
    add_config_arguments(parser, config_required=False)
    parser.add_argument("--model", metavar="URI",
                        help="pretrained model, models:/NAME@ALIAS or models:/NAME/VERSION (sets finetune.model), "
                             "e.g. models:/vlp3d-clip@champion after `vlp3d demo`")
    parser.add_argument("--run-name", help="Ray Train / MLflow run name; re-use one to resume it from its last checkpoint")
    parser.add_argument("--local", action="store_true",
                        help="run the training loop in this process without Ray (one rank; the same task, loop and "
                             "losses as one Ray Train worker): for debugging a step with pdb or a profiler, and for "
                             "tests. cluster.num_workers and train.max_failures are ignored; checkpoints still go "
                             "under tracking.storage/<run name>/ and a rerun with --local --run-name resumes")
    add_dry_run_argument(parser)
    return parser


def summary(result) -> str:
    """The per-class (segmentation) or per-label (classification) table of a finished run."""
    table = result.table
    if "dice" in table:
        columns = [c for c in ("class", "volumes", "dice", "hd95_mm", "dice_atlas", "dice_everywhere") if c in table]
        title = "segmentation on the held-out split (Dice; HD95 in mm, median over volumes; trivial baselines)"
    else:
        columns, title = ["label", "positives", "auroc"], "classification on the held-out split (AUROC)"
    rows = [[("inf" if isinstance(v, float) and math.isinf(v) else v) for v in row]
            for row in table[columns].itertuples(index=False)]
    return format_table(rows, columns, title=title)


def run(args: argparse.Namespace) -> int:
    cfg, sources = resolve_config_with_sources(args, [f"finetune.model={args.model}"] if args.model else None)
    if args.dry_run:
        print(config_text(cfg, sources, args.config))
        ft = cfg.finetune
        rows = training_rows(cfg, ft.max_steps, ft.global_batch, ft.label_fraction, "finetune.max_steps",
                             "finetune.global_batch")
        rows[1][1] = rows[1][1].replace("training volumes", "labelled training volumes")
        if args.local:
            rows[-1] = ["Ray resources", "none: --local runs one rank in this process"]
        print_plan("finetune", [["task", f"{ft.task}, init {ft.init}, from {ft.model or '(finetune.model not set)'}"],
                                *rows, *run_store(cfg, args, sources, dry_run=True)])
        return 0
    from vlp3d.platform.finetune import finetune

    run_store(cfg, args, sources)
    result = finetune(cfg, run_name=args.run_name, local=args.local)
    print(summary(result))
    print(f"run {result.run_name} (mlflow {result.run_id}) finished in {result.elapsed_s:.0f} s")
    print(f"fine-tuned model: {result.model_uri} (from {result.pretrained_uri})")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
