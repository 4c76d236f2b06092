"""A trained model in the formats other tools read (pure torch, MONAI, huggingface_hub, onnx; never Ray or
MLflow): Hugging Face (`hf`), ONNX (`onnx_export`), MONAI bundle (`monai_bundle`). `vlp3d export` calls them."""

from __future__ import annotations

from pathlib import Path

from vlp3d.errors import InputError


def new_output_dir(out: str | Path, flag: str = "the output folder") -> Path:
    """`out` as an empty folder (created with its parents when missing). An existing file or a folder that
    holds anything is a ValueError: an export never overwrites or mixes with what is there."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a file" if not out.is_dir() else "a folder that is not empty"
        raise InputError(f"{flag} {out} is {what}; give a new or empty folder (an export never overwrites files)")
    out.mkdir(parents=True, exist_ok=True)
    return out
