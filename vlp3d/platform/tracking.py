"""Only for loading old models: those logged before the pyfunc moved to vlp3d.platform.pyfunc pickled its
class under this module's name (`vlp3d.platform.tracking.Vlp3dEmbedder`). Everything vlp3d sends to
MLflow lives in vlp3d.platform.mlflow; import nothing from here."""

from vlp3d.platform.pyfunc import Vlp3dEmbedder

__all__ = ["Vlp3dEmbedder"]
