"""`[data]`: the corpus, the shards and how volumes, radiographs and reports are stored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vlp3d.config.fields import _f


@dataclass(frozen=True)
class DataConfig:
    corpus: str = _f("", "Corpus root in CT-RATE layout (`vlp3d synth` writes a phantom one).", location=True)
    shards: str = _f("", "Folder, or pyarrow filesystem URI (s3://bucket/shards), of the Parquet shards `vlp3d "
                     "prepare` writes.", location=True)
    shape: tuple[int, int, int] = _f((48, 48, 48), "Voxels (x, y, z) after RAS reorientation, resampling and crop/pad.", ge=1)
    spacing_mm: tuple[float, float, float] = _f((8.0, 8.0, 8.0), "Target voxel spacing in mm (x, y, z).", gt=0)
    hu_window: tuple[float, float] = _f((-1000.0, 1000.0), "HU window clipped and scaled to [0, 1].", ge=-2048, le=32767)
    storage_dtype: Literal["float16", "uint8"] = _f("float16", "Dtype of the stored volume tensor in the shards.")
    storage: Literal["fixed", "highres"] = _f(
        "fixed",
        "'fixed': every CT is resampled and cropped/padded to data.shape (a tensor column). 'highres' (T3D): "
        "resampled to data.spacing_mm and windowed but kept at its own size (padded up to at least "
        "data.shape so train-time crops fit), stored as raw bytes in 'image' with its shape in "
        "'image_shape' (vlp3d.data.shards.decode_image); use with data.foreground_crop=true.",
    )
    foreground_crop: bool = _f(
        False, "Crop CTs to the body's bounding box (voxels above data.body_threshold_hu, plus a small "
        "margin) before the final pad/crop, so stored voxels are body, not air.",
    )
    body_threshold_hu: float = _f(-500.0, "HU above which a voxel counts as body for data.foreground_crop.", ge=-2048, le=32767)
    shape_2d: tuple[int, int] = _f(
        (64, 64), "Pixels (rows, columns) of 2D radiographs (modality 'xray') after scaling to [0, 1] and "
        "resizing; rows run top to bottom of the image as displayed (superior to inferior on a chest film).",
        ge=1,
    )
    report_sections: tuple[str, ...] = _f(
        ("Impressions_EN",),
        "Report columns joined into the report text. With a frozen text encoder, impressions (which state "
        "what is present) align far better than findings (which list every absent finding as a negated "
        "sentence); with a trainable one, findings + impression (the papers' choice) is the usual one.",
    )
    max_tokens: int = _f(256, "Token ids kept per report (padded/truncated).", ge=1)
    text_embeddings: bool = _f(True, "Store frozen text-encoder report and sentence embeddings in the shards (fast training).")
    max_sentences: int = _f(16, "Sentence embeddings stored per report (padded, with a mask); the report embedding uses all.", ge=1)
    train_split: str = _f("train", "Split used for pretraining.")
    fraction: float = _f(1.0, "Fraction of training patients used, stratified by label; 0.25 within 0.5 within 1.0 (nested).", gt=0, le=1)
    valid_fraction: float = _f(0.1, "Share of patients put in 'valid' when a generic manifest has no split column.", ge=0, le=1)
    eval_split: str = _f("valid", "Held-out split used for evaluation.")
    materialize: Literal["auto", "always", "never"] = _f("auto", "Hold the training shards in Ray's object store ('auto': when they fit in a quarter of it).")
