"""End to end through the CLI: a tiny demo, then the registered model from a fresh process."""

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.mlflow_store import current_store


def test_demo_writes_shards_run_and_champion(tiny_demo, capsys):
    manifest = json.loads(next((tiny_demo / "shards").glob("*/_manifest.json")).read_text())
    assert manifest["counts"]["written"] == 24 and manifest["counts"]["failed"] == 0
    assert set(manifest["counts"]["hu_source"]) <= {"header", "metadata", "already_hu"}
    uri = f"sqlite:///{tiny_demo / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("vlp3d-clip", "champion")
    run = client.get_run(version.run_id)
    assert run.data.params["train.max_steps"] == "4"
    for tag in ("vlp3d.method", "vlp3d.git_commit", "vlp3d.data_hash", "vlp3d.preprocess_hash"):
        assert tag in run.data.tags
    assert run.data.tags["vlp3d.preprocess_hash"] == manifest["spec_hash"]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [2, 4]  # rank 0 only: one value per logged step
    # the step-time split of each logging window: data wait + compute = step time, all finite
    import math

    for step in (2, 4):
        times = {key: [m.value for m in client.get_metric_history(run.info.run_id, f"train/{key}") if m.step == step]
                 for key in ("time/data_wait_s", "time/compute_s", "step_time_s", "data_wait_share")}
        assert all(len(v) == 1 and math.isfinite(v[0]) and v[0] >= 0 for v in times.values()), times
        wait, compute, total = times["time/data_wait_s"][0], times["time/compute_s"][0], times["step_time_s"][0]
        assert compute > 0 and wait + compute == pytest.approx(total)
        assert times["data_wait_share"][0] == pytest.approx(wait / total)
    assert "train/compile_s" not in run.data.metrics  # model.compile is off in the demo
    assert "eval/valid/macro_auroc" in run.data.metrics
    assert 0 < run.data.metrics["eval/valid/retrieval_pool"] <= 24
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.toml", "data", "eval"} <= artifacts
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert any(m.source_run_id == run.info.run_id for m in logged)
    # what a user of the model needs besides embeddings: logit scale, label names, the prompt ensemble
    import mlflow

    with current_store(uri):
        metadata = mlflow.models.get_model_info("models:/vlp3d-clip@champion").metadata
    assert metadata["label_names"] == manifest["label_names"] and metadata["objective"] == "clip"
    assert metadata["logit_scale"] == pytest.approx(1 / run.data.metrics["train/temperature"])
    assert metadata["prompt_ensemble"] == ["report"] and "{Name}." in metadata["prompt_templates"]["report"]["positive"]
    # no report text in params or tags
    assert not any("effusion" in str(v).lower() for v in {**run.data.params, **run.data.tags}.values())


def test_champion_loads_in_a_fresh_process(tiny_demo):
    import pandas as pd

    volume = sorted((tiny_demo / "corpus" / "valid").rglob("*.nii.gz"))[0]
    # the rescale CT-RATE lists in its metadata CSV (the phantom stores some volumes as raw values)
    meta = pd.read_csv(tiny_demo / "corpus" / "metadata" / "validation_metadata.csv").set_index("VolumeName")
    slope, intercept = meta.loc[volume.name, ["RescaleSlope", "RescaleIntercept"]]
    code = (
        "import mlflow, numpy as np\n"
        "m = mlflow.pyfunc.load_model('models:/vlp3d-clip@champion')\n"
        f"out = m.predict({{'report': ['There is a pleural effusion.', ''], 'image': ['{volume}', None], "
        f"'rescale_slope': [{slope}, None], 'rescale_intercept': [{intercept}, None]}})\n"
        "r = np.asarray(out['report_embedding'][0]); v = np.asarray(out['image_embedding'][0])\n"
        "assert out['report_embedding'][1] is None and out['image_embedding'][1] is None\n"
        "print(r.shape[0], v.shape[0], round(float(np.linalg.norm(r)), 4), round(float(np.linalg.norm(v)), 4))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tiny_demo / 'mlflow.db'}",
           "VLP3D_ALLOWED_ROOT": str(tiny_demo)}  # a served model reads no path without it
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    dim_r, dim_v, norm_r, norm_v = out.stdout.split()[-4:]
    assert dim_r == dim_v and norm_r == "1.0" and norm_v == "1.0"


def test_rerun_resumes_nothing_lost(tiny_demo, ray_session):
    """Re-running prepare on the same corpus and spec is a no-op."""
    from vlp3d.config import load_config
    from vlp3d.platform.prepare import prepare

    cfg = load_config(tiny_demo / "config.toml")
    result = prepare(cfg, cfg.data.corpus, cfg.data.shards, progress=lambda *_: None)
    assert result.skipped


def test_data_fraction_reads_nested_training_subsets(tiny_demo):
    from vlp3d.config import load_config
    from vlp3d.data.shards import resolve_shard_dir, spec_from_config
    from vlp3d.platform.ray_data import pretraining_datasets
    from vlp3d.train.tasks.pretrain import local_datasets

    counts = {}
    for fraction in (0.5, 1.0):
        cfg = load_config(tiny_demo / "config.toml", [f"data.fraction={fraction}", "data.materialize='never'"])
        shard_dir = resolve_shard_dir(cfg.data.shards, spec_from_config(cfg).hash)
        manifest = json.loads((shard_dir / "_manifest.json").read_text())
        counts[fraction] = pretraining_datasets(cfg, shard_dir, manifest)["train"].count()
        assert local_datasets(cfg, shard_dir, manifest)["train"].rows() == counts[fraction]  # the same rows without Ray
    assert counts[1.0] == manifest["counts"]["by_split"]["train"]
    assert 0 < counts[0.5] < counts[1.0]
