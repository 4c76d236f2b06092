"""The only code that imports ray or mlflow: pipelines, training launcher, tracking, registry."""
