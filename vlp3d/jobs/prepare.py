"""Job: preprocess a corpus into Parquet shards with Ray Data."""

from __future__ import annotations

import argparse
import sys

from vlp3d.errors import InputError
from vlp3d.jobs.common import add_config_arguments, config_keys_epilog, resolve_config, run_main
from vlp3d.redact import redact
from vlp3d.table import format_table


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = (
        "Preprocess a CT-RATE-layout corpus with Ray Data: read each volume (nibabel), convert to HU once, "
        "reorient to RAS, resample, window, crop/pad; split and tokenize the report; store frozen text "
        "embeddings. 2D radiographs (modality 'xray': PNG or DICOM) are scaled to [0, 1] and resized to "
        "data.shape_2d. Writes Parquet shards (CT: OUT/<preprocessing-hash>/*.parquet, radiographs: "
        "OUT/<preprocessing-hash>/xray/*.parquet) and _manifest.json. Unreadable and non-CT rows are recorded "
        "(OUT/<preprocessing-hash>/_failed/, row and reason in the manifest) and skipped; transient read errors "
        "are retried. An interrupted run resumes: rows already written are kept. A lock file stops a second "
        "prepare into the same folder; a finished folder is never deleted (another corpus there is an error). "
        "See docs/prepare.md."
    )
    parser.epilog = config_keys_epilog()
    add_config_arguments(parser)
    parser.add_argument("--corpus", help="corpus root (default: data.corpus)")
    parser.add_argument("--out", help="shards root: a folder or a pyarrow filesystem URI such as s3://bucket/shards "
                             "(prepared in <tracking.workdir>/staging/, then uploaded; docs/cluster.md) "
                             "(default: data.shards)")
    return parser


def run(args: argparse.Namespace) -> int:
    from vlp3d.data.files import FolderLockedError
    from vlp3d.platform.prepare import PrepareError, prepare

    cfg = resolve_config(args)
    corpus = args.corpus or cfg.data.corpus
    out = args.out or cfg.data.shards
    if not corpus or not out:
        raise InputError("give --corpus and --out (or set data.corpus and data.shards in the config).")
    try:
        result = prepare(cfg, corpus, out)
    except (FolderLockedError, PrepareError) as err:  # a folder in use or holding other shards: one line
        print(f"error: {redact(err)}", file=sys.stderr)
        return 2
    print(summary(result))
    return 0


def summary(result) -> str:
    counts = result.manifest["counts"]
    rows = [[split, n] for split, n in counts["by_split"].items()]
    rows += [[modality, n] for modality, n in counts.get("by_modality", {}).items()]
    rows += [["failed", counts["failed"]], ["with warnings", counts["with_warnings"]]]
    if counts.get("resumed"):
        rows.append(["kept from an interrupted run", counts["resumed"]])
    text = format_table(rows, ["rows", "count"], title=redact(f"shards: {result.shard_dir}"))
    from vlp3d import storage
    from vlp3d.platform.prepare import FAILED_DIR

    # row numbers and scrubbed reasons (the manifest's): this output lands in job logs; paths stay in _failed/
    failures = result.manifest["failed"]
    for failure in failures[:10]:
        text += f"\n  failed row {failure['row']}: {failure['reason']}"
    if failures:
        text += redact(f"\n  (each failed row's file and full reason: {storage.join(result.shard_dir, FAILED_DIR)}"
                       "/row-NNNNNNNN.json, row = the manifest's row number)")
    return text


def main(argv: list[str] | None = None) -> int:
    return run_main(add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
