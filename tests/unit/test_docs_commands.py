"""Every `vlp3d` command README.md and docs/*.md show parses with the CLI's parser and its config
resolves (nothing runs): a documented command that stops parsing fails here. The cheap ones also run
end to end on the tiny demo (tests/integration/test_documented_commands.py)."""

from __future__ import annotations

import pytest

from tests.doc_commands import doc_commands, parse

COMMANDS = doc_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 55
    shown = {c.argv[0] for c in COMMANDS}
    assert {"demo", "pretrain", "finetune", "sweep", "evaluate", "probe", "promote", "embed", "submit",
            "jobs", "config"} <= shown


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.id)
def test_a_documented_command_parses_and_its_config_resolves(command, monkeypatch):
    for name, value in command.env:
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("VLP3D_WORKDIR", raising=False)
    try:
        args, cfg = parse(command)
    except SystemExit as exit_:
        if exit_.code == 0 and {"--version", "--help", "-h"} & set(command.argv):
            return  # printed and exited, as documented
        pytest.fail(f"{command.page}:{command.line}: `vlp3d {' '.join(command.argv)}` does not parse "
                    f"(exit {exit_.code})")
    assert args.run is not None
    if cfg is not None:
        assert cfg.train.max_steps >= 1
