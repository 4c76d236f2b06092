"""Job: the whole platform on a laptop — synth, prepare, pretrain, evaluate, register."""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vlp3d.config import ExperimentConfig, load_config, replace, to_toml
from vlp3d.config.loading import WORKDIR_ENV
from vlp3d.jobs.common import OVERRIDES_HELP, run_main
from vlp3d.table import format_table

if TYPE_CHECKING:
    from vlp3d.platform.evaluate import EvaluateReport
    from vlp3d.platform.pretrain import PretrainResult

DEFAULT_WORKDIR = "vlp3d-runs/demo"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = (
        "End to end on this machine: a phantom corpus (synth) -> Ray Data shards (prepare) -> Ray Train "
        "pretraining -> zero-shot and retrieval evaluation on held-out patients -> MLflow model registry "
        "(alias 'champion'). Everything lands in WORKDIR; MLflow uses sqlite:///WORKDIR/mlflow.db."
    )
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="experiment config (default: the built-in CPU demo = configs/demo.toml); e.g. "
                             "configs/mg3d_demo.toml, configs/t3d_demo.toml, configs/unimedi_demo.toml")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR, help=f"output folder (default: {DEFAULT_WORKDIR})")
    parser.add_argument("--n", type=int, default=500, help="phantom volumes (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    parser.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    return parser


def _stage(index: int, name: str, detail: str) -> float:
    print(f"\n[{index}/5] {name}: {detail}", flush=True)
    return time.time()


@dataclass
class DemoResult:
    cfg: ExperimentConfig
    report: EvaluateReport
    trained: PretrainResult
    timings: list[tuple[str, float]]
    tracking_uri: str


def run_pipeline(cfg: ExperimentConfig, n: int, seed: int = 0, radiographs: bool = False) -> DemoResult:
    """synth (reused when already written) -> prepare -> pretrain -> evaluate -> register, in `cfg.tracking.workdir`.
    The corpus gets radiographs when the method trains on 2D images or `radiographs` is set (a caller
    running several methods in one workdir sets it, so the corpus is written once for all of them).
    $MLFLOW_TRACKING_URI points at the demo's store while it runs and is put back afterwards (a
    second pipeline in the same process, e.g. bench_methods.py or a test, must not inherit it)."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        return _run_pipeline(cfg, n, seed, radiographs)
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def _run_pipeline(cfg: ExperimentConfig, n: int, seed: int, radiographs: bool) -> DemoResult:
    from vlp3d.data.phantom import synthesize
    from vlp3d.jobs.evaluate import render
    from vlp3d.jobs.prepare import summary
    from vlp3d.objectives import objective_class
    from vlp3d.platform.evaluate import evaluate_as_configured, promote
    from vlp3d.platform.mlflow.registry import registered_name
    from vlp3d.platform.prepare import PrepareError, prepare
    from vlp3d.platform.pretrain import pretrain
    from vlp3d.platform.runtime import tracking_uri

    workdir = Path(cfg.tracking.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / f"{cfg.name}.toml").write_text(to_toml(cfg))
    # pin the store for every process this demo starts (Ray workers included)
    uri = tracking_uri(cfg)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    timings: list[tuple[str, float]] = []

    t = _stage(1, "synth", f"{n} phantom CTs -> {cfg.data.corpus}")
    stamp = Path(cfg.data.corpus) / "_synth.json"
    # UniMedI trains on 2D images too: the phantom's frontal projections
    params = {"n": n, "seed": seed, "radiographs": radiographs or objective_class(cfg.objective.name).uses_2d}
    existing = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if existing and all(existing.get(k) == v for k, v in params.items() if k != "radiographs") and \
            (existing.get("radiographs") or not params["radiographs"]):
        print("corpus already written with these parameters; reusing it")
    else:
        from vlp3d import logs

        with logs.progress_bar(n, "synth", unit="vol") as bar:
            synthesize(cfg.data.corpus, n, seed=seed, progress=bar.update, radiographs=params["radiographs"])
        stamp.write_text(json.dumps(params))
    timings.append(("synth", time.time() - t))

    t = _stage(2, "prepare", "Ray Data: NIfTI -> HU -> RAS -> resample -> window -> shards")
    try:
        prepared = prepare(cfg, cfg.data.corpus, cfg.data.shards)
    except PrepareError as err:  # e.g. this workdir's shards are of a phantom corpus with another --n
        raise PrepareError(f"{err}\nThe demo keeps one phantom corpus per --workdir: run it with a new "
                           f"--workdir, or delete {cfg.data.shards} to prepare this corpus there.") from None
    print(summary(prepared))
    timings.append(("prepare", time.time() - t))

    t = _stage(3, "pretrain", f"Ray Train, {cfg.cluster.num_workers} DDP workers, {cfg.train.max_steps} steps, "
                              f"objective {cfg.objective.name}")
    trained = pretrain(cfg)
    timings.append(("pretrain", time.time() - t))

    t = _stage(4, "evaluate", f"held-out split '{cfg.data.eval_split}'")
    report = evaluate_as_configured(cfg, trained.model_uri)
    print(render(report))
    timings.append(("evaluate", time.time() - t))

    t = _stage(5, "register", f"{trained.model_uri} -> alias champion")
    # a second demo run in the same workdir is a challenger: it must beat the champion beyond the
    # paired bootstrap interval on the held-out split (vlp3d promote)
    _, message = promote(uri, registered_name(cfg), trained.model_uri.rsplit("/", 1)[1], cfg.data.shards,
                         cfg.data.eval_split, batch_size=cfg.eval.batch_size, n_boot=max(cfg.eval.bootstrap, 1000),
                         prompts=cfg.eval.prompts, prompt_ensemble=cfg.eval.prompt_ensemble)
    print(message)
    timings.append(("register", time.time() - t))
    return DemoResult(cfg, report, trained, timings, uri)


def demo_config(config: str | None, workdir: str | Path, overrides=()) -> ExperimentConfig:
    """The config with corpus, shards and MLflow store inside `workdir`."""
    workdir = Path(workdir).resolve()
    return replace(load_config(config, overrides), tracking={"workdir": str(workdir)},
                   data={"corpus": str(workdir / "corpus"), "shards": str(workdir / "shards")})


def _shown(path: Path) -> str:
    """`path` relative to the current folder when it is inside it (what a user pastes), else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def run(args: argparse.Namespace) -> int:
    from vlp3d.platform.mlflow.registry import registered_name

    started = time.time()
    cfg = demo_config(args.config, args.workdir, args.overrides)
    Path(cfg.tracking.workdir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.tracking.workdir) / "config.toml").write_text(to_toml(cfg))  # what `vlp3d pretrain` re-runs
    result = run_pipeline(cfg, args.n, args.seed)
    report, trained, timings, uri = result.report, result.trained, result.timings, result.tracking_uri
    name = registered_name(cfg)
    total = time.time() - started
    m = report.result.metrics
    pool = int(m["retrieval_pool"])
    rows = [[stage, f"{seconds:.0f} s"] for stage, seconds in timings] + [["total", f"{total:.0f} s"]]
    print("\n" + format_table(rows, ["stage", "wall time"], title="demo summary"))
    print(format_table([
        ["zero-shot macro AUROC", f"{m['macro_auroc']:.3f} [{m.get('macro_auroc_ci_low', float('nan')):.3f}, "
                                  f"{m.get('macro_auroc_ci_high', float('nan')):.3f}]", "0.500"],
        ["volume->report R@1", f"{m['v2r/recall_at_1']:.3f}", f"{1 / pool:.3f}"],
        ["volume->report R@5", f"{m['v2r/recall_at_5']:.3f}", f"{min(1, 5 / pool):.3f}"],
        ["volume->report R@10", f"{m['v2r/recall_at_10']:.3f}", f"{min(1, 10 / pool):.3f}"],
    ], [f"metric (held-out, pool {pool})", "value", "chance"]))
    config = Path(cfg.tracking.workdir) / "config.toml"
    print(f"\nmodel:   models:/{name}@champion  (run {trained.run_id})")
    print(f"store:   {uri}; the next commands read it with --config {_shown(config)} "
          f"(or export {WORKDIR_ENV}={_shown(Path(cfg.tracking.workdir))})")
    print(f"next:    vlp3d evaluate --config {_shown(config)} --model models:/{name}@champion")
    print(f"browse:  mlflow ui --backend-store-uri {uri} --port 5000")
    print(f"load:    MLFLOW_TRACKING_URI={uri} python -c \"import mlflow; "
          f"m = mlflow.pyfunc.load_model('models:/{name}@champion'); "
          "print(m.predict({'report': ['There is a pleural effusion.']}))\"")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
