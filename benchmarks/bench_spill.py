"""The Ray Data read path of pretraining on a simulated multi-node cluster whose object store is far
smaller than the corpus: what spills to disk, how long an epoch takes, and what streaming (no
materialisation) costs instead.

A demo shard folder (`vlp3d demo` writes one) is replicated `--copies` times into a corpus of the
same format (the same Parquet files under new names: every row is a real shard row), read with
`vlp3d.platform.ray_data.shard_dataset` exactly as `vlp3d pretrain` reads it (`read_parquet` → split
filter → columns), once with `data.materialize = "always"` (held in the object store: it must spill)
and once with "never" (streamed), and consumed by `--workers` consumer actors, one per simulated node,
through `streaming_split` (what Ray Train's `get_dataset_shard` does), each decoding its rows as
the training feed does. The cluster is `ray.cluster_utils.Cluster`: `--nodes` raylets on this
machine with `--store-mb` of object store each, so spilling is real (to /tmp) but the network is
loopback.

    .venv/bin/vlp3d demo --workdir vlp3d-runs/demo                                          # once
    .venv/bin/python benchmarks/bench_spill.py --shards vlp3d-runs/demo/shards --copies 8   # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from vlp3d.table import format_table  # noqa: E402

MB = 2**20


def replicate(shard_dir: Path, copies: int, out: Path) -> tuple[list[str], int]:
    """`copies` copies of every CT shard file of `shard_dir` (and its manifest) in `out`."""
    from vlp3d.data.shards import MANIFEST, shard_files

    files = shard_files(shard_dir, "ct")
    if not files:
        raise SystemExit(f"{shard_dir}: no CT shard files (run `vlp3d demo` or `vlp3d prepare` first)")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(shard_dir) / MANIFEST, out / MANIFEST)
    written = []
    for copy in range(copies):
        for file in files:
            target = out / f"copy{copy:03d}-{Path(file).name}"
            shutil.copy(file, target)
            written.append(str(target))
    return written, sum(Path(f).stat().st_size for f in written)


def spilled_mb() -> tuple[float, float]:
    """(spilled, restored) MiB so far, from Ray's memory summary."""
    from ray._private.internal_api import memory_summary

    text = memory_summary(stats_only=True)
    spilled = re.search(r"Spilled (\d+) MiB", text)
    restored = re.search(r"Restored (\d+) MiB", text)
    return float(spilled.group(1)) if spilled else 0.0, float(restored.group(1)) if restored else 0.0


def epoch(dataset, workers: int, shape, storage_dtype: str) -> tuple[float, int]:
    """One pass of `workers` consumers over `dataset` (streaming_split, as Ray Train splits it): seconds, rows."""
    import ray

    @ray.remote(num_cpus=0.5)
    class Consumer:
        def consume(self, split) -> int:
            from vlp3d.data.shards import decode_image

            rows = 0
            for batch in split.iter_batches(batch_size=16, batch_format="numpy"):
                for value in batch["image"]:
                    decode_image(value, shape, storage_dtype)
                rows += len(batch["image"])
            return rows

    splits = dataset.streaming_split(workers, equal=True)
    consumers = [Consumer.options(scheduling_strategy="SPREAD").remote() for _ in range(workers)]
    started = time.perf_counter()
    rows = sum(ray.get([c.consume.remote(s) for c, s in zip(consumers, splits, strict=True)]))
    return time.perf_counter() - started, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, type=Path, help="a shard folder (OUT/<spec hash>) or its parent")
    parser.add_argument("--copies", type=int, default=8, help="copies of the shard files in the corpus")
    parser.add_argument("--nodes", type=int, default=2, help="simulated nodes (raylets)")
    parser.add_argument("--store-mb", type=int, default=96, help="object store per node, MiB")
    parser.add_argument("--workers", type=int, default=2, help="consumers (training workers), spread over the nodes")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from vlp3d.config import ExperimentConfig, replace
    from vlp3d.data.shards import read_manifest, resolve_shard_dir
    from vlp3d.platform.ray_data import shard_dataset
    from vlp3d.platform.runtime import init_ray
    from vlp3d.train.tasks.pretrain import dataset_columns

    shard_dir = Path(resolve_shard_dir(args.shards))
    manifest = read_manifest(shard_dir)
    spec = manifest["spec"]
    shape, storage_dtype = tuple(spec["shape"]), spec.get("storage_dtype", "float16")
    figures = []
    with tempfile.TemporaryDirectory(prefix="vlp3d-spill-") as tmp:
        files, size = replicate(shard_dir, args.copies, Path(tmp) / "corpus")
        cluster = Cluster()
        try:
            for _ in range(args.nodes):
                cluster.add_node(num_cpus=2, object_store_memory=args.store_mb * MB)  # a whole CPU left for read tasks beside a consumer
            ray.init(address=cluster.address, logging_level="ERROR")
            init_ray(quiet=True)  # the Ray Data settings vlp3d's commands use (order kept, Parquet reader)
            cfg = ExperimentConfig()
            columns = dataset_columns(cfg)
            for materialize in ("always", "never"):
                run_cfg = replace(cfg, data={"materialize": materialize})
                before = spilled_mb()
                started = time.perf_counter()
                dataset = shard_dataset(run_cfg, files, columns, "train")
                prepared_s = time.perf_counter() - started
                seconds, rows = epoch(dataset, args.workers, shape, storage_dtype)
                after = spilled_mb()
                figures.append({"materialize": materialize, "corpus_mb": round(size / MB), "rows": rows,
                                "store_mb_total": args.store_mb * args.nodes, "materialise_s": round(prepared_s, 1),
                                "epoch_s": round(seconds, 1), "rows_per_s": round(rows / seconds, 1),
                                "spilled_mb": after[0] - before[0], "restored_mb": after[1] - before[1]})
                del dataset
        finally:
            ray.shutdown()
            cluster.shutdown()
    print(format_table([[f["materialize"], f["corpus_mb"], f["store_mb_total"], f["rows"], f["materialise_s"],
                         f["epoch_s"], f["rows_per_s"], f["spilled_mb"], f["restored_mb"]] for f in figures],
                       ["data.materialize", "corpus MiB", "object store MiB (all nodes)", "rows", "materialise s",
                        "epoch s", "rows/s", "spilled MiB", "restored MiB"],
                       title=f"Ray Data read path on {args.nodes} simulated nodes, {args.workers} consumers"))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
