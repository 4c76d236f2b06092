"""What `vlp3d submit` (and cluster.yaml's file_mounts) ship to a cluster: an allow-list, checked
against a deny-list of secret and patient-data files.

Shipped: the package (`vlp3d/`), `configs/`, `pyproject.toml`, `README.md` and the files or folders
named with `--include`; nothing else of the working folder. Inside them, caches are skipped, and a
file matching the deny-list refuses the whole upload with the offending names (a key or a scan inside
`configs/` is refused, not skipped: the user should know it was there). Denied by name: private keys
and keystores, cloud and database credentials, kubeconfigs, tokens and `.env` files; medical images
and arrays (DICOM, NIfTI, NRRD, MetaImage, `.npy`, HDF5), tables that may hold reports or ids (CSV,
Parquet, JSONL, spreadsheets) and MLflow/sqlite stores. Denied by content: DICOM without an extension
(`DICM` at byte 128), a PEM private key, a cloud service-account key (JSON with `private_key`).

No Ray here: `vlp3d.platform.jobs` stages the allowed files in a temporary folder, which Ray zips as
the job's working directory.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vlp3d.errors import InputError

ALLOWED = ("vlp3d", "configs", "pyproject.toml", "README.md")
SKIPPED = ("__pycache__", "*.pyc", "*.pyo", "*.egg-info", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".DS_Store")
# gitwildmatch-style name patterns (matched against every part of a relative path, case-insensitively);
# cluster.yaml's rsync_exclude lists the same (tests/unit/test_cluster_yaml.py)
DENIED_SECRETS = (
    "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore",
    "*.ovpn", ".ssh", ".aws", ".azure", ".gcloud", "gcloud", ".kube", "kubeconfig", "*kubeconfig*", ".docker",
    ".git-credentials", ".gitcredentials", ".pgpass", ".my.cnf", ".netrc", ".npmrc", ".pypirc", ".env", ".env.*",
    "credentials", "credentials.json", "*credentials*.json", "*service-account*.json", "*service_account*.json",
    "application_default_credentials.json", "auth_token", ".ray", "*.tfstate", "*.secret", "secrets.json",
    "secrets.yaml", "secrets.yml", "*.kdbx", "_patient_key",
)
DENIED_PATIENT_DATA = (
    "*.dcm", "*.dicom", "*.ima", "*.nii", "*.nii.gz", "*.nrrd", "*.nhdr", "*.mha", "*.mhd", "*.raw",
    "*.npy", "*.npz", "*.h5", "*.hdf5", "*.csv", "*.tsv", "*.parquet", "*.jsonl", "*.xlsx", "*.xls",
    "*.db", "*.sqlite", "*.sqlite3", "mlruns", "mlartifacts", "ray_results", "vlp3d-runs",
)
DENIED = DENIED_SECRETS + DENIED_PATIENT_DATA
PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
CONTENT_CHECK_BYTES = 1 << 20  # files up to this size are also checked by content
LISTED = 20  # offending names shown in the error


@dataclass(frozen=True)
class Upload:
    """The files of an upload (paths relative to `root`) and their total size in bytes."""

    root: Path
    files: tuple[str, ...]
    size: int

    def stage(self, folder: Path) -> Path:
        """Copy the files to `folder` (the working directory Ray zips); returns it."""
        for name in self.files:
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.root / name, target)
        return folder


def _matches(name: str, patterns: Iterable[str]) -> str | None:
    lowered = name.lower()
    return next((p for p in patterns if fnmatch.fnmatchcase(lowered, p.lower())), None)


def denied_reason(root: Path, relative: str) -> str | None:
    """Why `relative` (a file under `root`) may not be uploaded, or None."""
    for part in Path(relative).parts:
        pattern = _matches(part, DENIED)
        if pattern:
            kind = "secret" if pattern in DENIED_SECRETS else "patient data"
            return f"{kind}: matches {pattern}"
    path = root / relative
    try:
        if path.stat().st_size > CONTENT_CHECK_BYTES:
            return None
        head = path.read_bytes()
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if head[128:132] == b"DICM":
        return "patient data: a DICOM file (DICM at byte 128)"
    if PEM_PRIVATE_KEY.search(head):
        return "secret: holds a PEM private key"
    if relative.lower().endswith(".json"):
        try:
            loaded = json.loads(head)
        except (ValueError, UnicodeDecodeError):
            return None
        if isinstance(loaded, dict) and "private_key" in loaded:
            return "secret: a key file (JSON with private_key, e.g. a service-account key)"
    return None


def allowed_files(root: Path, include: Sequence[str] = (), excludes: Sequence[str] = ()) -> list[str]:
    """Files under `root` in the allow-list (ALLOWED and `include`), caches and `excludes` (name
    patterns of the runtime env) left out; sorted, relative, POSIX."""
    root = root.resolve()
    roots = []
    for name in [*ALLOWED, *include]:
        path = (root / name).resolve() if not Path(name).is_absolute() else Path(name).resolve()
        if not path.is_relative_to(root):
            raise InputError(f"--include {name}: outside the uploaded folder {root}")
        if name in include and not path.exists():
            raise FileNotFoundError(f"--include {name}: no such file or folder in {root}")
        roots.append(path)
    found = set()
    for path in roots:
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        for file in candidates:
            relative = file.relative_to(root).as_posix()
            parts = Path(relative).parts
            if any(_matches(part, [*SKIPPED, *excludes]) for part in parts):
                continue
            found.add(relative)
    return sorted(found)


def plan_upload(root: Path, include: Sequence[str] = (), excludes: Sequence[str] = ()) -> Upload:
    """The allow-listed files of `root`; an InputError naming every denied one (exit 2)."""
    root = Path(root).expanduser().resolve()
    files = allowed_files(root, include, excludes)
    denied = [(name, reason) for name in files if (reason := denied_reason(root, name))]
    if denied:
        shown = "\n".join(f"  {name}  ({reason})" for name, reason in denied[:LISTED])
        more = f"\n  ... and {len(denied) - LISTED} more" if len(denied) > LISTED else ""
        raise InputError(f"refusing to upload {root}: {len(denied)} file(s) look like secrets or patient data:\n"
                         f"{shown}{more}\nMove them out of the uploaded folders (or leave them out of --include); "
                         "data reaches the cluster through shared storage (data.shards, --out), credentials "
                         "through --env NAME or the nodes' own roles.")
    if not files:
        raise InputError(f"nothing to upload from {root}: none of {', '.join(ALLOWED)} is there "
                         "(pass --include PATH, or --working-dir a vlp3d checkout)")
    return Upload(root, tuple(files), sum((root / name).stat().st_size for name in files))
