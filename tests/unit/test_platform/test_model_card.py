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


def test_an_export_card_reads_the_registered_versions_auroc_with_its_intervals(tmp_path):
    from mlflow.tracking import MlflowClient

    from tests.mlflow_store import current_store
    from vlp3d.platform.mlflow.card import registered_evaluation

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with current_store(uri):
        client = MlflowClient(uri, uri)
        run = client.create_run(client.create_experiment("e", artifact_location=str(tmp_path / "artifacts")),
                                tags={"vlp3d.data_hash": "feedbeef"})
        for key, value in {"eval/valid/macro_auroc": 0.8, "eval/valid/macro_auroc_ci_low": 0.7,
                           "eval/valid/macro_auroc_ci_high": 0.9}.items():
            client.log_metric(run.info.run_id, key, value)
        table = tmp_path / "valid_zero_shot.csv"
        pd.DataFrame({"label": ["Emphysema"], "auroc": [0.95], "auroc_ci_low": [0.9], "auroc_ci_high": [0.99],
                      "f1": [0.5], "positives": [4], "n": [12]}).to_csv(table, index=False)
        client.log_artifact(run.info.run_id, str(table), "eval")
        client.create_registered_model("vlp3d-clip")
        client.create_model_version("vlp3d-clip", str(tmp_path), run.info.run_id, description="card text")
        client.set_registered_model_alias("vlp3d-clip", "champion", "1")
        facts = registered_evaluation(uri, "models:/vlp3d-clip@champion")
    assert facts["model_uri"] == "models:/vlp3d-clip/1" and facts["description"] == "card text"
    assert facts["data_hash"] == "feedbeef"
    assert facts["evaluations"] == [
        {"split": "valid", "label": "macro", "value": 0.8, "ci_low": 0.7, "ci_high": 0.9, "n": 12},
        {"split": "valid", "label": "Emphysema", "value": 0.95, "ci_low": 0.9, "ci_high": 0.99, "n": 12}]
