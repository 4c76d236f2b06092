"""The README's path after `make demo`, run as written (vlp3d-runs/demo read as a copy of the session's
tiny demo): every `vlp3d` command of a bash block that reads the demo's config, and the documented
`config show` lines, exit 0. The rest of the documented commands are parsed by
tests/unit/test_docs_commands.py (cluster, bucket and long-running ones do not run here)."""

from __future__ import annotations

import shutil

import pytest

from tests.doc_commands import doc_commands, parse

DEMO = "vlp3d-runs/demo"
AFTER_DEMO = [c for c in doc_commands()
              if (f"{DEMO}/config.toml" in c.argv and c.page == "README.md" and not c.inline)
              or (c.argv[:2] == ("config", "show") and "--help" not in c.argv)]


def test_the_readme_has_a_path_after_the_demo():
    assert {c.argv[0] for c in AFTER_DEMO} >= {"evaluate", "probe", "promote", "embed", "pretrain", "config"}


@pytest.fixture(scope="module")
def demo_copy(tiny_demo, tmp_path_factory):
    """The tiny demo's folder as a user's vlp3d-runs/demo: its config.toml names its own folder, so the
    copy keeps the original's paths except the store and shards, which point into the copy."""
    root = tmp_path_factory.mktemp("user")
    workdir = root / DEMO
    shutil.copytree(tiny_demo, workdir, ignore=shutil.ignore_patterns("ray_results"))
    config = workdir / "config.toml"
    config.write_text(config.read_text().replace(str(tiny_demo), str(workdir)))
    return root


@pytest.mark.parametrize("command", AFTER_DEMO, ids=lambda c: c.id)
def test_a_documented_command_runs_after_the_demo(command, demo_copy, monkeypatch, capsys):
    from vlp3d.cli import main

    monkeypatch.chdir(demo_copy)  # relative paths as the README pastes them
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("VLP3D_WORKDIR", raising=False)
    args, cfg = parse(command, {DEMO: str(demo_copy / DEMO)})
    if cfg is not None:
        assert cfg.tracking.workdir in (str(demo_copy / DEMO), "vlp3d-runs/default")
    code = main(list(command.argv))
    out, err = capsys.readouterr()
    assert code == 0, f"`vlp3d {' '.join(command.argv)}` exited {code}:\n{err[-3000:]}"
    if command.argv[0] in ("evaluate", "probe", "promote", "embed"):
        assert f"MLflow store: sqlite:///{demo_copy / DEMO}/mlflow.db" in err  # the demo's store, said so
    if "--dry-run" in command.argv:
        assert not (demo_copy / DEMO / "ray_results").exists()
