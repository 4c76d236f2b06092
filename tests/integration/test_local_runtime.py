"""The training loop without Ray (`LocalRuntime`, `vlp3d pretrain --local`, `vlp3d finetune --local`):
resume by name, a toy method, and fine-tuning under every guard of the loop (fp16 grad scaling, a
non-finite step skipped on the spot, its scheduler not advanced, the run not restarted). The same
losses as one Ray Train worker: tests/e2e/test_local_vs_ray.py."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.unit.test_config_methods import toy  # noqa: F401 - the toy method, registered per test
from vlp3d.config import load_config

TOLERANCE = 1e-6
STEPS = 6
PRETRAIN = [f"train.max_steps={STEPS}", "train.log_every=1", "train.checkpoint_every=3", "cluster.num_workers=1",
            "tracking.registered_model=vlp3d-local-runtime"]
# fp16 convolutions on a CPU take a slow path: small crops keep a step well under a second
FINETUNE = ["finetune.max_steps=4", "finetune.global_batch=2", "finetune.roi_size=[16, 16, 16]", 'finetune.classes=["lung", "heart"]',
            "finetune.model=models:/vlp3d-clip@champion", "train.log_every=1", "train.checkpoint_every=4",
            "train.max_skipped_steps=2"]


def _client(tiny_demo) -> MlflowClient:
    uri = f"sqlite:///{tiny_demo / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_local_pretrain_resumes_by_name_from_its_checkpoint(tiny_demo):
    from vlp3d.platform.pretrain import pretrain

    cfg = load_config(tiny_demo / "config.toml", [*PRETRAIN, "train.max_steps=3"])
    first = pretrain(cfg, run_name="local-resume", progress=None, local=True, register=False)
    longer = load_config(tiny_demo / "config.toml", PRETRAIN)
    resumed = pretrain(longer, run_name="local-resume", progress=None, local=True, register=False)
    assert resumed.run_id == first.run_id
    client = _client(tiny_demo)
    assert [a.path for a in client.list_artifacts(resumed.run_id) if a.path.startswith("resume-")] == ["resume-3.txt"]
    assert sorted(_history(client, resumed.run_id, "train/loss")) == list(range(1, STEPS + 1))


@pytest.fixture(scope="module")
def finetune_runs(tiny_demo):
    """Two local fp16 fine-tuning runs from the same seed: one clean, one whose 2nd batch turns NaN."""
    from vlp3d.platform.finetune import finetune
    from vlp3d.train import loop
    from vlp3d.train.tasks.finetune import FinetuneTask

    cfg = load_config(tiny_demo / "config.toml", [*FINETUNE, "train.precision=fp16"])
    clean = finetune(cfg, run_name="fp16-clean", progress=None, local=True, register=False)
    calls = {"n": 0}
    prepare = FinetuneTask.prepare_batch

    def poison_second(self, batch, generator):
        batch = prepare(self, batch, generator)
        calls["n"] += 1
        if calls["n"] == 2:
            loop._poison(batch, self.image_keys)
        return batch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FinetuneTask, "prepare_batch", poison_second)
        skipped = finetune(cfg, run_name="fp16-nan-step", progress=None, local=True, register=False)
    return {"clean": clean, "skipped": skipped, "client": _client(tiny_demo)}


def test_finetune_fp16_scales_its_loss_and_lowers_the_scale_after_a_non_finite_step(finetune_runs):
    client = finetune_runs["client"]
    clean = _history(client, finetune_runs["clean"].run_id, "train/loss_scale")
    assert clean == {1: 65536.0, 2: 65536.0, 3: 65536.0, 4: 65536.0}  # torch's initial scale, no overflow
    skipped = _history(client, finetune_runs["skipped"].run_id, "train/loss_scale")
    assert skipped[1] == 65536.0 and skipped[3] == skipped[4] == 32768.0  # halved by the NaN step's update


def test_finetune_skips_a_non_finite_step_without_advancing_its_scheduler_or_restarting(finetune_runs):
    client = finetune_runs["client"]
    clean, skipped = finetune_runs["clean"], finetune_runs["skipped"]
    run = client.get_run(skipped.run_id)
    assert run.info.status == "FINISHED" and "vlp3d.failure" not in run.data.tags
    assert not [a for a in client.list_artifacts(skipped.run_id) if a.path.startswith("resume-")]  # not restarted
    assert _history(client, skipped.run_id, "train/skipped_steps") == {1: 0, 2: 1, 3: 1, 4: 1}
    assert sorted(_history(client, skipped.run_id, "train/loss")) == [1, 3, 4]  # step 2 had no finite loss
    clean_lr = _history(client, clean.run_id, "train/lr")
    skipped_lr = _history(client, skipped.run_id, "train/lr")
    # the skipped step did not step the schedule: steps 3 and 4 run at the clean run's lr of steps 2 and 3
    assert skipped_lr[1] == clean_lr[1]
    assert skipped_lr[3] == pytest.approx(clean_lr[2], rel=1e-9) and skipped_lr[4] == pytest.approx(clean_lr[3], rel=1e-9)
    assert skipped_lr[3] != pytest.approx(clean_lr[3], rel=1e-6)
    clean_loss = _history(client, clean.run_id, "train/loss")
    assert _history(client, skipped.run_id, "train/loss")[1] == pytest.approx(clean_loss[1], abs=TOLERANCE)


def test_a_toy_method_defined_in_the_tests_pretrains_end_to_end(toy, tiny_demo):  # noqa: F811
    """A method is one file: the toy objective of tests/unit/test_config_methods.py, registered there and
    nowhere under vlp3d/, pretrains on the demo's shards, logs its term and registers its model."""
    from vlp3d.platform.pretrain import pretrain

    cfg = load_config(tiny_demo / "config.toml", ["objective.name=toy", "objective.toy.pull_weight=0.5",
                                                  "model.size=tiny", "train.max_steps=2", "train.log_every=1",
                                                  "train.checkpoint_every=2", "tracking.registered_model=vlp3d-toy"])
    assert cfg.objective.toy.scale == 2.0 and cfg.objective.toy.pull_weight == 0.5  # its table, read from the config
    result = pretrain(cfg, run_name="toy-method", progress=None, local=True)
    client = _client(tiny_demo)
    run = client.get_run(result.run_id)
    assert sorted(_history(client, result.run_id, "train/loss/pull")) == [1, 2]
    assert run.data.params["loss_weight/pull"] == "0.5" and run.data.params["objective.name"] == "toy"
    assert result.model_uri == "models:/vlp3d-toy/1"


def test_sigterm_ends_vlp3d_pretrain_killed_with_a_final_checkpoint_and_nothing_registered(tiny_demo):
    """`ray job stop` sends the driver SIGTERM. Before: the process died at once and its MLflow run
    stayed RUNNING; the steps since the last periodic checkpoint were lost."""
    client = _client(tiny_demo)
    versions = len(client.search_model_versions("name='vlp3d-local-runtime'"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tiny_demo / 'mlflow.db'}"}
    child = subprocess.Popen(
        [sys.executable, "-m", "vlp3d.cli", "pretrain", str(tiny_demo / "config.toml"), *PRETRAIN,
         "train.max_steps=100000", "train.checkpoint_every=100000", "--local", "--run-name", "sigterm"],
        cwd=Path(__file__).resolve().parents[2], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        run = None
        while time.time() < deadline and child.poll() is None:  # until two steps' metrics are in MLflow
            runs = client.search_runs([r.experiment_id for r in client.search_experiments()],
                                      "attributes.run_name = 'sigterm'")
            run = runs[0] if runs else None
            if run is not None and len(client.get_metric_history(run.info.run_id, "train/loss")) >= 2:
                break
            time.sleep(0.5)
        assert run is not None and child.poll() is None
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=300)
    finally:
        child.kill()
    assert child.returncode == 143, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stopped by SIGTERM" in errors[0] and "Traceback" not in err
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert len(client.search_model_versions("name='vlp3d-local-runtime'")) == versions  # nothing registered
    checkpoints = sorted((tiny_demo / "ray_results" / "sigterm").glob("checkpoint_*"))
    assert len(checkpoints) == 1 and int(checkpoints[0].name.split("_")[1]) >= 2  # the final one
