"""How fast `vlp3d embed` embeds volumes: in this process (`--actors 0`) and on 1 and 2 Ray Data
actors that each load the model once, on the demo corpus's CT files as CT-RATE keeps them (raw
values, rescale from the metadata CSV), with their reports. Each configuration embeds the same
manifest into a fresh output; the rows of every configuration are checked equal to the in-process
ones (embeddings within 1e-5). Wall time includes loading the model (once per actor) and, for
actors, starting them; volumes/s is over the whole command, as a user sees it.

    .venv/bin/vlp3d demo --workdir vlp3d-runs/demo                            # once: corpus + champion
    .venv/bin/python benchmarks/bench_embed.py --workdir vlp3d-runs/demo     # ~3 min on 2 cores
    .venv/bin/python benchmarks/bench_embed.py --workdir vlp3d-runs/demo --volumes 200 --actors 0 1 2 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from vlp3d.table import format_table


def demo_manifest(workdir: Path, volumes: int, out: Path) -> Path:
    """The first `volumes` CT files of the demo corpus (training and validation), with rescale and reports."""
    corpus = workdir / "corpus"
    metadata = pd.concat([pd.read_csv(p) for p in sorted((corpus / "metadata").glob("*.csv"))])
    reports = pd.concat([pd.read_csv(p) for p in sorted((corpus / "radiology_text_reports").glob("*.csv"))])
    paths = {p.name: p for p in corpus.rglob("*.nii.gz") if "label_maps" not in p.parts}
    table = metadata.merge(reports, on="VolumeName")
    table = table[table["VolumeName"].isin(paths)].head(volumes)
    if len(table) < volumes:
        raise SystemExit(f"{corpus} holds {len(table)} volumes, fewer than --volumes {volumes}")
    manifest = pd.DataFrame({"image": [str(paths[n].resolve()) for n in table["VolumeName"]],
                             "report": table["Findings_EN"].tolist(), "RescaleSlope": table["RescaleSlope"].tolist(),
                             "RescaleIntercept": table["RescaleIntercept"].tolist()})
    path = out / "manifest.csv"
    manifest.to_csv(path, index=False)
    return path


def run(manifest: Path, out: Path, model: str, workdir: Path, actors: int, batch: int, part_rows: int) -> float:
    command = [sys.executable, "-m", "vlp3d.cli", "embed", str(manifest), "--model", model, "--out", str(out),
               "--workdir", str(workdir), "--device", "cpu", "--batch-size", str(batch),
               "--part-rows", str(part_rows), "--actors", str(actors), "--log-level", "warning"]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, type=Path, help="a demo workdir (corpus/, mlflow.db)")
    parser.add_argument("--model", default="models:/vlp3d-clip@champion")
    parser.add_argument("--volumes", type=int, default=96)
    parser.add_argument("--actors", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--part-rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration (the median is shown)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vlp3d-bench-embed-") as tmp:
        folder = Path(tmp)
        manifest = demo_manifest(args.workdir.resolve(), args.volumes, folder)
        figures, reference = [], None
        for actors in args.actors:
            times = []
            for repeat in range(args.repeats):
                out = folder / f"actors{actors}-{repeat}.parquet"
                times.append(run(manifest, out, args.model, args.workdir.resolve(), actors, args.batch_size,
                                 args.part_rows))
            table = pd.read_parquet(out)
            vectors = np.stack([np.asarray(v, dtype=np.float32) for v in table["image_embedding"]])
            if reference is None:
                reference = vectors
            same = bool(np.allclose(vectors, reference, atol=1e-5))
            wall = float(np.median(times))
            figures.append({"actors": actors, "volumes": args.volumes, "wall_s": round(wall, 1),
                            "volumes_per_s": round(args.volumes / wall, 2), "same_rows_as_first": same})
    print(format_table([[f["actors"] or "0 (this process)", f["volumes"], f["wall_s"], f["volumes_per_s"],
                         f["same_rows_as_first"]] for f in figures],
                       ["actors", "volumes", "wall s", "volumes/s", "same rows"], title="vlp3d embed throughput"))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
