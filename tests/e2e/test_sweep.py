"""`vlp3d sweep` on Ray Tune over the session's tiny demo shards.

One sweep does the expensive part once: three trials run one at a time (a: lr 1e-3 on half the
data, b: lr 1e-2, stopped by ASHA at its first rung, c: lr 1e-3 on all the data). a and b run their
loop in the trial process (one worker each, tune.trial_runtime 'auto'). Its driver is a separate process, killed with SIGKILL while c trains; the sweep is then resumed in
this process; its report is re-fitted by `vlp3d sweep report`. Random and Optuna searches each complete a
one-trial sweep with intermediate reports. A fine-tuning sweep runs its trial on a Ray Train worker group
(Tune over Train).
"""

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.privacy_scan import assert_nothing_leaked, demo_needles, store_files
from vlp3d.config import ConfigError, load_config

NAME = "killed-sweep"
SWEEP = [
    "name=sweeptest", "train.max_steps=4", "train.global_batch=4", "train.log_every=1", "train.val_every=2",
    "train.checkpoint_every=2", "train.warmup_steps=2", "eval.bootstrap=10", "cluster.num_workers=1",
    "cluster.cpus_per_worker=0.5", "tune.max_concurrent_trials=1", "tune.fit_bootstrap=20",
    # ASHA on the learning rate (lower is better): a deterministic stand-in for a validation metric,
    # so that trial b, which follows a, is stopped at the step-2 rung whatever the losses do
    'tune.scheduler="asha"', 'tune.asha_metric="lr"', 'tune.asha_mode="min"', "tune.asha_grace_steps=2",
    'tune.variants={a = {"train.lr" = 0.001, "data.fraction" = 0.5}, b = {"train.lr" = 0.01, "data.fraction" = 0.5},'
    ' c = {"train.lr" = 0.001, "data.fraction" = 1.0}}',
]


def _wait_for_line(proc, pattern: str, timeout: float) -> str:
    """Read the driver's output until a line contains `pattern`; the output so far is returned."""
    lines: list[str] = []
    found = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if pattern in line:
                found.set()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)  # ends at the line, or when the process closes its output (it exited)
    if not found.is_set():
        proc.kill()
        pytest.fail(f"no line with {pattern!r} after {timeout} s:\n" + "".join(lines)[-6000:])
    return "".join(lines)


def _tune_saved_end_of(folder, trial_suffix: str, timeout: float) -> None:
    """Wait until Tune's saved experiment state (written at most every TUNE_GLOBAL_CHECKPOINT_S = 1 s) says
    trial `..._<suffix>` ended: a driver killed before that save would, on resume, rightly rerun the trial."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for path in folder.glob("experiment_state-*.json"):
            with contextlib.suppress(ValueError, KeyError, OSError):  # (a file being replaced)
                for state, _ in json.loads(path.read_text())["trial_data"]:
                    trial = json.loads(state)
                    if trial["trial_id"].endswith(trial_suffix) and trial["status"] == "TERMINATED":
                        return
        time.sleep(0.1)
    pytest.fail(f"Tune's state in {folder} never recorded the end of trial _{trial_suffix} within {timeout} s")


def _wait_for_free_cpus(ray, timeout: float = 60) -> float:
    total = ray.cluster_resources()["CPU"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if abs(ray.available_resources().get("CPU", 0) - total) < 1e-6:
            return total
        time.sleep(1)
    pytest.fail(f"CPUs not released: {ray.available_resources().get('CPU')} of {total} free after {timeout} s")


@pytest.fixture(scope="session")
def resumed_sweep(tiny_demo, ray_session, tmp_path_factory):
    """The sweep, killed while trial c trains and resumed here: (result, driver output, resume output)."""
    import ray

    from vlp3d.platform.sweep import run_sweep, stored_config

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "vlp3d.jobs.sweep", str(tiny_demo / "config.toml"), *SWEEP, "--name", NAME]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        before = _wait_for_line(proc, "_00002 step 2/4", timeout=300)
        _tune_saved_end_of(tiny_demo / "sweeps" / NAME, "00001", timeout=20)  # c still evaluates for ~10 s
    finally:
        with contextlib.suppress(ProcessLookupError):  # (gone already when it failed)
            os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-trial; Ray reaps its actors
        proc.wait(timeout=30)
    _wait_for_free_cpus(ray)
    started = time.time()
    cfg, name = stored_config(tiny_demo, NAME)
    assert name == NAME and stored_config("elsewhere", str(tiny_demo / "sweeps" / NAME))[1] == NAME
    log = tmp_path_factory.mktemp("resume") / "out.txt"
    handler, logger = logging.FileHandler(log), logging.getLogger("vlp3d")  # progress lines are log records
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        result = run_sweep(cfg, name=NAME, resume=True)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()
    return result, before, log.read_text(), time.time() - started


def test_resume_finishes_only_the_remaining_trial(resumed_sweep):
    result, before, after, _ = resumed_sweep
    assert "_00000 finished" in before and "_00001 stopped early at step 2" in before
    table = result.table.set_index("variant")
    assert table.loc["a", "status"] == "finished" and table.loc["c", "status"] == "finished"
    assert table.loc["b", "status"] == "stopped" and table.loc["b", "steps"] == 2
    assert "_00000 started" not in after and "_00001 started" not in after  # not rerun
    assert "_00002 finished" in after
    assert list(table["steps"]) == [4, 2, 4]
    assert table.loc["c", "n_train"] > table.loc["a", "n_train"] > 0  # nested fractions of the train split
    # every trial evaluated like `vlp3d evaluate`, the stopped one from its step-2 checkpoint
    assert table["macro_auroc"].between(0, 1).all() and (table["retrieval_pool"] > 0).all()
    assert table.loc["a", "val_loss"] > 0 and table.loc["a", "flops_per_step"] > 0
    assert table.loc["a", "train_flops"] == pytest.approx(4 * table.loc["a", "flops_per_step"])
    assert table.loc["a", "encoder_params"] == table.loc["c", "encoder_params"] > 0


def test_one_parent_run_and_one_child_run_per_trial(resumed_sweep, tiny_demo):
    result, *_ = resumed_sweep
    client = MlflowClient(tracking_uri=result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["vlp3d.sweep_parent"] == NAME
    assert "data.fraction" in parent.data.params["tune.variants"]
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 3  # the resumed trial reused its run; nothing duplicated
    assert set(result.table["mlflow_run_id"]) == {run.info.run_id for run in children}
    by_variant = {run.data.tags["variant"]: run for run in children}
    assert {v: r.info.status for v, r in by_variant.items()} == {"a": "FINISHED", "b": "KILLED", "c": "FINISHED"}
    assert by_variant["b"].data.tags["vlp3d.trial_status"] == "stopped"
    runtimes = {v: r.data.tags["vlp3d.runtime"] for v, r in by_variant.items()}
    assert runtimes == {"a": "local", "b": "local", "c": "local"}
    logged = [m.source_run_id for m in client.search_logged_models(experiment_ids=[parent.info.experiment_id])]
    for run in children:  # evaluated on both halves of the held-out patients: selection and report
        assert {"eval/valid_0-0.5/macro_auroc", "eval/valid_0.5-1/macro_auroc"} <= set(run.data.metrics)
        assert run.data.params["train.max_steps"] == "4"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")][0] == 2
        assert logged.count(run.info.run_id) == 1  # one model per trial, the stopped one's from its checkpoint
    steps = [m.step for m in client.get_metric_history(by_variant["a"].info.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4]  # trained once
    resumed = client.get_run(by_variant["c"].info.run_id)
    assert "resume-2.txt" in {a.path for a in client.list_artifacts(resumed.info.run_id)}  # from its checkpoint
    artifacts = {a.path for folder in ("sweep", "plots") for a in client.list_artifacts(parent.info.run_id, folder)}
    assert {"sweep/trials.csv", "sweep/trials.parquet", "sweep/fits.csv", "sweep/curves.csv", "sweep/report.txt",
            "plots/trials_auroc.png"} <= artifacts
    assert parent.data.metrics["trials_finished"] == 2 and parent.data.metrics["trials_stopped"] == 1


def test_the_sweep_store_holds_no_patient_data_or_secret(resumed_sweep, tiny_demo):
    """The demo's store after the sweep (parent run, trial runs, their models, trial table and plots):
    every byte searched as in test_fault_tolerance (tests/privacy_scan.py)."""
    files = store_files(tiny_demo / "mlflow.db", tiny_demo / "mlartifacts")
    assert {"trials.parquet", "trials_auroc.png"} <= {p.name for p in files}  # the sweep's artifacts are scanned
    assert assert_nothing_leaked(files, demo_needles(tiny_demo)) == len(files)


def test_the_report_says_what_it_selected_on_and_what_it_reports_on(resumed_sweep, tiny_demo, capsys):
    """Variants are never pooled into a law (so ASHA may stop trials here): no law, said in words; the report is
    on the test half of the held-out patients, selection on the other half; `vlp3d sweep report` re-fits it
    from what the sweep stored, without a trial."""
    from vlp3d.cli import main
    from vlp3d.jobs.sweep import render

    result, *_ = resumed_sweep
    assert (result.select_split, result.report_split) == ("valid[0:0.5]", "valid[0.5:1]")
    summary = render(result)
    assert "scaling laws: none" in summary and "best trial (selected on 'valid[0:0.5]'):" in summary
    assert "AUROC valid[0.5:1] [95% CI]" in summary
    assert pd.read_csv(result.folder / "fits.csv").empty
    table = pd.read_parquet(result.folder / "trials.parquet")
    assert {"trial_id", "status", "train.lr", "data.fraction", "n_train", "samples_seen", "epochs", "repeated",
            "trainable_params", "flops_per_step", "train_flops", "wall_s", "val_loss", "macro_auroc",
            "macro_auroc_ci_low", "select_macro_auroc", "macro_auroc_replicates", "v2r_r5",
            "mlflow_run_id"} <= set(table.columns)
    finished = table[table["status"] == "finished"]
    assert (finished["samples_seen"] == 16).all() and (finished["epochs"] > 0).all()
    assert (finished["macro_auroc_replicates"].map(len) == 10).all()  # eval.bootstrap resamples of the report split
    assert (result.folder / "plots" / "trials_auroc.png").stat().st_size > 10_000
    assert main(["sweep", "report", NAME, f"tracking.workdir={tiny_demo}"]) == 0
    out = capsys.readouterr().out
    assert f"sweep {NAME}: trials (selected on 'valid[0:0.5]', reported on 'valid[0.5:1]'" in out
    assert "selection on 'valid[0:0.5]'" in (result.folder / "report.txt").read_text()


def test_stopped_and_finished_trials_release_their_workers(resumed_sweep, ray_session):
    import ray

    assert _wait_for_free_cpus(ray, timeout=30) == 2


def test_bad_space_fails_before_any_trial(tiny_demo, ray_session, capsys):
    from vlp3d.cli import main
    from vlp3d.platform.sweep import run_sweep

    config = str(tiny_demo / "config.toml")
    cfg = load_config(config, ["name=badsweep", 'tune.space={"model.image_encoder" = ["resnet3d", "swin3d"]}'])
    with pytest.raises(ConfigError) as err:
        run_sweep(cfg, name="never-started")
    message = str(err.value)
    assert "model.image_encoder=swin3d" in message and "model.size = 'tiny'" in message
    assert "data.shape = (48, 48, 48)" in message and "multiples of 32" in message
    assert not (tiny_demo / "sweeps" / "never-started").exists()
    assert main(["sweep", config, 'tune.space={"data.fraction" = [0.5, 2.0]}']) == 2
    assert "data.fraction = 2.0 is out of range: must be in (0, 1]" in capsys.readouterr().err
    assert main(["sweep", config, "tune.asha_metric=\"val/auroc\"", 'tune.scheduler="asha"',
                 'tune.space={"train.seed" = [0, 1]}']) == 2
    assert "tune.asha_metric = 'val/auroc' is not a metric trials report" in capsys.readouterr().err
    assert main(["sweep", config, 'tune.scheduler="asha"', "train.val_every=2",
                 'tune.space={"train.max_steps" = [2, 4]}']) == 2
    assert "tune.scheduler = 'asha' with tune.space varying train.max_steps" in capsys.readouterr().err
    assert main(["sweep", config, 'tune.space={"train.max_steps" = [4, 8]}']) == 2  # the config warms up 20 steps
    assert "its schedule cannot reach its budget: train.warmup_steps = 20 >= train.max_steps = 4" in \
        capsys.readouterr().err
    assert main(["sweep", config, 'tune.report_split="valid"', 'tune.space={"train.lr" = [0.001]}']) == 2
    assert "data.eval_split = 'valid' and tune.report_split = 'valid'" in capsys.readouterr().err


def test_optuna_samples_the_space_and_its_absence_is_a_clear_error(monkeypatch, tiny_demo):
    from vlp3d.config import replace
    from vlp3d.platform.sweep import check_sweep, param_space, search_algorithm
    from vlp3d.search_space import parse_space

    cfg = replace(load_config(tiny_demo / "config.toml"), tune={
        "search": "optuna", "space": {"data.fraction": [0.5, 1.0], "train.lr": {"loguniform": [1e-4, 1e-2]}},
        "variants": {"a": {}, "b": {"train.seed": 1}}})
    space = parse_space(cfg.tune.space, cfg.tune.variants)
    searcher = search_algorithm(cfg, space)
    assert searcher.set_search_properties(None, None, param_space(space, "optuna"))  # grids became choices
    suggestion = searcher.suggest("trial-1")
    assert suggestion["data.fraction"] in (0.5, 1.0) and 1e-4 <= suggestion["train.lr"] <= 1e-2
    assert suggestion["variant"] in ("a", "b")
    searcher.on_trial_result("trial-1", {"step": 2, "val/loss": 2.0, "training_iteration": 1})  # no eval metric yet
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"pip install 'vlp3d\[optuna\]'"):
        check_sweep(cfg)


def test_concurrency_fills_the_cluster_and_keeps_a_cpu_for_data(monkeypatch):
    import ray

    from vlp3d.config import ExperimentConfig, replace
    from vlp3d.platform.sweep import concurrency

    cfg = replace(ExperimentConfig(), cluster={"num_workers": 2, "cpus_per_worker": 0.5})  # 1.1 CPUs a trial
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    assert concurrency(cfg, [cfg]) == 1  # this machine: one at a time, never zero
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 16.0})
    assert concurrency(cfg, [cfg]) == 57
    gpu = replace(cfg, cluster={"num_workers": 8, "cpus_per_worker": 4.0, "use_gpu": True})
    assert concurrency(cfg, [gpu]) == 1  # 32.1 CPUs a trial
    assert concurrency(replace(gpu, tune={"max_concurrent_trials": 3}), [gpu]) == 3
    small = replace(gpu, cluster={"num_workers": 4, "cpus_per_worker": 2.0})
    assert concurrency(small, [small]) == 4  # 16 GPUs / 4 per trial


def test_a_finetuning_sweep_runs_its_trials_on_ray_train(tiny_demo, ray_session):
    from vlp3d.platform.sweep import run_sweep
    from vlp3d.platform.sweep_results import table_column

    cfg = load_config(tiny_demo / "config.toml", [
        "name=ftsweep", 'tune.trial="finetune"', 'tune.metric="eval/mean_dice"', 'tune.trial_runtime="ray_train"',
        'tune.space={"finetune.init" = ["random"]}', "finetune.model=models:/vlp3d-clip@champion",
        "finetune.max_steps=2", "finetune.global_batch=2", 'finetune.classes=["lung"]', "finetune.roi_size=[16, 16, 16]",
        "train.checkpoint_every=2", "cluster.num_workers=1", "cluster.cpus_per_worker=0.5", "tune.max_concurrent_trials=1"])
    result = run_sweep(cfg, name="finetune-on-train", progress=lambda *_: None)
    [trial] = result.table.to_dict("records")
    column = table_column("eval/mean_dice")
    assert trial["status"] == "finished" and 0.0 <= trial[column] <= 1.0, trial
    run = MlflowClient(tracking_uri=result.tracking_uri).get_run(trial["mlflow_run_id"])
    assert run.data.tags["vlp3d.runtime"] == "ray_train" and run.data.tags["vlp3d.init"] == "random"
    assert run.data.tags["mlflow.parentRunId"] == result.parent_run_id
    with pytest.raises(ConfigError, match="tune.trial_runtime = 'local' runs a trial's loop in one process"):
        run_sweep(load_config(tiny_demo / "config.toml", ['tune.trial_runtime="local"', "cluster.num_workers=2",
                                                         'tune.space={"train.lr" = [0.001]}']), name="never")


@pytest.mark.parametrize("search", ["random", "optuna"])
def test_random_and_optuna_searches_complete_a_sweep_with_intermediate_reports(search, tiny_demo, ray_session):
    """One tiny trial per searcher (the grid is the resumed sweep above): validations at steps 1 and 2 reach
    Tune before the trial's evaluation, which Optuna used to fail on (a KeyError on eval/macro_auroc)."""
    from vlp3d.platform.sweep import run_sweep

    cfg = load_config(tiny_demo / "config.toml", [
        f"name=search-{search}", f'tune.search="{search}"', "tune.num_samples=1", "train.max_steps=2",
        "train.global_batch=4", "train.val_every=1", "train.checkpoint_every=2", "train.warmup_steps=1",
        "eval.bootstrap=10", "cluster.num_workers=1", "cluster.cpus_per_worker=0.5", "tune.max_concurrent_trials=1",
        "tune.fit_bootstrap=20", 'tune.space={"train.lr" = {loguniform = [1e-4, 1e-3]}}'])
    result = run_sweep(cfg, name=f"search-{search}", progress=lambda *_: None)
    [trial] = result.table.to_dict("records")
    assert trial["status"] == "finished" and 1e-4 <= trial["train.lr"] <= 1e-3
    results = [json.loads(line) for line in next(result.folder.glob("*/result.json")).read_text().splitlines()]
    assert sum("val/loss" in r for r in results) >= 2 and sum("eval/macro_auroc" in r for r in results) == 1
