"""The `vlp3d` commands: name -> (the job module that runs it, its one-line help).

The CLI (`vlp3d.cli`) builds its parser from this table and `vlp3d submit` reads its names (the
command lines it runs as `python -m vlp3d.cli ...`): the table imports no job, so jobs never import the CLI.
"""

from __future__ import annotations

JOBS = {
    "demo": ("vlp3d.jobs.demo", "synth -> prepare -> pretrain -> evaluate -> register, on this machine"),
    "synth": ("vlp3d.jobs.synth", "write a phantom corpus in CT-RATE layout"),
    "prepare": ("vlp3d.jobs.prepare", "preprocess a corpus into Parquet shards (Ray Data)"),
    "pretrain": ("vlp3d.jobs.pretrain", "pretrain on Ray Train, tracked in MLflow"),
    "sweep": ("vlp3d.jobs.sweep", "Ray Tune sweep over config keys; scaling-law fits and plots in MLflow"),
    "evaluate": ("vlp3d.jobs.evaluate", "zero-shot AUROC and retrieval on held-out shards"),
    "finetune": ("vlp3d.jobs.finetune",
                 "fine-tune a registered encoder: segmentation or classification, pretrained vs random"),
    "embed": ("vlp3d.jobs.embed", "embed CT volumes and reports with a logged model into a Parquet file"),
    "probe": ("vlp3d.jobs.probe", "linear probes on frozen image features vs random init, at label fractions"),
    "promote": ("vlp3d.jobs.promote",
                "move @champion to a version only if it is better beyond the paired bootstrap interval"),
    "register": ("vlp3d.jobs.register", "`promote` for a models:/NAME/VERSION URI"),
    "models": ("vlp3d.jobs.models", "list image encoders and presets with parameters and memory"),
    "export": ("vlp3d.jobs.export",
               "export a model: encoder for MONAI SwinUNETR / UNETR, Hugging Face, ONNX, MONAI bundle"),
    "submit": ("vlp3d.jobs.submit", "run a vlp3d command on a Ray cluster (Ray Jobs API, token auth)"),
    "jobs": ("vlp3d.jobs.jobs", "list, follow or stop the jobs of a Ray cluster"),
}

COMMANDS = (*JOBS, "config")  # every `vlp3d` command: the jobs and `config show`
