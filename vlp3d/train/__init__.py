"""The training core, without Ray or MLflow: one loop (`loop.run`) for every task (`tasks/`), the step
(`step.py`), batch feeding (`feed.py`), the checkpoint folder (`checkpoint.py`) and the Runtime a loop
runs on (`runtime.py`: one local process, or Ray Train's workers through `vlp3d.platform.ray_train`)."""
