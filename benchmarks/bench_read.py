"""Shard read rate (`iter_torch_batches` rows/s) versus the rate one training step consumes rows.

    python benchmarks/bench_read.py                        # demo 48^3 and MG-3D 128x128x96 specs
    python benchmarks/bench_read.py --specs demo --n-demo 128

For each spec, phantom corpora are synthesised and prepared with `vlp3d.platform.prepare` into
`benchmarks/results/read/` once (re-runs reuse them). The training split is then read the way
pretraining reads it (`read_parquet` of the shards -> split filter -> `image` +
`report_embedding`), batch 16, `prefetch_batches` 1 and 2 (Ray Data's format threadpool has that
many threads), streamed from Parquet and materialised in the object store. Each figure is the
second of two full passes (the first warms Ray's workers). The consumption rate is a forward +
backward of the default `resnet3d` tiny encoder on a batch of 16 of that shape, fp32, CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from vlp3d.config import load_config  # noqa: E402
from vlp3d.data.phantom import synthesize  # noqa: E402
from vlp3d.table import format_table  # noqa: E402

SPECS = {
    "demo": {"shape": (48, 48, 48), "spacing_mm": (8.0, 8.0, 8.0)},
    "mg3d": {"shape": (128, 128, 96), "spacing_mm": (0.75, 0.75, 1.5)},
}
COLUMNS = ["image", "report_embedding"]
BATCH = 16


def prepared_shards(name: str, n: int, root: Path) -> Path:
    from vlp3d.platform.prepare import prepare

    spec = SPECS[name]
    corpus = root / f"corpus_{n}"
    if not corpus.is_dir():
        print(f"synthesising {n} phantom CTs into {corpus} ...", flush=True)
        synthesize(corpus, n, seed=0)
    cfg = load_config(None, [f"data.shape={list(spec['shape'])}", f"data.spacing_mm={list(spec['spacing_mm'])}"])
    started = time.time()
    result = prepare(cfg, str(corpus), str(root / "shards"), progress=lambda *_: None)
    if not result.skipped:
        print(f"prepared {result.manifest['counts']['written']} volumes ({name}) in {time.time() - started:.0f} s",
              flush=True)
    return result.shard_dir


def read_rate(shard_dir: Path, prefetch: int, materialize: bool) -> dict:
    """Second full pass: rows/s, seconds, seconds to the first batch; plus seconds to materialise."""
    import ray
    from ray.data.expressions import col

    files = sorted(str(p) for p in shard_dir.glob("*.parquet"))
    ds = ray.data.read_parquet(files, columns=[*COLUMNS, "split"])
    ds = ds.filter(expr=col("split") == "train").select_columns(COLUMNS)
    materialise_s = 0.0
    if materialize:
        started = time.perf_counter()
        ds = ds.materialize()
        materialise_s = time.perf_counter() - started
    result = {}
    for _ in range(2):
        started, rows, first = time.perf_counter(), 0, None
        for batch in ds.iter_torch_batches(batch_size=BATCH, prefetch_batches=prefetch, drop_last=True):
            rows += batch["image"].shape[0]
            first = time.perf_counter() - started if first is None else first
        seconds = time.perf_counter() - started
        result = {"rows": rows, "rows_per_s": rows / seconds, "pass_s": seconds, "first_batch_s": first,
                  "files": len(files), "materialise_s": materialise_s}
    return result


def consume_rate(shape: tuple[int, int, int], threads: int, steps: int) -> float:
    """Rows/s of forward + backward of resnet3d tiny at batch 16 (what a training step eats)."""
    from vlp3d.encoders import build_image_encoder

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    encoder = build_image_encoder("resnet3d", "tiny", img_size=shape)
    batch = torch.rand(BATCH, 1, *shape)
    times = []
    for _ in range(steps + 1):  # the first step is a warm-up
        encoder.zero_grad(set_to_none=True)
        started = time.perf_counter()
        pooled, tokens = encoder(batch)
        (pooled.square().mean() + tokens.square().mean()).backward()
        times.append(time.perf_counter() - started)
    return BATCH / min(times[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", nargs="+", default=list(SPECS), choices=list(SPECS))
    parser.add_argument("--n-demo", type=int, default=256, help="phantoms for the demo spec (default 256)")
    parser.add_argument("--n-mg3d", type=int, default=64, help="phantoms for the MG-3D spec (default 64)")
    parser.add_argument("--root", default="benchmarks/results/read")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps (default 2, after one warm-up)")
    args = parser.parse_args()

    from vlp3d.platform.runtime import init_ray

    root = Path(args.root)
    init_ray(None)
    rows_out, records = [], []
    for name in args.specs:
        shard_dir = prepared_shards(name, args.n_demo if name == "demo" else args.n_mg3d, root)
        shape = SPECS[name]["shape"]
        size_mb = sum(p.stat().st_size for p in shard_dir.glob("*.parquet")) / 2**20
        for materialize in (False, True):
            for prefetch in (1, 2):
                result = read_rate(shard_dir, prefetch, materialize)
                source = "object store" if materialize else f"parquet stream ({result['files']} file)"
                rows_out.append([name, source, prefetch, result["rows"], round(result["rows_per_s"], 1),
                                 round(result["pass_s"], 2), round(result["first_batch_s"], 2)])
                records.append({"spec": name, "source": source, "prefetch_batches": prefetch, "shards_mb": size_mb,
                                **result})
        for threads in (1, 2):
            rate = consume_rate(shape, threads, args.steps)
            rows_out.append([name, f"train step, {threads} thread{'s' if threads > 1 else ''}", "-", BATCH,
                             round(rate, 1), round(BATCH / rate, 2), "-"])
            records.append({"spec": name, "source": "train_step", "threads": threads, "rows_per_s": rate})
    print(format_table(rows_out, ["spec", "source", "prefetch", "rows", "rows/s", "pass s", "1st batch s"],
                       title=f"batch {BATCH}: reading shards vs. resnet3d tiny forward+backward (CPU)"))
    out = root / "read.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
