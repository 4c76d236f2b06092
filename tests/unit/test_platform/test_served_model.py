"""The served model denies by default (vlp3d.platform.pyfunc): no path without an allowed root, paths and
the files they read resolved (symlinks included), volume caps before anything is allocated, and every
error one line without a stack trace or the caller's text. The python_model is built from a tiny
random-initialised checkpoint, without Ray or a trained run; what MLflow adds around it (schema
enforcement, loading) is tested on the demo's champion in tests/integration/test_pyfunc.py."""

import gzip
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from tests.unit.test_data.test_input_checks import synthetic_ct
from vlp3d.data.phantom import nifti_gz_bytes
from vlp3d.platform import pyfunc

SPACING = [8.0, 8.0, 8.0]
SECRET = "Patient Jane Roe, MRN 1234567: 3 cm mass in the right upper lobe."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint folder as training writes it (model.pt, config.toml, meta.json) of a random tiny model."""
    from vlp3d.config import load_config, public_config, to_toml
    from vlp3d.data.volume import PreprocessSpec
    from vlp3d.objectives.model import build_model
    from vlp3d.train import checkpoint as checkpoints

    folder = tmp_path_factory.mktemp("checkpoint")
    cfg = load_config(None, ["data.shape=[16, 16, 16]", "data.spacing_mm=[16.0, 16.0, 16.0]"])
    torch.save(build_model(cfg, text_dim=384).state_dict(), folder / checkpoints.MODEL)
    (folder / checkpoints.CONFIG).write_text(to_toml(public_config(cfg)))
    spec = PreprocessSpec(shape=(16, 16, 16), spacing_mm=(16.0, 16.0, 16.0))
    (folder / checkpoints.META).write_text(json.dumps({"spec": spec.to_dict(), "label_names": [], "text_dim": 384}))
    return folder


def served(checkpoint, **model_config) -> pyfunc.Vlp3dEmbedder:
    """The python_model as `mlflow models serve` loads it, with this model_config."""
    model = pyfunc.Vlp3dEmbedder({})
    model.load_context(SimpleNamespace(artifacts={"checkpoint": str(checkpoint)}, model_config=model_config))
    return model


@pytest.fixture(scope="module")
def model(checkpoint):
    return served(checkpoint)


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outside")
    path = folder / "ct.nii.gz"
    path.write_bytes(nifti_gz_bytes(synthetic_ct().astype(np.int16), np.diag([*SPACING, 1.0])))
    return path


def refused(model, frame, match: str = "") -> str:
    """The one-line message the caller gets; never a stack trace or the input text."""
    with pytest.raises(MlflowException) as err:
        model.predict(None, pd.DataFrame(frame))
    message = err.value.message
    assert "\n" not in message and "Traceback" not in message and SECRET not in message and "MRN" not in message
    assert err.value.__cause__ is None and err.value.__suppress_context__  # `from None`: no chained trace
    assert match in message, message
    return message


def test_no_path_is_read_without_an_allowed_root_but_arrays_are(model, ct_file):
    """Before: the default allowed root was empty and any path on the server was read."""
    message = refused(model, {"image": [str(ct_file)]}, "reads no image paths: no allowed root is configured")
    assert pyfunc.ALLOWED_ROOT_ENV in message and "model_config" in message
    refused(model, {"image": ["/etc/passwd"]}, "no allowed root")
    out = model.predict(None, pd.DataFrame({"image_array": [synthetic_ct().astype(np.float32)], "spacing": [SPACING]}))
    assert np.linalg.norm(out["image_embedding"].iloc[0]) == pytest.approx(1.0, abs=1e-5)


def test_an_allowed_root_admits_its_files_only(checkpoint, ct_file, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(ct_file, root / "ct.nii.gz")
    (root / "link.nii.gz").symlink_to(ct_file)
    model = served(checkpoint, allowed_root=str(root))
    assert model.predict(None, pd.DataFrame({"image": [str(root / "ct.nii.gz")]}))["image_embedding"].iloc[0]
    for path in (ct_file, root / "link.nii.gz", root / ".." / ct_file.parent.name / ct_file.name):
        refused(model, {"image": [str(path)]}, "reads image paths only under its allowed root")
    os.mkfifo(root / "pipe.nii.gz")  # reading it would block the server
    refused(model, {"image": [str(root / "pipe.nii.gz")]}, "no such file or folder")
    os.environ[pyfunc.ALLOWED_ROOT_ENV] = str(tmp_path / "elsewhere")  # the server's setting wins
    try:
        refused(served(checkpoint, allowed_root=str(root)), {"image": [str(root / "ct.nii.gz")]}, "allowed root")
    finally:
        del os.environ[pyfunc.ALLOWED_ROOT_ENV]


def test_a_dicom_folder_of_symlinks_out_of_the_root_is_refused(checkpoint, tmp_path):
    """Before: only the folder was resolved; its files, links to anywhere, were read."""
    pydicom = pytest.importorskip("pydicom")
    series = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    root = tmp_path / "root"
    (root / "links").mkdir(parents=True)
    shutil.copytree(series, root / "copy")
    for file in sorted(series.iterdir()):
        (root / "links" / file.name).symlink_to(file)
    model = served(checkpoint, allowed_root=str(root))
    assert model.predict(None, pd.DataFrame({"image": [str(root / "copy")]}))["image_embedding"].iloc[0]
    refused(model, {"image": [str(root / "links")]}, "a file it reads links outside it")


def test_volume_caps_refuse_before_allocating(model, checkpoint, tmp_path):
    """Before: a tiny array with 700 mm voxels was resampled to more than 6 GB (the demo's 8 mm grid: see
    tests/integration/test_pyfunc.py; this model's 16 mm grid needs 3000 mm voxels for as much); a NIfTI
    header announcing a huge volume ended in MemoryError."""
    tiny = synthetic_ct((16, 16, 16)).astype(np.float32)
    refused(model, {"image_array": [tiny], "spacing": [[3000.0, 3000.0, 3000.0]]}, "after resampling")
    header = tmp_path / "root" / "huge.nii.gz"
    header.parent.mkdir()
    announced = nib.Nifti1Header()  # 30000 x 30000 x 3000 int16 (5 TB) announced; the file holds 16 bytes
    announced.set_data_shape((30000, 30000, 3000))
    announced.set_data_dtype(np.int16)
    header.write_bytes(gzip.compress(announced.binaryblock + bytes(4 + 16)))
    huge = served(checkpoint, allowed_root=str(header.parent))
    refused(huge, {"image": [str(header)]}, "volume too large")
    # configurable: model_config, and the server's environment over it
    small = served(checkpoint, max_voxels=4000)
    refused(small, {"image_array": [tiny], "spacing": [SPACING]}, "exceed the cap of 4,000 (max_voxels)")
    os.environ[pyfunc.LIMIT_ENV["max_bytes"]] = "1000"
    try:
        refused(served(checkpoint), {"image_array": [tiny], "spacing": [SPACING]}, "(max_bytes)")
    finally:
        del os.environ[pyfunc.LIMIT_ENV["max_bytes"]]
    nested = [[list(row) for row in plane] for plane in tiny]  # JSON lists: checked before they are stacked
    refused(small, {"image_array": [nested], "spacing": [SPACING]}, "max_voxels")


def test_unexpected_errors_are_one_line_without_trace_or_input_text(checkpoint, monkeypatch):
    """Before: an error outside ValueError/OSError reached the server as its stack trace, and a
    tokenizer's message quoting the report went back to the caller."""
    model = served(checkpoint)

    def tokenizer_error(reports):
        raise ValueError(f"cannot tokenize {reports[0]!r}")

    monkeypatch.setattr(model.embedder, "embed_reports", tokenizer_error)
    refused(model, {"report": [SECRET]}, "the reports of rows 0 could not be embedded (ValueError)")

    def crash(*args, **kwargs):
        raise RuntimeError(f"CUDA error while embedding {SECRET}")

    monkeypatch.setattr(model.embedder, "embed_inputs", crash)
    frame = {"image_array": [synthetic_ct().astype(np.float32)], "spacing": [SPACING], "report": [SECRET]}
    refused(model, frame, "could not process this input (RuntimeError)")

    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(model.embedder, "embed_inputs", out_of_memory)
    refused(model, frame, "not enough memory on the server")


def test_bad_input_messages_are_one_line_and_name_the_row(model, checkpoint, tmp_path):
    rooted = served(checkpoint, allowed_root=str(tmp_path))
    message = refused(rooted, {"image": [str(tmp_path / "a\nb.nii.gz")], "report": [SECRET]}, "a b.nii.gz): no such")
    assert len(message) <= pyfunc.MESSAGE_CHARS
    refused(model, {"image_array": [synthetic_ct().astype(np.float32)], "spacing": [SPACING], "modality": ["MR"]},
            "modality is 'MR', not CT")
    refused(model, {"image_array": [np.full((1, 1, 1), -1000.0, np.float32)], "spacing": [SPACING]},
            "degenerate volume")
    refused(model, {"report": [{"text": SECRET}]}, "row 0: a report must be text")  # MLflow lets a dict through


def test_vlp3d_embed_reads_the_users_own_files():
    """`vlp3d embed` runs as its user on their machine: every path its user can read (the root "/"),
    still resolved, still capped (a served model reads none unless configured)."""
    from vlp3d.jobs import embed

    assert embed.EMBED_ALLOWED_ROOT == "/"
    assert "modality" in embed.MODEL_COLUMNS
