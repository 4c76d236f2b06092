"""2D radiographs (modality "xray"): PNG or single-file DICOM -> [0, 1] -> `shape_2d`, stored dtype.

Conventions of the stored image, an array [H, W] = `spec.shape_2d`:

- rows run from the top of the image as displayed to the bottom (superior -> inferior on a
  standard chest film), columns from the displayed left to right (the patient's right on the
  image's left for a PA/AP film, the radiological convention); nothing is flipped;
- brighter = more attenuation (bone white, air black). DICOM MONOCHROME1 images are inverted;
- the aspect ratio is kept: the image is zero-padded (centred, i.e. black borders) to the aspect
  ratio of `shape_2d`, then resized with MONAI `Resize` (bilinear, anti-aliased when shrinking).

Scaling to [0, 1]:

- PNG: value / the bit depth's maximum (255 for 8-bit, 65535 for 16-bit); colour PNGs are
  converted to grayscale (ITU-R 601 luma), an alpha channel is dropped.
- DICOM: the modality LUT (RescaleSlope/RescaleIntercept) is applied, then the first VOI window
  of the file (WindowCenter/WindowWidth, linear, DICOM PS3.3 C.11.2.1.2) maps to [0, 1]; a file
  without a window uses its own min..max. Needs pydicom (`pip install "vlp3d[dicom]"`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlp3d.errors import InputError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class RadiographInfo:
    """How a radiograph was read, recorded in the shards."""

    source: str  # png | dicom
    slope: float = 1.0
    intercept: float = 0.0
    spacing_mm: tuple[float, float] = (float("nan"), float("nan"))  # (row, column) pixel spacing


def is_dicom_file(path: str | Path) -> bool:
    """A DICOM Part-10 file ('DICM' at byte 128) or a file named *.dcm / *.dicom."""
    path = Path(path)
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    with open(path, "rb") as handle:
        head = handle.read(132)
    return head[128:132] == b"DICM"


def read_png(path: str | Path) -> tuple[np.ndarray, RadiographInfo]:
    """Grayscale PNG (8- or 16-bit) -> float32 [H, W] in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head != PNG_MAGIC:
        raise InputError(f"{path}: not a PNG image (file starts with {head!r}); radiographs must be PNG or DICOM")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                pixels = np.asarray(image)
                maximum = 65535.0
            else:
                if mode not in ("L", "1"):
                    image = image.convert("L")
                pixels = np.asarray(image)
                maximum = 1.0 if mode == "1" else 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise InputError(f"{path}: PNG cannot be decoded ({err})") from err
    if pixels.ndim != 2 or min(pixels.shape) < 2:
        raise InputError(f"{path}: expected a 2D grayscale image, got shape {pixels.shape}")
    scaled = np.clip(pixels.astype(np.float32) / maximum, 0.0, 1.0)
    return scaled, RadiographInfo(source="png")


def read_dicom_2d(path: str | Path) -> tuple[np.ndarray, RadiographInfo]:
    """Single-frame DICOM radiograph -> float32 [H, W] in [0, 1] (see the module docstring)."""
    try:
        import pydicom
    except ImportError as err:
        raise ImportError(f'{path}: reading DICOM needs pydicom: pip install "vlp3d[dicom]"') from err
    dataset = pydicom.dcmread(str(path))
    pixels = dataset.pixel_array.astype(np.float32)
    if pixels.ndim == 3 and getattr(dataset, "NumberOfFrames", 1) in (None, 1, "1"):
        pixels = pixels[..., 0] if pixels.shape[-1] in (3, 4) else pixels[0]
    if pixels.ndim != 2:
        raise InputError(f"{path}: expected a single-frame 2D radiograph, got pixel array shape {pixels.shape}")
    slope = float(getattr(dataset, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(dataset, "RescaleIntercept", 0.0) or 0.0)
    values = pixels * slope + intercept

    def first(value):
        if value is None:
            return None
        return float(value[0]) if isinstance(value, pydicom.multival.MultiValue | list | tuple) else float(value)

    centre, width = first(getattr(dataset, "WindowCenter", None)), first(getattr(dataset, "WindowWidth", None))
    if centre is not None and width is not None and width > 1:
        low = centre - 0.5 - (width - 1) / 2
        scaled = (values - low) / (width - 1)
    else:
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    scaled = np.clip(scaled, 0.0, 1.0)
    if str(getattr(dataset, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        scaled = 1.0 - scaled
    spacing = getattr(dataset, "PixelSpacing", None) or getattr(dataset, "ImagerPixelSpacing", None)
    spacing_mm = tuple(float(v) for v in spacing)[:2] if spacing else (float("nan"), float("nan"))
    return scaled.astype(np.float32), RadiographInfo("dicom", slope, intercept, spacing_mm)


def load_radiograph(path: str | Path) -> tuple[np.ndarray, RadiographInfo]:
    """PNG or DICOM radiograph -> float32 [H, W] in [0, 1] + how it was read."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"radiograph file not found: {path}")
    if path.is_dir():
        raise InputError(f"{path}: a radiograph must be one PNG or DICOM file, got a folder")
    image, info = read_dicom_2d(path) if is_dicom_file(path) else read_png(path)
    if not np.isfinite(image).all():
        raise InputError(f"{path}: image contains NaN or infinite values")
    return image, info


def resize_2d(image01: np.ndarray, shape_2d: tuple[int, int]) -> np.ndarray:
    """Zero-pad (centred) to the aspect ratio of `shape_2d`, then resize to it (float32)."""
    # imported here: MONAI costs seconds to import, and training workers never resize radiographs
    from monai.transforms import Resize, SpatialPad

    rows, cols = image01.shape
    target_rows, target_cols = shape_2d
    if rows * target_cols > cols * target_rows:  # too tall: widen
        padded = (rows, int(round(rows * target_cols / target_rows)))
    else:
        padded = (int(round(cols * target_rows / target_cols)), cols)
    tensor = torch.from_numpy(np.ascontiguousarray(image01, dtype=np.float32))[None]
    tensor = SpatialPad(spatial_size=padded, mode="constant", value=0.0)(tensor)
    tensor = Resize(spatial_size=tuple(shape_2d), mode="bilinear", anti_aliasing=True)(tensor)
    out = torch.as_tensor(tensor)[0].numpy()
    return np.clip(out, 0.0, 1.0)
