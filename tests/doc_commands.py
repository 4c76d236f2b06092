"""The `vlp3d` commands README.md and docs/*.md show, extracted for tests (tests/unit/test_docs_commands.py
parses every one; tests/integration/test_documented_commands.py runs the cheap ones on the tiny demo)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BASH = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_INLINE = re.compile(r"`(vlp3d [^`]+)`")
_USAGE = re.compile(r"\s\[|\||\.\.\.|…|<[a-z]")  # `vlp3d probe --model URI [--fractions ...]`: a usage line


@dataclass(frozen=True)
class DocCommand:
    page: str
    line: int
    argv: tuple[str, ...]  # after `vlp3d`
    env: tuple[tuple[str, str], ...] = ()
    inline: bool = False  # a `vlp3d ...` span in prose, not a line of a bash block

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}:{' '.join(self.argv[:2])}"


def _command(words: list[str]) -> tuple[tuple[tuple[str, str], ...], list[str]] | None:
    env = []
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        name, value = words.pop(0).split("=", 1)
        env.append((name, value))
    if words and (words[0] == "vlp3d" or words[0].endswith("/vlp3d")):
        return tuple(env), words[1:]
    return None


def doc_commands() -> list[DocCommand]:
    """Every `vlp3d ...` of a bash block (continuation lines joined, comments dropped) and every inline
    `vlp3d ...` span that is not a usage line, in README.md and docs/*.md."""
    found = []
    for page in PAGES:
        text = page.read_text()
        name = str(page.relative_to(ROOT))
        for block in _BASH.finditer(text):
            start = text[:block.start()].count("\n") + 2
            logical, first = "", None
            for offset, line in enumerate(block.group(1).splitlines()):
                first = start + offset if not logical else first
                if line.rstrip().endswith("\\"):
                    logical += line.rstrip()[:-1] + " "
                    continue
                logical += line
                for part in re.split(r"\s(?:&&|;)\s", logical):
                    words = shlex.split(part, comments=True)
                    parsed = _command(words)
                    if parsed:
                        found.append(DocCommand(name, first, tuple(parsed[1]), parsed[0]))
                logical = ""
        prose = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
        for match in _INLINE.finditer(prose):
            span = match.group(1)
            if _USAGE.search(span):
                continue
            words = shlex.split(span)
            parsed = _command(words)
            if parsed and (len(parsed[1]) >= 2 or parsed[1] == ["--version"]):  # not a mere mention
                found.append(DocCommand(name, prose[:match.start()].count("\n") + 1, tuple(parsed[1]), parsed[0],
                                        inline=True))
    return found


def parse(command: DocCommand, substitute: dict[str, str] | None = None):
    """(args, config or None) of a documented command: argv parsed by the CLI's own parser and, for a
    command with a config, the config resolved as the command would (nothing run). A `submit`'s
    command after `--` is parsed too (a vlp3d command). Paths that `vlp3d demo` creates
    (vlp3d-runs/...) are read through `substitute` {prefix: replacement}, or not resolved without it."""
    from vlp3d.cli import build_parser
    from vlp3d.jobs.commands import COMMANDS
    from vlp3d.jobs.common import resolve_config_with_sources, store_config

    argv = [_substituted(word, substitute) for word in command.argv]
    args = build_parser().parse_args(argv)
    inner = getattr(args, "command", None)
    if isinstance(inner, list):  # submit: its COMMAND
        tail = inner[1:] if inner[:1] == ["--"] else inner
        if tail and tail[0] in COMMANDS:
            return parse(DocCommand(command.page, command.line, tuple(tail)), substitute)
        return args, None
    config = getattr(args, "config", None)
    if config and config.startswith("vlp3d-runs/") and not substitute:
        return args, None  # written by `vlp3d demo`: resolved by the integration test
    if args.command == "sweep" and config == "report":
        return args, None  # `vlp3d sweep report NAME`: the config the sweep stored
    if config and re.fullmatch(r"[A-Z_]+", config):
        return args, None  # a placeholder (`vlp3d prepare CONFIG --corpus ...`)
    if hasattr(args, "overrides"):
        extra = [f"finetune.model={args.model}"] if getattr(args, "model", None) and args.command == "finetune" else None
        return args, resolve_config_with_sources(args, extra)[0]
    if hasattr(args, "tracking_uri"):  # a command that reads a store: --config resolves like the command's
        return args, store_config(args)
    return args, None


def _substituted(word: str, substitute: dict[str, str] | None) -> str:
    for prefix, replacement in (substitute or {}).items():
        word = word.replace(prefix, replacement)
    return word
