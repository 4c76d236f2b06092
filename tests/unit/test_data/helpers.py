"""Shared by the tests on real files that ship inside packages (pydicom, pydicom-data, nibabel, dipy)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation

RAS = (("L", "R"), ("P", "A"), ("I", "S"))


def package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing it (no network fetch)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.skip(f"{package} is not installed (pip install -e '.[dev]')")
    path = Path(spec.origin).parent.joinpath(*parts)
    assert path.is_file(), f"{path} missing from the installed {package}"
    return path


def to_ras(hu: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    volume = MetaTensor(torch.from_numpy(hu)[None], affine=torch.from_numpy(affine))
    volume = Orientation(axcodes="RAS", labels=RAS)(volume)
    return volume[0].as_tensor().numpy(), volume.affine.numpy()
