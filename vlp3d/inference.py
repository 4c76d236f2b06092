"""A trained checkpoint as an embedding model: volumes and reports into the shared space (pure torch)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlp3d.config import ExperimentConfig
from vlp3d.data.hounsfield import NO_NEGATIVE_HU, HUDecision, NotCTError, require_ct, to_hounsfield
from vlp3d.data.limits import VolumeLimits
from vlp3d.data.report import split_sentences
from vlp3d.data.volume import (
    PreprocessSpec,
    body_level,
    dequantise,
    load_volume_hu,
    preprocess_hu,
    resampled_voxels,
)
from vlp3d.encoders.text import TextEncoder, embed_reports
from vlp3d.errors import InputError
from vlp3d.objectives import objective_class
from vlp3d.objectives.model import VisionLanguageModel, build_model
from vlp3d.train import checkpoint as checkpoints

RESCALE_COLUMNS = ("rescale_slope", "rescale_intercept")  # the pyfunc's and `vlp3d embed`'s names


def _scaling_value(value) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


@dataclass
class VolumeInput:
    """One CT to embed: a `path` (NIfTI file, DICOM file or DICOM series folder) or an `array` of
    stored values on axes whose `affine` maps voxel indices to RAS+ millimetres (or, without one,
    `spacing_mm` along the R, A, S axes); `rescale_slope`/`rescale_intercept` as a metadata table
    lists them (CT-RATE: 1, -1024), applied by the rules prepare uses (`to_hounsfield`)."""

    path: str | None = None
    array: np.ndarray | None = None
    affine: np.ndarray | None = None
    spacing_mm: tuple[float, float, float] | None = None
    rescale_slope: float | None = None
    rescale_intercept: float | None = None
    name: str = ""  # how errors name it: the path, or "row N"
    modality: str | None = None  # as a manifest lists it: anything but CT is refused before reading

    @property
    def where(self) -> str:
        return self.name or str(self.path or "array input")

    @property
    def metadata_scaling(self) -> tuple[float | None, float | None]:
        return _scaling_value(self.rescale_slope), _scaling_value(self.rescale_intercept)


def array_affine(item: VolumeInput, shape: tuple[int, ...]) -> np.ndarray:
    """The affine of an array input: `affine` (4 x 4), else diag(`spacing_mm`) on RAS axes; both given
    must agree on the voxel sizes."""
    spacing = None if item.spacing_mm is None else np.asarray(item.spacing_mm, dtype=np.float64).reshape(-1)
    if spacing is not None and (spacing.shape != (3,) or not np.all(spacing > 0)):
        raise InputError(f"{item.where}: spacing must be 3 positive millimetre values, got {spacing.tolist()}")
    if item.affine is None:
        if spacing is None:
            raise InputError(f"{item.where}: an image array needs its `affine` (4 x 4, voxel indices -> RAS+ mm) or "
                             "its `spacing` (3 values in mm, array axes along R, A, S)")
        return np.diag([*spacing, 1.0])
    affine = np.asarray([np.asarray(row, dtype=np.float64) for row in item.affine], dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{item.where}: affine must be an invertible 4 x 4 matrix of finite numbers "
                         f"(got shape {list(affine.shape)})")
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(0))
    if spacing is not None and not np.allclose(sizes, spacing, rtol=1e-3):
        raise InputError(f"{item.where}: spacing {spacing.tolist()} differs from the affine's voxel sizes "
                         f"{np.round(sizes, 4).tolist()}; give one of them")
    return affine


def _nested_shape(value) -> tuple[int, ...]:
    """The shape nested lists announce along their first elements (what stacking them would allocate)."""
    shape = []
    while isinstance(value, list | tuple | np.ndarray) and not (isinstance(value, np.ndarray) and value.dtype != object):
        shape.append(len(value))
        if not len(value):
            break
        value = value[0]
    if isinstance(value, np.ndarray):
        shape.extend(value.shape)
    return tuple(shape)


def _stack(value, limits: VolumeLimits | None = None) -> np.ndarray:
    """A 3D array from an ndarray or nested lists (ragged input is an error, not an object array);
    the shape the lists announce is checked against `limits` before the array is allocated."""
    if isinstance(value, np.ndarray) and value.dtype != object:
        return value
    if limits is not None:
        limits.check(_nested_shape(value), 4)
    return np.stack([np.stack([np.asarray(row, dtype=np.float32) for row in plane]) for plane in value])


def load_ct(item: VolumeInput, assume_hu: bool = False,
            limits: VolumeLimits | None = None) -> tuple[np.ndarray, np.ndarray, HUDecision]:
    """(HU array, RAS affine, decision) of one input, by the rules prepare applies to a corpus row:
    a listed modality other than CT is refused before reading, header scaling first, else the given
    rescale, then `not_ct_reason`. Values that may be raw values offset from HU with no rescale
    anywhere (all >= 0, or air near 0 and soft tissue near 1024) raise, unless `assume_hu` says they
    are HU. With `limits`, a volume over them is refused from its header or shape, before its voxels
    are read."""
    if item.modality is not None and str(item.modality).strip() and str(item.modality).strip().upper() != "CT":
        raise NotCTError(f"{item.where}: modality is {str(item.modality).strip()[:16]!r}, not CT: this model "
                         "embeds CT volumes")
    if item.array is not None:
        try:
            raw = _stack(item.array, limits)
        except ValueError as err:
            raise InputError(f"{item.where}: image array is not a regular 3D array ({err})") from None
        if raw.ndim != 3:
            raise InputError(f"{item.where}: image array has {raw.ndim} dimensions, expected 3 (x, y, z)")
        if limits is not None:
            try:
                limits.check(raw.shape, 4)
            except ValueError as err:
                raise InputError(f"{item.where}: {err}") from None
        affine = array_affine(item, raw.shape)
        if not np.isfinite(raw).all():
            raise InputError(f"{item.where}: image array contains NaN or infinite values")
        hu, decision = to_hounsfield(raw, (None, None), item.metadata_scaling)
    else:
        if not Path(str(item.path)).exists():
            raise FileNotFoundError(f"{item.where}: no such file or folder")
        try:
            hu, affine, decision = load_volume_hu(str(item.path), item.metadata_scaling, limits)
        except (ValueError, OSError) as err:
            raise type(err)(f"{item.where}: {err}") from None
    try:
        require_ct(hu, decision)
    except NotCTError as err:
        if not err.uncertain_hu:
            raise NotCTError(f"{item.where}: not a CT in Hounsfield units: {err}") from None
        if not assume_hu:
            found = (f"stored values are all >= 0 ([{float(hu.min()):.0f}, {float(hu.max()):.0f}])"
                     if str(err).startswith(NO_NEGATIVE_HU) else
                     "stored values hold nothing near -1000 HU but air near 0 and soft tissue near 1024 (values "
                     "below 0 are noise or padding)")
            raise NotCTError(
                f"{item.where}: {found} and no rescale slope/intercept is in the file or given, so they may be raw "
                "values offset from HU (CT-RATE stores HU + 1024 and lists RescaleSlope/RescaleIntercept in its "
                "metadata CSV). Pass the volume's rescale in the columns rescale_slope and rescale_intercept "
                "(CT-RATE: 1 and -1024), or, if the values are HU, params={'assume_hu': True} (vlp3d embed: "
                "--assume-hu)", uncertain_hu=True) from None
    return hu, affine, decision


def preprocess_input(item: VolumeInput, spec: PreprocessSpec, assume_hu: bool = False,
                     limits: VolumeLimits | None = None) -> np.ndarray:
    """One input as a model trained with `spec` reads it: `load_ct`, then `preprocess_hu`; with `limits`,
    the grid it would be resampled to is checked before it is resampled."""
    hu, affine, _ = load_ct(item, assume_hu=assume_hu, limits=limits)
    if limits is not None:
        try:
            limits.check(hu.shape, 4, resampled_voxels(hu.shape, affine, spec))
        except ValueError as err:
            raise InputError(f"{item.where}: {err}") from None
    return preprocess_hu(hu, affine, spec)


class Embedder:
    """The embedding model of a checkpoint folder (vlp3d.train.checkpoint: model.pt, config.toml, meta.json).
    `text_encoder`: a folder holding the checkpoint's text encoder, in place of the name it was trained
    with (a logged model carries its own copy of a local one)."""

    def __init__(self, checkpoint_dir: str | Path, device: str = "cpu", text_encoder: str | None = None):
        checkpoint_dir = Path(checkpoint_dir)
        cfg, meta = checkpoints.read_config(checkpoint_dir), checkpoints.read_meta(checkpoint_dir)
        model = build_model(cfg, text_dim=int(meta["text_dim"]))
        model.load_state_dict(checkpoints.load_model_state(checkpoint_dir, map_location=resolve_device(device)))
        self._setup(cfg, meta, model, device, text_encoder)

    @classmethod
    def from_model(cls, cfg: ExperimentConfig, meta: dict, model: VisionLanguageModel, device: str = "cpu",
                   text_encoder: str | None = None) -> Embedder:
        """The embedder of a model already built and loaded (an export read back: vlp3d.formats.hf), with the
        checkpoint's `meta` (preprocessing spec, label names, text width)."""
        embedder = cls.__new__(cls)
        embedder._setup(cfg, meta, model, device, text_encoder)
        return embedder

    def _setup(self, cfg: ExperimentConfig, meta: dict, model: VisionLanguageModel, device: str,
               text_encoder: str | None) -> None:
        self.cfg, self.meta = cfg, meta
        self.spec = PreprocessSpec.from_dict(self.meta["spec"])
        self.text_encoder_path = text_encoder or self.spec.text_encoder
        self.label_names: list[str] = list(self.meta["label_names"])
        self.device = torch.device(resolve_device(device))
        self.model: VisionLanguageModel = model
        self.model.to(self.device).eval()
        self._text_encoder: TextEncoder | None = None

    def randomly_initialised(self, seed: int = 0) -> Embedder:
        """This model's architecture with fresh random weights (the linear probe's baseline): same
        preprocessing, text encoder and evaluation path, nothing learned."""
        other = copy.copy(self)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            other.model = build_model(self.cfg, text_dim=int(self.meta["text_dim"])).to(self.device).eval()
        return other

    @property
    def text_encoder(self) -> TextEncoder:
        if self._text_encoder is None:
            # stays on the CPU (small; its tokens are CPU tensors): the pooled vectors move to the device
            self._text_encoder = TextEncoder(self.text_encoder_path, max_tokens=self.spec.max_tokens)
        return self._text_encoder

    @property
    def logit_scale(self) -> float:
        """The zero-shot softmax scale: 1 / the learned temperature."""
        return self.model.scale().item()

    @torch.no_grad()
    def embed_volumes(self, stored: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Shard tensors [N, X, Y, Z] (float16 or uint8) -> [N, d]."""
        out = []
        for start in range(0, len(stored), batch_size):
            volume = dequantise(stored[start:start + batch_size]).unsqueeze(1).to(self.device)
            out.append(self.model.encode_image(volume).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.cfg.model.embed_dim)

    @torch.no_grad()
    def embed_tiled(self, volumes: list[np.ndarray], batch_size: int = 16, min_body: float = 0.1) -> torch.Tensor:
        """High-resolution volumes of any shape (T3D) -> [N, d]: the volume is tiled into crops of
        `objective.t3d.crop_shape` (zero-padded at the edges), crops with at least `min_body` of their
        voxels inside the body are embedded, and their embeddings averaged (all crops if none is)."""
        from vlp3d.objectives.t3d import tile_corners

        shape = tuple(self.cfg.objective.t3d.crop_shape)
        body = body_level(self.spec, dequantised=True)
        out = []
        for stored in volumes:
            volume = dequantise(torch.from_numpy(np.array(stored)))  # a copy: shard bytes are read-only
            pad = [p for s, v in zip(reversed(shape), reversed(volume.shape), strict=True) for p in (0, max(0, s - v))]
            volume = torch.nn.functional.pad(volume, pad)
            crops = torch.stack([volume[c[0]:c[0] + shape[0], c[1]:c[1] + shape[1], c[2]:c[2] + shape[2]]
                                 for c in tile_corners(volume.shape, shape)])
            inside = (crops > body).float().mean(dim=(1, 2, 3)) >= min_body
            crops = crops[inside] if inside.any() else crops
            embedded = torch.cat([self.model.encode_image(crops[i:i + batch_size].unsqueeze(1).to(self.device)).cpu()
                                  for i in range(0, len(crops), batch_size)])
            out.append(torch.nn.functional.normalize(embedded.mean(0), dim=-1))
        return torch.stack(out) if out else torch.zeros(0, self.cfg.model.embed_dim)

    def embed_stored(self, images, shapes=None, batch_size: int = 16) -> torch.Tensor:
        """Shard `image` values (fixed-shape tensors, or high-resolution bytes with `image_shape`) -> [N, d]."""
        if shapes is not None:
            from vlp3d.data.shards import decode_image

            images = [decode_image(v, s, self.spec.storage_dtype) for v, s in zip(images, shapes, strict=True)]
        if objective_class(self.cfg.objective.name).evaluation == "tiles":
            return self.embed_tiled(list(images), batch_size)
        return self.embed_volumes(torch.from_numpy(np.stack(list(images))), batch_size)

    def embed_volume_files(self, paths: list[str], assume_hu: bool = False) -> torch.Tensor:
        """NIfTI files or DICOM series -> [N, d], preprocessed with the spec the model was trained on
        (HU rules: `load_ct`; files that need a rescale: `embed_inputs`)."""
        return self.embed_inputs([VolumeInput(path=str(p)) for p in paths], assume_hu=assume_hu)

    def embed_inputs(self, items: list[VolumeInput], assume_hu: bool = False, batch_size: int = 16,
                     limits: VolumeLimits | None = None) -> torch.Tensor:
        """Volume inputs (paths or arrays, with their rescale) -> [N, d]; `load_ct` decides their HU.
        With `limits`, each volume is checked against them from its header or shape before it is read,
        and with the grid this model's preprocessing resamples it to before it is resampled."""
        volumes = [preprocess_input(item, self.spec, assume_hu, limits) for item in items]
        return self.embed_stored(volumes, batch_size=batch_size) if volumes else torch.zeros(0, self.cfg.model.embed_dim)

    @torch.no_grad()
    def embed_report_embeddings(self, report_embedding: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Frozen text-encoder report embeddings (as stored in the shards) -> [N, d]."""
        if not isinstance(report_embedding, torch.Tensor):  # shard columns: lists or arrays
            report_embedding = torch.from_numpy(np.array(report_embedding, dtype=np.float32))
        pooled = report_embedding.float().to(self.device)
        return self.model.encode_text(pooled).cpu()

    def embed_reports(self, reports: list[str]) -> torch.Tensor:
        """Report or prompt texts -> [N, d] (sentence-split exactly as at prepare time)."""
        pooled = embed_reports(self.text_encoder, [split_sentences(r) for r in reports])
        return self.embed_report_embeddings(pooled)


def resolve_device(device: str = "auto") -> str:
    """'auto': the first GPU when torch sees one, else the CPU; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
