"""Who is in which split of a shard folder: patient ids per split, their keyed fingerprints, split hashes.

The leakage check (an evaluation patient must not be one the model pretrained on) and the record
of a promotion (which volumes both models were scored on) read these; only two small columns of
the shards are read.

Fingerprints are HMAC-SHA256 of the patient id under the project's patient key, a random secret
that `vlp3d prepare` creates once beside the shards (`<out>/_patient_key`, owner-only) and that
never goes to MLflow: without the key, the fingerprints an MLflow store keeps cannot be turned back
into ids, not even by trying every 7-digit MRN. Collaborators who share patients share the key (a
copy of the file beside their shards, or `$VLP3D_PATIENT_KEY_FILE` naming it); a record made under
another key is refused, naming both keys' ids (docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlp3d import storage
from vlp3d.data.files import create_secret_file
from vlp3d.data.shards import MODALITIES, read_manifest, shard_files
from vlp3d.data.splits import parse_split
from vlp3d.redact import redact

KEY_FILE = "_patient_key"  # in the folder `prepare --out` names, beside each preprocessing hash's folder
KEY_ENV = "VLP3D_PATIENT_KEY_FILE"  # a key file used in place of the one beside the shards
KEY_BYTES = 32


class PatientKeyError(ValueError):
    """No patient key where one is needed, an unreadable one, or a record made under another key."""


@dataclass(frozen=True, repr=False)
class PatientKey:
    """The project's secret and where it was read (`source`, for messages; never the secret)."""

    secret: bytes
    source: str

    @property
    def key_id(self) -> str:
        """Names the key in records and messages; reveals nothing of it or of any patient."""
        return hmac.new(self.secret, b"vlp3d-patient-key-id", hashlib.sha256).hexdigest()[:12]

    def fingerprint(self, patient_id: str) -> str:
        """What a tracking store keeps of a patient id: the same patient gives the same value under
        this key, and without the key the value says nothing about the id."""
        return hmac.new(self.secret, f"vlp3d-patient:{patient_id}".encode(), hashlib.sha256).hexdigest()[:20]

    def __repr__(self) -> str:
        return f"PatientKey(id={self.key_id}, source={self.source!r})"


def unkeyed_fingerprint(patient_id: str) -> str:
    """The fingerprint runs recorded before the key existed (plain SHA-256, brute-forced in seconds):
    only to keep checking those runs' evaluations (vlp3d.platform.evaluate.check_leakage)."""
    return hashlib.sha256(f"vlp3d-patient:{patient_id}".encode()).hexdigest()[:20]


def shard_root(shard_dir: str | Path) -> str | Path:
    """The folder `prepare --out` named: the parent of a preprocessing hash's folder."""
    if storage.is_uri(shard_dir):
        return str(shard_dir).rstrip("/").rsplit("/", 1)[0]
    return Path(shard_dir).parent


def _parse_key(text: str, source: str) -> PatientKey:
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError:
        secret = b""
    if len(secret) < 16:
        raise PatientKeyError(f"{source}: not a patient key (expected {2 * KEY_BYTES} hex digits, as "
                              "`vlp3d prepare` writes); copy the key file again from its owner")
    return PatientKey(secret, source)


def _env_key() -> PatientKey | None:
    path = os.environ.get(KEY_ENV, "")
    if not path:
        return None
    if not storage.is_file(path):
        raise PatientKeyError(redact(f"${KEY_ENV} = {path}: no such file (the patient key to fingerprint "
                                     "patients with; unset it to use the key beside the shards)"))
    return _parse_key(storage.read_text(path), f"${KEY_ENV} ({redact(path)})")


def patient_key(shard_dir: str | Path) -> PatientKey:
    """The key for the patients of `shard_dir`: $VLP3D_PATIENT_KEY_FILE's when set, else the one beside
    the shards; a missing key is a PatientKeyError saying how to get one."""
    key = _env_key()
    if key is not None:
        return key
    root = shard_root(shard_dir)
    location = storage.join(root, KEY_FILE)
    if not storage.is_file(location):
        raise PatientKeyError(redact(
            f"{root}: no patient key ({KEY_FILE}) beside these shards (prepared before vlp3d keyed patient "
            f"fingerprints, or copied without it): run `vlp3d prepare` again with --out {root} (finished "
            f"shards are kept; it only adds the key), or set {KEY_ENV} to the key file of whoever prepared "
            "these patients (docs/security.md)"))
    return _parse_key(storage.read_text(location), redact(str(location)))


def ensure_patient_key(root: str | Path, announce: Callable[[str], None] | None = None,
                       copy_of: PatientKey | None = None) -> PatientKey:
    """The key beside the shards under `root` (`prepare --out`), created when missing: a copy of
    `copy_of`, else of $VLP3D_PATIENT_KEY_FILE's when that is set (collaborators sharing patients),
    else a new random one, and `announce(line)` said so. A local key file is readable by its owner
    only; a bucket's follows the bucket's permissions."""
    location = storage.join(root, KEY_FILE)
    if not storage.is_file(location):
        shared = copy_of or _env_key()
        text = (shared.secret if shared else secrets.token_bytes(KEY_BYTES)).hex() + "\n"
        if storage.is_uri(location):  # no exclusive create on an object store: one prepare per URI at a time
            storage.write_text(location, text)
            created = True
        else:
            Path(root).mkdir(parents=True, exist_ok=True)
            created = create_secret_file(location, text)  # a concurrent prepare may have created it first
        if created and announce is not None:
            announce(redact(f"patient key {location} {'copied from ' + shared.source if shared else 'created'}: "
                            "keep it with the shards; collaborators preparing the same patients need it "
                            "(docs/security.md)"))
    return _parse_key(storage.read_text(location), redact(str(location)))


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


def split_hash(shard_dir: str | Path, split: str) -> str:
    """Which CT volumes a split holds and how they were preprocessed: two evaluations with the same
    hash scored the same volumes the same way."""
    part = parse_split(split)
    names = sorted(str(n) for s, n, p in _columns(shard_dir, ["ct"], ["split", "volume_name", "patient_id"])
                   if s == part.split and part.contains(p))
    spec_hash = read_manifest(shard_dir).get("spec_hash", "")
    return hashlib.sha256("\n".join([spec_hash, *names]).encode()).hexdigest()[:12]


def leaked_patients(evaluated: set[str], pretraining_fingerprints: set[str],
                    fingerprint: Callable[[str], str]) -> list[str]:
    """Evaluated patient ids whose fingerprint (`fingerprint`, the record's) is among the pretraining
    patients' (sorted)."""
    return sorted(p for p in evaluated if fingerprint(p) in pretraining_fingerprints)
