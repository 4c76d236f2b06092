"""`vlp3d <command>`: parses arguments, then calls the job of the same name."""

from __future__ import annotations

import argparse
import importlib

import vlp3d
from vlp3d.config import to_toml
from vlp3d.jobs import commands
from vlp3d.jobs.common import (
    EXIT_CODES_HELP,
    Parser,
    add_config_arguments,
    add_logging_arguments,
    config_keys_epilog,
    formatter,
    resolve_config_with_sources,
    run_reporting_errors,
)

JOBS = {name: (importlib.import_module(module), text) for name, (module, text) in commands.JOBS.items()}


EPILOG = f"""Start with `vlp3d demo`. Each command has --help.

{EXIT_CODES_HELP}"""


def _config_show(args: argparse.Namespace) -> int:
    cfg, sources = resolve_config_with_sources(args)
    print(to_toml(cfg, sources), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="vlp3d", formatter_class=formatter(),
        description="Pretrain 3D medical vision-language models (CT + reports) on Ray, tracked in MLflow.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {vlp3d.__version__}")
    add_logging_arguments(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (job, text) in JOBS.items():
        sub = commands.add_parser(name, help=text, formatter_class=formatter())
        job.add_arguments(sub)
        sub.epilog = "\n\n".join(filter(None, [sub.epilog, getattr(job, "EXIT_CODES", EXIT_CODES_HELP)]))
        add_logging_arguments(sub, top_level=False)
        sub.set_defaults(run=job.run)
    config = commands.add_parser("config", help="show the resolved config", formatter_class=formatter())
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    show = config_commands.add_parser("show", help="print the resolved config as TOML", formatter_class=formatter(),
                                      description="Print defaults < CONFIG < overrides as TOML. Each value that is not a plain "
                                                  "default says where it came from: '# config file', '# override', "
                                                  "'# <method> default' (objective.name's defaults) or "
                                                  "'# $VLP3D_WORKDIR'.",
                                      epilog=f"{config_keys_epilog()}\n\n{EXIT_CODES_HELP}")
    add_config_arguments(show)
    add_logging_arguments(show, top_level=False)
    show.set_defaults(run=_config_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting_errors(args.run, args)


if __name__ == "__main__":
    raise SystemExit(main())
