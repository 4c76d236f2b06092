"""The tasks the training loop runs: pretraining (`pretrain.py`) and fine-tuning (`finetune.py`)."""
