"""Job: list every registered image encoder and preset with parameters and step memory."""

from __future__ import annotations

import argparse

from vlp3d.jobs.common import add_config_arguments, resolve_config, run_main
from vlp3d.table import format_table


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = (
        "List the registered image encoders (model.image_encoder) and their size presets (model.size) "
        "with parameter count and the memory of one forward+backward step at the configured input "
        "(data.shape, batch --batch). Memory: CUDA max_memory_allocated, or on CPU the torch "
        "profiler's allocation trace; 'resident' is weights + input, 'step' what the step adds."
    )
    add_config_arguments(parser)
    parser.add_argument("--batch", type=int, default=1, help="batch size for the memory measurement (default 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the forward+backward memory measurement")
    parser.add_argument("--device", default="cpu", help="device to measure on (default cpu; e.g. cuda)")
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    from vlp3d import logs
    from vlp3d.encoders import IMAGE_ENCODERS, build_image_encoder
    from vlp3d.encoders.export import count_parameters, measure_memory

    cfg = resolve_config(args)
    shape = tuple(cfg.data.shape)
    sizes = ("tiny", "small", "base", "large")
    rows = []
    for name in logs.progress_bar(None, "encoders", iterable=sorted(IMAGE_ENCODERS)):
        for size in sizes:
            try:
                encoder = build_image_encoder(name, size, img_size=shape).to(args.device)
            except (ValueError, KeyError) as err:
                rows.append([name, size, "-", "-", "-", "n/a: " + str(err).split(";")[0].split(":")[0][:60]])
                continue
            params = count_parameters(encoder) / 1e6
            if args.no_memory:
                rows.append([name, size, f"{params:.2f}", "-", "-", ""])
                continue
            report = measure_memory(encoder, (args.batch, 1, *shape))
            rows.append([name, size, f"{params:.2f}", f"{report.resident_bytes / 2**20:.0f}",
                         f"{report.step_peak_bytes / 2**20:.0f}", ""])
            del encoder
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    marked = [r[:-1] + [r[-1] + (" <- configured" if (r[0], r[1]) == (cfg.model.image_encoder, cfg.model.size) else "")]
              for r in rows]
    print(format_table(marked, ["encoder", "size", "params (M)", "resident MiB", "step MiB", "note"],
                       title=f"image encoders at input {args.batch}x1x{'x'.join(map(str, shape))} on {args.device}"))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
