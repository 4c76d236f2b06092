"""MLflow's current store for a block of a test, without leaking it to later tests.

`mlflow.set_tracking_uri` also exports $MLFLOW_TRACKING_URI (MLflow 3), which every later config
without `tracking.tracking_uri` takes for the user's store: a test that sets a store and "restores"
the previous one with `set_tracking_uri(before)` leaves that variable behind. The registry URI is
set too: vlp3d.platform.mlflow.store.client sets it with the store, and `models:/` URIs resolve there.
This puts all of it back.
"""

from __future__ import annotations

import contextlib
import os

ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextlib.contextmanager
def current_store(uri: str):
    import mlflow

    saved = {key: os.environ.get(key) for key in ENV}
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # `models:/` URIs resolve in the registry, which vlp3d sets with the store
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
