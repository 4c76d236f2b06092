"""`[tracking]`: where runs, checkpoints and the MLflow store live, and the model's name."""

from __future__ import annotations

from dataclasses import dataclass

from vlp3d.config.fields import _f


@dataclass(frozen=True)
class TrackingConfig:
    workdir: str = _f("vlp3d-runs/default", "Local folder for the local MLflow store, sweep folders and (without "
                      "tracking.storage) Ray results and checkpoints; never a URI.", location=True)
    storage: str = _f(
        "", "Where Ray Train keeps run state and checkpoints (pretraining and sweep trials; a rerun of a run name "
        "resumes from there): a folder or a pyarrow filesystem URI (s3://bucket/prefix, gs://bucket/prefix, "
        "file:///shared/runs) every node can reach; credentials come from the environment, never the URI "
        "(docs/cluster.md). Empty: <workdir>/ray_results.", location=True,
    )
    tracking_uri: str = _f("", "MLflow tracking URI; empty: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db.",
                           location=True)
    experiment: str = _f("", "MLflow experiment; empty: the config name.")
    registered_model: str = _f("", "Registered model name; empty: vlp3d-<objective>.")
    model_allowed_root: str = _f(
        "", "Folder the logged model may read image paths from (paths and every file they read resolved, "
        "symlinks included; other paths are refused, arrays still accepted); empty: no path at all (deny by "
        "default; `vlp3d embed` reads the files you name). Recorded in the model "
        "as model_config allowed_root; replaced at load time by mlflow.pyfunc.load_model(uri, "
        "model_config={'allowed_root': DIR}) or, e.g. under `mlflow models serve`, $VLP3D_ALLOWED_ROOT.")
