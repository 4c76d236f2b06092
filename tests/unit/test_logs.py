"""Terminal output: logger levels, the CLI switches and the training progress line."""

import logging

import pytest

from vlp3d import logs
from vlp3d.train.loop import progress_line


@pytest.fixture
def restore_level(monkeypatch):
    monkeypatch.delenv(logs.LEVEL_ENV, raising=False)
    yield
    logs.configure("info")


def test_configure_sets_one_handler_and_passes_the_level_to_child_processes(restore_level):
    logs.configure("debug")
    logs.configure("debug")
    root = logging.getLogger("vlp3d")
    assert root.level == logging.DEBUG and not root.propagate
    assert sum(getattr(h, "_vlp3d_handler", False) for h in root.handlers) == 1
    assert logs.is_debug() and logs.level_name() == "debug"
    logs.configure("warning")
    assert logging.getLogger("vlp3d.train").getEffectiveLevel() == logging.WARNING
    with pytest.raises(ValueError, match="--log-level 'loud'"):
        logs.configure("loud")


@pytest.mark.parametrize("argv, level", [
    (["models"], "info"),
    (["-v", "models"], "debug"),
    (["models", "-v"], "debug"),
    (["--log-level", "warning", "models"], "warning"),
    (["models", "--log-level", "error"], "error"),
])
def test_cli_log_level_before_or_after_the_command(argv, level, restore_level):
    from vlp3d.cli import build_parser

    assert build_parser().parse_args(argv).log_level == level


def test_progress_line_shows_terms_validation_throughput_data_wait_and_eta():
    metrics = {"loss": 1.23456, "loss/align": 0.5, "loss/mim": 0.0123, "val/loss": 1.1, "lr": 2e-3,
               "samples_per_s": 12.34, "data_wait_share": 0.25}
    line = progress_line(40, 600, metrics, {"align": 0.1, "mim": 1.0}, eta_s=3725)
    assert line == ("step  40/600 | loss 1.2346 (align 0.5 mim 0.0123) | val 1.1000 | lr 2.0e-03 | "
                    "12.3 samples/s | data wait 25% | ETA 1:02:05")
    # one term: no breakdown; the last step: no ETA
    last = progress_line(600, 600, {"loss": 2.0, "loss/align": 2.0, "lr": 1e-4, "samples_per_s": 3.0},
                         {"align": 1.0}, eta_s=0.0)
    assert last == "step 600/600 | loss 2.0000 | lr 1.0e-04 | 3.0 samples/s"


def test_every_line_of_vlp3d_and_of_mlflow_loses_its_credentials(restore_level, capsys, tmp_path):
    from vlp3d.platform.mlflow import store

    logs.configure("info")
    try:
        raise OSError("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI rejected")
    except OSError:
        logging.getLogger("vlp3d.platform.test").exception("MLflow at https://u:p@ss@mlflow.example/x failed")
    err = capsys.readouterr().err
    assert "https://mlflow.example/x failed" in err and "rejected" in err  # the line and its traceback ...
    assert "p@ss" not in err and "wJalrXUtnFEMI" not in err  # ... without the secrets
    store.client(f"sqlite:///{tmp_path / 'mlflow.db'}")  # MLflow imported: its own handler redacts too
    handlers = logging.getLogger("mlflow").handlers
    record = logging.LogRecord("mlflow.store", logging.WARNING, __file__, 1, "retrying %s", ("http://u:pw@h:5000/api",), None)
    assert handlers and all(handler.filter(record) for handler in handlers)
    assert record.getMessage() == "retrying http://h:5000/api"
