"""Who is in which split of a shard folder: patient ids per split, their fingerprints, split hashes.

The leakage check (an evaluation patient must not be one the model pretrained on) and the record
of a promotion (which volumes both models were scored on) read these; only two small columns of
the shards are read."""

from __future__ import annotations

import hashlib
from pathlib import Path

from vlp3d import storage
from vlp3d.data.shards import MODALITIES, read_manifest, shard_files
from vlp3d.data.splits import parse_split


def _columns(shard_dir: str | Path, modalities, names: list[str]):
    import pyarrow.parquet as pq

    for modality in modalities:
        fs, paths = storage.for_reading(shard_files(shard_dir, modality))  # shards on a URI too
        for path in paths:
            table = pq.read_table(path, columns=names, filesystem=fs)
            yield from zip(*(table.column(n).to_pylist() for n in names), strict=True)


def split_patients(shard_dir: str | Path) -> dict[str, set[str]]:
    """Patient ids per split over every modality of a shard folder."""
    out: dict[str, set[str]] = {}
    for split, patient in _columns(shard_dir, MODALITIES, ["split", "patient_id"]):
        out.setdefault(split, set()).add(str(patient))
    return out


def part_patients(shard_dir: str | Path, split: str) -> set[str]:
    """Patient ids of a split or of a part of one ('valid[0.5:1]', vlp3d.data.splits)."""
    part = parse_split(split)
    if part.whole:
        return split_patients(shard_dir).get(split, set())
    return {str(p) for p in split_patients(shard_dir).get(part.split, set()) if part.contains(p)}


def patient_fingerprint(patient_id: str) -> str:
    """What a tracking store keeps of a patient id (no identifiers in MLflow): enough to recognise
    the same patient in other shards, not the id itself."""
    return hashlib.sha256(f"vlp3d-patient:{patient_id}".encode()).hexdigest()[:20]


def split_hash(shard_dir: str | Path, split: str) -> str:
    """Which CT volumes a split holds and how they were preprocessed: two evaluations with the same
    hash scored the same volumes the same way."""
    part = parse_split(split)
    names = sorted(str(n) for s, n, p in _columns(shard_dir, ["ct"], ["split", "volume_name", "patient_id"])
                   if s == part.split and part.contains(p))
    spec_hash = read_manifest(shard_dir).get("spec_hash", "")
    return hashlib.sha256("\n".join([spec_hash, *names]).encode()).hexdigest()[:12]


def leaked_patients(evaluated: set[str], pretraining_fingerprints: set[str]) -> list[str]:
    """Evaluated patient ids whose fingerprint is among the pretraining patients' (sorted)."""
    return sorted(p for p in evaluated if patient_fingerprint(p) in pretraining_fingerprints)
