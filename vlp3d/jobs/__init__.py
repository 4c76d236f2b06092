"""Entry points: `python -m vlp3d.jobs.<name> ...`; the `vlp3d` CLI calls the same functions."""
