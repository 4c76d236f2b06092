"""DICOM CT -> (HU array, RAS affine, HUDecision), the same contract as `load_nifti_hu`.

Reads a folder holding one series of single-frame slices, a single slice, or one (enhanced)
multi-frame file with pydicom (optional extra: `pip install "vlp3d[dicom]"`).

Why not MONAI's `PydicomReader` (checked with MONAI 1.6.1): it orders a series by
InstanceNumber (not by position along the slice normal), ignores SeriesInstanceUID, gives an
identity affine and unscaled values for enhanced multi-frame CT (geometry and rescale live in
the functional group sequences there) and a 2D array for a single slice. Where it is right
(a well-ordered single-frame series) the tests check that this module agrees with it.

Conventions, as nibabel's NIfTI affines: array axes are (column, row, slice), i.e. `pixel_array`
transposed, slices sorted by their position along the slice normal; the affine maps voxel
indices to RAS+ world millimetres (DICOM patient space is LPS, so x and y flip sign).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlp3d.data.hounsfield import HUDecision, to_hounsfield
from vlp3d.data.limits import VolumeLimits
from vlp3d.errors import InputError

INSTALL_HINT = 'pip install "vlp3d[dicom]"'
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
ORIENTATION_ATOL = 1e-4
# slice gaps may differ by this much (relative to the median gap) before the series is rejected
SLICE_GAP_RTOL = 0.02
SLICE_GAP_ATOL_MM = 0.01
SHEAR_WARN_DEG = 0.5


def is_dicom_path(path: str | Path) -> bool:
    """A folder (a series), a `.dcm`-like name, or a file with the DICOM preamble ("DICM" at 128)."""
    path = Path(path)
    if path.is_dir():
        return True
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _pydicom(path: Path):
    try:
        import pydicom
    except ImportError as err:
        raise ImportError(f"'{path}' is DICOM; reading it needs pydicom: {INSTALL_HINT}") from err
    return pydicom


@dataclass
class _Frame:
    """One 2D image of the volume: geometry, rescale and where its pixels come from."""

    origin: np.ndarray  # ImagePositionPatient, LPS mm, centre of the first pixel
    orientation: np.ndarray  # ImageOrientationPatient: row cosine, column cosine
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    shape: tuple[int, int]  # (rows, columns)
    slope: float | None
    intercept: float | None
    thickness: float | None
    source: str
    dataset: object
    frame: int | None  # index into a multi-frame pixel_array, None for a single-frame file

    def pixels(self) -> np.ndarray:
        try:
            array = self.dataset.pixel_array
        except Exception as err:  # noqa: BLE001 - pydicom raises several types for undecodable data
            syntax = getattr(getattr(self.dataset, "file_meta", None), "TransferSyntaxUID", None)
            name = getattr(syntax, "name", syntax)
            raise InputError(f"{self.source}: cannot decode pixel data (transfer syntax {name}): {err}") from err
        if self.frame is not None and array.ndim == 3:
            array = array[self.frame]
        if array.shape != self.shape:
            raise InputError(f"{self.source}: pixel array shape {array.shape} is not Rows x Columns {self.shape}")
        return array


def _float(value) -> float | None:
    return None if value is None or value == "" else float(value)


def _item(sequence_owner, sequence: str, keyword: str):
    """`owner.<sequence>[0].<keyword>` or None."""
    items = getattr(sequence_owner, sequence, None)
    if not items:
        return None
    return getattr(items[0], keyword, None)


def _geometry(ds, source: str, groups: list) -> dict:
    """IOP / IPP / PixelSpacing / rescale from the first group that has them (per-frame, shared, top level)."""
    def find(sequence: str, keyword: str):
        for group in groups:
            value = _item(group, sequence, keyword)
            if value is not None:
                return value
        return getattr(ds, keyword, None)

    orientation = find("PlaneOrientationSequence", "ImageOrientationPatient")
    origin = find("PlanePositionSequence", "ImagePositionPatient")
    spacing = find("PixelMeasuresSequence", "PixelSpacing")
    if orientation is None or origin is None:
        raise InputError(
            f"{source}: no ImageOrientationPatient/ImagePositionPatient, so the slices cannot be placed in space"
        )
    if spacing is None:
        spacing = getattr(ds, "ImagerPixelSpacing", None)
    if spacing is None:
        raise InputError(f"{source}: no PixelSpacing")
    return {
        "orientation": np.asarray([float(v) for v in orientation], dtype=np.float64),
        "origin": np.asarray([float(v) for v in origin], dtype=np.float64),
        "pixel_spacing": (float(spacing[0]), float(spacing[1])),
        "slope": _float(find("PixelValueTransformationSequence", "RescaleSlope")),
        "intercept": _float(find("PixelValueTransformationSequence", "RescaleIntercept")),
        "thickness": _float(find("PixelMeasuresSequence", "SpacingBetweenSlices"))
        or _float(find("PixelMeasuresSequence", "SliceThickness")),
    }


def _check_pixels(ds, source: str) -> None:
    if int(getattr(ds, "SamplesPerPixel", 1)) != 1:
        raise InputError(f"{source}: {ds.SamplesPerPixel} samples per pixel (colour image), expected greyscale CT")
    if "ModalityLUTSequence" in ds:
        raise InputError(f"{source}: Modality LUT Sequence is not supported (only RescaleSlope/Intercept)")


def _frames_of(ds, source: str) -> list[_Frame]:
    _check_pixels(ds, source)
    shape = (int(ds.Rows), int(ds.Columns))
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
    if per_frame is None and shared is None:
        if n_frames != 1:
            raise InputError(f"{source}: {n_frames} frames without functional groups (no per-frame geometry)")
        return [_Frame(shape=shape, source=source, dataset=ds, frame=None, **_geometry(ds, source, []))]
    if per_frame is not None and len(per_frame) != n_frames:
        raise InputError(f"{source}: {len(per_frame)} per-frame groups for {n_frames} frames")
    frames = []
    for index in range(n_frames):
        groups = ([per_frame[index]] if per_frame is not None else []) + ([shared[0]] if shared else [])
        frames.append(_Frame(shape=shape, source=f"{source}[frame {index}]", dataset=ds, frame=index,
                             **_geometry(ds, f"{source} frame {index}", groups)))
    return frames


def _read_folder(folder: Path, pydicom, limits: VolumeLimits | None = None) -> list[_Frame]:
    datasets, skipped = [], 0
    paths = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if limits is not None:  # every file is read whole: its bytes count before any is read
        total = sum(p.stat().st_size for p in paths)
        if total > limits.max_bytes:
            raise InputError(f"{folder}: {len(paths)} files of {total / 2**30:.1f} GiB exceed the cap of "
                             f"{limits.max_bytes / 2**30:.1f} GiB (max_bytes)")
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
        except (pydicom.errors.InvalidDicomError, EOFError, OSError):
            skipped += 1
            continue
        if "PixelData" not in ds:  # DICOMDIR, structured reports, presentation states
            skipped += 1
            continue
        datasets.append((path, ds))
    if not datasets:
        raise InputError(f"{folder}: no DICOM images in this folder ({skipped} other files)")
    series = sorted({str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in datasets})
    if len(series) > 1:
        raise InputError(f"{folder}: holds {len(series)} series ({', '.join(series)}); put one series per folder")
    multi = [path.name for path, ds in datasets if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1]
    if multi and len(datasets) > 1:
        raise InputError(f"{folder}: multi-frame files {multi} mixed with other images; give the file itself")
    frames: list[_Frame] = []
    for path, ds in datasets:
        frames.extend(_frames_of(ds, str(path)))
    return frames


def _assemble(frames: list[_Frame], where: str) -> tuple[list[_Frame], np.ndarray, list[str]]:
    """Sort frames along the slice normal, check the grid is regular; return (frames, LPS affine, warnings)."""
    first = frames[0]
    for frame in frames[1:]:
        if not np.allclose(frame.orientation, first.orientation, atol=ORIENTATION_ATOL):
            raise InputError(f"{where}: slices have different orientations (localizer or multi-planar series?)")
        if frame.shape != first.shape or not np.allclose(frame.pixel_spacing, first.pixel_spacing, rtol=1e-4):
            raise InputError(f"{where}: slices differ in size or pixel spacing")
    row_cos, col_cos = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_cos, col_cos)
    if not math.isclose(np.linalg.norm(normal), 1.0, abs_tol=1e-3):
        raise InputError(f"{where}: ImageOrientationPatient {first.orientation.tolist()} is not two unit vectors")
    frames = sorted(frames, key=lambda f: float(f.origin @ normal))
    first = frames[0]
    positions = np.array([float(f.origin @ normal) for f in frames])
    warnings: list[str] = []
    if len(frames) > 1:
        gaps = np.diff(positions)
        if gaps.min() < SLICE_GAP_ATOL_MM:
            raise InputError(f"{where}: {int((gaps < SLICE_GAP_ATOL_MM).sum())} slices share a position "
                             "(several phases, echoes or stacks in one series?)")
        median = float(np.median(gaps))
        if np.abs(gaps - median).max() > max(SLICE_GAP_ATOL_MM, SLICE_GAP_RTOL * median):
            raise InputError(f"{where}: uneven slice spacing (gaps {gaps.min():.3f}-{gaps.max():.3f} mm, "
                             "missing slices?)")
        step = (frames[-1].origin - frames[0].origin) / (len(frames) - 1)
        angle = math.degrees(math.acos(min(1.0, abs(float(step @ normal)) / float(np.linalg.norm(step)))))
        if angle > SHEAR_WARN_DEG:
            warnings.append(f"slice positions are {angle:.1f} deg off the slice normal (gantry tilt): sheared grid")
    else:
        thickness = first.thickness or 1.0
        if not first.thickness:
            warnings.append("single slice without SliceThickness: assumed 1 mm")
        step = normal * thickness
    row_spacing, col_spacing = first.pixel_spacing
    affine = np.eye(4)
    affine[:3, 0] = row_cos * col_spacing  # array axis 0 walks along a row: column index
    affine[:3, 1] = col_cos * row_spacing  # array axis 1 walks down a column: row index
    affine[:3, 2] = step
    affine[:3, 3] = first.origin
    return frames, affine, warnings


def _rescale(frames: list[_Frame], raw: np.ndarray, metadata_scaling: tuple) -> tuple[np.ndarray, HUDecision]:
    slopes = {f.slope for f in frames}
    intercepts = {f.intercept for f in frames}
    if len(slopes) == 1 and len(intercepts) == 1:
        return to_hounsfield(raw, (frames[0].slope, frames[0].intercept), metadata_scaling)
    # per-slice rescale (allowed by DICOM): apply each slice's own header values, once
    slope = np.array([1.0 if f.slope is None else f.slope for f in frames], dtype=np.float32)
    intercept = np.array([0.0 if f.intercept is None else f.intercept for f in frames], dtype=np.float32)
    hu = raw.astype(np.float32) * slope + intercept
    warning = (f"RescaleSlope/Intercept vary per slice (slope {slope.min():g}-{slope.max():g}, "
               f"intercept {intercept.min():g}-{intercept.max():g}); applied per slice, recorded the first")
    return hu, HUDecision("header", float(slope[0]), float(intercept[0]), [warning])


def load_dicom_hu(path: str | Path, metadata_scaling: tuple = (None, None),
                  limits: VolumeLimits | None = None) -> tuple[np.ndarray, np.ndarray, HUDecision]:
    """A DICOM series folder or file -> (HU float32 array (x, y, slice), RAS affine, decision).

    DICOM RescaleSlope/Intercept (top level or in the Pixel Value Transformation functional
    group) are the "header" scaling: applied once, and metadata scaling only when they are absent
    (see `to_hounsfield`). Raises ValueError naming the file or folder on unusable input, and on
    a volume over `limits` (from the headers, before any pixel data are decoded).
    """
    path = Path(path)
    pydicom = _pydicom(path)
    if path.is_dir():
        frames = _read_folder(path, pydicom, limits)
    else:
        if limits is not None and path.stat().st_size > limits.max_bytes:
            raise InputError(f"{path}: a file of {path.stat().st_size / 2**30:.1f} GiB exceeds the cap of "
                             f"{limits.max_bytes / 2**30:.1f} GiB (max_bytes)")
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError as err:
            raise InputError(f"{path}: not a DICOM file ({err})") from err
        if "PixelData" not in ds:
            raise InputError(f"{path}: DICOM file without pixel data")
        frames = _frames_of(ds, str(path))
    if limits is not None:
        try:
            limits.check((*frames[0].shape[::-1], len(frames)), int(getattr(frames[0].dataset, "BitsAllocated", 16)) // 8)
        except ValueError as err:
            raise InputError(f"{path}: {err}") from None
    frames, affine_lps, geometry_warnings = _assemble(frames, str(path))
    # (slice, row, column) -> (column, row, slice)
    raw = np.stack([frame.pixels() for frame in frames]).transpose(2, 1, 0)
    hu, decision = _rescale(frames, raw, metadata_scaling)
    modality = str(getattr(frames[0].dataset, "Modality", "") or "")
    decision.modality = modality  # not CT: rejected by `not_ct_reason` in prepare
    if modality and modality != "CT":
        decision.warnings.append(f"modality {modality}: values are not Hounsfield units")
    decision.warnings.extend(geometry_warnings)
    if not np.isfinite(hu).all():
        raise InputError(f"{path}: volume contains NaN or infinite values")
    return np.ascontiguousarray(hu), LPS_TO_RAS @ affine_lps, decision
