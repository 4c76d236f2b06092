"""A worker dies mid-run: Ray Train restarts the group and training resumes from the last checkpoint."""

import json

from mlflow.tracking import MlflowClient

from vlp3d.config import load_config


def test_worker_failure_resumes_from_checkpoint(tiny_demo, monkeypatch, capsys):
    from vlp3d.platform.train import INJECT_ENV, pretrain

    cfg = load_config(tiny_demo / "config.toml", [
        "train.max_steps=6", "train.checkpoint_every=2", "train.log_every=1", "train.max_failures=1"])
    monkeypatch.setenv(INJECT_ENV, "3")
    result = pretrain(cfg, run_name="fault-drill", progress=lambda *_: None)
    meta = json.loads((result.checkpoint_dir / "meta.json").read_text())
    assert meta["step"] == 6
    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_demo / 'mlflow.db'}")
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert "resume-2.txt" in artifacts  # restarted from the step-2 checkpoint, not from scratch
    steps = [m.step for m in client.get_metric_history(result.run_id, "train/loss")]
    assert max(steps) == 6 and steps.count(3) == 2  # step 3 ran before the failure and again after


def test_rerun_with_same_run_name_continues_same_mlflow_run(tiny_demo):
    from vlp3d.platform.train import pretrain

    cfg = load_config(tiny_demo / "config.toml", ["train.max_steps=2", "train.checkpoint_every=2"])
    first = pretrain(cfg, run_name="resumable", progress=lambda *_: None)
    longer = load_config(tiny_demo / "config.toml", ["train.max_steps=4", "train.checkpoint_every=2"])
    second = pretrain(longer, run_name="resumable", progress=lambda *_: None)
    assert second.run_id == first.run_id
    assert json.loads((second.checkpoint_dir / "meta.json").read_text())["step"] == 4
