"""`vlp3d` command lines: options, positionals and `key=value` overrides in any order, for every command."""

from __future__ import annotations

import pytest

from vlp3d.cli import build_parser
from vlp3d.jobs.commands import COMMANDS

# per command: its positionals and overrides, then its options; each is parsed in both orders and
# with the options in the middle
ARGUMENTS = {
    "demo": (["train.max_steps=4", "train.lr=1e-3"], ["--workdir", "W", "--n", "24", "--config", "configs/demo.toml"]),
    "synth": ([], ["--out", "D", "--n", "4", "--seed", "1"]),
    "prepare": (["configs/demo.toml", "data.shape=[32,32,32]"], ["--corpus", "C", "--out", "O"]),
    "pretrain": (["configs/demo.toml", "train.max_steps=4", "train.lr=1e-3"], ["--run-name", "r", "--local"]),
    "sweep": (["configs/sweeps/demo.toml", "train.max_steps=4"], ["--name", "s"]),
    "evaluate": ([], ["--model", "models:/m@champion", "--shards", "S", "--prompt-ensemble", "report", "single"]),
    "finetune": (["configs/finetune_demo.toml", "finetune.init=random", "finetune.label_fraction=0.1"],
                 ["--model", "models:/vlp3d-clip@champion", "--local"]),
    "embed": (["a.nii.gz", "b.nii.gz"], ["--model", "models:/m@champion", "--out", "x.parquet", "--batch-size", "2"]),
    "probe": ([], ["--model", "models:/m@champion", "--shards", "S", "--fractions", "0.1", "1"]),
    "promote": (["vlp3d-clip"], ["--challenger", "2", "--shards", "S", "--workdir", "W"]),
    "register": ([], ["--model", "models:/m/2", "--shards", "S"]),
    "models": (["configs/demo.toml", "data.shape=[32,32,32]"], ["--log-level", "warning"]),
    "export": ([], ["--model", "models:/m@champion", "--format", "swinunetr", "--out", "x.pt"]),
    "submit": ([], ["--follow", "--env", "AWS_PROFILE"]),  # its COMMAND follows `--`, after its options
    "jobs": ([], []),
    "config": ([], []),
}


def _parse(argv: list[str]) -> dict:
    args = vars(build_parser().parse_args(argv))
    args.pop("run", None)
    return args


@pytest.mark.parametrize("command", COMMANDS)
def test_options_and_overrides_in_any_order(command):
    positionals, options = ARGUMENTS[command]
    if command == "jobs":
        argv = [["jobs", "logs", "JOB", "--follow", "--address", "http://h:8265"],
                ["jobs", "logs", "--follow", "JOB", "--address", "http://h:8265"],
                ["jobs", "--log-level", "debug", "logs", "--address", "http://h:8265", "JOB", "--follow"]]
    elif command == "config":
        argv = [["config", "show", "configs/demo.toml", "train.lr=1", "-v"],
                ["config", "show", "-v", "configs/demo.toml", "train.lr=1"],
                ["-v", "config", "show", "configs/demo.toml", "train.lr=1"]]
    elif command == "submit":
        tail = ["--", "pretrain", "configs/demo.toml", "train.max_steps=2", "--run-name", "r"]
        argv = [["submit", *options, *tail], ["submit", "--env", "AWS_PROFILE", "--follow", *tail]]
    else:
        half = len(positionals) // 2
        argv = [[command, *positionals, *options], [command, *options, *positionals],
                [command, *positionals[:half], *options, *positionals[half:]], ["-v", command, *positionals, *options]]
    parsed = [_parse(a) for a in argv]
    first = {k: v for k, v in parsed[0].items() if k != "log_level"}
    for other in parsed[1:]:
        assert {k: v for k, v in other.items() if k != "log_level"} == first


def test_the_readmes_finetune_baseline_parses():
    args = build_parser().parse_args(["finetune", "configs/finetune_demo.toml", "finetune.init=random",
                                      "finetune.label_fraction=0.1", "--model", "models:/vlp3d-clip@champion"])
    assert args.config == "configs/finetune_demo.toml"
    assert args.overrides == ["finetune.init=random", "finetune.label_fraction=0.1"]
    assert args.model == "models:/vlp3d-clip@champion"


def test_a_submitted_commands_options_stay_with_it():
    args = build_parser().parse_args(["submit", "--follow", "--", "pretrain", "--run-name", "r", "train.lr=1"])
    assert args.follow and args.command == ["--", "pretrain", "--run-name", "r", "train.lr=1"]
