"""Credentials in the locations a user gives never reach the terminal: each credential-bearing location
of the review (prepare --out, data.shards, tracking.storage, tracking.tracking_uri, data.corpus) and a
cluster address, tried through the commands with a planted secret, print an error without it."""

import argparse
import socket

import pytest

from vlp3d.cli import main
from vlp3d.config import ExperimentConfig, replace
from vlp3d.jobs.common import run_reporting_errors
from vlp3d.platform.mlflow import server as tracking_server

SECRET = "pl4nted-s3cret"
PRESIGNED = f"X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20240101&X-Amz-Signature={SECRET}"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _storage_error(location: str) -> int:
    """tracking.storage as Ray Train's RunConfig resolves it, reported as every command reports errors."""
    from vlp3d.platform.runtime import run_storage

    cfg = replace(ExperimentConfig(), tracking={"storage": location})
    return run_reporting_errors(lambda _: run_storage(cfg), argparse.Namespace(log_level=None))


@pytest.mark.parametrize("attempt", [
    lambda tmp: main(["prepare", "--corpus", str(tmp), "--out", f"weird://AKID:{SECRET}@bucket/shards"]),
    lambda tmp: main(["prepare", "--corpus", str(tmp), "--out", f"s3://bucket/shards?{PRESIGNED}"]),
    lambda tmp: main(["pretrain", f"data.shards=\"gs://svc:{SECRET}@bucket/shards\""]),
    lambda tmp: _storage_error(f"weird://user:{SECRET}@bucket/runs"),
    lambda tmp: _storage_error(f"s3://bucket/runs?{PRESIGNED}"),
    lambda tmp: main(["evaluate", "--model", "models:/m/1", "--shards", str(tmp),
                      "--tracking-uri", f"http://vlp3d:{SECRET}@127.0.0.1:{_closed_port()}"]),
    lambda tmp: main(["pretrain", f"data.corpus=\"s3://AKID:{SECRET}@bucket/ct\""]),
    lambda tmp: main(["jobs", "list", "--address", f"http://ray:{SECRET}@127.0.0.1:{_closed_port()}"]),
], ids=["prepare-out", "prepare-out-presigned", "data.shards", "tracking.storage", "tracking.storage-presigned",
        "tracking.tracking_uri", "data.corpus", "cluster-address"])
def test_no_location_prints_its_secret(attempt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tracking_server, "_answered", set())
    assert attempt(tmp_path) == 2
    out = capsys.readouterr()
    assert "error:" in out.err  # it failed with its one-line reason ...
    assert SECRET not in out.err + out.out and "AKIAIOSFODNN7EXAMPLE" not in out.err + out.out  # ... without the secret
