"""Corpus manifests: one row per volume with its path, report, labels, split and scaling metadata."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from vlp3d.data.labels import CTRATE_LABELS

_SPLIT_FILES = {
    # split: (reports, labels, metadata) file stems as published with CT-RATE
    "train": ("train_reports", "train_predicted_labels", "train_metadata"),
    "valid": ("validation_reports", "valid_predicted_labels", "validation_metadata"),
}


class CorpusError(ValueError):
    """The corpus is malformed; the message names the file/row and how to fix it."""


def _patient_of(volume_name: str) -> str:
    # CT-RATE: <split>_<patient>_<scan>_<reconstruction>.nii.gz
    stem = volume_name.removesuffix(".nii.gz").removesuffix(".nii")
    parts = stem.split("_")
    return "_".join(parts[:2]) if len(parts) >= 4 else stem


def _spacing(value) -> list[float] | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    numbers = [float(v) for v in re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", str(value))]
    return numbers or None


def read_ctrate(root: str | Path) -> pd.DataFrame:
    """Manifest of a corpus in CT-RATE layout (volumes under <split>/, CSVs in their folders).

    Plus, when the root holds `radiographs.csv`, one row per 2D radiograph (`read_radiographs`,
    modality "xray") after the CT rows.
    """
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"corpus folder '{root}' does not exist (write one with `vlp3d synth --out {root}`).")
    volumes = {p.name: p for p in root.glob("*/*/*/*.nii*")}
    volumes.update({p.name: p for p in root.glob("*/*/*/*/*.nii*")})
    frames = []
    for split, (reports_stem, labels_stem, metadata_stem) in _SPLIT_FILES.items():
        reports_path = next(iter(root.rglob(f"{reports_stem}.csv")), None)
        if reports_path is None:
            continue
        reports = pd.read_csv(reports_path)
        if "VolumeName" not in reports.columns:
            raise CorpusError(f"{reports_path}: no 'VolumeName' column (columns: {list(reports.columns)}).")
        table = reports.copy()
        labels_path = next(iter(root.rglob(f"{labels_stem}.csv")), None)
        if labels_path is not None:
            labels = pd.read_csv(labels_path)
            table = table.merge(labels, on="VolumeName", how="left", validate="one_to_one")
        metadata_path = next(iter(root.rglob(f"{metadata_stem}.csv")), None)
        if metadata_path is not None:
            metadata = pd.read_csv(metadata_path)
            keep = [c for c in ("VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing")
                    if c in metadata.columns]
            table = table.merge(metadata[keep], on="VolumeName", how="left", validate="one_to_one")
        table["split"] = split
        frames.append(table)
    if not frames:
        raise CorpusError(
            f"{root}: no reports CSV found (expected e.g. radiology_text_reports/train_reports.csv)."
        )
    table = pd.concat(frames, ignore_index=True)
    table["patient_id"] = table["VolumeName"].map(_patient_of)
    table["image"] = [str(volumes[name]) if name in volumes else str(root / "missing" / name)
                      for name in table["VolumeName"]]
    table["modality"] = "ct"
    label_maps, classes = root / LABEL_MAPS_DIR, None
    if label_maps.is_dir():  # voxel label maps, e.g. the phantom's (vlp3d.data.phantom.render)
        paths = [label_maps / split / label_map_name(name) for split, name in zip(table["split"], table["VolumeName"],
                                                                                 strict=True)]
        table[LABEL_MAP_COLUMN] = [str(p) if p.is_file() else None for p in paths]
        classes_file = label_maps / LABEL_MAP_CLASSES_FILE
        if classes_file.is_file():
            classes = _label_map_classes(classes_file)
    if (root / RADIOGRAPHS_CSV).is_file():
        table = pd.concat([table, read_radiographs(root / RADIOGRAPHS_CSV, table)], ignore_index=True)
    label_names = [c for c in CTRATE_LABELS if c in table.columns]
    table[label_names] = table[label_names].fillna(0).astype(np.int8)
    table.attrs["label_names"] = label_names
    if classes:
        table.attrs["label_map_classes"] = classes
    check_patient_splits(table, source=str(root))
    return table


RADIOGRAPHS_CSV = "radiographs.csv"
LABEL_MAP_COLUMN = "label"  # manifest column: path of a voxel label map on the CT's grid (optional)
LABEL_MAPS_DIR = "label_maps"  # CT-RATE layout: <root>/label_maps/<split>/<volume stem>_label.nii.gz
LABEL_MAP_CLASSES_FILE = "classes.json"  # in LABEL_MAPS_DIR, or beside a generic manifest: class names by value
_NOT_INHERITED = {"image", "modality", "VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing",
                  LABEL_MAP_COLUMN}


def label_map_name(volume_name: str) -> str:
    """File name of a CT's label map in a CT-RATE-layout corpus: <name>.nii.gz -> <name>_label.nii.gz
    (never the CT's own name: a search for the CT by name finds the CT)."""
    stem = volume_name.removesuffix(".gz").removesuffix(".nii")
    return f"{stem}_label.nii.gz"


def _label_map_classes(path: Path) -> list[str]:
    """Class names of the label maps by value (index 0 = background), from a JSON list of strings."""
    try:
        classes = json.loads(path.read_text())
    except ValueError as err:
        raise CorpusError(f"{path}: not valid JSON ({err}); it must list the label-map class names by value, "
                          'e.g. ["background", "lung", "heart"].') from None
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
        raise CorpusError(f"{path}: must be a JSON list of at least two class names by label value (index 0 = "
                          f'background), e.g. ["background", "lung", "heart"]; got {classes!r}.')
    return classes


def read_radiographs(path: str | Path, ct: pd.DataFrame) -> pd.DataFrame:
    """2D radiograph rows of a CT-RATE-layout corpus, from the optional `radiographs.csv` in its root.

    A generic-style manifest: `image` (PNG or DICOM file, relative to the CSV's folder or absolute),
    optional `modality` (default "xray"), `VolumeName` (default: the file name), `patient_id`,
    `split`, report columns (the CT-RATE sections or one `report` column) and label columns. A
    `source_volume` column naming a CT's VolumeName fills every column the row lacks (patient,
    split, report sections, labels) from that CT row; rows without it must give `split` and a
    report. CT rows come first in the corpus table, so adding radiographs keeps the CT row ids.
    """
    path = Path(path)
    table = pd.read_csv(path)
    if "image" not in table.columns:
        raise CorpusError(f"{path}: no 'image' column (columns: {list(table.columns)}).")
    table["image"] = [str(p if Path(p).is_absolute() else (path.parent / p)) for p in table["image"].astype(str)]
    if "VolumeName" not in table.columns:
        table["VolumeName"] = [Path(p).name for p in table["image"]]
    if "modality" not in table.columns:
        table["modality"] = "xray"
    if "source_volume" in table.columns:
        by_name = ct.set_index("VolumeName")
        unknown = sorted(set(table["source_volume"].dropna()) - set(by_name.index))
        if unknown:
            raise CorpusError(f"{path}: source_volume names no CT volume of the corpus: {unknown[:5]}.")
        for column in ct.columns:
            if column not in table.columns and column not in _NOT_INHERITED:
                table[column] = table["source_volume"].map(by_name[column])
            elif column in ("patient_id", "split"):
                inherited = table["source_volume"].map(by_name[column])
                table[column] = table[column].where(table[column].notna(), inherited)
    missing = [c for c in ("split",) if c not in table.columns or table[c].isna().any()]
    if missing:
        raise CorpusError(f"{path}: rows without 'split' (give a split column or a source_volume column).")
    if "patient_id" not in table.columns:
        table["patient_id"] = [Path(p).name.split(".")[0] for p in table["image"]]
    table["patient_id"] = table["patient_id"].astype(str)
    return table


_GENERIC_KNOWN = {"image", "report", "split", "patient_id", "modality", "label"}
_READERS = {".csv": pd.read_csv, ".parquet": pd.read_parquet, ".jsonl": lambda p: pd.read_json(p, lines=True),
            ".json": lambda p: pd.read_json(p, lines=True)}


def read_corpus(path: str | Path, valid_fraction: float = 0.1) -> pd.DataFrame:
    """A CT-RATE folder, or a generic manifest file (CSV, Parquet or JSONL)."""
    path = Path(path)
    if path.is_dir():
        return read_ctrate(path)
    return read_generic_manifest(path, valid_fraction)


def read_generic_manifest(path: str | Path, valid_fraction: float = 0.1) -> pd.DataFrame:
    """Manifest with `image` (NIfTI path, relative to the manifest's folder or absolute) and `report`;
    optional `split`, `patient_id`, `modality`, 0/1 label columns and `label` (a voxel label map on the
    image's grid, relative like `image`; class names by value in `classes.json` beside the manifest).

    Without `split`, patients are assigned to 'valid' with probability `valid_fraction` by a hash
    of their id (stable across runs and machines); without `patient_id`, each image is a patient.
    """
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"corpus '{path}' is neither a folder (CT-RATE layout) nor a manifest file.")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise CorpusError(f"{path}: unsupported manifest type '{path.suffix}'; use .csv, .parquet or .jsonl.")
    table = reader(path)
    missing = [c for c in ("image", "report") if c not in table.columns]
    if missing:
        raise CorpusError(f"{path}: missing column(s) {missing}; a manifest needs 'image' and 'report' "
                          f"(columns found: {list(table.columns)}).")
    table["image"] = [str(p if Path(p).is_absolute() else (path.parent / p)) for p in table["image"].astype(str)]
    classes = None
    if LABEL_MAP_COLUMN in table.columns:  # optional voxel label maps, relative like `image`; empty: none
        table[LABEL_MAP_COLUMN] = [None if pd.isna(p) or not str(p).strip() else
                                   str(p if Path(str(p)).is_absolute() else (path.parent / str(p)))
                                   for p in table[LABEL_MAP_COLUMN]]
        if (path.parent / LABEL_MAP_CLASSES_FILE).is_file():
            classes = _label_map_classes(path.parent / LABEL_MAP_CLASSES_FILE)
    table["VolumeName"] = [Path(p).name for p in table["image"]]
    if "patient_id" not in table.columns:
        table["patient_id"] = [Path(p).name.split(".")[0] for p in table["image"]]
    table["patient_id"] = table["patient_id"].astype(str)
    if "split" not in table.columns:
        table["split"] = ["valid" if _unit_hash(p) < valid_fraction else "train" for p in table["patient_id"]]
    if "modality" not in table.columns:
        table["modality"] = "ct"
    label_names = [c for c in table.columns if c not in _GENERIC_KNOWN | {"VolumeName"}
                   and pd.api.types.is_numeric_dtype(table[c]) and set(table[c].dropna().unique()) <= {0, 1}]
    table[label_names] = table[label_names].fillna(0).astype(np.int8)
    table.attrs["label_names"] = label_names
    if classes:
        table.attrs["label_map_classes"] = classes
    check_patient_splits(table, source=str(path))
    return table


def _unit_hash(text: str, seed: int = 0) -> float:
    """A stable pseudo-random number in [0, 1) for a string (same on every machine and run)."""
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def fraction_ranks(table: pd.DataFrame, label_names: list[str], seed: int = 0) -> np.ndarray:
    """Per row, the patient's stratified quantile in (0, 1) within its split.

    Keeping rows with rank < f gives nested subsets (f=0.25 within 0.5 within 1.0) that hold about
    f of each stratum's patients; the stratum is a patient's rarest positive label (or 'none').
    """
    patients = table.groupby("patient_id", sort=True)
    prevalence = table[label_names].mean() if label_names else pd.Series(dtype=float)
    rows = []
    for patient, group in patients:
        positives = [n for n in label_names if group[n].max() > 0]
        stratum = min(positives, key=lambda n: (prevalence[n], n)) if positives else "none"
        rows.append((patient, group["split"].iloc[0], stratum, _unit_hash(patient, seed)))
    frame = pd.DataFrame(rows, columns=["patient_id", "split", "stratum", "u"])
    frame = frame.sort_values(["split", "stratum", "u"])
    position = frame.groupby(["split", "stratum"]).cumcount()
    size = frame.groupby(["split", "stratum"])["u"].transform("size")
    frame["rank"] = (position + 0.5) / size
    rank_of = dict(zip(frame["patient_id"], frame["rank"], strict=True))
    return np.array([rank_of[p] for p in table["patient_id"]], dtype=np.float32)


def check_patient_splits(table: pd.DataFrame, source: str) -> None:
    """A patient in two splits leaks test data into training: refuse it."""
    splits_per_patient = table.groupby("patient_id")["split"].nunique()
    leaked = splits_per_patient[splits_per_patient > 1]
    if len(leaked):
        examples = ", ".join(leaked.index[:5])
        raise CorpusError(
            f"{source}: {len(leaked)} patient(s) appear in more than one split (e.g. {examples}); "
            "assign each patient's scans to one split."
        )


def metadata_scaling(row: dict) -> tuple[float | None, float | None]:
    slope, intercept = row.get("RescaleSlope"), row.get("RescaleIntercept")
    def clean(v):
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)
    return clean(slope), clean(intercept)


def metadata_spacing(row: dict) -> list[float] | None:
    xy, z = _spacing(row.get("XYSpacing")), _spacing(row.get("ZSpacing"))
    if xy and z:
        return [*xy[:2], z[0]]
    return None


def manifest_hash(table: pd.DataFrame) -> str:
    """Hash of the manifest rows (paths, reports, labels) that prepare consumes."""
    payload = table.drop(columns=[c for c in table.columns if c.startswith("_")]).to_json(orient="records")
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def manifest_rows(table: pd.DataFrame) -> list[dict]:
    rows = json.loads(table.to_json(orient="records"))
    for index, row in enumerate(rows):
        row["row"] = index
    return rows
