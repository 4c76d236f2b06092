"""Every pretraining method on the phantom corpus, one table: held-out zero-shot AUROC and retrieval.

Runs synth (once, with radiographs for UniMedI) -> prepare -> pretrain -> evaluate -> register for
each config in one work folder (shared corpus, shards per preprocessing spec, one MLflow store), then
prints a Markdown table (also written to WORKDIR/methods.md and methods.json).

    .venv/bin/python benchmarks/bench_methods.py                      # all demo configs (~45 min, 2 cores)
    .venv/bin/python benchmarks/bench_methods.py --configs configs/mg3d_demo.toml train.max_steps=50
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vlp3d.jobs.demo import demo_config, run_pipeline
from vlp3d.table import format_table

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = [  # unimedi first: its corpus (with radiographs) serves every other config
    "configs/unimedi_demo.toml",
    "configs/t3d_demo.toml",
    "configs/mg3d_demo.toml",
    "configs/demo.toml",
    "configs/mg3d_demo_no_reconstruction.toml",
    "configs/mg3d_demo_no_interpatient.toml",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="config files, run in this order")
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks/results/methods"), help="output folder")
    parser.add_argument("--n", type=int, default=500, help="phantom volumes (default 500)")
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every config")
    args = parser.parse_args(argv)

    # every config is validated before any work starts
    configs = [(path, demo_config(str(ROOT / path) if not Path(path).is_absolute() else path, args.workdir,
                                  args.overrides)) for path in args.configs]
    rows, records = [], []
    for path, cfg in configs:
        started = time.time()
        result = run_pipeline(cfg, args.n)
        m = result.report.result.metrics
        pool = int(m["retrieval_pool"])
        timings = dict(result.timings)
        record = {
            "config": path, "objective": cfg.objective.name, "encoder": f"{cfg.model.image_encoder}/{cfg.model.size}",
            "steps": cfg.train.max_steps, "global_batch": cfg.train.global_batch,
            "terms": {k: v for k, v in result.trained.metrics.items() if k.startswith("loss/")},
            "macro_auroc": m["macro_auroc"], "ci": [m.get("macro_auroc_ci_low"), m.get("macro_auroc_ci_high")],
            "v2r_r1": m["v2r/recall_at_1"], "v2r_r5": m["v2r/recall_at_5"], "v2r_r10": m["v2r/recall_at_10"],
            "r2v_r5": m["r2v/recall_at_5"], "pool": pool, "pretrain_s": timings["pretrain"],
            "total_s": time.time() - started, "model_uri": result.trained.model_uri,
        }
        records.append(record)
        rows.append([Path(path).stem, cfg.objective.name, record["encoder"], f"{cfg.train.max_steps}x{cfg.train.global_batch}",
                     f"{m['macro_auroc']:.3f} [{record['ci'][0]:.3f}, {record['ci'][1]:.3f}]",
                     f"{record['v2r_r1']:.3f} / {record['v2r_r5']:.3f} / {record['v2r_r10']:.3f}",
                     f"{record['r2v_r5']:.3f}", f"{timings['pretrain']:.0f} s"])
        Path(args.workdir, "methods.json").write_text(json.dumps(records, indent=2))
    pool = records[0]["pool"] if records else 0
    headers = ["config", "objective", "encoder", "steps x batch", "zero-shot macro AUROC [95% CI]",
               f"v->r R@1/5/10 (pool {pool})", "r->v R@5", "pretrain"]
    chance = ["chance", "", "", "", "0.500", f"{1 / max(1, pool):.3f} / {min(1, 5 / max(1, pool)):.3f} / "
              f"{min(1, 10 / max(1, pool)):.3f}", f"{min(1, 5 / max(1, pool)):.3f}", ""]
    table = format_table(rows + [chance], headers, title="held-out (valid split, unseen patients)")
    print("\n" + table)
    md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    md += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows + [chance]]
    Path(args.workdir, "methods.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
