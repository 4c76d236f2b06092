"""A tiny demo run once per session; platform tests read its shards, runs and registry."""

import pytest

TINY = ["--n", "24", "train.max_steps=4", "train.global_batch=8", "train.checkpoint_every=2",
        "train.log_every=2", "eval.bootstrap=10"]


@pytest.fixture(scope="session")
def tiny_demo(ray_session, tmp_path_factory):
    from vlp3d.cli import main

    workdir = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--workdir", str(workdir), *TINY]) == 0
    return workdir
