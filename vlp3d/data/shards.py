"""Shard rows and `_manifest.json`: what `prepare` writes and training/evaluation read (no Ray).

Layout of a shard folder (`<shards root>/<spec hash>/`):

    *.parquet          CT rows (modality "ct")
    xray/*.parquet     2D radiograph rows (modality "xray"), same columns
    _manifest.json     counts (with `by_modality`), spec, source manifest hash, failed rows ({row, reason})
    _failed/           one JSON per failed row: row, path, volume name, reason, attempts
    _prepare.json      source and spec hash of the run that wrote the folder (resume)
    _prepare.lock      only while a prepare runs (see docs/prepare.md)

Read one modality with `shard_files(shard_dir, modality)` (never the folder: Ray's
`read_parquet` on a folder is recursive and would mix the two). Columns of every row:
`row, volume_name, patient_id, split, fraction_rank, modality, source_path, image, image_shape,
labels, report, sentences, hu_source, hu_slope, hu_intercept, spacing_mm_source, warnings,
spec_hash` (+ `input_ids, attention_mask`, and with text embeddings `report_embedding,
sentence_embeddings, sentence_mask`).

`image`: CT with `storage = "fixed"`: tensor of `spec.shape` (x, y, z in RAS); xray: tensor of
`spec.shape_2d` (rows, columns as displayed, see `vlp3d.data.radiograph`); CT with
`storage = "highres"`: binary, the storage dtype's little-endian bytes in C order, axes x, y, z
(RAS), shape in `image_shape` (int32, 3 values, each >= `spec.shape`). `decode_image` turns
either kind into an array.

`label_map` (only in shards of a corpus with voxel label maps, manifest column `label`): binary,
uint8 class per voxel in C order on the grid of `image` (shape `image_shape`), resampled with
nearest-neighbour interpolation through the same transforms as the CT
(`vlp3d.data.volume.preprocess_volume`); empty bytes for a row without one. Shards written
before it simply lack the column; `_manifest.json` then has no `label_maps` entry.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from vlp3d import storage
from vlp3d.config import ExperimentConfig
from vlp3d.data.corpus import LABEL_MAP_COLUMN, metadata_scaling, metadata_spacing
from vlp3d.data.hounsfield import require_ct
from vlp3d.data.radiograph import load_radiograph, resize_2d
from vlp3d.data.report import report_text
from vlp3d.data.splits import parse_split
from vlp3d.data.volume import PreprocessSpec, load_volume_hu, preprocess_volume, quantise
from vlp3d.errors import InputError
from vlp3d.redact import redact

MANIFEST = "_manifest.json"
LABEL_MAP = "label_map"  # shard column of CT rows when the corpus has voxel label maps (`decode_label_map`)
SPACING_TOLERANCE = 0.01
MODALITIES = ("ct", "xray")
MODALITY_DIRS = {"ct": "", "xray": "xray"}  # sub-folder of the shard folder per modality
_MODALITY_ALIASES = {"ct": "ct", "xray": "xray", "x-ray": "xray", "cxr": "xray", "cr": "xray", "dx": "xray"}


def spec_from_config(cfg: ExperimentConfig) -> PreprocessSpec:
    """The spec of `cfg`: every spec field named like a `data.*` setting takes that setting, the text
    encoder is `model.text_encoder`; the rest (orientation, interpolation, version) are fixed."""
    names = {f.name for f in dataclasses.fields(PreprocessSpec)} & {f.name for f in dataclasses.fields(cfg.data)}
    return PreprocessSpec(text_encoder=cfg.model.text_encoder, **{n: getattr(cfg.data, n) for n in names})


def normalise_modality(value) -> str:
    """'CT' / 'xray' / 'X-ray' / 'CR' / 'DX' -> 'ct' or 'xray'; missing -> 'ct'. Raises on others
    (MR, PT, US, ...: prepare records such a row as failed with this reason)."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
        return "ct"
    modality = _MODALITY_ALIASES.get(str(value).strip().lower())
    if modality is None:
        raise InputError(f"modality {value!r} is not supported: prepare reads CT volumes ('ct') and 2D "
                         f"radiographs ('xray', also {sorted(k for k in _MODALITY_ALIASES if k not in MODALITIES)})")
    return modality


def shard_files(shard_dir: str | Path, modality: str = "ct") -> list[str]:
    """Parquet files of one modality in a shard folder (sorted; [] if none).

    "ct": the top-level `*.parquet` only; "xray": `xray/*.parquet`.
    """
    if modality not in MODALITY_DIRS:
        raise InputError(f"unknown modality {modality!r}; use one of {list(MODALITIES)}")
    if storage.is_uri(shard_dir):
        return storage.files_with_suffix(storage.join(shard_dir, MODALITY_DIRS[modality]), ".parquet")
    folder = Path(shard_dir) / MODALITY_DIRS[modality]
    return [str(p) for p in sorted(folder.glob("*.parquet")) if p.is_file()]


def decode_image(value, shape, storage_dtype: str) -> np.ndarray:
    """A shard row's `image` -> array of the storage dtype.

    Highres rows store raw bytes (little-endian, C order) and their shape in `image_shape` (any
    sequence of ints: list, ndarray, Ray tensor element): the result is a read-only view of those
    bytes (no copy). Fixed-shape rows already are arrays and are returned as they are (`shape`
    may then be None); torch tensors come back as numpy views.
    """
    target = None if shape is None else tuple(int(v) for v in np.asarray(shape).reshape(-1))
    if isinstance(value, np.ndarray) and value.dtype != object:
        if target is not None and value.ndim == 1 and value.dtype == np.uint8 and len(target) > 1:
            return value.view(np.dtype(storage_dtype).newbyteorder("<")).reshape(target)
        return value
    if isinstance(value, np.ndarray):  # 0-d object array holding bytes
        value = value.item()
    if hasattr(value, "numpy") and not isinstance(value, bytes | bytearray | memoryview):  # torch tensor
        return value.numpy()
    if target is None:
        raise InputError("decode_image: raw image bytes need their shape (the row's image_shape)")
    dtype = np.dtype(storage_dtype).newbyteorder("<")
    array = np.frombuffer(value, dtype=dtype)
    if array.size != int(np.prod(target)):
        raise InputError(f"image holds {array.size} values of {storage_dtype}, shape {list(target)} needs "
                         f"{int(np.prod(target))}")
    return array.reshape(target)


def resolve_shard_dir(root: str | Path, spec_hash: str | None = None) -> Path | str:
    """`root` itself if it holds a manifest, else `root/<spec_hash>` (the folder prepare wrote). A
    local root gives a Path, a URI root (`s3://bucket/shards`, vlp3d.storage) a URI string."""
    if storage.is_uri(root):
        root = str(root).rstrip("/")
        storage.filesystem(root, "data.shards")  # a URI pyarrow cannot open: an error naming the key
    else:
        root = Path(root)
    if storage.is_file(storage.join(root, MANIFEST)):
        return root
    candidates = sorted(storage.name(entry) for entry, folder in storage.list_dir(root)
                        if folder and storage.is_file(storage.join(entry, MANIFEST)))
    if spec_hash and spec_hash in candidates:
        return storage.join(root, spec_hash)
    if spec_hash is None and len(candidates) == 1:
        return storage.join(root, candidates[0])
    found = f"found preprocessing hashes {candidates}" if candidates else "found no prepared shards"
    want = f" for preprocessing hash {spec_hash}" if spec_hash else ""
    raise FileNotFoundError(redact(
        f"no shards{want} under '{root}' ({found}). Run `vlp3d prepare CONFIG --corpus PATH --out {root}` "
        "with the same data.* settings as this run."
    ))


def read_manifest(shard_dir: str | Path) -> dict:
    return json.loads(storage.read_text(storage.join(shard_dir, MANIFEST)))


def count_rows(shard_dir: str | Path, split: str, fraction: float = 1.0, modality: str = "ct") -> int:
    """CT rows of `split` inside the nested `data.fraction` subset, as training reads them (two
    small columns read, no volumes)."""
    import pyarrow.parquet as pq

    total = 0
    fs, paths = storage.for_reading(shard_files(shard_dir, modality))
    for path in paths:
        table = pq.read_table(path, columns=["split", "fraction_rank", "patient_id"], filesystem=fs)
        splits = np.asarray(table.column("split").to_pylist())
        ranks = table.column("fraction_rank").to_numpy()
        patients = np.asarray(table.column("patient_id").to_pylist())
        total += int((parse_split(split).mask(splits, patients) & (ranks < fraction if fraction < 1.0 else True)).sum())
    return total


def preprocess_row(row: dict, spec: PreprocessSpec, label_names: list[str]) -> dict:
    """One manifest row -> one shard row (without token ids / text embeddings). Raises on bad input,
    and with `NotCTError` on a CT row whose volume is not CT (`vlp3d.data.hounsfield.require_ct`)."""
    text, sentences = report_text(row, spec.report_sections)
    if not sentences:
        raise InputError(f"empty report (sections {list(spec.report_sections)} are all missing or blank)")
    modality = normalise_modality(row.get("modality"))
    if modality == "xray":
        out = _xray_row(row, spec, label_names, text, sentences)
        if LABEL_MAP_COLUMN in row:  # no label map for a radiograph, but the same columns in both folders
            out[LABEL_MAP] = b""
        return out
    path = row["image"]
    if not Path(path).exists():
        raise FileNotFoundError(f"volume file not found: {path}")
    hu, affine, decision = load_volume_hu(path, metadata_scaling(row))
    require_ct(hu, decision)
    warnings = list(decision.warnings)
    header_spacing = [float(v) for v in nib.affines.voxel_sizes(affine)]
    listed = metadata_spacing(row)
    if listed and not np.allclose(header_spacing, listed, rtol=SPACING_TOLERANCE):
        warnings.append(f"header spacing {np.round(header_spacing, 3).tolist()} differs from metadata {listed}; used header")
    label_map = load_label_map(row[LABEL_MAP_COLUMN], affine, hu.shape) if row.get(LABEL_MAP_COLUMN) else None
    volume, label_map = preprocess_volume(hu, affine, spec, label_map)
    image_shape = np.asarray(volume.shape, dtype=np.int32)
    image = encode_image(volume) if spec.storage == "highres" else volume
    out = _shard_row(row, spec, label_names, text, sentences, modality, image, image_shape,
                     decision.source, decision.slope, decision.intercept, header_spacing, warnings)
    if LABEL_MAP_COLUMN in row:  # the corpus has label maps: every CT row gets the column (empty: none)
        out[LABEL_MAP] = b"" if label_map is None else encode_image(label_map)
    return out


def load_label_map(path, affine: np.ndarray, shape) -> np.ndarray:
    """A voxel label map (NIfTI) that lies on the CT's grid: same shape, affine within 1e-3 mm."""
    if not Path(path).exists():
        raise FileNotFoundError(f"label map file not found: {path} (manifest column '{LABEL_MAP_COLUMN}')")
    img = nib.load(str(path))
    if tuple(img.shape) != tuple(shape) or not np.allclose(img.affine, affine, atol=1e-3):
        raise InputError(f"label map {path} (shape {list(img.shape)}) is not on the grid of its CT (shape "
                         f"{list(shape)}, affine {np.round(affine, 3).tolist()}); resample it onto the CT's grid first")
    return np.asarray(img.dataobj)


def decode_label_map(value, shape) -> np.ndarray | None:
    """A shard row's `label_map` (uint8 bytes, C order, axes x, y, z of `image_shape`) -> array; None when the
    row has no label map (empty bytes)."""
    if value is None or len(value) == 0:
        return None
    return decode_image(value, shape, "uint8")


def encode_image(volume: np.ndarray) -> bytes:
    """Highres storage: little-endian bytes in C order (inverse of `decode_image`)."""
    return np.ascontiguousarray(volume, dtype=volume.dtype.newbyteorder("<")).tobytes(order="C")


def _xray_row(row: dict, spec: PreprocessSpec, label_names: list[str], text: str, sentences: list[str]) -> dict:
    path = row["image"]
    image01, info = load_radiograph(path)
    image = quantise(resize_2d(image01, spec.shape_2d), spec.storage_dtype)
    spacing = [*info.spacing_mm, float("nan")]  # (row, column, -): same width as CT rows
    return _shard_row(row, spec, label_names, text, sentences, "xray", image,
                      np.asarray(image.shape, dtype=np.int32), info.source, info.slope, info.intercept,
                      spacing, [])


def _shard_row(row, spec, label_names, text, sentences, modality, image, image_shape, source, slope,
               intercept, spacing, warnings) -> dict:
    labels = np.array([float(row.get(name) or 0) for name in label_names], dtype=np.float32)
    path = row["image"]
    return {
        "row": int(row["row"]),
        "volume_name": str(row.get("VolumeName") or Path(path).name),
        "patient_id": str(row["patient_id"]),
        "split": str(row["split"]),
        "fraction_rank": float(row["fraction_rank"]),
        "modality": modality,
        "source_path": str(path),
        "image": image,
        "image_shape": image_shape,
        "labels": labels,
        "report": text,
        "sentences": "\n".join(sentences),  # one sentence per line
        "hu_source": source,
        "hu_slope": slope,
        "hu_intercept": intercept,
        "spacing_mm_source": np.asarray(spacing, dtype=np.float32),
        "warnings": "; ".join(warnings),
        "spec_hash": spec.hash,
    }
