"""What one Ray Data read of a shard folder costs with Ray 2.60's two Parquet readers: V2 (Ray's
default: a ListFiles task and a pool of footer-reading actors, new processes, per read) and V1 (read
tasks only), which vlp3d uses unless RAY_DATA_USE_DATASOURCE_V2=1 is set. Each reader runs in a fresh
local Ray (2 CPUs); the first read includes worker start-up, the later ones are warm.

    make demo
    .venv/bin/python benchmarks/bench_parquet_reader.py --shards vlp3d-runs/demo/shards
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from vlp3d.table import format_table

CHILD = """
import json, sys, time
import ray, ray.data
from vlp3d.data.shards import resolve_shard_dir, shard_files
ray.init(address="local", num_cpus=2, object_store_memory=400 * 2**20, include_dashboard=False, logging_level="ERROR")
context = ray.data.DataContext.get_current()
context.enable_progress_bars = False
context.use_datasource_v2 = sys.argv[1] == "v2"
files = shard_files(resolve_shard_dir(sys.argv[2]), "ct")
times = []
for _ in range(int(sys.argv[3])):
    started = time.perf_counter()
    rows = sum(len(b["volume_name"]) for b in ray.data.read_parquet(files, columns=["volume_name", "split"])
               .iter_batches(batch_format="numpy"))
    times.append(time.perf_counter() - started)
print(json.dumps({"files": len(files), "rows": rows, "times": times}))
ray.shutdown()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, type=Path, help="a shard folder (OUT/<spec hash>) or its parent")
    parser.add_argument("--reads", type=int, default=4, help="reads per reader, in one Ray session")
    args = parser.parse_args()
    rows = []
    for reader in ("v2", "v1"):
        out = subprocess.run([sys.executable, "-c", CHILD, reader, str(args.shards), str(args.reads)],
                             check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        result = json.loads(out)
        warm = sorted(result["times"][1:])
        rows.append([reader.upper(), result["files"], result["rows"], round(result["times"][0], 2),
                     round(warm[len(warm) // 2], 2)])
    print(format_table(rows, ["reader", "files", "rows", "first read s", "warm read s (median)"],
                       title="Ray Data read_parquet of the CT shards"))


if __name__ == "__main__":
    main()
