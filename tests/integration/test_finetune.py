"""`vlp3d finetune --local` on the tiny demo's shards and registered model: a few steps of the training
loop in this process, evaluated, registered with a link to the pretrained version, loadable as a
pyfunc. (The loop is the one Ray Train workers run, tests/e2e/test_local_vs_ray.py; fine-tuning on
a Ray Train worker group: the fine-tuning sweep of tests/e2e/test_sweep.py.)"""

import math

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.mlflow_store import current_store


def test_finetune_segmentation_is_tracked_and_registered_with_its_source(tiny_demo, capsys):
    from vlp3d.cli import main

    code = main(["finetune", str(tiny_demo / "config.toml"), "finetune.max_steps=2", "finetune.global_batch=4",
                 'finetune.classes=["lung", "heart"]', "train.checkpoint_every=2", "train.log_every=1",
                 "--model", "models:/vlp3d-clip@champion", "--run-name", "finetune-local", "--local"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "lung" in out and "heart" in out and "dice_atlas" in out
    uri = f"sqlite:///{tiny_demo / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    source = client.get_model_version_by_alias("vlp3d-clip", "champion")
    [version] = client.search_model_versions("name='vlp3d-clip-segmentation'")
    assert version.tags["vlp3d.pretrained_model"] == f"models:/vlp3d-clip/{source.version}"
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["vlp3d.runtime"] == "local"
    assert run.data.tags["vlp3d.pretrained_model"] == f"models:/vlp3d-clip/{source.version}"
    assert run.data.tags["vlp3d.init"] == "pretrained" and run.data.params["finetune.max_steps"] == "2"
    assert run.data.params["model.image_encoder"] == "resnet3d"  # the pretrained model's encoder
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
    metrics = run.data.metrics
    for name in ("lung", "heart"):
        assert 0.0 <= metrics[f"eval/valid/dice/{name}"] <= 1.0
        assert 0.0 < metrics[f"eval/valid/dice_atlas/{name}"] <= 1.0  # the trivial baselines are logged beside
        assert 0.0 < metrics[f"eval/valid/dice_everywhere/{name}"] < 0.5
    assert {a.path for a in client.list_artifacts(run.info.run_id, "eval")} == {"eval/segmentation.csv"}
    # the registered model predicts structure volumes from a NIfTI file
    with current_store(uri):
        model = mlflow.pyfunc.load_model(f"models:/vlp3d-clip-segmentation/{version.version}",
                                         model_config={"allowed_root": str(tiny_demo)})
        volume = next((tiny_demo / "corpus" / "valid").rglob("*.nii.gz"))
        # the rescale CT-RATE lists in its metadata CSV (some phantoms store raw values without one)
        meta = pd.read_csv(tiny_demo / "corpus" / "metadata" / "validation_metadata.csv").set_index("VolumeName")
        slope, intercept = meta.loc[volume.name, ["RescaleSlope", "RescaleIntercept"]]
        predicted = model.predict(pd.DataFrame({"image": [str(volume)], "rescale_slope": [float(slope)],
                                                "rescale_intercept": [float(intercept)]}))
        # as served without an allowed root: no path is read (one line, deny by default)
        served = mlflow.pyfunc.load_model(f"models:/vlp3d-clip-segmentation/{version.version}")
        with pytest.raises(mlflow.exceptions.MlflowException, match="no allowed root is configured"):
            served.predict(pd.DataFrame({"image": [str(volume)]}))
    assert list(predicted.columns) == ["lung_ml", "heart_ml"]
    assert all(math.isfinite(v) and v >= 0 for v in predicted.iloc[0])
