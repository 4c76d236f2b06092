"""Everything vlp3d sends to MLflow and reads back, one module per concern (absolute imports only:
`import mlflow` in here is the MLflow library, never this package).

- `store`: the client of a config's store, experiments, finding runs by tag, the code version a run
  records, scrubbing paths and secrets from what is logged
- `runs`: creating/resuming training and sweep runs, what they log, ending them, evaluations
- `logger`: `RankZeroLogger`, the rank-0 worker's background metrics sender
- `models`: the one model logger (pretraining, fine-tuning, sweep trials) and loading a logged embedder
- `registry`: registered names, versions, aliases and the one `promote`
- `card`: the model card (markdown description and `vlp3d.*` tags) of a registered version
"""
