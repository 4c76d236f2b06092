"""Forward+backward throughput and peak memory of every image encoder preset.

Examples:
    python benchmarks/bench_encoders.py                       # 128x128x96, all encoders and sizes
    python benchmarks/bench_encoders.py --cpu-small           # a quick CPU run at 64x64x32
    python benchmarks/bench_encoders.py --encoders swin3d --sizes base large --batch 4

Every encoder gets the same input [B, 1, X, Y, Z] (default 128 x 128 x 96: divisible by 32 for
swin3d/resnet3d, by 16 for vit3d, by 16 x 16 x 4 for unimedi_vit). Each configuration is run
with and without gradient checkpointing and, on CUDA, in fp32 and under bf16 autocast.
samples/s counts volumes through one training step (forward + backward of a mean-square loss,
no optimizer). Memory (see vlp3d.encoders.export.measure_memory): `resident` = weights, buffers
and input; `step peak` = the most allocated on top of that during the step (activations,
gradients, workspace); on CUDA from torch.cuda.max_memory_allocated, on CPU from the torch
profiler's allocation trace.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from vlp3d.encoders import IMAGE_ENCODERS, SIZES, build_image_encoder
from vlp3d.encoders.export import count_parameters, measure_memory

MIB = 2**20


@dataclass
class BenchRow:
    encoder: str
    size: str
    params_m: float
    checkpointing: bool
    precision: str
    samples_per_s: float | None
    step_ms: float | None
    resident_mib: float | None
    step_peak_mib: float | None
    note: str = ""


def _loss(pooled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return pooled.float().square().mean() + tokens.float().square().mean()


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
        with torch.autocast(
            device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            loss = _loss(*encoder(volume))
        loss.backward()
    _sync(device)
    elapsed = time.perf_counter() - start
    encoder.zero_grad(set_to_none=True)
    return elapsed / steps


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
) -> BenchRow:
    """Build `name`/`size`, time it and measure its memory; failures become a row with a note."""
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    row = BenchRow(name, size, float("nan"), checkpointing, precision, None, None, None, None)
    encoder = None
    try:
        torch.manual_seed(0)
        encoder = build_image_encoder(
            name, size, img_size=input_shape[2:], gradient_checkpointing=checkpointing
        )
        encoder.to(device)
        row.params_m = count_parameters(encoder) / 1e6
        volume = torch.rand(input_shape, device=device)
        seconds = time_steps(encoder, volume, steps, warmup, autocast_dtype)
        row.step_ms = 1000 * seconds
        row.samples_per_s = input_shape[0] / seconds
        if memory:
            report = measure_memory(encoder, input_shape, autocast_dtype=autocast_dtype)
            row.resident_mib = report.resident_bytes / MIB
            row.step_peak_mib = report.step_peak_bytes / MIB
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
        "ckpt",
        "prec",
        "samples/s",
        "step ms",
        "resident MiB",
        "step peak MiB",
        "note",
    )
    lines = [header] + [
        (
            r.encoder,
            r.size,
            f"{r.params_m:.1f}",
            "on" if r.checkpointing else "off",
            r.precision,
            num(r.samples_per_s, ".2f"),
            num(r.step_ms, ".0f"),
            num(r.resident_mib, ".0f"),
            num(r.step_peak_mib, ".0f"),
            r.note,
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i in (0, 1, 9) else cell.rjust(w)
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
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
        f"{torch.get_num_threads()} threads), input {list(input_shape)}, {args.steps} timed steps",
        flush=True,
    )
    rows = []
    for name in args.encoders or sorted(IMAGE_ENCODERS):
        for size in args.sizes:
            for precision in precisions:
                for ckpt in checkpointing:
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
