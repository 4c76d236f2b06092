"""Forward+backward throughput and peak memory of every image encoder preset.

Examples:
    python benchmarks/bench_encoders.py                       # 128x128x96, all encoders and sizes
    python benchmarks/bench_encoders.py --cpu-small           # a quick CPU run at 64x64x32
    python benchmarks/bench_encoders.py --encoders swin3d --sizes base large --batch 4
    python benchmarks/bench_encoders.py --device cuda --encoders swin3d vit3d --sizes base --checkpointing off

Every encoder gets the same input [B, 1, X, Y, Z] (default 128 x 128 x 96: divisible by 32 for
swin3d/resnet3d, by 16 for vit3d, by 16 x 16 x 4 for unimedi_vit). Each configuration is run
with and without gradient checkpointing and, on CUDA, in fp32 and under bf16 autocast.
samples/s counts volumes through one training step (forward + backward of a mean-square loss,
no optimizer). Memory (see vlp3d.encoders.export.measure_memory): `resident` = weights, buffers
and input; `step peak` = the most allocated on top of that during the step (activations,
gradients, workspace); on CUDA from torch.cuda.max_memory_allocated, on CPU from the torch
profiler's allocation trace.

swin3d and vit3d run with both attention paths side by side (`--attention`, config
`model.attention`): 'manual' (MONAI's matmul-softmax-matmul) and 'fused'
(scaled_dot_product_attention); the other encoders have one path ('-').
FLOP/step = model FLOPs of one forward+backward without recomputation, counted with
torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions) on the manual attention path
for both paths (it has no formula for torch's CPU flash-attention kernel);
TFLOP/s = that over the step time; MFU = TFLOP/s over the device's nominal dense bf16 peak
(H100/H200 SXM 989, A100 312, L40S 362 TFLOP/s; `--peak-tflops` overrides, and on CPU MFU is
'-' without it). On CUDA, `max batch` is the largest power-of-two batch whose training step
fits (doubling until torch.cuda.OutOfMemoryError; `--no-fit` skips it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from vlp3d.encoders import IMAGE_ENCODERS, SIZES, accepted_options, build_image_encoder
from vlp3d.encoders.export import count_parameters, measure_memory, train_step

MIB = 2**20
ATTENTION_PATHS = ("manual", "fused")
# nominal dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name
PEAK_BF16 = (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12))
FIT_CAP = 4096


@dataclass
class BenchRow:
    encoder: str
    size: str
    params_m: float
    attention: str
    checkpointing: bool
    precision: str
    samples_per_s: float | None
    step_ms: float | None
    resident_mib: float | None
    step_peak_mib: float | None
    gflop_per_step: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    max_batch: int | None = None
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    encoder: torch.nn.Module,
    volume: torch.Tensor,
    steps: int,
    warmup: int,
    autocast_dtype: torch.dtype | None,
) -> float:
    """Seconds per training step (forward + backward), averaged over `steps` after `warmup`."""
    device = volume.device
    encoder.train()
    for index in range(warmup + steps):
        if index == warmup:
            _sync(device)
            start = time.perf_counter()
        encoder.zero_grad(set_to_none=True)
        train_step(encoder, volume, autocast_dtype)
    _sync(device)
    elapsed = time.perf_counter() - start
    encoder.zero_grad(set_to_none=True)
    return elapsed / steps


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """Nominal dense bf16 peak FLOP/s of `device` (`override_tflops` * 1e12 if given); None when unknown."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def count_flops(
    name: str, size: str, attention: str, input_shape: tuple[int, ...], device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> int:
    """FLOPs of one forward+backward (no checkpoint recomputation: the model's FLOPs, as MFU counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    encoder = _build(name, size, input_shape, attention, checkpointing=False).to(device).train()
    volume = torch.rand(input_shape, device=device)
    with FlopCounterMode(display=False) as counter:
        train_step(encoder, volume, autocast_dtype)
    return counter.get_total_flops()


def largest_batch(
    encoder: torch.nn.Module, sample_shape: tuple[int, ...], device: torch.device,
    autocast_dtype: torch.dtype | None, cap: int = FIT_CAP,
) -> int | None:
    """Largest power-of-two batch (up to `cap`) whose training step fits on the CUDA `device`."""
    best, batch = None, 1
    while batch <= cap:
        volume = None
        try:
            volume = torch.rand((batch, *sample_shape), device=device)
            train_step(encoder, volume, autocast_dtype)
            best, batch = batch, 2 * batch
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            del volume
            encoder.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
    return best


def _build(
    name: str, size: str, input_shape: tuple[int, ...], attention: str, checkpointing: bool
) -> torch.nn.Module:
    torch.manual_seed(0)
    options = accepted_options(name, {"attention": attention}) if attention != "-" else {}
    return build_image_encoder(
        name, size, img_size=input_shape[2:], gradient_checkpointing=checkpointing, **options
    )


def attention_paths(name: str, requested: list[str]) -> list[str]:
    """The attention paths to run for encoder `name`: `requested` if it has both, else ['-']."""
    return requested if accepted_options(name, {"attention": None}) else ["-"]


def bench_one(
    name: str,
    size: str,
    input_shape: tuple[int, ...],
    device: torch.device,
    checkpointing: bool,
    precision: str,
    steps: int,
    warmup: int,
    memory: bool,
    attention: str = "-",
    flops: dict | None = None,
    peak: float | None = None,
    fit: bool = False,
) -> BenchRow:
    """Build `name`/`size`, time it, count its FLOPs, measure its memory and (`fit`, CUDA) its
    largest batch; failures become a row with a note. `flops` caches FLOP counts across rows."""
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    row = BenchRow(name, size, float("nan"), attention, checkpointing, precision, None, None, None, None)
    encoder = None
    try:
        encoder = _build(name, size, input_shape, attention, checkpointing).to(device)
        row.params_m = count_parameters(encoder) / 1e6
        volume = torch.rand(input_shape, device=device)
        seconds = time_steps(encoder, volume, steps, warmup, autocast_dtype)
        row.step_ms = 1000 * seconds
        row.samples_per_s = input_shape[0] / seconds
        # model FLOPs, the same for both attention paths: counted on the manual one, since
        # FlopCounterMode has no formula for some fused kernels (torch's CPU flash attention)
        key = (name, size, input_shape, precision)
        flops = {} if flops is None else flops
        if key not in flops:
            flops[key] = count_flops(name, size, "manual" if attention != "-" else "-", input_shape, device,
                                     autocast_dtype)
        row.gflop_per_step = flops[key] / 1e9
        row.tflops = flops[key] / seconds / 1e12
        row.mfu = flops[key] / seconds / peak if peak else None
        if memory:
            report = measure_memory(encoder, input_shape, autocast_dtype=autocast_dtype)
            row.resident_mib = report.resident_bytes / MIB
            row.step_peak_mib = report.step_peak_bytes / MIB
        if fit and device.type == "cuda":
            del volume
            row.max_batch = largest_batch(encoder, tuple(input_shape[1:]), device, autocast_dtype)
    except torch.OutOfMemoryError:
        row.note = "out of memory"
    except ValueError as err:  # an input shape the encoder cannot take
        row.note = str(err).split(";")[0]
    finally:
        del encoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def format_table(rows: list[BenchRow]) -> str:
    """Rows as an aligned text table, one line per configuration."""

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    header = (
        "encoder",
        "size",
        "params M",
        "attn",
        "ckpt",
        "prec",
        "samples/s",
        "step ms",
        "GFLOP/step",
        "TFLOP/s",
        "MFU",
        "resident MiB",
        "step peak MiB",
        "max batch",
        "note",
    )
    left = {0, 1, 3, len(header) - 1}
    lines = [header] + [
        (
            r.encoder,
            r.size,
            f"{r.params_m:.1f}",
            r.attention,
            "on" if r.checkpointing else "off",
            r.precision,
            num(r.samples_per_s, ".2f"),
            num(r.step_ms, ".0f"),
            num(r.gflop_per_step, ".1f"),
            num(r.tflops, ".3g"),
            "-" if r.mfu is None else f"{100 * r.mfu:.1f}%",
            num(r.resident_mib, ".0f"),
            num(r.step_peak_mib, ".0f"),
            num(r.max_batch, "d"),
            r.note,
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i in left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--encoders",
        nargs="+",
        default=None,
        choices=sorted(IMAGE_ENCODERS),
        help="Encoders to run (default: all registered).",
    )
    parser.add_argument(
        "--sizes", nargs="+", default=list(SIZES), choices=SIZES, help="Size presets to run."
    )
    parser.add_argument(
        "--input",
        nargs=3,
        type=int,
        default=(128, 128, 96),
        metavar=("X", "Y", "Z"),
        help="Input volume shape (default 128 128 96, MG-3D's).",
    )
    parser.add_argument("--batch", type=int, default=2, help="Volumes per step.")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per configuration.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps first.")
    parser.add_argument(
        "--checkpointing",
        choices=("off", "on", "both"),
        default="both",
        help="Gradient checkpointing setting(s) to run.",
    )
    paths = list(ATTENTION_PATHS)
    parser.add_argument("--attention", nargs="+", choices=paths, default=paths,
                        help="Attention paths of swin3d/vit3d to run side by side (default: both).")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "both"),
        default="auto",
        help="auto: fp32 and bf16 autocast on CUDA, fp32 on CPU.",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]."
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="Peak TFLOP/s for MFU (default: the GPU's nominal dense bf16 peak; none on CPU).",
    )
    parser.add_argument(
        "--no-fit", action="store_true", help="Skip the largest-batch search on CUDA."
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)."
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="Skip the memory measurement step."
    )
    parser.add_argument(
        "--cpu-small",
        action="store_true",
        help="Quick CPU smoke run: --input 64 64 32 --batch 1 --steps 2 --sizes tiny, fp32.",
    )
    parser.add_argument("--json", default=None, help="Also write the rows as JSON to this path.")
    args = parser.parse_args(argv)
    if args.cpu_small:
        args.input, args.batch, args.steps, args.sizes = (64, 64, 32), 1, 2, ["tiny"]
        if args.device == "auto":
            args.device = "cpu"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if args.precision == "auto":
        precisions = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    else:
        precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    input_shape = (args.batch, 1, *args.input)
    peak = peak_flops(device, args.peak_tflops)
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
        f"{torch.get_num_threads()} threads), input {list(input_shape)}, {args.steps} timed steps, "
        f"MFU peak {f'{peak / 1e12:g} TFLOP/s' if peak else '-'}",
        flush=True,
    )
    rows: list[BenchRow] = []
    flops: dict = {}
    for name in args.encoders or sorted(IMAGE_ENCODERS):
        for size in args.sizes:
            for precision in precisions:
                for ckpt in checkpointing:
                    for attention in attention_paths(name, args.attention):
                        rows.append(
                            bench_one(
                                name,
                                size,
                                input_shape,
                                device,
                                ckpt,
                                precision,
                                args.steps,
                                args.warmup,
                                memory=not args.no_memory,
                                attention=attention,
                                flops=flops,
                                peak=peak,
                                fit=not args.no_fit,
                            )
                        )
                        print(format_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(format_table(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump([asdict(r) for r in rows], handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
