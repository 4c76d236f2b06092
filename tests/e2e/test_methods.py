"""MG-3D, T3D and UniMedI through the same pipeline as the demo: synth (with radiographs) ->
prepare (fixed and high-resolution shards) -> Ray Train DDP (2 workers) -> evaluate -> registry."""

import math

import pytest
from mlflow import MlflowClient

TINY = ["train.max_steps=2", "train.global_batch=4", "train.checkpoint_every=2", "train.log_every=1",
        "eval.bootstrap=0", "objective.unimedi.dino_dim=32"]


@pytest.fixture(scope="module")
def method_runs(ray_session, tmp_path_factory):
    from vlp3d.jobs.demo import demo_config, run_pipeline

    workdir = tmp_path_factory.mktemp("methods")
    runs = {}
    for name in ("unimedi", "mg3d", "t3d"):  # unimedi first: it synthesises the radiographs
        cfg = demo_config(f"configs/{name}_demo.toml", workdir, TINY)
        runs[name] = run_pipeline(cfg, n=16)
    return runs


def test_each_method_trains_evaluates_and_logs_every_term_with_its_weight(method_runs):
    expected = {"mg3d": {"align", "mim", "mlm", "sentence_consistency", "disentangled", "sentence_match"},
                "t3d": {"text_contrast", "crop_contrast", "restore"},
                "unimedi": {"vl_contrast", "distill_cls", "distill_patch"}}
    for name, result in method_runs.items():
        client = MlflowClient(result.tracking_uri)
        run = client.get_run(result.trained.run_id)
        logged = {k.split("/", 2)[2] for k in run.data.metrics if k.startswith("train/loss/")}
        assert logged == expected[name], name
        weights = {k.split("/", 1)[1]: float(v) for k, v in run.data.params.items() if k.startswith("loss_weight/")}
        assert set(weights) == expected[name]
        assert all(math.isfinite(run.data.metrics[f"train/loss/{t}"]) for t in expected[name])
        metrics = result.report.result.metrics
        assert 0.0 <= metrics["macro_auroc"] <= 1.0 and metrics["retrieval_pool"] > 0
        assert result.trained.model_uri.startswith(f"models:/vlp3d-{name}/")
    assert method_runs["mg3d"].trained.metrics  # reported with the final checkpoint


def test_unimedi_trained_on_radiographs_and_t3d_on_highres_shards(method_runs):
    from vlp3d.data.shards import read_manifest, shard_files

    unimedi = method_runs["unimedi"].trained
    assert shard_files(unimedi.shard_dir, "xray")  # 2D rows existed and were a training dataset
    assert read_manifest(method_runs["t3d"].trained.shard_dir)["spec"]["storage"] == "highres"
    assert (method_runs["t3d"].trained.checkpoint_dir / "objective.pt").is_file()
