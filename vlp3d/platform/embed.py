"""`vlp3d embed` at any scale: the input table in parts of `part_rows` rows, each embedded through the
model's own pyfunc (the served model's preprocessing and HU rules) and written as one Parquet file
beside the output (`OUT.parquet.parts/`) as soon as it is done, in this process or on Ray Data
actors that each load the model once (a GPU each when the cluster has them). A rerun with the same
inputs, model and part size keeps the parts already written; at the end the parts are joined, in
input order, into OUT.parquet. Either way the rows are the same: parts, batches and model calls do
not depend on where they run.

A part the model refuses (an unreadable volume, a path outside the model's allowed root, a volume
that is not CT) is embedded again row by row: the refused rows get no embeddings and their one-line
reason in the `error` column, the others are kept; one bad volume never costs the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

STATE_FILE = "_embed.json"
PART = "part-{:06d}.parquet"
ERROR_COLUMN = "error"
OUTPUT_COLUMNS = ("image_embedding", "report_embedding")


@dataclass
class EmbedPlan:
    """What to embed and where the parts go. `columns` are the model's input columns of `table`."""

    table: pd.DataFrame
    columns: list[str]
    model_uri: str
    out: Path
    part_rows: int = 256
    batch_size: int = 8
    params: dict = field(default_factory=dict)

    @property
    def parts_dir(self) -> Path:
        return self.out.with_name(self.out.name + ".parts")

    @property
    def n_parts(self) -> int:
        return -(-len(self.table) // self.part_rows)

    def part(self, index: int) -> pd.DataFrame:
        return self.table.iloc[index * self.part_rows:(index + 1) * self.part_rows]

    def fingerprint(self) -> str:
        """What the parts were computed from: the model, the inputs (paths, reports, rescale), the part
        size and the predict params; parts of another fingerprint are never mixed in."""
        digest = hashlib.sha256()
        digest.update(json.dumps({"model": self.model_uri, "part_rows": self.part_rows, "batch_size": self.batch_size,
                                  "params": self.params, "columns": self.columns}, sort_keys=True).encode())
        digest.update(pd.util.hash_pandas_object(self.table[self.columns].astype(str), index=True).values.tobytes())
        return digest.hexdigest()[:16]


def done_parts(plan: EmbedPlan) -> set[int]:
    """Parts already written for this plan; the parts folder is (re)started when it holds another plan's."""
    folder = plan.parts_dir
    state = folder / STATE_FILE
    fingerprint = plan.fingerprint()
    if folder.exists():
        try:
            written = json.loads(state.read_text()).get("fingerprint")
        except (OSError, ValueError):
            written = None
        if written != fingerprint:
            if written is not None and any(folder.glob("part-*.parquet")):
                raise FileExistsError(
                    f"{folder} holds parts embedded from other inputs, another model or another --part-rows; "
                    f"delete it or choose another --out (a rerun of the same command resumes from its parts)")
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"fingerprint": fingerprint, "model": plan.model_uri, "rows": len(plan.table),
                                 "part_rows": plan.part_rows}))
    return {int(p.stem.split("-")[1]) for p in folder.glob("part-*.parquet")}


def write_part(plan: EmbedPlan, index: int, embedded: pd.DataFrame) -> None:
    """One part's rows (input columns + embeddings + error), whole or not at all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = plan.parts_dir / PART.format(index)
    partial = path.with_name(path.name + ".partial")
    # without pandas' metadata: rows from Ray Data carry pyarrow-backed dtypes that pandas cannot read back
    table = pa.Table.from_pandas(embedded, preserve_index=False)
    pq.write_table(table.replace_schema_metadata(None), partial)
    partial.replace(path)


def embed_rows(model, rows: pd.DataFrame, plan_columns: list[str], batch_size: int, params: dict,
               predict: Callable) -> pd.DataFrame:
    """`rows` with image_embedding, report_embedding and error: batches of `batch_size` through the
    pyfunc; a refused batch is retried row by row so that only the refused rows lose their embeddings."""
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows.iloc[start:start + batch_size]
        try:
            result = predict(model, chunk[plan_columns], params=params).set_axis(chunk.index)
            result[ERROR_COLUMN] = None
        except (ValueError, OSError):
            result = pd.concat([_one_row(model, chunk.iloc[[i]][plan_columns], params, predict)
                                for i in range(len(chunk))])
        out.append(result)
    embedded = pd.concat(out) if out else pd.DataFrame(columns=[*OUTPUT_COLUMNS, ERROR_COLUMN])
    return pd.concat([rows, embedded], axis=1).reset_index(drop=True)


def _one_row(model, row: pd.DataFrame, params: dict, predict: Callable) -> pd.DataFrame:
    try:
        result = predict(model, row, params=params).set_axis(row.index)
        result[ERROR_COLUMN] = None
    except (ValueError, OSError) as err:
        reason = str(err).strip().splitlines()[0][:500] if str(err).strip() else type(err).__name__
        report = None
        if "report" in row and pd.notna(row["report"].iloc[0]):  # the report still gets its embedding
            report = predict(model, row.assign(image=None), params=params)["report_embedding"].iloc[0]
        result = pd.DataFrame({"image_embedding": [None], "report_embedding": [report], ERROR_COLUMN: [reason]},
                              index=row.index)
    return result


class PartEmbedder:
    """One Ray Data actor (or this process): loads the pyfunc once, embeds whole parts."""

    def __init__(self, model_uri: str, tracking_uri: str, model_config: dict, table: pd.DataFrame,
                 columns: list[str], part_rows: int, batch_size: int, params: dict):
        from vlp3d.platform.mlflow.models import load_embedder, predict
        from vlp3d.platform.mlflow.store import client

        if type(table).__name__ == "ObjectRef":  # on a Ray Data actor: the driver's table, put once
            import ray

            table = ray.get(table)
        client(tracking_uri)
        self.model, _ = load_embedder(model_uri, model_config=model_config)
        self.predict = predict
        self.table, self.columns, self.part_rows = table, columns, part_rows
        self.batch_size, self.params = batch_size, params

    def embed_part(self, index: int) -> pd.DataFrame:
        rows = self.table.iloc[index * self.part_rows:(index + 1) * self.part_rows]
        out = embed_rows(self.model, rows, self.columns, self.batch_size, self.params, self.predict)
        out["_part"] = index
        return out

    def __call__(self, batch: dict) -> pd.DataFrame:  # Ray Data: a batch of part indices
        return pd.concat([self.embed_part(int(i)) for i in batch["part"]], ignore_index=True)


def _local_parts(plan: EmbedPlan, todo: list[int], tracking_uri: str, model_config: dict) -> Iterator[tuple[int, pd.DataFrame]]:
    embedder = PartEmbedder(plan.model_uri, tracking_uri, model_config, plan.table, plan.columns, plan.part_rows,
                            plan.batch_size, plan.params)
    for index in todo:
        yield index, embedder.embed_part(index).drop(columns="_part")


def _ray_parts(plan: EmbedPlan, todo: list[int], tracking_uri: str, model_config: dict, actors: int,
               gpus_per_actor: float) -> Iterator[tuple[int, pd.DataFrame]]:
    """Parts embedded by `actors` Ray Data actors; each part comes back to this process, which writes it
    (so a part never lands on a worker node's own disk)."""
    import ray

    table_ref = ray.put(plan.table)
    dataset = ray.data.from_items([{"part": i} for i in todo], override_num_blocks=max(1, len(todo)))
    embedded = dataset.map_batches(
        PartEmbedder, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus_per_actor,
        num_cpus=0 if gpus_per_actor else 1,
        fn_constructor_kwargs={"model_uri": plan.model_uri, "tracking_uri": tracking_uri, "model_config": model_config,
                               "table": table_ref, "columns": plan.columns, "part_rows": plan.part_rows,
                               "batch_size": plan.batch_size, "params": plan.params})
    expected = {i: len(plan.part(i)) for i in todo}
    pending: dict[int, list[pd.DataFrame]] = {}
    for block in embedded.iter_batches(batch_size=None, batch_format="pandas"):
        for index, rows in block.groupby("_part", sort=False):
            index = int(index)
            pending.setdefault(index, []).append(rows.drop(columns="_part"))
            if sum(len(r) for r in pending[index]) == expected[index]:
                yield index, pd.concat(pending.pop(index), ignore_index=True)


def run_embedding(plan: EmbedPlan, tracking_uri: str, model_config: dict, actors: int = 0,
                  progress: Callable[[int], None] | None = None) -> dict:
    """Embed every part not yet written, then join the parts into `plan.out`. `actors` 0: in this
    process; N: N Ray Data actors (Ray is started or joined here). Returns counts for the summary."""
    started = time.time()
    done = done_parts(plan)
    todo = [i for i in range(plan.n_parts) if i not in done]
    if progress is not None and done:
        progress(sum(len(plan.part(i)) for i in done))
    if todo:
        if actors:
            import ray

            from vlp3d.platform.runtime import init_ray

            init_ray()
            device = model_config.get("device", "auto")
            gpus = 1.0 if device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
            parts = _ray_parts(plan, todo, tracking_uri, model_config, actors, gpus)
        else:
            parts = _local_parts(plan, todo, tracking_uri, model_config)
        for index, embedded in parts:
            write_part(plan, index, embedded)
            if progress is not None:
                progress(len(embedded))
    frames = [pd.read_parquet(plan.parts_dir / PART.format(i)) for i in range(plan.n_parts)]
    result = pd.concat(frames, ignore_index=True) if frames else plan.table.assign(
        image_embedding=None, report_embedding=None, error=None)
    plan.out.parent.mkdir(parents=True, exist_ok=True)
    partial = plan.out.with_name(plan.out.name + ".partial")
    result.to_parquet(partial, index=False)
    partial.replace(plan.out)
    shutil.rmtree(plan.parts_dir)
    return {"rows": len(result), "volumes embedded": int(result["image_embedding"].notna().sum()),
            "reports embedded": int(result["report_embedding"].notna().sum()),
            "refused": int(result[ERROR_COLUMN].notna().sum()), "parts resumed": len(done),
            "parts embedded": len(todo), "seconds": round(time.time() - started, 1), "result": result}
