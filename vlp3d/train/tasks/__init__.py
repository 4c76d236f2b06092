"""The tasks the training loop runs: pretraining (`pretrain.py`) and fine-tuning (`finetune.py`)."""

from __future__ import annotations


def make_task(loop_config: dict, cfg):
    """The task a worker runs, from what the driver put in `loop_config`."""
    if loop_config["task"] == "finetune":
        from vlp3d.train.tasks.finetune import FinetuneTask

        return FinetuneTask(cfg, loop_config["meta"], loop_config.get("encoder_state"))
    from vlp3d.train.tasks.pretrain import PretrainTask

    return PretrainTask(cfg, loop_config["meta"], loop_config.get("shuffle_rows", 0))
