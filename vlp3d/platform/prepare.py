"""`vlp3d prepare`: a Ray Data pipeline from a corpus manifest to Parquet shards + `_manifest.json`.

Rows are split by modality before Ray Data and the pipeline runs once per modality present: CT
rows go to `<out>/<spec hash>/*.parquet`, 2D radiographs to `<out>/<spec hash>/xray/*.parquet`
(`vlp3d.data.shards.shard_files`).

Resume: `_prepare.json` (written first) records the source manifest hash. A run that stopped
before writing `_manifest.json` is resumed by the next run with the same source: rows found in
readable Parquet files (by `row` id) and rows recorded as failed (`_failed/`) are kept,
unreadable (partially written) files are deleted, and only the missing rows are processed. A
different source manifest clears the folder; a finished folder with the same source is a no-op
(delete the folder to retry failed rows).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

import vlp3d
from vlp3d.config import ExperimentConfig
from vlp3d.data.corpus import fraction_ranks, manifest_hash, manifest_rows, read_corpus
from vlp3d.data.shards import (
    MANIFEST,
    MODALITIES,
    MODALITY_DIRS,
    normalise_modality,
    preprocess_row,
    shard_files,
    spec_from_config,
)
from vlp3d.data.volume import PreprocessSpec
from vlp3d.engine import text_dim_for
from vlp3d.platform.runtime import init_ray

FAILED_DIR = "_failed"
PROGRESS = "_prepare.json"
ROWS_PER_FILE = {"fixed": 256, "highres": 16}  # highres rows are MBs each: smaller files
_SUMMARY_COLUMNS = ["row", "split", "hu_source", "warnings", "modality"]


@dataclass
class PrepareResult:
    shard_dir: Path
    manifest: dict
    skipped: bool = False


def _record_failure(failed_dir: str | Path, row: dict, reason: str) -> None:
    record = {"row": int(row["row"]), "path": str(row.get("image")),
              "volume_name": str(row.get("VolumeName")), "reason": reason}
    Path(failed_dir, f"row-{int(row['row']):08d}.json").write_text(json.dumps(record))


def _preprocess_batch(batch: dict, spec: PreprocessSpec, label_names: list[str], failed_dir: str) -> dict:
    """Ray Data UDF: preprocess each row; a row that fails is written to `failed_dir` and dropped."""
    rows = [dict(zip(batch.keys(), values, strict=True)) for values in zip(*batch.values(), strict=True)]
    out: dict[str, list] = {}
    for row in rows:
        row = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}
        try:
            shard_row = preprocess_row(row, spec, label_names)
        except Exception as err:  # noqa: BLE001 - every failure is recorded with its reason
            _record_failure(failed_dir, row, f"{type(err).__name__}: {err}")
            continue
        for key, value in shard_row.items():
            out.setdefault(key, []).append(value)
    if not out:
        return {}
    tensors = ("labels", "spacing_mm_source", "image_shape")
    if spec.storage != "highres" or out["modality"][0] != "ct":
        tensors += ("image",)  # highres CT images are bytes: a binary column
    result = {key: np.stack(values) if key in tensors else np.array(values, dtype=object)
              for key, values in out.items()}
    result["row"] = np.asarray(out["row"], dtype=np.int64)
    for key in ("hu_slope", "hu_intercept", "fraction_rank"):
        result[key] = np.asarray(out[key], dtype=np.float32)
    return result


class ReportEncoder:
    """Ray Data actor: token ids and frozen report embeddings, model loaded once per actor."""

    def __init__(self, text_encoder: str, max_tokens: int, with_embeddings: bool, max_sentences: int):
        import torch

        from vlp3d.encoders.text import TextEncoder

        torch.set_num_threads(1)
        self.encoder = TextEncoder(text_encoder, max_tokens=max_tokens)
        self.with_embeddings = with_embeddings
        self.max_sentences = max_sentences

    def __call__(self, batch: dict) -> dict:
        from vlp3d.encoders.text import embed_report_sentences

        tokens = self.encoder.tokenize(list(batch["report"]))
        batch["input_ids"] = tokens["input_ids"].numpy().astype(np.int32)
        batch["attention_mask"] = tokens["attention_mask"].numpy().astype(np.int8)
        sentences = [str(s).split("\n") for s in batch["sentences"]]
        if self.with_embeddings:
            reports, per_sentence, mask = embed_report_sentences(self.encoder, sentences, self.max_sentences)
            batch["report_embedding"] = reports.numpy().astype(np.float32)
            # fixed width so every shard row has the same tensor shape (padded, with a mask)
            full = np.zeros((len(sentences), self.max_sentences, per_sentence.shape[-1]), dtype=np.float16)
            full_mask = np.zeros((len(sentences), self.max_sentences), dtype=np.bool_)
            full[:, :per_sentence.shape[1]] = per_sentence.numpy()
            full_mask[:, :mask.shape[1]] = mask.numpy()
            batch["sentence_embeddings"], batch["sentence_mask"] = full, full_mask
        return batch


def prepare(cfg: ExperimentConfig, corpus: str, out: str, progress=print,
            rows_per_file: int | None = None) -> PrepareResult:
    """Preprocess `corpus` into `out/<spec_hash>/`; unchanged input and spec is a no-op, a run that
    stopped halfway is resumed (see the module docstring). `rows_per_file`: Parquet rows per file
    (default 256, highres 16)."""
    import ray

    started = time.time()
    spec = spec_from_config(cfg)
    table = read_corpus(corpus, valid_fraction=cfg.data.valid_fraction)
    label_names = list(table.attrs["label_names"])
    table["fraction_rank"] = fraction_ranks(table, label_names)
    source_hash = manifest_hash(table)
    shard_dir = Path(out).resolve() / spec.hash
    manifest_path = shard_dir / MANIFEST
    if manifest_path.is_file():
        existing = json.loads(manifest_path.read_text())
        if existing.get("source_manifest_hash") == source_hash:
            progress(f"shards up to date: {shard_dir} (spec {spec.hash}, source {source_hash})")
            return PrepareResult(shard_dir, existing, skipped=True)
    failed_dir = shard_dir / FAILED_DIR
    done = _resumable_rows(shard_dir, source_hash, spec.hash, progress)
    if done is None:  # nothing to resume: start afresh
        if shard_dir.exists():
            shutil.rmtree(shard_dir)
        shard_dir.mkdir(parents=True)
        (shard_dir / PROGRESS).write_text(json.dumps({"source_manifest_hash": source_hash, "spec_hash": spec.hash}))
        done = set()
    failed_dir.mkdir(parents=True, exist_ok=True)
    done |= _failed_rows(failed_dir)  # failures of the interrupted run stand, like those of a finished run

    rows = manifest_rows(table)
    todo: dict[str, list[dict]] = {}
    for row in rows:
        if row["row"] in done:
            continue
        try:
            modality = normalise_modality(row.get("modality"))
        except ValueError as err:
            _record_failure(failed_dir, row, f"ValueError: {err}")
            continue
        todo.setdefault(modality, []).append(row)
    if done:
        progress(f"resuming {shard_dir}: {len(done)} rows kept (written or failed), {sum(map(len, todo.values()))} to do")
    if todo:
        init_ray(cfg)
    for modality, modality_rows in todo.items():
        target = shard_dir / MODALITY_DIRS[modality]
        progress(f"preprocessing {len(modality_rows)} {modality} rows -> {target}")
        _run_pipeline(ray, cfg, spec, modality_rows, label_names, failed_dir, target,
                      rows_per_file or ROWS_PER_FILE[spec.storage if modality == "ct" else "fixed"])

    failed = sorted((json.loads(p.read_text()) for p in failed_dir.glob("*.json")), key=lambda r: r["row"])
    written = _written_summary(shard_dir)
    duplicated = int(written["row"].duplicated().sum())
    if duplicated:
        raise RuntimeError(f"{shard_dir}: {duplicated} rows written twice; delete the folder and prepare again")
    warnings = [{"row": int(r.row), "warning": r.warnings} for r in written.itertuples() if r.warnings]
    manifest = {
        "vlp3d_version": vlp3d.__version__,
        "corpus": str(Path(corpus).resolve()),
        "source_manifest_hash": source_hash,
        "spec": spec.to_dict(),
        "spec_hash": spec.hash,
        "label_names": label_names,
        "text_dim": text_dim_for(cfg),
        "counts": {
            "rows": len(rows),
            "written": len(written),
            "failed": len(failed),
            "resumed": len(done),  # rows (written or failed) kept from an interrupted run
            "by_split": _counts(written["split"]),
            "by_modality": {m: int((written["modality"] == m).sum()) for m in MODALITIES
                            if (written["modality"] == m).any()},
            "hu_source": _counts(written["hu_source"]),
            "with_warnings": len(warnings),
        },
        "failed": failed,
        "warnings": sorted(warnings, key=lambda r: r["row"]),
        "elapsed_s": round(time.time() - started, 1),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(failed_dir)
    return PrepareResult(shard_dir, manifest)


def _counts(column: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in column.value_counts().sort_index().items()}


def _run_pipeline(ray, cfg: ExperimentConfig, spec: PreprocessSpec, rows: list[dict], label_names: list[str],
                  failed_dir: Path, target: Path, rows_per_file: int) -> None:
    """The Ray Data pipeline for rows of one modality: preprocess -> tokenize/embed -> Parquet."""
    n_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), max(4 * n_cpus, len(rows) // 8)))
    ds = ds.map_batches(
        _preprocess_batch,
        batch_size=4,
        fn_kwargs={"spec": spec, "label_names": label_names, "failed_dir": str(failed_dir)},
    )
    ds = ds.map_batches(
        ReportEncoder,
        batch_size=64,
        fn_constructor_kwargs={"text_encoder": cfg.model.text_encoder, "max_tokens": spec.max_tokens,
                               "with_embeddings": spec.text_embeddings, "max_sentences": spec.max_sentences},
        compute=ray.data.ActorPoolStrategy(size=1),
        num_gpus=1 if cfg.cluster.use_gpu else 0,
        # fractional CPU: keeps Ray Data from fusing the volume tasks into this single actor
        num_cpus=0.5,
    )
    ds.write_parquet(str(target), min_rows_per_file=rows_per_file, max_rows_per_file=rows_per_file)


def _readable_rows(path: Path) -> list[int] | None:
    """`row` ids of a complete Parquet file; None if it cannot be read (e.g. cut off mid-write)."""
    try:
        return [int(v) for v in pq.read_table(path, columns=["row"]).column("row").to_pylist()]
    except Exception:  # noqa: BLE001 - any unreadable file is redone
        return None


def _resumable_rows(shard_dir: Path, source_hash: str, spec_hash: str, progress) -> set[int] | None:
    """Row ids already written by an unfinished run on the same source; None: start afresh.

    Unreadable Parquet files are deleted (their rows are redone); a row found in two files (not
    written by this code, but cheap to guard) keeps its first file only.
    """
    marker = shard_dir / PROGRESS
    if not marker.is_file():
        return None
    try:
        state = json.loads(marker.read_text())
    except ValueError:
        return None
    if state.get("source_manifest_hash") != source_hash or state.get("spec_hash") != spec_hash:
        return None
    done: set[int] = set()
    for modality in MODALITIES:
        for name in shard_files(shard_dir, modality):
            path = Path(name)
            rows = _readable_rows(path)
            if rows is None or done.intersection(rows):
                progress(f"removing {'unreadable' if rows is None else 'duplicate'} shard file {path.name}")
                path.unlink()
                continue
            done.update(rows)
    return done


def _failed_rows(failed_dir: Path) -> set[int]:
    """Rows recorded as failed in `failed_dir`; a record cut off mid-write is deleted (row redone)."""
    rows = set()
    for path in failed_dir.glob("*.json"):
        try:
            rows.add(int(json.loads(path.read_text())["row"]))
        except (ValueError, KeyError, TypeError):
            path.unlink()
    return rows


def _written_summary(shard_dir: Path) -> pd.DataFrame:
    frames = [pq.read_table(name, columns=_SUMMARY_COLUMNS).to_pandas()
              for modality in MODALITIES for name in shard_files(shard_dir, modality)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in _SUMMARY_COLUMNS})
    return pd.concat(frames, ignore_index=True)
