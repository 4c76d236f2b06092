"""Every pretraining method on the phantom corpus, one table: held-out zero-shot AUROC and retrieval,
over several seeds, at equal steps x global batch or at equal wall-clock time.

Runs synth (once, with radiographs for UniMedI) -> prepare -> pretrain -> evaluate -> register for
each config and seed in one work folder (shared corpus, shards per preprocessing spec, one MLflow
store), then prints a table of means with 95% t-intervals over seeds (also written to
WORKDIR/methods.md and methods.json, one record per run).

Budgets (`--budget`):
- `steps` (default): every config at the same `train.max_steps` x `train.global_batch` (set them with
  overrides; the demo configs differ, so pass e.g. train.max_steps=300 train.global_batch=16).
- `time`: every config gets the wall-clock training time of the first config (CLIP by default) at
  the given steps: a 20-step probe run per config measures its seconds per step, and its
  `train.max_steps` is set so its training takes as long (warm-up scaled alike).

Per run the final per-term gradient shares on the image encoder (`train/grad_share/<term>`) are
recorded, which tell whether the term that defines the shared embedding drowns in the others.

    .venv/bin/python benchmarks/bench_methods.py --seeds 0 1 2 train.max_steps=300 train.global_batch=16
    .venv/bin/python benchmarks/bench_methods.py --configs configs/demo.toml configs/mg3d_demo.toml \
        --budget time --seeds 0 train.max_steps=100
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from vlp3d.config import replace
from vlp3d.jobs.demo import demo_config, run_pipeline
from vlp3d.table import format_table

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = [  # CLIP first (the time budget's reference)
    "configs/demo.toml",
    "configs/unimedi_demo.toml",
    "configs/t3d_demo.toml",
    "configs/mg3d_demo.toml",
    "configs/mg3d_demo_no_reconstruction.toml",
    "configs/mg3d_demo_no_interpatient.toml",
]
PROBE_STEPS = 20


def interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t-interval of the mean over seeds (low = high = mean for one seed)."""
    from scipy import stats

    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def _fmt(values: list[float]) -> str:
    mean, low, high = interval(values)
    return f"{mean:.3f}" if len(values) < 2 else f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def _grad_shares(result) -> dict[str, float]:
    import mlflow

    run = mlflow.MlflowClient(result.tracking_uri).get_run(result.trained.run_id)
    return {k.removeprefix("train/grad_share/"): v for k, v in run.data.metrics.items()
            if k.startswith("train/grad_share/")}


def seconds_per_step(cfg, n: int, radiographs: bool) -> float:
    """Training seconds per step of `cfg`, from a short run (its start-up excluded: two probe lengths)."""
    times = []
    for steps in (PROBE_STEPS // 2, PROBE_STEPS):
        probe = dataclasses.replace(
            replace(cfg, train={"max_steps": steps, "warmup_steps": 1, "checkpoint_every": steps, "val_every": 0,
                                "grad_share_every": 0}), name=f"{cfg.name}-probe{steps}")
        times.append(dict(run_pipeline(probe, n, radiographs=radiographs).timings)["pretrain"])
    return max(1e-3, (times[1] - times[0]) / (PROBE_STEPS - PROBE_STEPS // 2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="config files, run in this order")
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks/results/methods"), help="output folder")
    parser.add_argument("--n", type=int, default=500, help="phantom volumes (default 500)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed values (default: 0)")
    parser.add_argument("--budget", choices=("steps", "time"), default="steps",
                        help="equal steps x batch (default) or equal wall-clock training time")
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every config")
    args = parser.parse_args(argv)

    # every config is validated before any work starts
    configs = [(path, demo_config(str(ROOT / path) if not Path(path).is_absolute() else path, args.workdir,
                                  args.overrides)) for path in args.configs]
    # one corpus for every config: with radiographs if any method trains on 2D images (written once;
    # adding them later would rewrite the corpus under the shards already prepared from it)
    from vlp3d.objectives import objective_class

    radiographs = any(objective_class(cfg.objective.name).uses_2d for _, cfg in configs)
    if args.budget == "time":
        reference = None
        timed = []
        for path, cfg in configs:
            per_step = seconds_per_step(cfg, args.n, radiographs)
            reference = reference or per_step * cfg.train.max_steps
            steps = max(PROBE_STEPS, round(reference / per_step))
            warmup = round(cfg.train.warmup_steps * steps / cfg.train.max_steps)
            print(f"{Path(path).stem}: {per_step:.2f} s/step -> {steps} steps in {reference:.0f} s", flush=True)
            timed.append((path, replace(cfg, train={"max_steps": steps, "warmup_steps": warmup,
                                                    "checkpoint_every": steps})))
        configs = timed
    # runs already in WORKDIR/methods.json (same config, seed, budget, steps and batch) are reused, so a
    # benchmark stopped part-way, or extended by more seeds or configs, only runs what is missing
    store = Path(args.workdir, "methods.json")
    kept = json.loads(store.read_text()) if store.is_file() else []
    records = []
    for path, cfg in configs:
        for seed in args.seeds:
            key = (path, seed, args.budget, cfg.train.max_steps, cfg.train.global_batch)
            done = [r for r in kept if (r["config"], r["seed"], r["budget"], r["steps"], r["global_batch"]) == key]
            if done:
                print(f"{Path(path).stem} seed {seed}: reusing the run in {store}", flush=True)
                records.append(done[-1])
                continue
            run_cfg = dataclasses.replace(replace(cfg, train={"seed": seed}), name=f"{cfg.name}-seed{seed}")
            started = time.time()
            result = run_pipeline(run_cfg, args.n, radiographs=radiographs)
            m = result.report.result.metrics
            timings = dict(result.timings)
            records.append({
                "config": path, "seed": seed, "objective": cfg.objective.name, "budget": args.budget,
                "encoder": f"{cfg.model.image_encoder}/{cfg.model.size}",
                "steps": cfg.train.max_steps, "global_batch": cfg.train.global_batch,
                "terms": {k: v for k, v in result.trained.metrics.items() if k.startswith("loss/")},
                "grad_share": _grad_shares(result),
                "macro_auroc": m["macro_auroc"], "ci": [m.get("macro_auroc_ci_low"), m.get("macro_auroc_ci_high")],
                "heldout_prompts_auroc": m.get("prompts/heldout/macro_auroc"),
                "v2r_r1": m["v2r/recall_at_1"], "v2r_r5": m["v2r/recall_at_5"], "v2r_r10": m["v2r/recall_at_10"],
                "r2v_r5": m["r2v/recall_at_5"], "pool": int(m["retrieval_pool"]), "pretrain_s": timings["pretrain"],
                "total_s": time.time() - started, "model_uri": result.trained.model_uri,
            })
            kept.append(records[-1])
            store.write_text(json.dumps(kept, indent=2))

    rows = []
    for path, cfg in configs:
        runs = [r for r in records if r["config"] == path]
        shares = {}
        for r in runs:
            for term, share in r["grad_share"].items():
                shares.setdefault(term, []).append(share)
        rows.append([Path(path).stem, cfg.objective.name, f"{cfg.train.max_steps}x{cfg.train.global_batch}",
                     len(runs), _fmt([r["macro_auroc"] for r in runs]),
                     _fmt([r["heldout_prompts_auroc"] for r in runs if r["heldout_prompts_auroc"] is not None] or [math.nan]),
                     _fmt([r["v2r_r5"] for r in runs]), _fmt([r["r2v_r5"] for r in runs]),
                     f"{np.mean([r['pretrain_s'] for r in runs]):.0f} s",
                     " ".join(f"{t} {np.mean(v):.2f}" for t, v in shares.items()) or "-"])
    pool = records[0]["pool"] if records else 0
    headers = ["config", "objective", "steps x batch", "seeds", "zero-shot macro AUROC (mean [95% t-CI])",
               "heldout prompts", f"v->r R@5 (pool {pool})", "r->v R@5", "pretrain", "final grad shares"]
    table = format_table(rows, headers, title=f"held-out (valid split, unseen patients), budget: {args.budget}")
    print("\n" + table)
    md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    md += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    Path(args.workdir, "methods.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
