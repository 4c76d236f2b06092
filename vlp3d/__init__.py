"""vlp3d: pretraining 3D medical vision-language models on Ray, tracked in MLflow."""

__version__ = "0.1.0"
