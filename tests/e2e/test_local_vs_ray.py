"""The same seed and shards give the same loss at every step on `LocalRuntime` (`vlp3d pretrain --local`)
and on one Ray Train worker (the two runtimes of vlp3d/train/runtime.py and vlp3d/platform/ray_train.py)."""

import pytest

from tests.integration.test_local_runtime import PRETRAIN, STEPS, TOLERANCE, _client, _history
from vlp3d.config import load_config


def test_local_runtime_and_one_ray_train_worker_log_the_same_losses(tiny_demo):
    from vlp3d.cli import main
    from vlp3d.platform.mlflow import store
    from vlp3d.platform.pretrain import pretrain

    config = str(tiny_demo / "config.toml")
    on_ray = pretrain(load_config(config, PRETRAIN), run_name="one-ray-worker", progress=None)
    assert main(["pretrain", config, *PRETRAIN, "--local", "--run-name", "local-runtime"]) == 0
    client = _client(tiny_demo)
    local = store.find_run(load_config(config, PRETRAIN), store.RUN_NAME_TAG, "local-runtime")
    assert local.data.tags["vlp3d.runtime"] == "local"
    assert client.get_run(on_ray.run_id).data.tags["vlp3d.runtime"] == "ray_train"
    ray_losses = _history(client, on_ray.run_id, "train/loss")
    local_losses = _history(client, local.info.run_id, "train/loss")
    assert sorted(ray_losses) == sorted(local_losses) == list(range(1, STEPS + 1))
    for step, value in ray_losses.items():
        assert local_losses[step] == pytest.approx(value, abs=TOLERANCE, rel=TOLERANCE), step
    # `vlp3d pretrain --local` registers its model as a Ray run does
    versions = client.search_model_versions("name='vlp3d-local-runtime'")
    assert {v.run_id for v in versions} == {on_ray.run_id, local.info.run_id}
