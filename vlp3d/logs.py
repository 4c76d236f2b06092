"""Terminal output: one `logging` logger per module under `vlp3d`, one level for every process.

`configure(level)` is called once by the CLI (`--log-level`, `-v`) and again in every Ray worker
that logs (the level travels in $VLP3D_LOG_LEVEL, which `init_ray` hands to the workers). Log lines
go to stderr; a command's results (tables, summaries) go to stdout with `print`.

Every line vlp3d logs, and every line of MLflow's own loggers, passes through `vlp3d.redact.redact`
(credentials removed, exception text included) on its way to the terminal.

Below `debug`, third-party chatter stays off the terminal: MLflow's INFO lines (database set-up,
signature checks) and artifact-download bars, and Ray's per-report and per-dataset lines
(`vlp3d.platform.runtime`). At `debug` everything is shown, with time and logger name.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from vlp3d.errors import InputError
from vlp3d.redact import redact

LEVEL_ENV = "VLP3D_LOG_LEVEL"
LEVELS = ("debug", "info", "warning", "error")
_HANDLER_FLAG = "_vlp3d_handler"


def level_name() -> str:
    """The level this process logs at ($VLP3D_LOG_LEVEL, default 'info')."""
    name = os.environ.get(LEVEL_ENV, "info").lower()
    return name if name in LEVELS else "info"


def is_debug() -> bool:
    return level_name() == "debug"


def configure(level: str | None = None) -> logging.Logger:
    """Set the `vlp3d` loggers to `level` (default: $VLP3D_LOG_LEVEL, else info) with one stderr
    handler; remember the level in $VLP3D_LOG_LEVEL for child processes. Idempotent."""
    if level is not None:
        if level.lower() not in LEVELS:
            raise InputError(f"--log-level {level!r}: choose one of {', '.join(LEVELS)}.")
        os.environ[LEVEL_ENV] = level.lower()
    name = level_name()
    debug = name == "debug"
    root = logging.getLogger("vlp3d")
    root.setLevel(name.upper())
    root.propagate = False  # Ray Train's workers route the root logger to the console a second time
    handler = next((h for h in root.handlers if getattr(h, _HANDLER_FLAG, False)), None)
    if handler is None:
        handler = _StderrHandler()
        setattr(handler, _HANDLER_FLAG, True)
        root.addHandler(handler)
    handler.setFormatter(RedactingFormatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s" if debug else "%(message)s"))
    redact_handlers("mlflow")
    if not debug:
        _quiet_third_party()
    return root


def redact_handlers(name: str) -> None:
    """Every handler of logger `name` (MLflow's own stderr handler, set up when mlflow is imported)
    writes its lines without credentials. Idempotent."""
    for handler in logging.getLogger(name).handlers:
        handler.addFilter(_REDACT)


class RedactingFormatter(logging.Formatter):
    """A log line, its traceback included, without credentials (`vlp3d.redact.redact`)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class RedactMessages(logging.Filter):
    """Rewrites a record's message without credentials, for handlers vlp3d does not format."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


_REDACT = RedactMessages()


def ensure_configured() -> None:
    """`configure()` unless logging is set up already (the CLI did, or the application has root
    handlers): the platform's entry points call it so that a Python caller sees progress lines."""
    if not logging.getLogger("vlp3d").handlers and not logging.getLogger().handlers:
        configure()


def _quiet_third_party() -> None:
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported (workers too)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # vlp3d logs its pyfunc model as a Python object on purpose (the class is importable wherever
    # vlp3d is installed); MLflow warns about cloudpickle on every registration
    logging.getLogger("mlflow.pyfunc").addFilter(_PYFUNC_NOTICES)  # the same filter object: added once
    warnings.filterwarnings("ignore", message=".*Passing a Python object as `python_model`.*")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (a test's capture, a redirected stream)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


class DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


_PYFUNC_NOTICES = DropMessages("Passing a Python object as `python_model`", "Validating input example")


def progress_bar(total: int | None, desc: str, unit: str = "it", **kwargs):
    """A tqdm bar on stderr with counts and rate; off below info level or when stderr is not a terminal
    (then the caller's summary line says what happened)."""
    from tqdm import tqdm

    disable = None if level_name() in ("debug", "info") else True
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, **kwargs)
