"""Shard rows and `_manifest.json`: what `prepare` writes and training/evaluation read (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from vlp3d.config import ExperimentConfig
from vlp3d.data.corpus import metadata_scaling, metadata_spacing
from vlp3d.data.report import report_text
from vlp3d.data.volume import PreprocessSpec, load_nifti_hu, preprocess_hu

MANIFEST = "_manifest.json"
SPACING_TOLERANCE = 0.01


def spec_from_config(cfg: ExperimentConfig) -> PreprocessSpec:
    d = cfg.data
    return PreprocessSpec(
        shape=d.shape, spacing_mm=d.spacing_mm, hu_window=d.hu_window, storage_dtype=d.storage_dtype,
        report_sections=d.report_sections, text_encoder=cfg.model.text_encoder,
        max_tokens=d.max_tokens, text_embeddings=d.text_embeddings, max_sentences=d.max_sentences,
    )


def resolve_shard_dir(root: str | Path, spec_hash: str | None = None) -> Path:
    """`root` itself if it holds a manifest, else `root/<spec_hash>` (the folder prepare wrote)."""
    root = Path(root)
    if (root / MANIFEST).is_file():
        return root
    candidates = sorted(p.parent.name for p in root.glob(f"*/{MANIFEST}"))
    if spec_hash and (root / spec_hash / MANIFEST).is_file():
        return root / spec_hash
    if spec_hash is None and len(candidates) == 1:
        return root / candidates[0]
    found = f"found preprocessing hashes {candidates}" if candidates else "found no prepared shards"
    want = f" for preprocessing hash {spec_hash}" if spec_hash else ""
    raise FileNotFoundError(
        f"no shards{want} under '{root}' ({found}). Run `vlp3d prepare CONFIG --corpus PATH --out {root}` "
        "with the same data.* settings as this run."
    )


def read_manifest(shard_dir: str | Path) -> dict:
    return json.loads((Path(shard_dir) / MANIFEST).read_text())


def preprocess_row(row: dict, spec: PreprocessSpec, label_names: list[str]) -> dict:
    """One manifest row -> one shard row (without token ids / text embeddings). Raises on bad input."""
    text, sentences = report_text(row, spec.report_sections)
    if not sentences:
        raise ValueError(f"empty report (sections {list(spec.report_sections)} are all missing or blank)")
    path = row["image"]
    if not Path(path).exists():
        raise FileNotFoundError(f"volume file not found: {path}")
    hu, affine, decision = load_nifti_hu(path, metadata_scaling(row))
    warnings = list(decision.warnings)
    header_spacing = [float(v) for v in nib.affines.voxel_sizes(affine)]
    listed = metadata_spacing(row)
    if listed and not np.allclose(header_spacing, listed, rtol=SPACING_TOLERANCE):
        warnings.append(f"header spacing {np.round(header_spacing, 3).tolist()} differs from metadata {listed}; used header")
    volume = preprocess_hu(hu, affine, spec)
    labels = np.array([float(row.get(name) or 0) for name in label_names], dtype=np.float32)
    return {
        "row": int(row["row"]),
        "volume_name": str(row.get("VolumeName") or Path(path).name),
        "patient_id": str(row["patient_id"]),
        "split": str(row["split"]),
        "fraction_rank": float(row["fraction_rank"]),
        "modality": str(row.get("modality", "ct")),
        "source_path": str(path),
        "image": volume,
        "labels": labels,
        "report": text,
        "sentences": "\n".join(sentences),  # one sentence per line
        "hu_source": decision.source,
        "hu_slope": decision.slope,
        "hu_intercept": decision.intercept,
        "spacing_mm_source": np.asarray(header_spacing, dtype=np.float32),
        "warnings": "; ".join(warnings),
        "spec_hash": spec.hash,
    }
