"""The whole training step of each pretraining method, as `vlp3d pretrain` runs it on one device:
the objective's forward (all its loss terms), backward, gradient clipping and the AdamW step
(`engine.train_step`), on a pretrainer built from an ExperimentConfig exactly as training builds it
(`vlp3d.config.load_config` + `engine.build_pretrainer`). Two paths per method, side by side:

    landed   model.attention = manual, no torch.compile, --precision (fp32 by default)
    fast     model.attention = --fast-attention (fused), model.compile = true (the image encoder,
             as training compiles it), bf16 autocast on CUDA (--precision on CPU)

Inputs are synthetic, of the shapes the objective's collated batches have (volumes, T3D's crops,
UniMedI's radiographs, MG-3D's token ids and sentence embeddings). Per path:

    samples/s   volumes through the step per second over --steps timed steps, after --warmup
                (the fast path's first step compiles: timed apart as `compile s`, left out here)
    peak MiB    torch.cuda.max_memory_allocated over the timed steps (weights, optimizer state,
                activations, workspace); '-' on CPU
    max batch   CUDA: the batch doubled from --batch until torch.cuda.OutOfMemoryError, the last
                that fitted (the cache emptied after each try); '-' on CPU or with --no-max-batch
    MFU         FLOPs of one step (torch.utils.flop_counter.FlopCounterMode) x steps/s over the
                device's nominal dense bf16 peak (H100/H200 989, A100 312, L40S 362 TFLOP/s; --peak-tflops
                for others or for CPU); '-' when no peak is known

Examples:
    .venv/bin/python benchmarks/bench_step.py --methods clip mg3d --steps 2      # CPU, tiny sizes
    .venv/bin/python benchmarks/bench_step.py --device cuda --preset paper        # the published set-ups
    .venv/bin/python benchmarks/bench_step.py --device cuda --encoder swin3d --size small --batch 4 train.precision=bf16

`model.attention` acts on the transformer encoders (swin3d, vit3d, through `engine.build_model`);
resnet3d has no attention, so for it the two paths differ by torch.compile (and precision) only.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from bench_encoders import peak_flops  # the nominal bf16 peak per GPU, one table
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from vlp3d.config import OBJECTIVES, load_config
from vlp3d.objectives import objective_class
from vlp3d.objectives.model import model_input_shape, text_dim_for
from vlp3d.table import format_table
from vlp3d.train.step import compile_errors, train_step
from vlp3d.train.tasks.pretrain import (
    build_optimizer,
    build_pretrainer,
    build_scheduler,
    compile_image_encoder,
)

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
# small enough for a CPU: tiny encoders at 32^3 (3D) and 32^2 (2D)
TINY = ["model.size=tiny", "data.shape=[32,32,32]", "objective.t3d.crop_shape=[32,32,32]", "data.shape_2d=[32,32]",
        "data.max_tokens=32", "data.max_sentences=4"]
REPORTS = ["Small nodule in the left lower lobe. No effusion.", "Cardiomegaly. Bilateral pleural effusions.",
           "No acute findings.", "Emphysema with apical bullae; atelectasis at the right base."]


def synthetic_batch(cfg, batch: int, text_dim: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A model batch of the shapes the configured objective trains on (what `to_model_batch` makes
    of its collated shard columns): volumes [B, 1, X, Y, Z] in [0, 1] (high-resolution storage:
    crops [B, K, 1, X, Y, Z]), L2-normalised report embeddings, and the objective's extra columns."""
    objective = objective_class(cfg.objective.name)
    generator = torch.Generator().manual_seed(seed)
    shape = model_input_shape(cfg)
    out = {"report_embedding": F.normalize(torch.randn(batch, text_dim, generator=generator), dim=-1)}
    if objective.storage == "highres":  # T3D's collate samples crops of the stored volumes
        out["crops"] = torch.rand(batch, cfg.objective.t3d.num_crops, 1, *shape, generator=generator)
    else:
        out["volume"] = torch.rand(batch, 1, *shape, generator=generator)
    if "input_ids" in objective.columns:
        from vlp3d.encoders.text import TextEncoder

        tokens = TextEncoder(cfg.model.text_encoder, max_tokens=cfg.data.max_tokens).tokenize(
            [REPORTS[i % len(REPORTS)] for i in range(batch)])
        out.update(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    if "sentence_embeddings" in objective.columns:
        out["sentence_embeddings"] = F.normalize(torch.randn(batch, cfg.data.max_sentences, text_dim,
                                                             generator=generator), dim=-1)
        out["sentence_mask"] = torch.ones(batch, cfg.data.max_sentences, dtype=torch.bool)
    if objective.uses_2d:
        out["image_2d"] = torch.rand(batch, 1, *cfg.data.shape_2d, generator=generator)
        out["report_embedding_2d"] = out["report_embedding"].clone()
    return {key: value.to(device) for key, value in out.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Step:
    """One method on one path: the pretrainer, its optimizer and schedule, and its step."""

    def __init__(self, cfg, device: torch.device, compile_backend: str):
        self.cfg, self.device = cfg, device
        self.text_dim = text_dim_for(cfg)
        self.pretrainer, self.weights = build_pretrainer(cfg, text_dim=self.text_dim)
        self.pretrainer.to(device).train()
        if cfg.model.compile:
            compile_image_encoder(self.pretrainer.model, backend=compile_backend)
        self.optimizer = build_optimizer(self.pretrainer, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict:
        with compile_errors():
            return train_step(self.pretrainer, self.weights, dict(batch), self.optimizer, self.scheduler,
                              self.cfg.train.precision, self.scaler)

    def batch(self, size: int) -> dict[str, torch.Tensor]:
        return synthetic_batch(self.cfg, size, self.text_dim, self.device)


def timed(step: Step, batch: dict, steps: int) -> float:
    """Seconds per step over `steps` steps."""
    _sync(step.device)
    started = time.perf_counter()
    for _ in range(steps):
        step(batch)
    _sync(step.device)
    return (time.perf_counter() - started) / steps


def step_flops(step: Step, batch: dict) -> int:
    """FLOPs of one training step (forward + backward), counted by torch (after the compiling step:
    a first call under the counter would leave a compiled encoder eager)."""
    with FlopCounterMode(display=False) as counter:
        step(batch)
    return counter.get_total_flops()


def largest_batch(step: Step, start: int, limit: int) -> int:
    """CUDA: the largest batch, doubling from `start` (which fits), up to `limit`, whose step fits."""
    fits, size = start, start * 2
    while size <= limit:
        try:
            batch = step.batch(size)
            step(batch)
            _sync(step.device)
            fits = size
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            batch = None
            step.optimizer.zero_grad(set_to_none=True)
            _free(step.device)
        size *= 2
    return fits


def run_path(cfg, device: torch.device, args, path: str) -> dict:
    """Measure one method on one path; returns its record."""
    step = Step(cfg, device, args.compile_backend)
    batch = step.batch(args.batch)
    compile_s = None
    if cfg.model.compile:  # the first step traces and compiles the encoder
        _sync(device)
        started = time.perf_counter()
        step(batch)
        _sync(device)
        compile_s = time.perf_counter() - started
    for _ in range(args.warmup):
        step(batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = timed(step, batch, args.steps)
    peak = torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None
    flops = step_flops(step, batch)
    max_batch = None
    if device.type == "cuda" and not args.no_max_batch:
        batch = None
        _free(device)
        max_batch = largest_batch(step, args.batch, args.max_batch_limit)
    record = {"method": cfg.objective.name, "path": path, "encoder": cfg.model.image_encoder, "size": cfg.model.size,
              "input": list(model_input_shape(cfg)), "precision": cfg.train.precision,
              "attention": cfg.model.attention, "compile": cfg.model.compile, "batch": args.batch,
              "step_s": step_s, "samples_per_s": args.batch / step_s, "peak_mib": peak, "max_batch": max_batch,
              "compile_s": compile_s, "flops_per_step": flops}
    del step
    _free(device)
    return record


def path_overrides(path: str, device: torch.device, args) -> list[str]:
    if path == "landed":
        return ["model.attention=manual", "model.compile=false", f"train.precision={args.precision}"]
    precision = "bf16" if device.type == "cuda" else args.precision
    return [f"model.attention={args.fast_attention}", "model.compile=true", f"train.precision={precision}"]


def method_config(method: str, path: str, device: torch.device, args):
    sized = [] if args.preset == "paper" else [*TINY, "model.image_encoder=resnet3d"] if method == "clip" else TINY
    chosen = [*([f"model.image_encoder={args.encoder}"] if args.encoder else []),
              *([f"model.size={args.size}"] if args.size else [])]
    return load_config(None, [f"objective.name={method}", *sized, *chosen, *path_overrides(path, device, args),
                              *args.overrides])


def _fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def table_rows(records: list[dict], peak: float | None) -> list[list]:
    landed = {r["method"]: r["samples_per_s"] for r in records if r["path"] == "landed"}
    rows = []
    for r in records:
        mfu = r["flops_per_step"] / r["step_s"] / peak if peak else None
        rows.append([r["method"], r["path"], f"{r['encoder']}/{r['size']}", "x".join(map(str, r["input"])),
                     r["precision"], r["attention"], "yes" if r["compile"] else "no", r["batch"],
                     f"{r['samples_per_s']:.2f}", _fmt(r["samples_per_s"] / landed[r["method"]] if r["method"] in landed
                                                       else None, ".2f"),
                     f"{r['step_s'] * 1000:.0f}", _fmt(r["peak_mib"], ".0f"), _fmt(r["max_batch"]),
                     _fmt(r["compile_s"], ".1f"), f"{r['flops_per_step'] / 1e9:.1f}", _fmt(mfu and 100 * mfu, ".1f")])
    return rows


HEADERS = ["method", "path", "encoder", "input", "precision", "attention", "compile", "batch", "samples/s",
           "vs landed", "step ms", "peak MiB", "max batch", "compile s", "GFLOP/step", "MFU %"]


def markdown(rows: list[list], headers: list[str]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES),
                        help="pretraining methods to measure (default: all four)")
    parser.add_argument("--preset", choices=("tiny", "paper"), default="tiny",
                        help="tiny (default): tiny encoders at 32^3 volumes / 32^2 radiographs (clip on resnet3d), "
                             "for a CPU; paper: each method's published set-up from config.METHOD_DEFAULTS "
                             "(mg3d: swin3d/base at 128x128x96, t3d: swin3d/base on 96^3 crops, unimedi: "
                             "unimedi_vit/base at 128x128x96 and 224^2, clip: the config default resnet3d)")
    parser.add_argument("--encoder", default=None, help="model.image_encoder for every method (default: the preset's)")
    parser.add_argument("--size", choices=("tiny", "small", "base", "large"), default=None,
                        help="model.size for every method (default: the preset's)")
    parser.add_argument("--batch", type=int, default=2, help="per-device batch of the timed steps (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method and path (default 5)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed steps before them, after the fast path's compiling step (default 1)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="train.precision of the landed path, and of the fast path on CPU (default fp32; "
                             "the fast path uses bf16 on CUDA)")
    parser.add_argument("--fast-attention", choices=("fused", "auto"), default="fused",
                        help="model.attention of the fast path (default fused)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the fast path (default inductor, what training uses; "
                             "aot_eager traces the same graphs without generating code, for a quick check)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for MFU (default: H100/H200 989, A100 312, L40S 362 dense bf16; "
                             "none on CPU)")
    parser.add_argument("--no-max-batch", action="store_true", help="skip the largest-batch search on CUDA")
    parser.add_argument("--max-batch-limit", type=int, default=1024,
                        help="largest batch the search tries (default 1024)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/step"),
                        help="folder for step.json and step.md (default benchmarks/results/step)")
    parser.add_argument("overrides", nargs="*", help="section.key=value on top of the preset, for every method and "
                                                     "path (e.g. train.precision=bf16 model.gradient_checkpointing=true)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    peak = peak_flops(device, args.peak_tflops)
    mfu = f"MFU against {peak / 1e12:.0f} TFLOP/s" if peak else "no peak FLOP/s for MFU (--peak-tflops)"
    print(f"device {device} ({name}); batch {args.batch}, {args.warmup} warm-up + {args.steps} timed steps per "
          f"path; {mfu}", flush=True)
    records = []
    for method in args.methods:
        for path in ("landed", "fast"):
            cfg = method_config(method, path, device, args)
            print(f"{method} {path}: {cfg.model.image_encoder}/{cfg.model.size} at {model_input_shape(cfg)}, "
                  f"{cfg.train.precision}, attention {cfg.model.attention}, compile {cfg.model.compile} ...", flush=True)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                records.append(run_path(cfg, device, args, path))
    rows = table_rows(records, peak)
    title = f"whole training step per method on {name} (batch {args.batch}, {args.steps} timed steps)"
    print("\n" + format_table(rows, HEADERS, title=title))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step.json").write_text(json.dumps({"device": name, "peak_flops": peak, "args": vars(args),
                                               "records": records}, indent=2))
    (out / "step.md").write_text(f"{title}\n\n{markdown(rows, HEADERS)}\n")
    print(f"written: {out / 'step.json'}, {out / 'step.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
