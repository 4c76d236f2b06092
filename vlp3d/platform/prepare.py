"""`vlp3d prepare`: a Ray Data pipeline from a corpus manifest to Parquet shards + `_manifest.json`."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads

import vlp3d
from vlp3d.config import ExperimentConfig
from vlp3d.data.corpus import fraction_ranks, manifest_hash, manifest_rows, read_corpus
from vlp3d.data.shards import MANIFEST, preprocess_row, spec_from_config
from vlp3d.data.volume import PreprocessSpec
from vlp3d.engine import text_dim_for
from vlp3d.platform.runtime import init_ray

FAILED_DIR = "_failed"


@dataclass
class PrepareResult:
    shard_dir: Path
    manifest: dict
    skipped: bool = False


def _preprocess_batch(batch: dict, spec: PreprocessSpec, label_names: list[str], failed_dir: str) -> dict:
    """Ray Data UDF: preprocess each row; a row that fails is written to `failed_dir` and dropped."""
    rows = [dict(zip(batch.keys(), values, strict=True)) for values in zip(*batch.values(), strict=True)]
    out: dict[str, list] = {}
    for row in rows:
        row = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}
        try:
            shard_row = preprocess_row(row, spec, label_names)
        except Exception as err:  # noqa: BLE001 - every failure is recorded with its reason
            record = {"row": int(row["row"]), "path": str(row.get("image")),
                      "volume_name": str(row.get("VolumeName")), "reason": f"{type(err).__name__}: {err}"}
            Path(failed_dir, f"row-{int(row['row']):08d}.json").write_text(json.dumps(record))
            continue
        for key, value in shard_row.items():
            out.setdefault(key, []).append(value)
    if not out:
        return {}
    result = {key: np.stack(values) if key in ("image", "labels", "spacing_mm_source") else np.array(values, dtype=object)
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


def prepare(cfg: ExperimentConfig, corpus: str, out: str, progress=print) -> PrepareResult:
    """Preprocess `corpus` into `out/<spec_hash>/`; unchanged input and spec is a no-op."""
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
    if shard_dir.exists():
        shutil.rmtree(shard_dir)
    failed_dir = shard_dir / FAILED_DIR
    failed_dir.mkdir(parents=True)

    init_ray(cfg)
    rows = manifest_rows(table)
    progress(f"preprocessing {len(rows)} volumes -> {shard_dir}")
    n_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), max(4 * n_cpus, len(rows) // 8)))
    ds = ds.map_batches(
        _preprocess_batch,
        batch_size=4,
        fn_kwargs={"spec": spec, "label_names": label_names, "failed_dir": str(failed_dir)},
    )
    use_gpu = cfg.cluster.use_gpu
    ds = ds.map_batches(
        ReportEncoder,
        batch_size=64,
        fn_constructor_kwargs={"text_encoder": cfg.model.text_encoder, "max_tokens": spec.max_tokens,
                               "with_embeddings": spec.text_embeddings, "max_sentences": spec.max_sentences},
        compute=ray.data.ActorPoolStrategy(size=1),
        num_gpus=1 if use_gpu else 0,
        # fractional CPU: keeps Ray Data from fusing the volume tasks into this single actor
        num_cpus=0.5,
    )
    ds.write_parquet(str(shard_dir), min_rows_per_file=256)

    failed = sorted((json.loads(p.read_text()) for p in failed_dir.glob("*.json")), key=lambda r: r["row"])
    written = pads.dataset(str(shard_dir), format="parquet").to_table(
        columns=["split", "hu_source", "warnings", "row"]).to_pandas()
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
            "by_split": {k: int(v) for k, v in written["split"].value_counts().sort_index().items()},
            "hu_source": {k: int(v) for k, v in written["hu_source"].value_counts().sort_index().items()},
            "with_warnings": len(warnings),
        },
        "failed": failed,
        "warnings": sorted(warnings, key=lambda r: r["row"]),
        "elapsed_s": round(time.time() - started, 1),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(failed_dir)
    return PrepareResult(shard_dir, manifest)
