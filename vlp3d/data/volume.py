"""CT volume preprocessing: NIfTI or DICOM -> Hounsfield units (exactly once) -> RAS -> spacing -> window -> shape.

Two storage modes (`PreprocessSpec.storage`):

- "fixed": RAS -> [body crop] -> crop to the target field of view -> resample -> window -> pad/crop to
  `shape`. One tensor of `shape` per volume.
- "highres" (T3D): RAS -> [body crop] -> resample -> window -> pad up to at least `shape` per axis.
  The volume keeps its own size; shards store its bytes and shape (`vlp3d.data.shards.decode_image`).

The body crop (`foreground_crop`) keeps the bounding box of voxels above `body_threshold_hu` plus
`FOREGROUND_MARGIN_MM`; it is computed on the HU volume before resampling (cheaper than resampling air
first, and equal up to the interpolation at the box's edge). Real scans: the patient table lies above
the threshold too and stays inside the box.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import torch

from vlp3d.config import DataConfig, ModelConfig
from vlp3d.data.dicom import is_dicom_path, load_dicom_hu
from vlp3d.data.hounsfield import HUDecision, to_hounsfield
from vlp3d.data.limits import VolumeLimits
from vlp3d.errors import InputError

if TYPE_CHECKING:  # MONAI is imported where a volume is transformed: importing it costs seconds, and a
    # training worker, which reads prepared shards, never needs it
    from monai.data import MetaTensor
    from monai.transforms import ScaleIntensityRanged

_DATA, _MODEL = DataConfig(), ModelConfig()  # the spec's defaults are the config's: one source


@dataclass(frozen=True)
class PreprocessSpec:
    """Every parameter that changes the stored tensors; its hash names the shard folder.

    Defaults are `DataConfig`'s (and `ModelConfig.text_encoder`), so a spec built without a config
    is the one the default config builds (`vlp3d.data.shards.spec_from_config`)."""

    shape: tuple[int, int, int] = _DATA.shape
    spacing_mm: tuple[float, float, float] = _DATA.spacing_mm
    hu_window: tuple[float, float] = _DATA.hu_window
    storage_dtype: str = _DATA.storage_dtype
    orientation: str = "RAS"
    interpolation: str = "bilinear"
    report_sections: tuple[str, ...] = _DATA.report_sections
    text_encoder: str = _MODEL.text_encoder
    max_tokens: int = _DATA.max_tokens
    text_embeddings: bool = _DATA.text_embeddings
    max_sentences: int = _DATA.max_sentences
    storage: str = _DATA.storage
    foreground_crop: bool = _DATA.foreground_crop
    body_threshold_hu: float = _DATA.body_threshold_hu
    shape_2d: tuple[int, int] = _DATA.shape_2d
    version: int = 1
    quantisation_error_hu: float = field(default=0.0)

    @classmethod
    def from_dict(cls, spec: dict) -> PreprocessSpec:
        """A spec as stored (a manifest's or checkpoint's `spec`, JSON lists for tuples); keys an
        older spec lacks take today's defaults."""
        spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items() if k != "quantisation_error_hu"}
        return cls(**spec)

    def __post_init__(self):
        width = self.hu_window[1] - self.hu_window[0]
        if self.storage_dtype == "uint8":
            error = 0.5 / 255 * width
        elif self.storage_dtype == "float16":
            error = 2.0**-12 * width  # half ulp of float16 just below 1.0
        else:
            raise InputError(f"data.storage_dtype must be 'float16' or 'uint8', got {self.storage_dtype!r}")
        if self.storage not in ("fixed", "highres"):
            raise InputError(f"data.storage must be 'fixed' or 'highres', got {self.storage!r}")
        object.__setattr__(self, "quantisation_error_hu", round(error, 3))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @property
    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


def load_nifti_hu(path: str, metadata_scaling: tuple = (None, None),
                  limits: VolumeLimits | None = None) -> tuple[np.ndarray, np.ndarray, HUDecision]:
    """Read a NIfTI file; return (HU array, affine, decision). Raises ValueError on unreadable data, and
    on a header whose volume exceeds `limits` (before its data are read)."""
    try:
        img = nib.load(path)
    except nib.filebasedimages.ImageFileError as err:  # not NIfTI, truncated, not gzip: bad input, said as such
        raise InputError(f"not a readable NIfTI file ({err})") from None
    if len(img.shape) != 3:
        raise InputError(f"expected a 3D volume, got shape {img.shape}")
    if limits is not None:
        limits.check(img.shape, img.get_data_dtype().itemsize)
    proxy = img.dataobj
    if hasattr(proxy, "get_unscaled"):
        # after loading, nibabel moves scl_slope/scl_inter from the header into the array proxy
        raw, header_scaling = np.asanyarray(proxy.get_unscaled()), (float(proxy.slope), float(proxy.inter))
    else:
        raw, header_scaling = np.asanyarray(proxy), (None, None)
    hu, decision = to_hounsfield(raw, header_scaling, metadata_scaling)
    if not np.isfinite(hu).all():
        raise InputError("volume contains NaN or infinite values")
    return hu, img.affine.astype(np.float64), decision


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def load_volume_hu(path, metadata_scaling: tuple = (None, None),
                   limits: VolumeLimits | None = None) -> tuple[np.ndarray, np.ndarray, HUDecision]:
    """NIfTI file, DICOM series folder or DICOM file -> (HU array, RAS affine, decision).

    Every format returns the same contract as `load_nifti_hu`: stored values converted to HU
    exactly once and an affine from voxel indices to RAS+ world mm (nibabel's convention).
    DICOM needs the optional extra `pip install "vlp3d[dicom]"`; other files go to nibabel. With
    `limits`, a volume over them is refused from its header, before its voxels are read.
    """
    if str(path).lower().endswith(NIFTI_SUFFIXES):
        return load_nifti_hu(str(path), metadata_scaling, limits)
    if is_dicom_path(path):
        return load_dicom_hu(path, metadata_scaling, limits)
    return load_nifti_hu(str(path), metadata_scaling, limits)


CROP_MARGIN_VOXELS = 4
FOREGROUND_MARGIN_MM = 5.0


IMAGE, LABEL = "image", "label"  # keys of the transform chain: the CT and its (optional) voxel label map


def _window(spec: PreprocessSpec) -> ScaleIntensityRanged:
    from monai.transforms import ScaleIntensityRanged

    return ScaleIntensityRanged(keys=IMAGE, a_min=spec.hu_window[0], a_max=spec.hu_window[1], b_min=0.0, b_max=1.0,
                                clip=True)


def _voxel_sizes(volume: MetaTensor) -> np.ndarray:
    return np.sqrt((volume.affine[:3, :3].numpy() ** 2).sum(0))


def _crop_to_body(data: dict, threshold_hu: float, margin_mm: float = FOREGROUND_MARGIN_MM) -> dict:
    """Crop the channel-first HU MetaTensors of `data` to the bounding box of the image's voxels above
    `threshold_hu`, plus `margin_mm` (clipped at the volume's edge); the affine follows. No voxel above:
    unchanged."""
    volume = data[IMAGE]
    if not bool((volume > threshold_hu).any()):
        return data
    from monai.transforms import CropForegroundd

    margin = np.ceil(margin_mm / _voxel_sizes(volume)).astype(int).tolist()
    crop = CropForegroundd(keys=list(data), source_key=IMAGE, select_fn=lambda x: x > threshold_hu, margin=margin,
                           allow_smaller=True)
    return crop(data)


def preprocess_hu(hu: np.ndarray, affine: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """HU array + affine -> window-scaled [0, 1] array in RAS (axes x, y, z), stored dtype.

    "fixed": the centre `spec.shape` voxels at `spec.spacing_mm` (of the body box when
    `spec.foreground_crop`); the input is first cropped to that field of view (plus a margin) so
    only voxels that are kept get resampled. "highres": every voxel (of the body box) at
    `spec.spacing_mm`, zero-padded (centred) up to at least `spec.shape` per axis.
    """
    return preprocess_volume(hu, affine, spec)[0]


def preprocess_volume(hu: np.ndarray, affine: np.ndarray, spec: PreprocessSpec,
                      label_map: np.ndarray | None = None, with_affine: bool = False) -> tuple:
    """`preprocess_hu`, carrying an optional voxel label map (integer class per voxel, on the same
    grid as `hu`) through the same transforms: one chain of MONAI dictionary transforms, the label
    map resampled with nearest-neighbour interpolation, cropped with the volume (the body box is
    the CT's) and padded with 0 (background). Returns (image, uint8 label map or None), and with
    `with_affine` the affine of the output grid (voxel -> RAS+ mm) third."""
    from monai.data import MetaTensor
    from monai.transforms import (
        CenterSpatialCropd,
        Compose,
        Orientationd,
        ResizeWithPadOrCropd,
        Spacingd,
        SpatialPadd,
    )

    data = {IMAGE: MetaTensor(torch.from_numpy(np.ascontiguousarray(hu))[None], affine=torch.from_numpy(affine))}
    if label_map is not None:
        label_map = np.asarray(label_map)
        if label_map.shape != hu.shape:
            raise InputError(f"label map shape {list(label_map.shape)} differs from the volume's {list(hu.shape)}: "
                             "a label map must lie on the CT's voxel grid (same shape and affine)")
        if label_map.size and (label_map.min() < 0 or label_map.max() > 255 or
                               not np.array_equal(label_map, np.round(label_map))):
            raise InputError("label map values must be integer classes in 0..255 (0 = background); got values in "
                             f"[{label_map.min()}, {label_map.max()}]")
        data[LABEL] = MetaTensor(torch.from_numpy(np.ascontiguousarray(label_map, dtype=np.float32))[None],
                                 affine=torch.from_numpy(affine))
    keys = list(data)
    modes = [spec.interpolation if key == IMAGE else "nearest" for key in keys]
    data = Orientationd(keys=keys, axcodes=spec.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")))(data)
    if spec.foreground_crop:
        data = _crop_to_body(data, spec.body_threshold_hu)
    spacing = Spacingd(keys=keys, pixdim=spec.spacing_mm, mode=modes)
    if spec.storage == "highres":
        data = Compose([spacing, _window(spec),
                        SpatialPadd(keys=keys, spatial_size=spec.shape, mode="constant", value=0.0)])(data)
    else:
        volume = data[IMAGE]
        needed = np.ceil(np.asarray(spec.shape) * np.asarray(spec.spacing_mm) / _voxel_sizes(volume)).astype(int)
        roi = np.minimum(np.asarray(volume.shape[1:]), needed + 2 * CROP_MARGIN_VOXELS)
        if (roi < np.asarray(volume.shape[1:])).any():
            data = CenterSpatialCropd(keys=keys, roi_size=roi.tolist())(data)
        data = Compose([spacing, _window(spec),
                        ResizeWithPadOrCropd(keys=keys, spatial_size=spec.shape, mode="constant", value=0.0)])(data)
    image = quantise(data[IMAGE][0].as_tensor().numpy(), spec.storage_dtype)
    labels = None
    if LABEL in data:
        labels = np.round(data[LABEL][0].as_tensor().numpy()).astype(np.uint8)
    if with_affine:
        return image, labels, np.asarray(data[IMAGE].affine, dtype=np.float64)
    return image, labels


def resampled_voxels(shape, affine: np.ndarray, spec: PreprocessSpec) -> int:
    """How many voxels `preprocess_volume` resamples a volume of `shape` with `affine` to, computed
    before it does (the grid `Spacingd` allocates: the whole volume for "highres", the field of view
    plus its margin for "fixed"); the body crop can only make it smaller."""
    import nibabel.orientations as orientations

    sizes = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(0))
    order = orientations.io_orientation(affine)[:, 0].astype(int)  # input axis i -> RAS axis order[i]
    ras_shape, ras_sizes = np.zeros(3), np.zeros(3)
    ras_shape[order], ras_sizes[order] = np.asarray(shape, dtype=np.float64), sizes
    if spec.storage != "highres":
        needed = np.ceil(np.asarray(spec.shape) * np.asarray(spec.spacing_mm) / ras_sizes)
        ras_shape = np.minimum(ras_shape, needed + 2 * CROP_MARGIN_VOXELS)
    return math.prod(int(n) for n in np.ceil(ras_shape * ras_sizes / np.asarray(spec.spacing_mm)))


def body_level(spec: PreprocessSpec, threshold_hu: float | None = None, *, dequantised: bool = False) -> float:
    """The value a voxel at `threshold_hu` (default: the spec's `body_threshold_hu`) has in volumes
    stored with `spec`: in stored units (uint8: 0..255, float16: 0..1), or with `dequantised` in
    the [0, 1] of `dequantise`. Voxels above it are body (T3D's crops and tiles)."""
    lo, hi = spec.hu_window
    threshold = spec.body_threshold_hu if threshold_hu is None else threshold_hu
    level = (threshold - lo) / (hi - lo)
    return level * 255 if spec.storage_dtype == "uint8" and not dequantised else level


def quantise(volume01: np.ndarray, storage_dtype: str) -> np.ndarray:
    if storage_dtype == "uint8":
        return np.round(np.clip(volume01, 0, 1) * 255).astype(np.uint8)
    return volume01.astype(np.float16)


def dequantise(stored: torch.Tensor) -> torch.Tensor:
    """Stored shard tensor -> float32 in [0, 1]."""
    if stored.dtype == torch.uint8:
        return stored.float() / 255.0
    return stored.float()
