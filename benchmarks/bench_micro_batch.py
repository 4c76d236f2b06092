"""Peak memory and step time of one training step against `train.micro_batch` (gradient caching) at a
fixed global batch: the same step (same loss, same gradients: tests/unit/test_train_micro_batch.py)
with the encoder's graph held for `micro_batch` volumes at a time instead of the whole batch.

Each setting runs in a fresh process (so its peak is its own): build the CLIP pretrainer from the
config as `vlp3d pretrain` does, one warm-up step, then `--steps` timed steps on random volumes of
`data.shape`. Memory on CPU is the process's peak resident set (ru_maxrss) above what it held after
the warm-up's model and batch existed; on CUDA, `torch.cuda.max_memory_allocated` of the steps.

    .venv/bin/python benchmarks/bench_micro_batch.py                                   # ~2 min on 2 cores
    .venv/bin/python benchmarks/bench_micro_batch.py --batch 32 --micro 0 16 8 4 2 model.size=small
    .venv/bin/python benchmarks/bench_micro_batch.py --device cuda --batch 64 --micro 0 32 16 8 data.shape=[128,128,96]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

BASE = ["model.image_encoder=resnet3d", "model.size=tiny", "model.text_head=\"linear\"", "train.warmup_steps=0"]


def one_setting(batch: int, micro: int, steps: int, device: str, overrides: list[str]) -> dict:
    """Runs in the child process: the figures of one micro-batch setting."""
    import torch

    from vlp3d.config import load_config
    from vlp3d.train.step import train_step
    from vlp3d.train.tasks.pretrain import build_optimizer, build_pretrainer, build_scheduler

    torch.manual_seed(0)
    cfg = load_config(None, [*BASE, f"train.global_batch={batch}", f"train.micro_batch={micro}", *overrides])
    text_dim = 384
    module, weights = build_pretrainer(cfg, text_dim=text_dim)
    module.to(device)
    optimizer, scheduler = build_optimizer(module, cfg), None
    scheduler = build_scheduler(optimizer, cfg)
    shape = tuple(cfg.data.shape)
    batch_tensors = {"volume": torch.randn(batch, 1, *shape, device=device),
                     "report_embedding": torch.randn(batch, text_dim, device=device)}

    def step():
        return train_step(module, weights, batch_tensors, optimizer, scheduler, cfg.train.precision,
                          micro_batch=micro)

    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up: optimizer state, allocator pools
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        metrics = step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"batch": batch, "micro_batch": micro or batch, "step_s": seconds, "samples_per_s": batch / seconds,
           "loss": metrics["loss"], "shape": list(shape), "encoder": f"{cfg.model.image_encoder}/{cfg.model.size}",
           "peak_mib": (peak_kb - baseline_kb) / 1024 if device == "cpu" else
           torch.cuda.max_memory_allocated() / 2**20}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="global batch (one process: the per-worker batch)")
    parser.add_argument("--micro", type=int, nargs="+", default=[0, 16, 8, 4, 2],
                        help="train.micro_batch settings (0: the whole batch at once)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides (default: resnet3d tiny at data.shape's default)")
    args = parser.parse_args()
    if args.child is not None:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(one_setting(args.batch, args.child, args.steps, args.device, args.overrides)))
        return
    from vlp3d.table import format_table

    figures = []
    for micro in args.micro:
        command = [sys.executable, __file__, "--child", str(micro), "--batch", str(args.batch), "--steps",
                   str(args.steps), "--device", args.device, "--threads", str(args.threads), *args.overrides]
        result = subprocess.run(command, check=True, capture_output=True, text=True)
        figures.append(json.loads(result.stdout.strip().splitlines()[-1]))
    whole = figures[0]
    rows = [[f["encoder"], "x".join(map(str, f["shape"])), f["batch"], f["micro_batch"], round(f["peak_mib"]),
             round(f["peak_mib"] / max(whole["peak_mib"], 1e-9), 2), round(f["samples_per_s"], 2),
             round(f["samples_per_s"] / whole["samples_per_s"], 2), round(f["loss"], 5)] for f in figures]
    print(format_table(rows, ["encoder", "input", "global batch", "micro-batch", "peak MiB", "vs whole",
                              "samples/s", "vs whole", "loss"],
                       title=f"one training step vs train.micro_batch ({args.device}, {args.threads} thread(s))"))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
