"""Where a sweep's time goes: runs a sweep (the demo's by default) and prints, per trial, its wall time
split into start-up, data, steps and evaluation, and the sweep's total wall time.

- wall: Tune's `time_total_s` of the trial (from the trial function's start to its last report);
- steps and data: from the trial's MLflow child run, the loop's own step times (`train/step_time_s`,
  `train/time/data_wait_s`, averages per logging window, times the steps of the window);
- start-up: the rest of `pretrain` (the MLflow run, shard resolution, datasets, model build, the first-step
  FLOP count, checkpoints and the model logged at the end), i.e. `pretrain_s - steps`;
- evaluation: both evaluations (selection and report split) and the replicates.

    make demo    # the shards the demo sweep reads
    .venv/bin/python benchmarks/bench_sweep.py --name bench-scaling-demo                 # the demo sweep
    .venv/bin/python benchmarks/bench_sweep.py --name bench-tiny 'tune.space={"model.size" = ["tiny"], "train.max_steps" = [5, 10]}'

Measure on a quiet machine: the figures are wall times.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from vlp3d.config import load_config
from vlp3d.table import format_table

ROOT = Path(__file__).resolve().parents[1]


def window_seconds(client, run_id: str, key: str, steps: int) -> float:
    """Sum over logging windows of (average per step) x (steps in the window)."""
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    total, previous = 0.0, 0
    for metric in history:
        total += metric.value * (min(metric.step, steps) - previous)
        previous = min(metric.step, steps)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.max_steps=10")
    parser.add_argument("--config", default=str(ROOT / "configs" / "sweeps" / "demo.toml"))
    parser.add_argument("--name", default=f"bench-sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from vlp3d.platform.sweep import run_sweep

    cfg = load_config(args.config, args.overrides)
    started = time.time()
    result = run_sweep(cfg, name=args.name)
    wall = time.time() - started
    client = MlflowClient(tracking_uri=result.tracking_uri)
    rows, startup_shares = [], []
    for trial in result.table.to_dict("records"):
        steps = int(trial["steps"]) if trial["steps"] == trial["steps"] else 0
        run_id = trial["mlflow_run_id"]
        step_s = window_seconds(client, run_id, "train/step_time_s", steps) if run_id else math.nan
        data_s = window_seconds(client, run_id, "train/time/data_wait_s", steps) if run_id else math.nan
        startup = trial["pretrain_s"] - step_s
        startup_shares.append(startup / trial["wall_s"])
        rows.append([trial["trial_id"], trial["label"], trial["status"], f"{trial['wall_s']:.1f}", f"{startup:.1f}",
                     f"{data_s:.1f}", f"{step_s - data_s:.1f}", f"{trial['evaluate_s']:.1f}",
                     f"{startup / trial['wall_s']:.0%}"])
    print(format_table(rows, ["trial", "config", "status", "wall s", "start-up s", "data s", "steps s",
                              "evaluation s", "start-up share"], title=f"sweep {result.name}: per trial"))
    finite = [s for s in startup_shares if s == s]
    print(f"{len(rows)} trials in {wall:.0f} s; start-up share of a trial's wall time: "
          f"median {sorted(finite)[len(finite) // 2]:.0%}, max {max(finite):.0%}" if finite else "no trial finished")


if __name__ == "__main__":
    main()
