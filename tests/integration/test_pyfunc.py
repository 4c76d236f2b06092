"""The registered model's inputs: HU-correct paths (rescale columns), arrays, the allowed root, its
signature and requirements, what the loaded model exposes, and `vlp3d embed`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.mlflow_store import current_store

CHAMPION = "models:/vlp3d-clip@champion"
RESCALE = {"rescale_slope": [1.0], "rescale_intercept": [-1024.0]}


@pytest.fixture(scope="module")
def store(tiny_demo):
    with current_store(f"sqlite:///{tiny_demo / 'mlflow.db'}"):
        yield tiny_demo


@pytest.fixture(scope="module")
def champion(store):
    """The champion allowed to read every path here (the volumes are in temporary folders)."""
    import mlflow

    return mlflow.pyfunc.load_model(CHAMPION, model_config={"allowed_root": "/"})


@pytest.fixture(scope="module")
def volumes(tiny_demo, tmp_path_factory):
    """One phantom CT as CT-RATE keeps it (raw = HU + 1024, int16, no header scaling; the rescale
    only in a metadata table) and the same CT stored in HU. Air is clipped at -1024 HU, as a
    scanner's padding value is: the raw file holds no negative value."""
    from vlp3d.data.phantom import nifti_gz_bytes
    from vlp3d.data.volume import load_volume_hu

    source = sorted((tiny_demo / "corpus" / "valid").rglob("*.nii.gz"))[0]
    hu, affine, _ = load_volume_hu(str(source), (1.0, -1024.0))
    hu = np.clip(np.round(hu), -1024, 3071).astype(np.int16)
    folder = tmp_path_factory.mktemp("volumes")
    (folder / "raw.nii.gz").write_bytes(nifti_gz_bytes((hu.astype(np.int32) + 1024).astype(np.int16), affine))
    (folder / "hu.nii.gz").write_bytes(nifti_gz_bytes(hu, affine))
    return {"raw": folder / "raw.nii.gz", "hu": folder / "hu.nii.gz", "array": hu, "affine": affine}


def embedding(out: pd.DataFrame, row: int = 0, column: str = "image_embedding") -> np.ndarray:
    return np.asarray(out[column].iloc[row], dtype=np.float32)


def test_raw_ctrate_file_needs_its_rescale_then_embeds_as_the_hu_file(champion, volumes):
    from mlflow.exceptions import MlflowException

    raw = str(volumes["raw"])
    with pytest.raises(MlflowException) as refused:
        champion.predict(pd.DataFrame({"image": [raw]}))
    message = refused.value.message
    assert raw in message and "rescale_slope" in message and "rescale_intercept" in message
    out = champion.predict(pd.DataFrame({"image": [raw, str(volumes["hu"])], "rescale_slope": [1.0, None],
                                         "rescale_intercept": [-1024.0, None]}))
    assert np.array_equal(embedding(out, 0), embedding(out, 1))
    assert np.linalg.norm(embedding(out, 0)) == pytest.approx(1.0, abs=1e-5)
    # the opt-out embeds raw values as HU: 1024 HU off, a different embedding
    as_hu = champion.predict(pd.DataFrame({"image": [raw]}), params={"assume_hu": True})
    assert not np.allclose(embedding(as_hu), embedding(out, 1), atol=1e-3)


def test_array_input_with_affine_or_spacing(champion, volumes):
    from mlflow.exceptions import MlflowException

    array, affine = volumes["array"].astype(np.float32), volumes["affine"]
    out = champion.predict(pd.DataFrame({"image": [str(volumes["hu"]), None],
                                         "image_array": [None, array], "affine": [None, affine.tolist()]}))
    assert np.array_equal(embedding(out, 0), embedding(out, 1))
    # raw values in an array follow the same rule as a raw file: refused, then right with the rescale
    raw = {"image_array": [array + 1024], "affine": [affine.tolist()]}
    with pytest.raises(MlflowException, match="rescale_slope and rescale_intercept"):
        champion.predict(pd.DataFrame(raw))
    # (a batch of one: equal up to float rounding of a different batch size)
    np.testing.assert_allclose(embedding(champion.predict(pd.DataFrame({**raw, **RESCALE}))), embedding(out, 1),
                               rtol=0, atol=1e-6)
    with pytest.raises(MlflowException, match=r"row 0 \(image_array\): an image array needs its `affine`"):
        champion.predict(pd.DataFrame({"image_array": [array]}))
    with pytest.raises(MlflowException, match="spacing .* differs from the affine's voxel sizes"):
        champion.predict(pd.DataFrame({"image_array": [array], "affine": [affine.tolist()], "spacing": [[9.0, 9.0, 9.0]]}))
    with pytest.raises(MlflowException, match="affine and spacing apply to `image_array` only"):
        champion.predict(pd.DataFrame({"image": [str(volumes["hu"])], "affine": [affine.tolist()], "spacing": [[1.0, 1.0, 1.0]]}))


def test_dicom_series_folder_embeds_like_its_volume(champion):
    pydicom = pytest.importorskip("pydicom")
    from vlp3d.data.volume import load_volume_hu

    series = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
    hu, affine, decision = load_volume_hu(series)  # the header's rescale, as prepare reads it
    assert decision.source == "header"
    out = champion.predict(pd.DataFrame({"image": [str(series), None], "image_array": [None, hu],
                                         "affine": [None, affine.tolist()]}))
    assert np.array_equal(embedding(out, 0), embedding(out, 1))


def test_allowed_root_refuses_paths_outside_it(champion, volumes, tmp_path):
    from mlflow.exceptions import MlflowException

    model = champion.unwrap_python_model()
    inside = tmp_path / "allowed"
    inside.mkdir()
    (inside / "hu.nii.gz").write_bytes(volumes["hu"].read_bytes())
    (inside / "link.nii.gz").symlink_to(volumes["hu"])  # a link out of the root is outside it
    before = model.allowed_root
    model.allowed_root = str(inside)
    try:
        for path in (volumes["hu"], inside / "link.nii.gz", inside / ".." / volumes["hu"].name):
            with pytest.raises(MlflowException, match="reads image paths only under its allowed root"):
                champion.predict(pd.DataFrame({"image": [str(path)]}))
        out = champion.predict(pd.DataFrame({"image": [str(inside / "hu.nii.gz")]}))
        assert out["image_embedding"].iloc[0] is not None
    finally:
        model.allowed_root = before


def test_the_champion_as_served_denies_paths_caps_volumes_and_never_echoes(store, volumes):
    """As `mlflow models serve` loads it (no model_config): no path without an allowed root; the tiny
    array with 700 mm voxels that expanded to more than 6 GB on the demo's 8 mm grid is refused before
    resampling; MLflow's own schema error does not quote the input (it quoted the whole frame)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    served = mlflow.pyfunc.load_model(CHAMPION)
    secret = "Patient Jane Roe, MRN 1234567: mass in the right upper lobe."
    cases = [({"image": [str(volumes["hu"])]}, "no allowed root is configured"),
             ({"image_array": [volumes["array"].astype(np.float32)],
               "spacing": [[700.0, 700.0, 700.0]]}, "after resampling"),
             ({"rescale_slope": [secret], "image": [None]}, "Failed to enforce model input schema"),
             ({"report": [{"text": secret}]}, "row 0: a report must be text")]
    for frame, says in cases:
        with pytest.raises(MlflowException) as refused:
            served.predict(pd.DataFrame(frame))
        message = refused.value.message
        assert says in message and "\n" not in message and "MRN" not in message, message


def test_signature_example_requirements_and_what_the_loaded_model_tells(champion, store):
    import mlflow
    import torch

    info = mlflow.models.get_model_info(CHAMPION)
    inputs = info.signature.inputs.input_names()
    for column in ("image", "report", "rescale_slope", "rescale_intercept", "image_array", "affine", "spacing"):
        assert column in inputs
    assert [p.name for p in info.signature.params] == ["assume_hu"]
    model_dir = Path(mlflow.artifacts.download_artifacts(CHAMPION))
    example = mlflow.models.Model.load(model_dir).load_input_example(model_dir)
    assert {"rescale_slope", "rescale_intercept"} <= set(example.columns)
    requirements = (model_dir / "requirements.txt").read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert all("==" in r for r in requirements)
    assert not any(r.split("==")[0] in ("vlp3d", "ray") for r in requirements)
    assert (model_dir / "code" / "vlp3d" / "inference.py").is_file()
    model = champion.unwrap_python_model()
    assert model.logit_scale == pytest.approx(info.metadata["logit_scale"])
    assert model.label_names == info.metadata["label_names"] and model.label_names
    assert model.prompt_templates == info.metadata["prompt_templates"]


def test_embed_writes_the_models_embeddings(champion, volumes, store, tmp_path, capsys):
    from vlp3d.cli import main

    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"image": [str(volumes["raw"]), "hu.nii.gz"], "report": ["There is a pleural effusion.", None],
                  "RescaleSlope": [1.0, None], "RescaleIntercept": [-1024.0, None]}).to_csv(manifest, index=False)
    (tmp_path / "hu.nii.gz").write_bytes(volumes["hu"].read_bytes())  # relative to the manifest's folder
    out = tmp_path / "embeddings.parquet"
    assert main(["embed", str(manifest), "--model", CHAMPION, "--out", str(out), "--device", "cpu",
                 "--batch-size", "1", "--workdir", str(store)]) == 0
    table = pd.read_parquet(out)
    expected = champion.predict(pd.DataFrame({"image": [str(volumes["hu"])], "report": ["There is a pleural effusion."]}))
    assert np.array_equal(embedding(table, 0), embedding(expected))
    assert np.array_equal(embedding(table, 1), embedding(expected))
    assert np.array_equal(embedding(table, 0, "report_embedding"), embedding(expected, 0, "report_embedding"))
    assert table["report_embedding"].iloc[1] is None
    assert "volumes embedded" in capsys.readouterr().out
    # half a rescale is refused before the model loads
    assert main(["embed", str(volumes["raw"]), "--model", CHAMPION, "--out", str(out), "--rescale-slope", "1"]) == 2
    assert "--rescale-intercept" in capsys.readouterr().err
