"""Pieces of the training worker's loop that need no Ray: the prefetch thread's data positions, the
device feed and the step-time split logged every log_every steps; and the loop failing cleanly on the
local runtime with a tiny random encoder on synthetic batches: divergence in one line, the skip counter
across a resume, the UniMedI centres after a NaN batch, SIGTERM/SIGINT ending KILLED with a final
checkpoint."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlp3d.config import load_config
from vlp3d.data.volume import PreprocessSpec
from vlp3d.train import checkpoint as checkpoints
from vlp3d.train import loop
from vlp3d.train.batches import to_model_batch
from vlp3d.train.feed import DeviceBatches, Prefetched
from vlp3d.train.loop import step_times
from vlp3d.train.runtime import CheckpointStore, LocalRuntime
from vlp3d.train.tasks.pretrain import PretrainTask

ROOT = Path(__file__).resolve().parents[2]


class SyntheticPretrain(PretrainTask):
    """Pretraining as the loop runs it (model, objective, optimizer, schedule, guards), fed random
    volumes and reports instead of shards; batch k is the same in every run."""

    def feeds(self, runtime, position, local_batch):
        def batches():
            done = position.setdefault("train", [0, 0])
            while True:
                generator = torch.Generator().manual_seed(done[1])
                batch = {"volume": torch.rand(local_batch, 1, *self.cfg.data.shape, generator=generator),
                         "report_embedding": torch.nn.functional.normalize(
                             torch.randn(local_batch, 384, generator=generator), dim=-1)}
                done[1] += 1
                yield batch

        return [batches()]


def synthetic_run(overrides=(), folder=None):
    """(task, runtime, cfg) of a tiny CLIP run on synthetic batches, checkpoints under `folder`."""
    cfg = load_config(None, ["data.shape=[16, 16, 16]", "train.global_batch=2", "cluster.num_workers=1",
                             "train.log_every=1", "train.warmup_steps=0", "train.augment=false", *overrides])
    spec = PreprocessSpec(shape=tuple(cfg.data.shape)).to_dict()
    task = SyntheticPretrain(cfg, {"spec": spec, "text_dim": 384, "label_names": []})
    return task, LocalRuntime({}, CheckpointStore(folder, "run", keep=5)), cfg


def _numbered(own, name="train"):
    """Endless batches 0, 1, 2, ... moving `own[name]` as `epoch_batches` does (4 batches an epoch)."""
    epoch, done = own.setdefault(name, [0, 0])
    index = epoch * 4 + done
    while True:
        index += 1
        own[name] = [index // 4, index % 4]
        yield {"image": torch.full((2, 3, 3, 3), index - 1, dtype=torch.uint8),
               "report_embedding": torch.full((2, 5), float(index - 1), dtype=torch.float16)}


def test_positions_move_when_a_batch_is_taken_for_training_not_when_it_is_read_ahead():
    position = {"train": [1, 2]}  # a resumed run: epoch 1, two batches of it done
    batches = Prefetched(_numbered, position, "train", depth=3)
    batch, after = batches.take()
    assert int(batch["image"][0, 0, 0, 0]) == 6 and after == [1, 3]
    assert position == {"train": [1, 2]}  # taken, not committed: a checkpoint now replays it
    batches.commit(after)
    assert position == {"train": [1, 3]}
    assert int(next(batches)["image"][0, 0, 0, 0]) == 7 and position == {"train": [2, 0]}


def test_a_failure_of_the_reading_thread_is_raised_by_the_next_blocking_take():
    def failing(own):
        own["train"] = [0, 1]
        yield {"image": torch.zeros(1, dtype=torch.uint8)}
        raise ValueError("rank 0 holds fewer rows than its batch")

    batches = Prefetched(failing, {}, "train", depth=2)
    next(batches)
    while batches.failed is None:  # the thread has put its error on the queue; a non-blocking take keeps it
        assert batches.take(block=False) is None
    with pytest.raises(ValueError, match="fewer rows"):
        next(batches)


def test_device_batches_on_cpu_are_to_model_batch_of_the_same_batches_in_order():
    device = torch.device("cpu")
    position = {}
    fed = DeviceBatches(Prefetched(_numbered, position, "train", depth=2), lambda h: to_model_batch(h, device), device)
    reference = _numbered({})
    for _ in range(5):
        batch, expected = next(fed), to_model_batch(next(reference), device)
        assert batch.keys() == expected.keys() and all(torch.equal(batch[k], expected[k]) for k in batch)
        assert batch["volume"].dtype == torch.float32 and batch["volume"].shape == (2, 1, 3, 3, 3)
    assert position == {"train": [1, 1]} and fed.stream is None and fed.ahead is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_batches_on_cuda_copy_the_next_batch_ahead_from_pinned_memory():
    device = torch.device("cuda")
    position = {}
    pinned = lambda own: ({k: v.pin_memory() for k, v in b.items()} for b in _numbered(own))  # noqa: E731
    fed = DeviceBatches(Prefetched(pinned, position, "train", depth=4), lambda h: to_model_batch(h, device), device)
    reference = _numbered({})
    for step in range(6):
        batch = next(fed)
        expected = to_model_batch(next(reference), torch.device("cpu"))
        assert all(torch.equal(batch[k].cpu(), expected[k]) for k in batch)
        assert batch["volume"].device.type == "cuda"
        assert position["train"] == [(step + 1) // 4, (step + 1) % 4]  # the batch ahead is not counted


def test_step_times_split_a_window_into_data_wait_and_compute():
    times = step_times(window_s=10.0, steps=4, data_wait_s=1.0)
    assert times == pytest.approx({"time/data_wait_s": 0.25, "time/compute_s": 2.25, "step_time_s": 2.5,
                                   "data_wait_share": 0.1})
    assert step_times(5.0, 0, 0.0) == {}  # only the compiling step in this window
    clamped = step_times(1.0, 1, 1.5)  # clock granularity: the wait never exceeds the window
    assert clamped["data_wait_share"] == 1.0 and clamped["time/compute_s"] == 0.0
    assert all(math.isfinite(v) for v in step_times(0.0, 1, 0.0).values())


def test_an_absurd_learning_rate_stops_the_run_as_diverged_in_one_line(tmp_path):
    """Before: the logit scale reached 0 and the temperature metric raised ZeroDivisionError (under Ray
    Train: a traceback, after the workers were restarted for nothing)."""
    task, runtime, cfg = synthetic_run(["train.lr=100", "train.seed=1", "train.max_steps=4"], tmp_path)
    result = loop.run(task, runtime, cfg)
    assert result.stopped == "diverged" and result.step == 1
    assert "\n" not in runtime.stopped and "training diverged at step 1: degenerate logit scale" in runtime.stopped
    assert "train.lr = 100" in runtime.stopped
    assert runtime.store.latest() is None  # nothing written from the diverged state


def test_the_skip_counter_survives_a_resume(tmp_path):
    """Batches are NaN from step 3 on; max_skipped_steps = 4. The first run ends at its max_steps = 4 with
    2 skips in a row in its checkpoint; resumed, it stops after 2 more (step 6). Before: the counter
    restarted at 0 and the resumed run skipped 4 more steps (to step 8)."""
    common = ["train.max_skipped_steps=4", "train.checkpoint_every=2"]
    task, runtime, cfg = synthetic_run([*common, "train.max_steps=4"], tmp_path)
    first = loop.run(task, runtime, cfg, loop.LoopOptions(faults="3:0:nan"))
    assert first.step == 4 and not first.stopped
    with runtime.store.latest_local() as folder:
        assert checkpoints.load_train_state(folder)["skipped_in_a_row"] == 2
    task, runtime, cfg = synthetic_run([*common, "train.max_steps=20"], tmp_path)
    resumed = loop.run(task, runtime, cfg, loop.LoopOptions(faults="3:0:nan"))
    assert resumed.stopped == "4 consecutive non-finite steps" and resumed.step == 6


def test_a_nan_batch_leaves_the_unimedi_centres_and_teacher_alone(tmp_path):
    """Before: UniMedI moved its DINO centres in forward, before the step was skipped: one NaN batch made
    them NaN, and every later step with them."""
    task, runtime, cfg = synthetic_run(["objective.name=unimedi", "model.size=tiny", "data.shape=[32, 32, 16]",
                                        "objective.unimedi.dino_dim=32", "train.max_steps=3",
                                        "train.checkpoint_every=3", "train.max_skipped_steps=3"], tmp_path)
    centres = []
    original = task.prepare_batch

    def one_nan_batch(batch, generator):  # the 2nd batch only (the fault drill poisons every later one)
        centres.append(task.module.objective.center_cls.clone())
        batch = original(batch, generator)
        if len(centres) == 2:
            loop._poison(batch, task.image_keys)
        return batch

    task.prepare_batch = one_nan_batch
    result = loop.run(task, runtime, cfg)
    objective = task.module.objective
    assert result.step == 3 and not result.stopped
    assert torch.isfinite(objective.center_cls).all() and torch.isfinite(objective.center_patch).all()
    assert not torch.equal(centres[0], centres[1])  # step 1 moved them
    with runtime.store.latest_local() as folder:
        assert checkpoints.load_train_state(folder)["skipped_steps"] == 1
        assert not checkpoints.nonfinite_parameters_in(folder)


CHILD = """
import json, sys
from tests.unit.test_train_loop import synthetic_run
from vlp3d.jobs.common import run_reporting_errors
from vlp3d.platform import launch
from vlp3d.platform.mlflow import store
from vlp3d.train import loop

folder, uri = sys.argv[1], sys.argv[2]
run_id = store.client(uri).create_run(store.client(uri).create_experiment("guards")).info.run_id
print(json.dumps({"run_id": run_id}), flush=True)
task, runtime, cfg = synthetic_run(["train.max_steps=100000", "train.checkpoint_every=100000"], folder)
original = task.prepare_batch

def announce(batch, generator):  # the parent signals once training is under way
    print("step", flush=True)
    return original(batch, generator)

task.prepare_batch = announce

def train(args):
    with launch.stop_on_signals(launch.killed_on_signal(uri, run_id, runtime.request_stop)):
        result = loop.run(task, runtime, cfg)
    finished = launch.Finished(runtime.last_checkpoint, runtime.last_metrics, runtime.stopped,
                               interrupted=result.interrupted)
    launch.end_interrupted(uri, run_id, "guards", finished)

sys.exit(run_reporting_errors(train, __import__("argparse").Namespace()))
"""


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_sigterm_and_sigint_end_the_run_killed_with_a_final_checkpoint(tmp_path, name, code):
    """What `ray job stop` (SIGTERM) and Ctrl-C (SIGINT) send to the driver. Before: SIGTERM left the
    MLflow run RUNNING and no checkpoint after the last periodic one."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "checkpoints"), uri], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_id = json.loads(child.stdout.readline())["run_id"]
        for _ in range(3):  # two steps done, the third under way
            assert child.stdout.readline().strip() == "step"
        child.send_signal(getattr(signal, name))
        _, err = child.communicate(timeout=300)
    finally:
        child.kill()
    assert child.returncode == code, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"stopped by {name}" in lines[0] and "Traceback" not in err
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"
    written = CheckpointStore(tmp_path / "checkpoints", "run").latest()
    assert written is not None  # the only checkpoint: the final one (checkpoint_every = 100000)
    state = checkpoints.load_train_state(written)
    assert state["step"] >= 2 and len(state["rng"]) == 1
