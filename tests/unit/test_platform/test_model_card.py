"""The model card of a fine-tuned version and the module boundaries of vlp3d.platform.mlflow and vlp3d.jobs,
without a store or Ray."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pandas as pd

ROOT = Path(__file__).resolve().parents[3]


def test_a_fine_tuned_version_gets_its_own_card():
    from vlp3d.platform.mlflow.card import model_card

    run = SimpleNamespace(
        info=SimpleNamespace(run_id="r1"),
        data=SimpleNamespace(
            params={"model.image_encoder": "resnet3d", "model.size": "tiny", "finetune.max_steps": "2",
                    "finetune.global_batch": "4", "data.eval_split": "valid", "data.train_split": "train"},
            tags={"vlp3d.pretrained_model": "models:/vlp3d-clip/1", "vlp3d.task": "segmentation",
                  "vlp3d.init": "pretrained", "vlp3d.label_fraction": "1.0", "vlp3d.method": "clip"},
            metrics={"eval/valid/mean_dice": 0.5, "eval/valid/macro_auroc": float("nan")}))
    table = pd.DataFrame({"class": ["lung", "heart"], "volumes": [3, 3], "dice": [0.6, 0.4],
                          "hd95_mm": [1.0, float("nan")]})
    text, tags = model_card("vlp3d-clip-segmentation", "1", run, {"segmentation": table}, {})
    assert text.startswith("# vlp3d-clip-segmentation version 1")
    assert "fine-tuned for segmentation" in text and "`models:/vlp3d-clip/1`" in text
    assert "Zero-shot" not in text and "embeds CT volumes and report texts" not in text
    assert "| lung | 3 | 0.600 | 1.000 |" in text and "| heart | 3 | 0.400 |  |" in text
    assert tags["vlp3d.pretrained_model"] == "models:/vlp3d-clip/1" and tags["vlp3d.task"] == "segmentation"
    assert tags["vlp3d.eval.valid.mean_dice"] == "0.500"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_jobs_never_import_the_cli_nor_mlflow():
    for path in sorted((ROOT / "vlp3d" / "jobs").glob("*.py")):
        imported = _imports(path)
        assert not any(n == "vlp3d.cli" or n.startswith("vlp3d.cli.") for n in imported), path
        assert not any(n == "mlflow" or n.startswith("mlflow.") for n in imported), path


def test_the_mlflow_package_imports_the_library_absolutely():
    import mlflow

    from vlp3d.platform.mlflow import card, logger, models, registry, runs, store

    for module in (card, logger, models, registry, runs, store):
        assert module.mlflow is mlflow and not Path(mlflow.__file__).is_relative_to(ROOT / "vlp3d")
        source = Path(module.__file__)
        assert len(source.read_text().splitlines()) < 600, source
        assert all(node.level == 0 for node in ast.walk(ast.parse(source.read_text()))
                   if isinstance(node, ast.ImportFrom)), f"{source}: relative import"
