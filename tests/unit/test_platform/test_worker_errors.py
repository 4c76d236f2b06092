"""Bad input found on a Ray Train worker (too few rows for the batch, a config the task refuses) ends the
command as bad input (exit 2, its own line), not as an internal error; other worker failures stay bugs."""

from __future__ import annotations

import argparse

from ray.train import WorkerGroupError

from vlp3d.errors import InputError
from vlp3d.jobs.common import run_reporting_errors
from vlp3d.platform.launch import worker_input_error

MESSAGE = "dataset 'train': rank 1 holds fewer rows than its batch of 16; lower the global batch"


class _Wrapped(Exception):
    """Like Ray's RayTaskError: the worker's exception in `cause`."""

    def __init__(self, cause):
        super().__init__(f"wrapped: {cause}")
        self.cause = cause


def test_a_workers_input_error_is_found_in_the_worker_group_error():
    for failure in (InputError(MESSAGE), _Wrapped(InputError(MESSAGE))):
        found = worker_input_error(WorkerGroupError("snippet", {0: RuntimeError("other rank"), 1: failure}))
        assert isinstance(found, InputError) and str(found) == MESSAGE
    assert worker_input_error(WorkerGroupError("snippet", {0: KeyError("x")})) is None
    assert worker_input_error(ValueError("not a worker group")) is None


def test_it_ends_the_command_with_exit_2_and_its_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("VLP3D_ERROR_LOG_DIR", str(tmp_path))

    def run(args):
        error = WorkerGroupError("snippet", {1: InputError(MESSAGE)})
        raise worker_input_error(error) from None

    assert run_reporting_errors(run, argparse.Namespace()) == 2
    assert capsys.readouterr().err == f"error: {MESSAGE}\n"
