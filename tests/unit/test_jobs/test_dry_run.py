"""`--dry-run` of pretrain, finetune and sweep: the resolved config with where each value came from and
the plan, and no side effect (no folder created, neither Ray nor MLflow imported, so no run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

COMMANDS = {
    "pretrain": ["pretrain", "configs/mg3d_demo.toml", "train.max_steps=7", "--run-name", "r"],
    "pretrain --local": ["pretrain", "configs/demo.toml", "--local", "train.max_steps=7"],
    "finetune": ["finetune", "configs/finetune_demo.toml", "finetune.init=random", "finetune.max_steps=7",
                 "--model", "models:/vlp3d-clip@champion"],
    "sweep": ["sweep", "configs/sweeps/demo.toml", "train.max_steps=7", "--name", "s"],
}

_RUN = """
import json, sys
from vlp3d.cli import main
code = main(json.loads(sys.argv[1]))
print(json.dumps({"code": code, "ray": "ray" in sys.modules, "mlflow": "mlflow" in sys.modules}))
"""


def _dry_run(argv: list[str], tmp_path: Path) -> tuple[dict, str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLP3D_LOG_LEVEL": "info"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = subprocess.run([sys.executable, "-c", _RUN, json.dumps(argv)], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=300)
    *printed, status = out.stdout.rstrip("\n").split("\n")
    return json.loads(status), "\n".join(printed), out.stderr


@pytest.mark.parametrize("name", COMMANDS)
def test_dry_run_prints_config_and_plan_and_changes_nothing(name, tmp_path):
    workdir = tmp_path / "store"
    status, out, err = _dry_run([*COMMANDS[name], f"tracking.workdir={workdir}", "--dry-run"], tmp_path)
    assert status == {"code": 0, "ray": False, "mlflow": False}, err
    assert not workdir.exists()  # no store, no checkpoint folder, no sweep folder
    assert f'workdir = "{workdir}"  # override' in out
    assert "max_steps = 7  # override" in out
    assert "dry run:" in out and "steps " in out and "Ray resources" in out
    assert f"sqlite:///{workdir}/mlflow.db" in out and "MLflow store" in err  # the store, and why
    assert "training FLOPs" in out
    if name == "pretrain":
        assert 'image_encoder = "resnet3d"  # config file' in out
        assert "align_weight = 0.1  # mg3d default" in out
    if name == "sweep":
        from vlp3d.config import load_config
        from vlp3d.search_space import parse_space, planned_trials

        cfg = load_config(ROOT / "configs" / "sweeps" / "demo.toml")
        trials = planned_trials(cfg, parse_space(cfg.tune.space, cfg.tune.variants))
        assert f"trials  {trials} (grid search" in out or f"  {trials} (grid search" in out
        assert "space: " in out
    if name == "finetune":
        assert 'init = "random"  # override' in out and "from models:/vlp3d-clip@champion" in out
    if name == "pretrain --local":
        assert "--local runs one rank" in out


def test_dry_run_counts_epochs_from_prepared_shards(tmp_path, monkeypatch, capsys):
    """With shards prepared for this config, the plan says how many epochs the steps are."""
    import pandas as pd

    from vlp3d.cli import main
    from vlp3d.config import load_config
    from vlp3d.data.shards import spec_from_config

    cfg = load_config(None, [f"data.shards={tmp_path / 'shards'}"])
    folder = tmp_path / "shards" / spec_from_config(cfg).hash
    folder.mkdir(parents=True)
    (folder / "_manifest.json").write_text("{}")
    pd.DataFrame({"split": ["train"] * 8 + ["valid"] * 2, "modality": ["ct"] * 10,
                  "patient_id": [f"p{i}" for i in range(10)], "fraction_rank": [i / 10 for i in range(10)]}
                 ).to_parquet(folder / "part-0.parquet")
    code = main(["pretrain", f"data.shards={tmp_path / 'shards'}", "train.max_steps=4", "train.global_batch=4",
                 f"tracking.workdir={tmp_path / 'w'}", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "epochs" in out
    line = next(line for line in out.splitlines() if line.strip().startswith("epochs"))
    assert "2.0 over 8 training volumes" in line, line  # 4 steps x 4 volumes, 8 in the train split
