"""Synthetic CT-RATE-layout corpus: chest phantoms in HU with findings, and reports that state them.

Anatomy is defined in world millimetres (RAS+, origin at the volume centre) and sampled through
each volume's affine, so every orientation and spacing shows the same patient.

With `radiographs=True` every CT also gets a frontal (PA-like) projection radiograph, a PNG under
`radiographs/<split>/<patient>/`, listed in `radiographs.csv` in the corpus root (see
`vlp3d.data.corpus.read_ctrate`): same patient, split, report and labels as its CT.

Every CT also gets a voxel label map on its own grid and affine (`render`; classes
`LABEL_MAP_CLASSES`: body, lungs, heart and each lesion type), a uint8 NIfTI at
`label_maps/<split>/<volume stem>_label.nii.gz`; `label_maps/classes.json` lists the class names. `read_ctrate`
puts their paths in the manifest column `label` (segmentation fine-tuning, `vlp3d finetune`).
"""

from __future__ import annotations

import gzip
import io
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from vlp3d.data.corpus import (
    LABEL_MAP_CLASSES_FILE,
    LABEL_MAPS_DIR,
    RADIOGRAPHS_CSV,
    label_map_name,
)
from vlp3d.data.labels import CTRATE_LABELS, PHANTOM_FINDINGS
from vlp3d.errors import InputError

# Storage variants exercised by the corpus, each a trap real corpora set:
#   header   - slope/intercept in the NIfTI header (nibabel applies them on read)
#   metadata - raw values in the file, slope/intercept only in the metadata CSV (CT-RATE)
#   hu       - values already in HU, while the metadata CSV still lists intercept -1024
STORAGE_MODES = ("header", "metadata", "hu")
ORIENTATIONS = ("RAS", "LPS", "LAS", "RPI", "PSL")
FOV_MM = (400.0, 400.0, 330.0)
RADIOGRAPH_PIXEL_MM = FOV_MM[0] / 256  # 256 columns across the field of view
RADIOGRAPH_MU_MAX = 0.75  # mean relative attenuation shown as white


@dataclass
class Case:
    volume_name: str
    patient_id: str
    split: str
    findings: dict[str, dict] = field(default_factory=dict)
    anatomy: dict[str, float] = field(default_factory=dict)
    orientation: str = "RAS"
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    storage: str = "header"
    slope: float = 1.0
    intercept: float = -1024.0


def axcodes_affine(axcodes: str, spacing_mm, shape) -> np.ndarray:
    """Affine whose voxel axes point along `axcodes` (e.g. 'LPS'), centred on the world origin."""
    world_axis = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    affine = np.zeros((4, 4))
    for voxel_axis, code in enumerate(axcodes):
        axis, sign = world_axis[code]
        affine[axis, voxel_axis] = sign * spacing_mm[voxel_axis]
    affine[3, 3] = 1.0
    centre = (np.asarray(shape) - 1) / 2.0
    affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


def _ellipsoid(x, y, z, centre, radii):
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + (
        (z - centre[2]) / radii[2]
    ) ** 2


# classes of the voxel label maps (value = index); each lesion type is its own class
LABEL_MAP_CLASSES = ("background", "body", "lung", "heart", "lung_nodule", "consolidation", "pleural_effusion",
                     "pericardial_effusion")


def render_hu(case: Case, affine: np.ndarray, shape, rng: np.random.Generator) -> np.ndarray:
    """HU volume of `case` sampled on the voxel grid of `affine`/`shape`."""
    return render(case, affine, shape, rng)[0]


def render(case: Case, affine: np.ndarray, shape, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(HU volume, voxel label map) of `case` on the voxel grid of `affine`/`shape`: the label map
    (uint8, values index `LABEL_MAP_CLASSES`) marks exactly the voxels each structure was painted on
    (the last painted wins, as in the HU volume); noise draws nothing that the labels depend on."""
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    x, y, z = (affine[:3, :3].astype(np.float32) @ ijk) + affine[:3, 3:4].astype(np.float32)
    a = case.anatomy
    hu = np.full(x.shape, -1000.0, dtype=np.float32)
    labels = np.zeros(x.shape, dtype=np.uint8)
    cls = {name: index for index, name in enumerate(LABEL_MAP_CLASSES)}
    body = _ellipsoid(x, y, z, (0, 0, 0), (a["body_rx"], a["body_ry"], 1e6)) <= 1
    hu[body] = -90.0  # subcutaneous fat
    labels[body] = cls["body"]
    muscle = _ellipsoid(x, y, z, (0, 0, 0), (a["body_rx"] - 15, a["body_ry"] - 15, 1e6)) <= 1
    hu[muscle] = 40.0
    f = case.findings
    lungs = {}
    for side, sx in (("right", 1.0), ("left", -1.0)):
        centre = (sx * a["lung_dx"], 5.0, 10.0)
        lung = _ellipsoid(x, y, z, centre, (a["lung_rx"], a["lung_ry"], a["lung_rz"])) <= 1
        lungs[side] = (lung, centre)
        hu[lung] = -960.0 if "Emphysema" in f else -840.0
        labels[lung] = cls["lung"]
    if "Emphysema" in f:  # bullae
        for _ in range(12):
            side = "right" if rng.random() < 0.5 else "left"
            lung, c = lungs[side]
            bc = (c[0] + rng.uniform(-30, 30), c[1] + rng.uniform(-30, 30), c[2] + rng.uniform(-60, 60))
            hu[lung & (_ellipsoid(x, y, z, bc, (12, 12, 12)) <= 1)] = -1000.0
    if "Pleural effusion" in f:
        for side in f["Pleural effusion"]["sides"]:
            lung, c = lungs[side]
            fluid = lung & (y < c[1] - 0.35 * a["lung_ry"])
            hu[fluid] = 12.0
            labels[fluid] = cls["pleural_effusion"]
    if "Consolidation" in f:
        d = f["Consolidation"]
        lung, c = lungs[d["side"]]
        cz = c[2] + (0.45 if d["lobe"] == "upper" else -0.45) * a["lung_rz"]
        consolidated = lung & (_ellipsoid(x, y, z, (c[0], c[1] + 10, cz), (38, 35, 40)) <= 1)
        hu[consolidated] = 35.0
        labels[consolidated] = cls["consolidation"]
    if "Lung nodule" in f:
        d = f["Lung nodule"]
        lung, c = lungs[d["side"]]
        r = d["size_mm"] / 2.0
        nc = (c[0] + d["offset"][0], c[1] + d["offset"][1], c[2] + d["offset"][2])
        nodule = _ellipsoid(x, y, z, nc, (r, r, r)) <= 1
        hu[nodule] = 80.0
        labels[nodule] = cls["lung_nodule"]
    heart_r = np.array([a["heart_r"] * 1.1, a["heart_r"], a["heart_r"] * 0.95])
    if "Cardiomegaly" in f:
        heart_r = heart_r * 1.4
    heart_c = (-22.0, 40.0, -25.0)
    if "Pericardial effusion" in f:
        sac = _ellipsoid(x, y, z, heart_c, heart_r + 14.0) <= 1
        hu[sac] = 8.0
        labels[sac] = cls["pericardial_effusion"]
    heart = _ellipsoid(x, y, z, heart_c, heart_r) <= 1
    hu[heart] = 180.0  # contrast-enhanced blood pool
    labels[heart] = cls["heart"]
    spine = ((x / 18.0) ** 2 + ((y + a["body_ry"] - 45) / 18.0) ** 2) <= 1
    hu[spine] = 600.0
    labels[spine] = cls["body"]
    hu += rng.normal(0.0, 15.0, size=hu.shape).astype(np.float32)
    return hu.reshape(shape), labels.reshape(shape)


# --- reports --------------------------------------------------------------------------------

_PRESENT = {
    "Lung nodule": (
        "A {size} mm nodule is seen in the {side} lung.",
        "There is a {size} mm pulmonary nodule in the {side} lung.",
        "A solid nodule measuring approx. {size} mm is noted in the {side} lung.",
    ),
    "Pleural effusion": (
        "{Sides} pleural effusion is present.",
        "There is {sides} pleural effusion.",
        "{Sides} pleural fluid is noted.",
    ),
    "Cardiomegaly": (
        "The heart is enlarged.",
        "Cardiomegaly is present.",
        "Heart size is increased, consistent with cardiomegaly.",
    ),
    "Emphysema": (
        "Emphysematous changes are seen in both lungs.",
        "There is emphysema with bullae.",
        "Both lungs show emphysema.",
    ),
    "Consolidation": (
        "Consolidation is present in the {side} {lobe} lobe.",
        "There is an area of consolidation in the {side} {lobe} lobe.",
        "A consolidation is seen in the {lobe} lobe of the {side} lung.",
    ),
    "Pericardial effusion": (
        "There is a pericardial effusion.",
        "Pericardial effusion is noted.",
        "Fluid is seen in the pericardial space.",
    ),
}
_ABSENT = {
    "Lung nodule": ("No pulmonary nodule is seen.", "There is no lung nodule.", "No nodules are detected in the lungs."),
    "Pleural effusion": ("No pleural effusion.", "There is no pleural effusion.", "The pleural spaces are clear."),
    "Cardiomegaly": ("Heart size is normal.", "There is no cardiomegaly.", "The heart is not enlarged."),
    "Emphysema": ("No emphysema.", "There is no emphysema.", "The lung parenchyma shows no emphysematous change."),
    "Consolidation": ("No consolidation.", "There is no consolidation.", "No consolidation is seen in either lung."),
    "Pericardial effusion": ("No pericardial effusion.", "There is no pericardial effusion.", "The pericardium is unremarkable."),
}
_IMPRESSION = {
    "Lung nodule": "{Side} lung nodule ({size} mm).",
    "Pleural effusion": "{Sides} pleural effusion.",
    "Cardiomegaly": "Cardiomegaly.",
    "Emphysema": "Emphysema.",
    "Consolidation": "{Side} {lobe} lobe consolidation.",
    "Pericardial effusion": "Pericardial effusion.",
}
_CLINICAL = ("Cough.", "Shortness of breath.", "Follow-up.", "Chest pain.", "Fever and cough.", "Screening.")


def _fill(template: str, detail: dict) -> str:
    sides = detail.get("sides", [])
    side_text = "bilateral" if len(sides) == 2 else (sides[0] if sides else "")
    values = {
        "size": detail.get("size_mm", ""),
        "side": detail.get("side", ""),
        "Side": str(detail.get("side", "")).capitalize(),
        "lobe": detail.get("lobe", ""),
        "sides": side_text,
        "Sides": side_text.capitalize(),
    }
    return template.format(**values)


def write_report(case: Case, rng: np.random.Generator) -> dict[str, str]:
    """Report columns of CT-RATE whose sentences state exactly the present and absent findings."""
    findings = ["Trachea and both main bronchi are patent."]
    for name in PHANTOM_FINDINGS:
        if name in case.findings:
            findings.append(_fill(str(rng.choice(_PRESENT[name])), case.findings[name]))
        else:
            findings.append(str(rng.choice(_ABSENT[name])))
    findings.append("Bone structures are unremarkable.")
    present = [n for n in PHANTOM_FINDINGS if n in case.findings]
    impression = " ".join(_fill(_IMPRESSION[n], case.findings[n]) for n in present)
    return {
        "ClinicalInformation_EN": str(rng.choice(_CLINICAL)),
        "Technique_EN": f"Chest CT, {case.spacing_mm[2]:.1f} mm sections.",
        "Findings_EN": " ".join(findings),
        "Impressions_EN": impression or "No acute cardiopulmonary abnormality.",
    }


# --- cases ----------------------------------------------------------------------------------


def draw_case(rng: np.random.Generator, volume_name: str, patient_id: str, split: str,
              prevalence: float, storage_mode: str | None = None, full_size: bool = False) -> Case:
    case = Case(volume_name=volume_name, patient_id=patient_id, split=split)
    case.anatomy = {
        "body_rx": rng.uniform(150, 175), "body_ry": rng.uniform(105, 125),
        "lung_dx": rng.uniform(68, 78), "lung_rx": rng.uniform(50, 58),
        "lung_ry": rng.uniform(62, 72), "lung_rz": rng.uniform(105, 125),
        "heart_r": rng.uniform(40, 46),
    }
    for name in PHANTOM_FINDINGS:
        if rng.random() >= prevalence:
            continue
        side = "right" if rng.random() < 0.5 else "left"
        if name == "Lung nodule":
            detail = {"side": side, "size_mm": int(rng.integers(22, 35)),
                      "offset": [float(v) for v in rng.uniform(-25, 25, size=3)]}
        elif name == "Pleural effusion":
            detail = {"sides": ["right", "left"] if rng.random() < 0.3 else [side]}
        elif name == "Consolidation":
            detail = {"side": side, "lobe": "upper" if rng.random() < 0.5 else "lower"}
        else:
            detail = {}
        case.findings[name] = detail
    case.orientation = str(rng.choice(ORIENTATIONS))
    if full_size:  # clinical chest CT: 512 x 512 in-plane, ~250 slices
        xy = float(np.round(FOV_MM[0] / 512, 4))
        case.spacing_mm = (xy, xy, float(rng.choice([1.25, 1.3, 1.4])))
    else:
        xy = float(np.round(rng.uniform(4.5, 6.0), 3))
        case.spacing_mm = (xy, xy, float(np.round(rng.uniform(5.0, 7.5), 3)))
    case.storage = storage_mode or str(rng.choice(STORAGE_MODES))
    case.slope = 1.0 if case.storage != "header" or rng.random() < 0.5 else 0.5
    case.intercept = -1024.0
    return case


def encode_nifti(case: Case, hu: np.ndarray, affine: np.ndarray) -> bytes:
    """gzip NIfTI bytes (mtime 0, so the same case gives the same bytes)."""
    if case.storage == "hu":
        raw = np.round(hu)
    else:
        raw = np.round((hu - case.intercept) / case.slope)
    raw = np.clip(raw, -32768, 32767).astype(np.int16)
    if case.storage == "header":
        return nifti_gz_bytes(raw, affine, case.slope, case.intercept)
    return nifti_gz_bytes(raw, affine)


def nifti_gz_bytes(raw: np.ndarray, affine: np.ndarray, slope: float | None = None,
                   intercept: float | None = None) -> bytes:
    """gzip NIfTI-1 bytes with exactly this stored data and header scaling (mtime 0: reproducible).

    nibabel recomputes scl_slope/scl_inter on save, so they are written into the header bytes after
    serialisation (offsets 112 and 116 of the NIfTI-1 header).
    """
    img = nib.Nifti1Image(raw, affine)
    img.header.set_xyzt_units("mm", "sec")
    data = bytearray(img.to_bytes())
    if slope is not None:
        data[112:120] = np.array([slope, intercept or 0.0], dtype="<f4").tobytes()
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, compresslevel=6) as gz:
        gz.write(bytes(data))
    return buffer.getvalue()


def radiograph(hu: np.ndarray, affine: np.ndarray, pixel_mm: float = RADIOGRAPH_PIXEL_MM) -> np.ndarray:
    """Frontal (coronal, PA-like) projection of an HU volume -> float32 [rows, columns] in [0, 1].

    The volume is brought to the canonical RAS frame; the value of a pixel is the mean linear
    attenuation relative to water, max(0, (HU + 1000) / 1000), along the anterior-posterior axis,
    divided by `RADIOGRAPH_MU_MAX`. Display convention of a chest film: rows run superior ->
    inferior, columns from the patient's right to left (patient's right on the image's left);
    pixels are `pixel_mm` square (the projection is resampled from the voxel spacing).
    """
    import torch

    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(hu, ornt)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = zooms
    mu = np.clip((ras.astype(np.float32) + 1000.0) / 1000.0, 0.0, None)
    projection = mu.mean(axis=1)  # [x (left -> right), z (inferior -> superior)]
    image = np.ascontiguousarray(projection[::-1, ::-1].T)  # [superior -> inferior, right -> left]
    size = (max(2, int(round(image.shape[0] * spacing[2] / pixel_mm))),
            max(2, int(round(image.shape[1] * spacing[0] / pixel_mm))))
    resized = torch.nn.functional.interpolate(torch.from_numpy(image)[None, None], size=size, mode="bilinear",
                                              align_corners=False, antialias=True)[0, 0].numpy()
    return np.clip(resized / RADIOGRAPH_MU_MAX, 0.0, 1.0).astype(np.float32)


def png_bytes(image01: np.ndarray, bits: int = 16) -> bytes:
    """Grayscale PNG (8- or 16-bit) of an image in [0, 1]; same image gives the same bytes."""
    from PIL import Image

    if bits == 16:
        pil = Image.fromarray(np.round(image01 * 65535).astype(np.uint16))
    elif bits == 8:
        pil = Image.fromarray(np.round(image01 * 255).astype(np.uint8), mode="L")
    else:
        raise InputError(f"bits must be 8 or 16, got {bits}")
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


def _voxel_shape(case: Case) -> tuple[int, int, int]:
    # voxel axes follow the orientation codes; FOV is defined per world axis
    world = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    return tuple(int(round(FOV_MM[world[c]] / s)) for c, s in zip(case.orientation, case.spacing_mm, strict=True))


def _write_case(job) -> tuple[dict, dict, dict, dict | None]:
    """Render one case, write its NIfTI file (and radiograph); return its reports, labels, metadata
    and radiographs.csv rows (the last None without radiographs)."""
    out, case, seed, index, radiographs = job
    case_rng = np.random.default_rng([seed, index])
    shape = _voxel_shape(case)
    affine = axcodes_affine(case.orientation, case.spacing_mm, shape)
    hu, labels = render(case, affine, shape, case_rng)
    scan = case.volume_name.rsplit("_", 1)[0]
    path = Path(out) / case.split / case.patient_id / scan / f"{case.volume_name}.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_nifti(case, hu, affine))
    name = f"{case.volume_name}.nii.gz"
    label_path = Path(out) / LABEL_MAPS_DIR / case.split / label_map_name(name)  # same grid and affine as the CT
    label_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.write_bytes(nifti_gz_bytes(labels, affine))
    report = {"VolumeName": name, "split": case.split, **write_report(case, case_rng)}
    label = {"VolumeName": name, "split": case.split, **{k: int(k in case.findings) for k in CTRATE_LABELS}}
    meta = {
        "VolumeName": name, "split": case.split,
        "Manufacturer": "vlp3d-phantom", "PatientSex": str(case_rng.choice(["M", "F"])),
        "PatientAge": f"{int(case_rng.integers(30, 85)):03d}Y",
        "Rows": shape[1], "Columns": shape[0], "NumberofSlices": shape[2],
        "XYSpacing": f"[{case.spacing_mm[0]}, {case.spacing_mm[1]}]", "ZSpacing": case.spacing_mm[2],
        "RescaleIntercept": case.intercept, "RescaleSlope": case.slope,
    }
    xray = None
    if radiographs:  # deterministic, draws nothing from case_rng: the CT corpus stays the same
        bits = 8 if index % 3 == 2 else 16  # both bit depths occur
        relative = Path("radiographs") / case.split / case.patient_id / f"{case.volume_name}_pa.png"
        (Path(out) / relative).parent.mkdir(parents=True, exist_ok=True)
        (Path(out) / relative).write_bytes(png_bytes(radiograph(hu, affine), bits))
        xray = {"image": relative.as_posix(), "VolumeName": relative.name, "source_volume": name,
                "patient_id": case.patient_id, "split": case.split, "modality": "xray", "bits": bits}
    return report, label, meta, xray


def synthesize(out: str | Path, n: int, seed: int = 0, valid_fraction: float = 0.2,
               prevalence: float = 0.35, progress=None, workers: int | None = None,
               full_size: bool = False, radiographs: bool = False) -> pd.DataFrame:
    """Write `n` phantom volumes in CT-RATE layout under `out`; return the case table.

    Same (n, seed, valid_fraction, prevalence) gives a byte-identical corpus, whatever `workers`.
    `full_size`: 512 x 512 x ~250 voxels (0.78 mm in-plane, 1.25-1.4 mm slices) instead of ~80 x 80 x 55.
    `radiographs`: also a frontal projection PNG per CT (`radiograph`) and `radiographs.csv`; the CT
    part of the corpus is byte-identical to the one written without them.
    """
    workers = workers if workers is not None else min(4, os.cpu_count() or 1)
    if n < 2:
        raise InputError(f"--n must be at least 2 (one train and one valid volume), got {n}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    cases: list[Case] = []
    patient = 0
    while len(cases) < n:
        patient += 1
        split = "valid" if rng.random() < valid_fraction else "train"
        n_scans = 2 if rng.random() < 0.25 else 1
        for scan in "ab"[:n_scans]:
            if len(cases) == n:
                break
            name = f"{split}_{patient}_{scan}_1"
            cases.append(draw_case(rng, name, f"{split}_{patient}", split, prevalence, full_size=full_size))
    if not any(c.split == "valid" for c in cases):
        cases[-1] = draw_case(rng, f"valid_{patient + 1}_a_1", f"valid_{patient + 1}", "valid", prevalence,
                              full_size=full_size)

    jobs = [(out, case, seed, index, radiographs) for index, case in enumerate(cases)]
    reports, labels, metadata, xrays = [], [], [], []
    if workers > 1 and len(jobs) > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            results = pool.map(_write_case, jobs, chunksize=4)
            for report, label, meta, xray in results:
                reports.append(report), labels.append(label), metadata.append(meta), xrays.append(xray)
                if progress is not None:
                    progress(1)
    else:
        for job in jobs:
            report, label, meta, xray = _write_case(job)
            reports.append(report), labels.append(label), metadata.append(meta), xrays.append(xray)
            if progress is not None:
                progress(1)

    names = {"train": ("train", "train"), "valid": ("validation", "valid")}
    for split, (long, short) in names.items():
        for folder, filename, rows in (
            ("radiology_text_reports", f"{long}_reports.csv", reports),
            ("multi_abnormality_labels", f"{short}_predicted_labels.csv", labels),
            ("metadata", f"{long}_metadata.csv", metadata),
        ):
            table = pd.DataFrame([r for r in rows if r["split"] == split]).drop(columns="split")
            (out / folder).mkdir(parents=True, exist_ok=True)
            table.to_csv(out / folder / filename, index=False)
    if radiographs:
        pd.DataFrame([x for x in xrays if x is not None]).to_csv(out / RADIOGRAPHS_CSV, index=False)
    (out / LABEL_MAPS_DIR / LABEL_MAP_CLASSES_FILE).write_text(json.dumps(list(LABEL_MAP_CLASSES)) + "\n")
    return pd.DataFrame([
        {"VolumeName": c.volume_name, "patient_id": c.patient_id, "split": c.split,
         "orientation": c.orientation, "storage": c.storage, **{k: int(k in c.findings) for k in PHANTOM_FINDINGS}}
        for c in cases
    ])
