"""Job: write the phantom corpus (CT-RATE layout)."""

from __future__ import annotations

import argparse
import time

from vlp3d import logs
from vlp3d.data.labels import PHANTOM_FINDINGS
from vlp3d.data.phantom import synthesize
from vlp3d.jobs.common import run_main
from vlp3d.table import format_table


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = (
        "Write a synthetic chest-CT corpus in CT-RATE layout: NIfTI int16 volumes with varied orientation, "
        "spacing and slope/intercept storage, reports stating present and absent findings, labels and "
        "metadata CSVs, patient-level train/valid splits. Same seed -> byte-identical corpus."
    )
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--n", type=int, default=400, help="number of volumes (default 400)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--valid-fraction", type=float, default=0.2, help="fraction of patients in 'valid' (default 0.2)")
    parser.add_argument("--prevalence", type=float, default=0.35, help="probability of each finding (default 0.35)")
    parser.add_argument("--full-size", action="store_true",
                        help="clinical size volumes: 512x512x~250 at 0.78 mm in-plane (default: ~80x80x55 at ~5 mm)")
    parser.add_argument("--radiographs", action="store_true",
                        help="also a frontal projection radiograph (PNG, modality 'xray') per CT, listed in "
                             "radiographs.csv; the CT files are the same as without it")
    return parser


def run(args: argparse.Namespace) -> int:
    started = time.time()
    with logs.progress_bar(args.n, "synth", unit="vol") as bar:
        cases = synthesize(args.out, args.n, seed=args.seed, valid_fraction=args.valid_fraction,
                           prevalence=args.prevalence, progress=bar.update, full_size=args.full_size,
                           radiographs=args.radiographs)
    rows = [[split, len(group), group["patient_id"].nunique(),
             *(int(group[f].sum()) for f in PHANTOM_FINDINGS)] for split, group in cases.groupby("split")]
    print(format_table(rows, ["split", "volumes", "patients", *PHANTOM_FINDINGS],
                       title=f"phantom corpus in {args.out} ({time.time() - started:.1f} s)"))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
