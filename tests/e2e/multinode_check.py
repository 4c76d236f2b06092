"""Prepare + training-data sharding on a simulated 2-node Ray cluster (run by test_multinode.py).

Runs in its own process because the test session already holds a local Ray. Prints one JSON
line prefixed with RESULT; exits non-zero on any failed check.

    python tests/e2e/multinode_check.py WORKDIR
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NODE_MARKS = "node_marks"


def _mark_node(kind: str) -> None:
    import ray

    marks = Path(os.environ["VLP3D_NODE_MARKS"])
    (marks / f"{kind}-{ray.get_runtime_context().get_node_id()}-{uuid.uuid4().hex[:8]}").touch()


def _consume(iterator, epochs: int, out: list) -> None:
    """One Train worker: read its split for `epochs` epochs, record the row ids per epoch."""
    try:
        for _ in range(epochs):
            rows = []
            for batch in iterator.iter_batches(batch_size=2, batch_format="numpy"):
                rows.extend(int(r) for r in batch["row"])
            out.append(rows)
    except BaseException as err:  # noqa: BLE001 - reported by the main thread
        out.append(err)


def _check_split(dataset, train_rows: list[int], nodes: list[str], epochs: int = 2) -> dict:
    """Split like Ray Train's get_dataset_shard, read two epochs; rows disjoint, union all but the drop."""
    import ray.train

    splits = ray.train.DataConfig().configure({"train": dataset}, world_size=2, worker_handles=None,
                                              worker_node_ids=nodes)
    seen: list[list] = [[], []]
    threads = [threading.Thread(target=_consume, args=(splits[i]["train"], epochs, seen[i])) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "streaming_split consumers hung"
    for item in seen[0] + seen[1]:
        if isinstance(item, BaseException):
            raise item
    dropped = []
    for epoch in range(epochs):
        a, b = seen[0][epoch], seen[1][epoch]
        assert len(a) == len(set(a)) and len(b) == len(set(b)), "a row repeated within one worker's epoch"
        assert not set(a) & set(b), f"epoch {epoch}: workers share rows {set(a) & set(b)}"
        assert len(a) == len(b), f"epoch {epoch}: equal=True gave {len(a)} and {len(b)} rows"
        assert set(a) | set(b) <= set(train_rows)
        missing = sorted(set(train_rows) - set(a) - set(b))
        assert len(missing) == len(train_rows) % 2, (epoch, missing, a, b)
        dropped.append(missing)
    return {"rows": len(train_rows), "worker0": [sorted(e) for e in seen[0]],
            "worker1": [sorted(e) for e in seen[1]], "dropped_per_epoch": dropped}


def main(workdir: str) -> int:
    import pyarrow.parquet as pq
    import ray
    from ray.cluster_utils import Cluster
    from ray.data.expressions import col

    import vlp3d.platform.prepare as prepare_module
    from vlp3d.config import load_config
    from vlp3d.data.phantom import synthesize

    started = time.time()
    work = Path(workdir)
    marks = work / NODE_MARKS
    marks.mkdir(parents=True, exist_ok=True)
    # both simulated nodes run on this machine, so a folder is a cheap cross-node log
    os.environ["VLP3D_NODE_MARKS"] = str(marks)

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 150 * 2**20,
        "env_vars": {"VLP3D_NODE_MARKS": str(marks), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=150 * 2**20,
                         env_vars={"VLP3D_NODE_MARKS": str(marks), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
        cluster.wait_for_nodes()
        timings = {"cluster_s": round(time.time() - started, 1)}

        corpus = work / "corpus"
        synthesize(corpus, n=8, seed=0, workers=1)
        cfg = load_config(None, ["data.shape=[16,16,16]", "data.spacing_mm=[24.0,24.0,24.0]",
                                 f"cluster.address={cluster.address}"])

        # record which node ran each volume task / the report-encoder actor (pickled by value from __main__)
        original_batch = prepare_module._preprocess_batch

        def traced_batch(batch, **kwargs):
            _mark_node("volume")
            return original_batch(batch, **kwargs)

        class TracedReportEncoder(prepare_module.ReportEncoder):
            def __init__(self, *args, **kwargs):
                _mark_node("encoder")
                super().__init__(*args, **kwargs)

        prepare_module._preprocess_batch = traced_batch
        prepare_module.ReportEncoder = TracedReportEncoder
        t0 = time.time()
        result = prepare_module.prepare(cfg, str(corpus), str(work / "shards"), progress=lambda *_: None)
        timings["prepare_s"] = round(time.time() - t0, 1)
        assert ray.is_initialized() and ray.get_runtime_context().gcs_address == cluster.address
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        assert len(nodes) == 2, nodes
        used: dict[str, set] = {}
        for mark in marks.iterdir():
            kind, node, _ = mark.name.split("-")
            used.setdefault(kind, set()).add(node)
        assert used.get("volume") and used.get("encoder"), used
        assert used["volume"] | used["encoder"] == set(nodes), f"pipeline used {used}, cluster has {nodes}"

        manifest = result.manifest
        assert manifest["counts"]["failed"] == 0, manifest["failed"]
        table = pq.read_table(result.shard_dir, columns=["row", "split"]).to_pandas()
        train_rows = sorted(int(r) for r in table[table.split == cfg.data.train_split].row)

        # the real training dataset (same filter/materialise logic as pretrain), plus the row id
        from vlp3d.data.shards import shard_files
        from vlp3d.objectives import objective_class
        from vlp3d.platform.ray_data import shard_dataset

        columns = [*dict.fromkeys([*objective_class(cfg.objective.name).columns, "row"])]
        dataset = shard_dataset(cfg, shard_files(result.shard_dir), columns, cfg.data.train_split, cfg.data.fraction)
        assert "row" in dataset.columns(), f"training dataset columns {dataset.columns()} lack the row id"
        # both parities of the training-row count: equal=True may drop up to world_size - 1 rows
        t0 = time.time()
        full = _check_split(dataset, train_rows, nodes)
        dropped_one = _check_split(dataset.filter(expr=col("row") != train_rows[-1]), train_rows[:-1], nodes)
        timings["split_s"] = round(time.time() - t0, 1)
        report = {
            "nodes": nodes,
            "volume_task_nodes": sorted(used.get("volume", ())),
            "encoder_nodes": sorted(used.get("encoder", ())),
            "train_rows": train_rows,
            "split_full": full,
            "split_one_less": dropped_one,
            "materialized": type(dataset).__name__,
            "timings": timings,
        }
        print("RESULT " + json.dumps(report), flush=True)
        return 0
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
