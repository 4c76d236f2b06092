"""Argument helpers shared by the job entry points."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path

import vlp3d
from vlp3d import logs
from vlp3d.config import (
    ExperimentConfig,
    TrackingConfig,
    describe,
    load_config,
    load_config_with_sources,
)
from vlp3d.config.loading import WORKDIR_ENV
from vlp3d.errors import InputError
from vlp3d.redact import redact

CONFIG_HELP = "TOML experiment config (see configs/). Omit for the built-in CPU demo defaults."
OVERRIDES_HELP = "config overrides as section.key=value (TOML values), e.g. train.max_steps=200 data.shape=[32,32,32]"


def config_keys_epilog() -> str:
    lines = ["config keys (section.key = default: meaning):"]
    lines += [f"  {key} = {default}: {text}" for key, default, text in describe()]
    return "\n".join(lines)


def add_config_arguments(parser: argparse.ArgumentParser, config_required: bool = False) -> None:
    if config_required:
        parser.add_argument("config", help=CONFIG_HELP)
    else:
        parser.add_argument("config", nargs="?", default=None, help=CONFIG_HELP)
    parser.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)


def resolve_config(args: argparse.Namespace, extra: list[str] | None = None) -> ExperimentConfig:
    return resolve_config_with_sources(args, extra)[0]


def resolve_config_with_sources(args: argparse.Namespace, extra: list[str] | None = None
                                ) -> tuple[ExperimentConfig, dict[str, str]]:
    """The config of CONFIG + overrides, and which keys came from the method's defaults."""
    config, overrides = args.config, list(args.overrides)
    # `vlp3d prepare train.lr=1` : a first positional with '=' is an override, not a file
    if config is not None and "=" in config and not os.path.exists(config):
        overrides.insert(0, config)
        config = None
    return load_config_with_sources(config, [*(extra or []), *overrides])


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that takes options and positionals (CONFIG, `key=value` overrides, files) in
    any order: `vlp3d finetune cfg.toml finetune.init=random --model URI` and `vlp3d demo --n 24
    train.max_steps=4 --workdir W` alike (`parse_known_intermixed_args`). A parser with sub-commands
    or a `-- COMMAND ...` remainder (`vlp3d`, `vlp3d jobs`, `vlp3d submit`) parses as usual; its
    sub-commands are Parsers too (`add_subparsers` uses the parent's class)."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        positional_kinds = {action.nargs for action in self._get_positional_actions()}
        if self._intermixing or positional_kinds & {argparse.PARSER, argparse.REMAINDER}:
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls parse_known_args (Python 3.11)
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps the description paragraph; keeps the epilog's key table as written."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return super()._fill_text(text, width, indent)
        return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent)


def formatter() -> type[argparse.HelpFormatter]:
    return _HelpFormatter


STORE_CONFIG_HELP = ("experiment config whose [tracking] names the MLflow store and whose [data]/[eval] keys are "
                     "this command's defaults, e.g. vlp3d-runs/demo/config.toml, which `vlp3d demo` writes")


def add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config`, `--workdir` and `--tracking-uri` of jobs that read an MLflow store (evaluate, probe,
    promote, register, embed, export): the store rule of `store_uri`."""
    parser.add_argument("--config", metavar="FILE", help=STORE_CONFIG_HELP)
    parser.add_argument("--workdir", default=None,
                        help="workdir of the local MLflow store (default: the config's tracking.workdir, "
                             f"else ${WORKDIR_ENV}, else {TrackingConfig().workdir})")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: the config's tracking.tracking_uri, else "
                             "$MLFLOW_TRACKING_URI, else sqlite:///WORKDIR/mlflow.db)")


def store_config(args: argparse.Namespace) -> ExperimentConfig:
    """The config of `--config` (or the defaults; $VLP3D_WORKDIR applies) with `--workdir` and
    `--tracking-uri` applied."""
    from vlp3d.config import replace

    cfg = load_config(getattr(args, "config", None))
    changes = {key: value for key, value in (("workdir", getattr(args, "workdir", None)),
                                             ("tracking_uri", getattr(args, "tracking_uri", None))) if value}
    return replace(cfg, tracking=changes) if changes else cfg


def store_uri(cfg: ExperimentConfig, args: argparse.Namespace | None = None, must_exist: bool = False,
              create: bool = True, sources: dict[str, str] | None = None) -> str:
    """The one store rule of every command: --tracking-uri, else --workdir, else the config's
    tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else the config's tracking.workdir (a config
    file's, else $VLP3D_WORKDIR, else the default) as sqlite:///WORKDIR/mlflow.db. Logs which store
    it is and why. `must_exist`: a local store that is not there is bad input (a command that reads
    a model must not create an empty store and then report the model missing); `create`: false in a
    dry run (the workdir is not made)."""
    from vlp3d.platform.runtime import tracking_uri

    uri = tracking_uri(cfg, create=create and not must_exist)
    given = {} if args is None else vars(args)
    config = given.get("config")
    if given.get("tracking_uri"):
        why = "--tracking-uri"
    elif given.get("workdir"):
        why = "--workdir"
    elif cfg.tracking.tracking_uri:
        why = f"tracking.tracking_uri of {config or 'the config'}"
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        why = "$MLFLOW_TRACKING_URI"
    elif sources and "tracking.workdir" in sources:
        why = {"override": "the tracking.workdir override", "config file": f"tracking.workdir of {config}"}.get(
            sources["tracking.workdir"], sources["tracking.workdir"])
    elif config and cfg.tracking.workdir != TrackingConfig().workdir:
        why = f"tracking.workdir of {config}"
    elif os.environ.get(WORKDIR_ENV):
        why = f"${WORKDIR_ENV}"
    else:
        why = (f"tracking.workdir of {config}" if config else "the default tracking.workdir") + \
              f"; --config FILE, --workdir DIR or ${WORKDIR_ENV} name another"
    logging.getLogger(__name__).info("MLflow store: %s (%s)", redact(uri), why)
    if must_exist and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise InputError(f"no MLflow store at {uri.removeprefix('sqlite:///')} ({why}): pass the config the "
                         f"model was trained with (--config, e.g. vlp3d-runs/demo/config.toml after `vlp3d demo`), "
                         f"--workdir DIR, or set ${WORKDIR_ENV}.")
    return uri


def given(value, default):
    """An option's value, else (None: not given) the config's."""
    return default if value is None else value


def shards_from(args: argparse.Namespace, cfg: ExperimentConfig) -> str:
    """`--shards`, else the config's data.shards; bad input when neither names them."""
    shards = args.shards or cfg.data.shards
    if not shards:
        raise InputError("no shards: pass --shards DIR, or --config FILE whose data.shards names them "
                         "(vlp3d-runs/demo/config.toml after `vlp3d demo`).")
    return shards


def tracking_uri_from(args: argparse.Namespace) -> str:
    """The MLflow store of a command that reads one (`add_tracking_arguments`); it must exist."""
    return store_uri(store_config(args), args, must_exist=True)


def add_logging_arguments(parser: argparse.ArgumentParser, top_level: bool = True) -> None:
    """`--log-level` and `-v` (= debug), accepted before or after the command name."""
    default = "info" if top_level else argparse.SUPPRESS
    parser.add_argument("--log-level", choices=logs.LEVELS, default=default,
                        help="what reaches the terminal (default info: progress lines and warnings; debug adds "
                             "Ray's and MLflow's own lines, with times and logger names)")
    parser.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="debug",
                        default=default, help="same as --log-level debug")


EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
# a user path or service: bad input (exit 2), whoever raised it
INPUT_ERRORS = (InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                FileExistsError, ConnectionError)
EXIT_CODES_HELP = """exit codes (every command):
  0  success: the work is done (also `promote` keeping the current champion, a decision it was asked for)
  1  the work failed: training stopped on non-finite losses, no sweep trial finished, a Ray job FAILED
  2  bad input, with a one-line reason: config, arguments, files, corpus, model URI, an unreachable
     cluster or tracking server, a shard folder in use or holding other shards
  3  an internal error (a bug in vlp3d): the traceback goes to a log file, the terminal says where
  130, 143  stopped by SIGINT (Ctrl-C) or SIGTERM (`ray job stop`); training runs end KILLED with a
     final checkpoint"""
ERROR_LOG_ENV = "VLP3D_ERROR_LOG_DIR"  # where internal errors' tracebacks go (default: a temporary folder)


def exit_code_of(err: BaseException) -> int:
    """The exit code a command ends with when `err` escapes it (vlp3d.errors)."""
    code = getattr(err, "exit_code", None)
    if isinstance(code, int):
        return code
    return EXIT_BAD_INPUT if isinstance(err, INPUT_ERRORS) else EXIT_INTERNAL


def write_traceback(err: BaseException) -> Path:
    """The traceback of `err` in a new file under $VLP3D_ERROR_LOG_DIR (default <tmp>/vlp3d-errors)."""
    folder = Path(os.environ.get(ERROR_LOG_ENV) or Path(tempfile.gettempdir()) / "vlp3d-errors")
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(tempfile.mkstemp(prefix=f"vlp3d-{stamp}-", suffix=".log", dir=folder)[1])
    command = " ".join(sys.argv[:1] + [redact(a) for a in sys.argv[1:]])
    path.write_text(f"vlp3d {vlp3d.__version__}, python {sys.version.split()[0]}\n$ {command}\n\n"
                    + redact("".join(traceback.format_exception(err))))
    return path


def run_reporting_errors(run, args: argparse.Namespace) -> int:
    """Run a job and turn what escapes it into an exit code and one line on stderr (EXIT_CODES_HELP):
    bad input and failed work say why; anything else is a bug, its traceback written to a file."""
    logs.configure(getattr(args, "log_level", None))
    try:
        return run(args) or EXIT_OK
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM during training (TrainingInterrupted: its exit code)
        print(f"error: {redact(str(err)) or 'interrupted'}", file=sys.stderr)
        return getattr(err, "exit_code", 130)
    except Exception as err:  # noqa: BLE001 - every error ends as an exit code, none as a bare traceback
        code = exit_code_of(err)
        text = redact(err) or type(err).__name__
        if code != EXIT_INTERNAL:
            print(f"error: {text}", file=sys.stderr)
            return code
        try:
            where = f"the traceback is in {write_traceback(err)}"
        except OSError as log_err:
            traceback.print_exception(err)
            where = f"the traceback is above (it could not be written to a file: {log_err})"
        print(f"internal error (a bug in vlp3d; please report it with the traceback): {type(err).__name__}: "
              f"{text.splitlines()[0] if text else ''}; {where}", file=sys.stderr)
        return EXIT_INTERNAL


def run_store(cfg: ExperimentConfig, args: argparse.Namespace, sources: dict[str, str] | None = None,
              dry_run: bool = False) -> list[list[str]]:
    """Plan rows of where a training run's results go (`--dry-run`, and logged before a run): the
    MLflow store (and why), Ray Train's checkpoint storage."""
    uri = store_uri(cfg, args, create=not dry_run, sources=sources)
    checkpoints = cfg.tracking.storage or str(Path(cfg.tracking.workdir, "ray_results"))
    return [["MLflow store", redact(uri)],
            ["checkpoints", f"{redact(checkpoints)}/<run name>, every {cfg.train.checkpoint_every} steps"]]


def run_main(build_parser, run, argv: list[str] | None = None) -> int:
    parser = build_parser(Parser(formatter_class=formatter()))
    add_logging_arguments(parser)
    return run_reporting_errors(run, parser.parse_args(argv))
