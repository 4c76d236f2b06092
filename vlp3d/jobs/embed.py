"""Job: embed CT volumes (and reports) with a logged model into a Parquet file, through its pyfunc."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlp3d.errors import InputError
from vlp3d.jobs.common import add_tracking_arguments, run_main, tracking_uri_from

MANIFEST_SUFFIXES = (".csv", ".parquet", ".jsonl")
# CT-RATE's metadata CSV names -> the model's columns
ALIASES = {"RescaleSlope": "rescale_slope", "RescaleIntercept": "rescale_intercept"}
MODEL_COLUMNS = ("image", "report", "rescale_slope", "rescale_intercept", "modality")
# the command line reads the files its user names, with the user's own permissions: the allowed root is
# the filesystem's root (a served model has none unless configured: deny by default). Symlinks are still
# resolved and the volume caps (VLP3D_MAX_VOXELS / VLP3D_MAX_BYTES) still apply.
EMBED_ALLOWED_ROOT = "/"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = (
        "Embed CT volumes (NIfTI files, DICOM files or DICOM series folders) and optional reports with a "
        "logged model, through the model's own pyfunc: the same preprocessing and HU rules as the served model "
        "(header rescale first, else the given rescale; stored values all >= 0 with no rescale anywhere stop "
        "with an error naming the file). Writes one row per input: the input columns, image_embedding and "
        "report_embedding (L2-normalised float lists), and error (why the model refused that row, else empty: "
        "a refused volume never stops the others). Works in parts of --part-rows rows, each written beside "
        "the output (OUT.parquet.parts/) as soon as it is done: a rerun of the same command resumes from them. "
        "With --actors N the parts are embedded by N Ray Data actors (on the Ray cluster of $RAY_ADDRESS, "
        "else a local Ray), each loading the model once, a GPU each when the cluster has GPUs."
    )
    parser.add_argument("inputs", nargs="+", metavar="FILES_OR_MANIFEST",
                        help="volume files / DICOM series folders, or one manifest (.csv, .parquet, .jsonl) with "
                             "column image (paths relative to the manifest's folder, or absolute) and optional "
                             "report, rescale_slope, rescale_intercept (CT-RATE's RescaleSlope/RescaleIntercept "
                             "are read as those), modality (rows not CT are refused)")
    parser.add_argument("--model", required=True,
                        help="MLflow model URI: models:/NAME@ALIAS (e.g. models:/vlp3d-mg3d@champion), "
                             "models:/NAME/VERSION or runs:/RUN_ID/model")
    parser.add_argument("--out", required=True, metavar="FILE.parquet", help="Parquet file to write (replaced)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="rows per model call: volumes preprocessed and embedded together (default: 8)")
    parser.add_argument("--part-rows", type=int, default=256,
                        help="rows per part: the unit written to OUT.parquet.parts/ and resumed (default: 256)")
    parser.add_argument("--actors", type=int, default=0,
                        help="Ray Data actors embedding parts in parallel, each loading the model once "
                             "(default 0: in this process, without Ray)")
    parser.add_argument("--device", default="auto",
                        help="torch device of the image model: auto (the first GPU torch sees, else the CPU), "
                             "cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument("--rescale-slope", type=float, default=None,
                        help="RescaleSlope for volumes without their own (a manifest row's or the file header's "
                             "win); give with --rescale-intercept (CT-RATE: 1)")
    parser.add_argument("--rescale-intercept", type=float, default=None,
                        help="RescaleIntercept for volumes without their own (CT-RATE: -1024)")
    parser.add_argument("--assume-hu", action="store_true",
                        help="embed volumes whose stored values are all >= 0 and have no rescale anywhere as if "
                             "they were HU (default: stop with an error, they may be raw values offset by 1024)")
    add_tracking_arguments(parser)
    return parser


def read_inputs(inputs: list[str]):
    """A DataFrame of the model's columns: one manifest, or volume paths (one row each)."""
    import pandas as pd

    from vlp3d.data.corpus import _READERS

    if len(inputs) == 1 and inputs[0].lower().endswith(MANIFEST_SUFFIXES):
        path = Path(inputs[0])
        if not path.is_file():
            raise FileNotFoundError(f"manifest {path} not found")
        table = _READERS[path.suffix.lower()](path).rename(columns=ALIASES)
        if "image" not in table.columns:
            raise InputError(f"{path}: no column 'image' (volume paths); columns found: {list(table.columns)}")
        table["image"] = [None if pd.isna(p) or not str(p).strip() else
                          str(p if Path(str(p)).is_absolute() else path.parent / str(p)) for p in table["image"]]
        return table.reset_index(drop=True)
    manifests = [p for p in inputs if p.lower().endswith(MANIFEST_SUFFIXES)]
    if manifests:
        raise InputError(f"give one manifest alone, or volume paths: got manifest(s) {manifests} among {len(inputs)} inputs")
    return pd.DataFrame({"image": [str(Path(p)) for p in inputs]})


def fill_rescale(table, slope: float | None, intercept: float | None):
    """--rescale-slope/--rescale-intercept for rows without their own rescale."""
    if (slope is None) != (intercept is None):
        raise InputError("give --rescale-slope and --rescale-intercept together (CT-RATE: 1 and -1024)")
    if slope is None:
        return table
    table = table.copy()
    for column, value in (("rescale_slope", slope), ("rescale_intercept", intercept)):
        if column not in table.columns:
            table[column] = value
        table[column] = table[column].astype("float64").fillna(value)
    return table


def run(args: argparse.Namespace) -> int:
    from vlp3d.logs import progress_bar
    from vlp3d.platform.embed import EmbedPlan, run_embedding
    from vlp3d.table import format_table

    if args.batch_size < 1 or args.part_rows < 1 or args.actors < 0:
        raise InputError(f"--batch-size and --part-rows must be at least 1 and --actors at least 0, got "
                         f"{args.batch_size}, {args.part_rows} and {args.actors}")
    if not args.out.endswith(".parquet"):
        raise InputError(f"--out {args.out}: name a .parquet file")
    table = fill_rescale(read_inputs(args.inputs), args.rescale_slope, args.rescale_intercept)
    uri = tracking_uri_from(args)
    columns = [c for c in MODEL_COLUMNS if c in table.columns]
    plan = EmbedPlan(table, columns, args.model, Path(args.out), part_rows=args.part_rows,
                     batch_size=args.batch_size, params={"assume_hu": args.assume_hu})
    # the command line reads the user's own files (as its user): every path, symlinks resolved, caps applied
    model_config = {"device": args.device, "allowed_root": EMBED_ALLOWED_ROOT}
    with progress_bar(len(table), "embedding", unit="volume") as bar:
        done = run_embedding(plan, uri, model_config, actors=args.actors, progress=bar.update)
    result = done.pop("result")
    embed_dim = len(next((v for v in result["image_embedding"] if v is not None), ())) or \
        len(next((v for v in result["report_embedding"] if v is not None), ()))
    rows = [[what, value] for what, value in done.items()]
    rows += [["embedding size", embed_dim], ["where", f"{args.actors} Ray Data actors" if args.actors else
                                             f"this process ({args.device})"], ["written", str(plan.out)]]
    print(format_table(rows, ["what", "value"], title=f"vlp3d embed with {args.model}"))
    if done["refused"]:
        print(f"{done['refused']} row(s) refused by the model: see the 'error' column of {plan.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
