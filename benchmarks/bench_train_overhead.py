"""What Ray Train costs: `vlp3d pretrain` with one Ray Train worker against the same loop in one
process without Ray (`vlp3d pretrain --local`, LocalRuntime) and against a plain PyTorch loop, on
the same model, data, batch and threads (one per process), and 1 -> 2 workers at the same global
batch (strong scaling: 1 core -> 2 cores).

The plain loop reads the same training shards into memory once and runs `engine.train_step` on
shuffled batches, with the same augmentation; `vlp3d pretrain` (either runtime) runs everything it runs in
production (Ray Data ingest in a fixed order, DDP wrapper, the NaN guard's all-reduce, rank-0
MLflow logging every step, checkpoints every `--checkpoint-every` steps). Step time is the
steady state: the time between the `--warmup`-th and the last step (from the loop's own clock,
and for Ray from the timestamps of the per-step MLflow metrics), so start-up (worker group,
dataset, first-step FLOP counting) is left out and reported separately.

    .venv/bin/python benchmarks/bench_train_overhead.py                  # ~4 min on 2 cores, after the corpus is prepared
    .venv/bin/python benchmarks/bench_train_overhead.py --steps 60 model.size=small
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from vlp3d.config import replace
from vlp3d.jobs.demo import demo_config
from vlp3d.table import format_table

ROOT = Path(__file__).resolve().parents[1]


def plain_loop(cfg, shard_dir: Path, steps: int, warmup: int, threads: int) -> dict:
    """The same training step in one process, without Ray: data held in memory as tensors."""
    import pyarrow.parquet as pq

    from vlp3d.data.shards import shard_files
    from vlp3d.train.batches import augment, to_model_batch
    from vlp3d.train.step import train_step
    from vlp3d.train.tasks.pretrain import build_optimizer, build_pretrainer, build_scheduler

    torch.set_num_threads(threads)
    table = pq.read_table(shard_files(shard_dir, "ct"), columns=["image", "report_embedding", "split"])
    table = table.filter(np.asarray(table["split"]) == cfg.data.train_split)
    # Ray's tensor extension columns read back as flat lists: shape them as the shards' volumes
    images = torch.from_numpy(np.stack(table["image"].to_numpy(zero_copy_only=False)).reshape(-1, *cfg.data.shape))
    texts = torch.from_numpy(np.stack(table["report_embedding"].to_numpy(zero_copy_only=False)))
    pretrainer, weights = build_pretrainer(cfg, text_dim=texts.shape[-1])
    optimizer = build_optimizer(pretrainer, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    generator = torch.Generator().manual_seed(0)
    batch_size, times = cfg.train.global_batch, []
    order = torch.randperm(len(images), generator=generator)
    cursor = 0
    for _ in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(images), generator=generator), 0
        rows = order[cursor:cursor + batch_size]
        cursor += batch_size
        batch = to_model_batch({"image": images[rows], "report_embedding": texts[rows]}, torch.device("cpu"))
        batch["volume"] = augment(batch["volume"], generator)
        train_step(pretrainer, weights, batch, optimizer, scheduler, cfg.train.precision)
        times.append(time.perf_counter())
    step_s = (times[-1] - times[warmup - 1]) / (steps - warmup)
    return {"step_s": step_s, "samples_per_s": batch_size / step_s}


def ray_run(cfg, name: str, warmup: int, local: bool = False) -> dict:
    from mlflow.tracking import MlflowClient

    from vlp3d.platform.pretrain import pretrain
    from vlp3d.platform.runtime import tracking_uri

    started = time.time()
    if local:
        torch.set_num_threads(1)  # as a Ray Train worker with cpus_per_worker < 2
    result = pretrain(cfg, run_name=name, progress=None, local=local)
    wall = time.time() - started
    history = sorted(MlflowClient(tracking_uri(cfg)).get_metric_history(result.run_id, "train/loss"),
                     key=lambda m: m.step)
    stamps = {m.step: m.timestamp / 1000 for m in history}
    steps = cfg.train.max_steps
    step_s = (stamps[steps] - stamps[warmup]) / (steps - warmup)
    return {"step_s": step_s, "samples_per_s": cfg.train.global_batch / step_s, "wall_s": wall,
            "startup_s": wall - step_s * steps}


def main(argv: list[str] | None = None) -> int:
    from vlp3d.data.phantom import synthesize
    from vlp3d.data.shards import resolve_shard_dir, spec_from_config
    from vlp3d.platform.prepare import prepare

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks/results/train_overhead"), help="output folder")
    parser.add_argument("--n", type=int, default=96, help="phantom volumes (default 96)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per measurement (default 60)")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the steady state (default 10)")
    parser.add_argument("--checkpoint-every", type=int, default=20, help="Ray runs' checkpoint interval")
    parser.add_argument("overrides", nargs="*", help="section.key=value on top of configs/demo.toml")
    args = parser.parse_args(argv)

    base = demo_config(str(ROOT / "configs/demo.toml"), args.workdir, [
        f"train.max_steps={args.steps}", "train.log_every=1", f"train.checkpoint_every={args.checkpoint_every}",
        "train.val_every=0", *args.overrides])
    if not (Path(base.data.corpus) / "_synth.json").is_file():
        synthesize(base.data.corpus, args.n, seed=0)
        Path(base.data.corpus, "_synth.json").write_text(json.dumps({"n": args.n, "seed": 0, "radiographs": False}))
    prepare(base, base.data.corpus, base.data.shards, progress=lambda *_: None)
    shard_dir = resolve_shard_dir(base.data.shards, spec_from_config(base).hash)

    records = {}
    print("plain PyTorch loop, 1 thread ...", flush=True)
    records["plain loop, 1 process"] = plain_loop(base, shard_dir, args.steps, args.warmup, threads=1)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    print("vlp3d pretrain --local (LocalRuntime, no Ray), 1 thread ...", flush=True)
    records["vlp3d pretrain --local"] = ray_run(replace(base, cluster={"num_workers": 1}), f"overhead-local-{stamp}",
                                                args.warmup, local=True)
    for workers in (1, 2):
        # one torch thread per worker (floor of cpus_per_worker, at least 1); a quarter core each is
        # left to Ray Data and the split coordinator (a worker holding every core can starve them)
        cfg = replace(base, cluster={"num_workers": workers, "cpus_per_worker": 0.75})
        print(f"vlp3d pretrain, {workers} Ray Train worker(s) x 1 thread ...", flush=True)
        records[f"vlp3d pretrain, {workers} worker(s)"] = ray_run(cfg, f"overhead-{workers}w-{stamp}", args.warmup)

    plain = records["plain loop, 1 process"]["samples_per_s"]
    local = records["vlp3d pretrain --local"]["samples_per_s"]
    rows = [[label, f"{r['step_s'] * 1000:.0f} ms", f"{r['samples_per_s']:.1f}", f"{r['samples_per_s'] / plain:.2f}",
             f"{r['samples_per_s'] / local:.2f}", f"{r['startup_s']:.0f} s" if "startup_s" in r else ""]
            for label, r in records.items()]
    print("\n" + format_table(rows, ["", "step (steady state)", "samples/s", "vs plain loop", "vs --local", "start-up"],
                              title=f"{base.model.image_encoder}/{base.model.size}, global batch "
                                    f"{base.train.global_batch}, {tuple(base.data.shape)}, 1 thread per process"))
    Path(args.workdir, "train_overhead.json").write_text(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
