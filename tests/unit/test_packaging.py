"""Every third-party import is declared in pyproject.toml: vlp3d/'s among the runtime dependencies (or
the extra that makes it optional), tests/' and benchmarks/' among the runtime ones or the dev extra.
Import names map to distributions with importlib.metadata.packages_distributions()."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# runtime imports that only an extra installs (the code imports them where the feature is used)
OPTIONAL = {"pydicom": "dicom", "optuna": "optuna", "onnxruntime": "onnx"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {extra: {_name(r) for r in reqs} for extra, reqs in project["optional-dependencies"].items()}
    return {_name(r) for r in project["dependencies"]}, extras


def _imports(folder: str) -> dict[str, str]:
    """{top-level module: a file importing it} of the third-party imports under `folder`."""
    local = {p.stem for p in (ROOT / folder).rglob("*.py")} | {"vlp3d", "tests", "benchmarks", "__future__"}
    found = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def _undeclared(imports: dict[str, str], allowed: set[str]) -> list[str]:
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for module, where in sorted(imports.items()):
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [])}
        if not names:
            missing.append(f"{module} ({where}): not installed, so not mapped to a distribution")
        elif not names & allowed:
            missing.append(f"{module} ({where}) from {sorted(names)}")
    return missing


def test_runtime_imports_are_runtime_dependencies():
    runtime, extras = _declared()
    imports = _imports("vlp3d")
    for module, extra in OPTIONAL.items():
        assert module in imports and module in {m.replace("-", "_") for m in extras[extra]}, (module, extra)
        imports.pop(module)
    assert _undeclared(imports, runtime) == []


def test_test_and_benchmark_imports_are_declared_with_the_dev_extra():
    runtime, extras = _declared()
    imports = {**_imports("tests"), **_imports("benchmarks")}
    assert _undeclared(imports, runtime | extras["dev"]) == []


def test_test_tools_are_not_runtime_dependencies():
    runtime, extras = _declared()
    assert not {"pytest", "ruff", "moto"} & runtime
    assert {"pytest", "ruff"} <= extras["dev"]
