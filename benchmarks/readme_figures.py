"""Copy the measured figures of benchmarks/README.md into README.md.

Each `<!-- figures:NAME -->` ... `<!-- /figures:NAME -->` block of README.md is replaced by the block
of the same name in benchmarks/README.md, where every figure is written with its date and command.
Edit figures there, then run:

    python benchmarks/readme_figures.py          # rewrite README.md
    python benchmarks/readme_figures.py --check  # exit 1 if README.md differs (tests/unit/test_docs.py)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE, TARGET = ROOT / "benchmarks" / "README.md", ROOT / "README.md"
BLOCK = re.compile(r"<!-- figures:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /figures:(?P=name) -->", re.DOTALL)


def blocks(text: str) -> dict[str, str]:
    return {m["name"]: m["body"] for m in BLOCK.finditer(text)}


def render(readme: str, source: str) -> str:
    """`readme` with each figures block replaced by `source`'s; a block `source` lacks is an error."""
    figures = blocks(source)
    missing = sorted(set(blocks(readme)) - set(figures))
    if missing:
        raise SystemExit(f"benchmarks/README.md has no figures block {missing}")
    return BLOCK.sub(lambda m: f"<!-- figures:{m['name']} -->\n{figures[m['name']]}<!-- /figures:{m['name']} -->",
                     readme)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is not up to date")
    args = parser.parse_args(argv)
    current = TARGET.read_text()
    wanted = render(current, SOURCE.read_text())
    if args.check:
        if wanted != current:
            print("README.md's figures differ from benchmarks/README.md: run python benchmarks/readme_figures.py",
                  file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(wanted)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
