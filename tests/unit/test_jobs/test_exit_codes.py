"""Exit codes (README "Exit codes", every command's --help): 0 success, 1 the work failed, 2 bad input
with a one-line reason, 3 an internal error with its traceback in a file and one line saying where."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from vlp3d.cli import build_parser, main
from vlp3d.config import ConfigError
from vlp3d.errors import InputError
from vlp3d.jobs.common import EXIT_CODES_HELP, run_reporting_errors
from vlp3d.platform.pretrain import NonFiniteTrainingError


def _raising(err):
    def run(args):
        raise err
    return run


@pytest.mark.parametrize(("err", "code"), [
    (ConfigError("train.max_steps = -3 is out of range: must be >= 1."), 2),
    (InputError("--batch-size must be at least 1, got 0"), 2),
    (FileNotFoundError("manifest x.csv not found"), 2),
    (PermissionError("cannot write /root/out"), 2),
    (ConnectionError("the cluster at http://127.0.0.1:8265 does not answer"), 2),
    (NonFiniteTrainingError("training stopped: 10 non-finite steps in a row"), 1),
])
def test_bad_input_and_failed_work_end_in_one_line(err, code, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("VLP3D_ERROR_LOG_DIR", str(tmp_path))
    assert run_reporting_errors(_raising(err), argparse.Namespace()) == code
    err_text = capsys.readouterr().err
    assert err_text == f"error: {err}\n"
    assert not list(tmp_path.iterdir())  # no traceback file: not a bug


@pytest.mark.parametrize("err", [KeyError("label"), ValueError("operands could not be broadcast"),
                                 ZeroDivisionError("division by zero"), OSError(28, "No space left on device")])
def test_anything_else_is_a_bug_with_its_traceback_in_a_file(err, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("VLP3D_ERROR_LOG_DIR", str(tmp_path))
    assert run_reporting_errors(_raising(err), argparse.Namespace()) == 3
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("internal error (a bug in vlp3d")
    [log] = list(tmp_path.iterdir())
    assert str(log) in lines[0]
    assert "Traceback (most recent call last)" in log.read_text() and type(err).__name__ in log.read_text()


def test_a_library_value_error_is_not_reported_as_bad_input(capsys, tmp_path, monkeypatch):
    """numpy's own ValueError (a bug of ours when it escapes) is exit 3, not 2 as before."""
    monkeypatch.setenv("VLP3D_ERROR_LOG_DIR", str(tmp_path))

    def run(args):
        np.zeros(3) + np.zeros(4)

    assert run_reporting_errors(run, argparse.Namespace()) == 3


def test_bad_config_from_the_command_line_is_exit_2(capsys):
    assert main(["config", "show", "configs/demo.toml", "cluster.num_workers=0"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: command-line override 'cluster.num_workers=0': cluster.num_workers = 0 is out of "
                   "range: must be >= 1.\n")


def test_every_commands_help_lists_the_exit_codes():
    parser = build_parser()
    assert EXIT_CODES_HELP in parser.epilog
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subcommands.choices.items():
        text = sub.format_help()
        if name == "config":
            text = sub._subparsers._group_actions[0].choices["show"].format_help()
        assert "exit codes" in text and "3  an internal error" in text, name
        assert "%%" not in text, name
    jobs_help = subcommands.choices["jobs"].format_help()
    assert "0  submitted" not in jobs_help  # submit's own codes stay with submit
