"""Shared fixtures: one local Ray per test session, small object store."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s by default; a checkpoint report waits for the
# poll, and so do a run's start and end: the suite's many 8-step runs poll faster
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        # address="local": a Ray the user (or another session) left running on this machine is
        # never joined; the suite starts, and later stops, only its own
        ray.init(address="local", num_cpus=2, object_store_memory=400 * 2**20, include_dashboard=True, dashboard_host="127.0.0.1",
                 logging_level="WARNING", log_to_driver=True)
    yield ray
    if started_here:
        ray.shutdown()
