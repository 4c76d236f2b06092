"""A worker dies mid-run: Ray Train restarts the group and training resumes from the last checkpoint;
running the same run name again continues the same run."""

import json

import pytest
from mlflow.tracking import MlflowClient

from vlp3d.config import load_config


@pytest.fixture(scope="module")
def fault_drill(tiny_demo):
    """6 steps; the last worker raises at step 3 (once), so the group restarts from step 2."""
    from vlp3d.platform.train import INJECT_ENV, pretrain

    cfg = load_config(tiny_demo / "config.toml", [
        "train.max_steps=6", "train.checkpoint_every=2", "train.log_every=1", "train.max_failures=1"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(INJECT_ENV, "3")
        return pretrain(cfg, run_name="fault-drill", progress=lambda *_: None)


def test_worker_failure_resumes_from_checkpoint(fault_drill, tiny_demo):
    meta = json.loads((fault_drill.checkpoint_dir / "meta.json").read_text())
    assert meta["step"] == 6
    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_demo / 'mlflow.db'}")
    artifacts = {a.path for a in client.list_artifacts(fault_drill.run_id)}
    assert "resume-2.txt" in artifacts  # restarted from the step-2 checkpoint, not from scratch
    steps = [m.step for m in client.get_metric_history(fault_drill.run_id, "train/loss")]
    assert max(steps) == 6 and steps.count(3) == 2  # step 3 ran before the failure and again after


def test_rerun_with_same_run_name_continues_same_mlflow_run(fault_drill, tiny_demo):
    """The drill's run, run again under its name with more steps: same MLflow run, trained on."""
    from vlp3d.platform.train import pretrain

    longer = load_config(tiny_demo / "config.toml", ["train.max_steps=8", "train.checkpoint_every=2",
                                                     "train.log_every=1"])
    second = pretrain(longer, run_name="fault-drill", progress=lambda *_: None)
    assert second.run_id == fault_drill.run_id
    assert json.loads((second.checkpoint_dir / "meta.json").read_text())["step"] == 8
    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_demo / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(second.run_id, "train/loss")]
    assert max(steps) == 8 and steps.count(7) == 1  # continued from step 6, not from scratch
