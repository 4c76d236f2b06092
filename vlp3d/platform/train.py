"""`vlp3d pretrain`: Ray Train TorchTrainer (DDP) over the shards, metrics and checkpoints via Ray,
run tracked in MLflow (params/tags/artifacts from the driver, metrics from rank 0)."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from vlp3d import checkpoint as checkpoints
from vlp3d import logs, storage
from vlp3d.config import ExperimentConfig, from_dict, to_dict
from vlp3d.data.shards import read_manifest, resolve_shard_dir, spec_from_config
from vlp3d.encoders.export import count_parameters
from vlp3d.engine import (
    AUTOCAST_DTYPES,
    TermBalancer,
    augment_batch,
    build_optimizer,
    build_pretrainer,
    build_scheduler,
    check_encoder_input,
    compile_errors,
    compile_image_encoder,
    drop_sentences,
    term_weights,
    to_model_batch,
    train_step,
)
from vlp3d.objectives import objective_class
from vlp3d.platform import tracking
from vlp3d.platform.runtime import checkpoint_location, init_ray, run_storage

# fault drills and tests: "STEP[:RANK[:raise|kill|nan]]", comma-separated (RANK default: the last
# worker). raise and
# kill (SIGKILL of the worker process) fire once per run and rank (a marker file in the temp dir);
# nan makes that rank's image input NaN from STEP on.
FAULT_ENV = "VLP3D_INJECT_FAULT"
VALIDATION_SEED = 20_251_129  # same masks, crops and corruptions at every validation: comparable curves
SHUFFLE_BUFFER_BYTES = 256 * 2**20  # per worker, of stored rows
FLUSH_AT_CHECKPOINT_S = 2.0  # how long a checkpoint waits for unsent MLflow metrics (they are saved with it)

log = logging.getLogger(__name__)


class NonFiniteTrainingError(FloatingPointError):
    """Training stopped: too many consecutive non-finite steps, or non-finite weights."""

    exit_code = 1


@dataclass
class PretrainResult:
    run_id: str
    run_name: str
    checkpoint_dir: Path | str  # a URI when tracking.storage is one
    shard_dir: Path | str  # a URI when data.shards is one
    model_uri: str  # registered version, models:/NAME/VERSION
    metrics: dict
    elapsed_s: float


def data_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of one rank's pass over its shard in one epoch: shuffle order and T3D crops depend
    on (train.seed, rank, epoch) only, so a resumed run replays an epoch exactly."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


def epoch_batches(shard, position: dict[str, list[int]], name: str, batch_size: int, seed: int, rank: int,
                  collate_for=None, shuffle_rows: int = 0, pin_memory: bool = False):
    """Endless batches of a Ray Train dataset shard, epoch after epoch. `position[name]` =
    [epoch, batches of it consumed] always names the next batch, so the checkpoint a resumed
    run starts from says where to continue: the epoch is replayed with its seed and the batches
    already trained on are skipped. Rows are shuffled in a buffer of `shuffle_rows` (at least 4
    batches): Ray Data hands each worker the same blocks in the same order every epoch (the price
    of determinism), so the buffer is what mixes an epoch's batches. Batches stay in host memory
    (`DeviceBatches` copies them to the device), page-locked with `pin_memory` (by Ray, in its
    collate threads) so that those copies can run asynchronously."""
    while True:
        epoch, done = position.setdefault(name, [0, 0])
        epoch_seed = data_seed(seed, rank, epoch)
        found = 0
        for index, batch in enumerate(shard.iter_torch_batches(
                batch_size=batch_size, drop_last=True, local_shuffle_buffer_size=max(4 * batch_size, shuffle_rows),
                local_shuffle_seed=epoch_seed, collate_fn=collate_for(epoch_seed) if collate_for else None,
                device="cpu", pin_memory=pin_memory)):
            found += 1
            if index < done:
                continue
            position[name] = [epoch, index + 1]
            yield batch
        if not found:
            raise ValueError(f"dataset '{name}': rank {rank} holds fewer rows than its batch of {batch_size}; "
                             "lower train.global_batch or cluster.num_workers, or add data.")
        position[name] = [epoch + 1, 0]


class Prefetched:
    """`epoch_batches` run `depth` batches ahead in a background thread, so that reading, shuffling
    and collating the next batches (and the shuffle buffer's refill at each epoch start) overlap the
    training step. Each batch travels with the data position after it, which is written to the
    shared `position` only when the batch is taken: a checkpoint never counts batches still queued."""

    def __init__(self, make_batches, position: dict[str, list[int]], name: str, depth: int):
        import queue
        import threading

        self.position, self.name, self.failed = position, name, None
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        own = {name: list(position[name])} if name in position else {}

        def produce() -> None:
            try:
                for batch in make_batches(own):
                    self.queue.put((batch, list(own[name])))
            except BaseException as err:  # noqa: BLE001 - handed to the training loop
                self.queue.put(err)

        threading.Thread(target=produce, name=f"prefetch-{name}", daemon=True).start()

    def __iter__(self):
        return self

    def __next__(self):
        batch, after = self.take()
        self.commit(after)
        return batch

    def take(self, block: bool = True):
        """(batch, data position after it) without moving `position` (see `commit`); None when not
        blocking and no batch is ready. A failure of the reading thread is raised by a blocking take."""
        import queue

        if self.failed is None:
            try:
                item = self.queue.get(block=block)
            except queue.Empty:
                return None
            if not isinstance(item, BaseException):
                return item
            self.failed = item
        if not block:
            return None
        raise self.failed

    def commit(self, after: list[int]) -> None:
        """The batch taken with this position is being trained on: checkpoints continue after it."""
        self.position[self.name] = after


class DeviceBatches:
    """Model batches on `device` (`convert`: host batch -> `to_model_batch` on the device) from a
    `Prefetched`. On CUDA the host batches are pinned and the next batch's host-to-device copy (and
    dequantisation) is issued on a side stream while the current step computes: the compute stream
    waits for it when the batch is taken (`wait_stream`), and `record_stream` keeps the caching
    allocator from reusing its memory before the compute stream is done with it. Its data position
    is committed only when it is taken, so checkpoints never skip it. On CPU: `convert` of the next
    batch, nothing ahead (the same batches, in the same order, as without this class)."""

    def __init__(self, batches: Prefetched, convert, device: torch.device):
        self.batches, self.convert, self.device = batches, convert, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ahead = None  # (batch on the device, data position after it)

    def __iter__(self):
        return self

    def _issue(self, block: bool):
        item = self.batches.take(block)
        if item is None:
            return None
        host, after = item
        with torch.cuda.stream(self.stream):
            return self.convert(host), after

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.stream is None:
            return self.convert(next(self.batches))
        batch, after = self.ahead or self._issue(block=True)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.stream)
        for tensor in batch.values():
            tensor.record_stream(compute)
        self.batches.commit(after)
        self.ahead = self._issue(block=False)  # when the reading thread has it ready: no waiting here
        return batch


def shuffle_rows(shard_dir: Path | str, manifest: dict) -> int:
    """Rows of the training shuffle buffer per worker: as many as fit in SHUFFLE_BUFFER_BYTES at the
    shards' average row size (every row of a small corpus: a full shuffle each epoch)."""
    from vlp3d.data.shards import shard_files

    files = shard_files(shard_dir, "ct")
    rows = max(1, int(manifest["counts"].get("by_modality", {}).get("ct", manifest["counts"]["written"])))
    row_bytes = max(1.0, sum(storage.file_sizes(files)) / rows)
    return int(SHUFFLE_BUFFER_BYTES // row_bytes)


def parse_faults(spec: str, world_size: int) -> list[tuple[int, int, str]]:
    """FAULT_ENV "STEP[:RANK[:raise|kill|nan]]", comma-separated -> [(step, rank, mode)]."""
    faults = []
    for item in filter(None, spec.split(",")):
        parts = item.split(":")
        mode = parts[2] if len(parts) > 2 else "raise"
        if mode not in ("raise", "kill", "nan"):
            raise ValueError(f"{FAULT_ENV}={spec!r}: the mode of {item!r} must be raise, kill or nan")
        faults.append((int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1] else world_size - 1, mode))
    return faults


def _poison(batch: dict) -> None:
    """Fault drill `nan`: the image input of this batch becomes NaN (the loss follows)."""
    for key in ("volume", "crops", "image_2d"):
        if key in batch:
            batch[key] = batch[key] * float("nan")
            return


def _inject_fault(fault: tuple[int, int, str], step: int, rank: int, run_id: str) -> None:
    """Fault drills: raise, or SIGKILL this worker process, at the given step and rank, once per run."""
    import signal

    at, target, mode = fault
    if step != at or rank != target or mode == "nan":
        return
    marker = Path(tempfile.gettempdir(), f"vlp3d-fault-{run_id}-{step}-{rank}")
    if marker.exists():
        return
    marker.touch()
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected worker failure at step {step} on rank {rank} ({FAULT_ENV})")


def _gather(obj) -> list:
    """`obj` of every rank, by rank (one process: [obj])."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: plain PyTorch plus prepare_model / get_dataset_shard / report."""
    import ray.train
    import ray.train.torch

    logs.configure(loop_config.get("log_level"))
    if not logs.is_debug():
        _quiet_train_reports()
    cfg = from_dict(loop_config["experiment"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    if not cfg.cluster.use_gpu:
        torch.set_num_threads(max(1, math.floor(cfg.cluster.cpus_per_worker)))
    device = ray.train.torch.get_device()

    pretrainer, weights = build_pretrainer(cfg, text_dim=loop_config["text_dim"])
    pretrainer.to(device)
    optimizer = build_optimizer(pretrainer, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler() if cfg.train.precision == "fp16" else None
    generator = torch.Generator()  # augmentation
    state = checkpoints.TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = checkpoints.restore(folder, pretrainer.model, pretrainer.objective, optimizer, scheduler,
                                        scaler, map_location=device)
    if len(state.rng) == world_size:
        checkpoints.restore_rng(state.rng[rank], generator)
    else:
        if state.rng and rank == 0:
            log.warning(f"checkpoint of step {state.step} was written by {len(state.rng)} workers, this run has "
                        f"{world_size}: random streams re-seeded (the run continues, not bit-exactly)")
        checkpoints.seed_everything(cfg.train.seed * 1000 + rank + state.step, generator)
    step = resumed_from = state.step
    balancer = TermBalancer(weights, cfg.train.grad_share_every, cfg.train.balance_terms)
    balancer.load_state_dict(state.term_multipliers)
    # e.g. UniMedI's 2D tokenizer gets no gradient in a 3D-only batch (and vice versa)
    unused = pretrainer.objective.find_unused_parameters(weights, pretrainer.model.image_encoder)
    if cfg.model.compile:  # before the DDP wrapper; the first step compiles (timed apart: train/compile_s)
        compile_image_encoder(pretrainer.model)
    module = ray.train.torch.prepare_model(pretrainer, parallel_strategy_kwargs={"find_unused_parameters": unused})
    unwrapped = module.module if hasattr(module, "module") else module
    encoder_params = [p for p in unwrapped.model.image_encoder.parameters() if p.requires_grad]

    # reported to Ray/Tune with every result, logged to MLflow once as params (not a per-step curve)
    compute = {"encoder_params": count_parameters(pretrainer.model.image_encoder),
               "trainable_params": count_parameters(pretrainer, trainable_only=True), "flops_per_step": 0}
    logger = tracking.RankZeroLogger(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None
    if logger:
        logger.requeue(state.unsent_logs)  # what the previous rank 0 could not send before it stopped
        if step:
            logger.log_text(f"resumed from checkpoint at step {step}\n", f"resume-{step}.txt")
        else:
            logger.log_params({f"loss_weight/{term}": weight for term, weight in weights.items()})
    local_batch = cfg.train.global_batch // world_size
    print_every = max(cfg.train.log_every, cfg.train.max_steps // 20 // cfg.train.log_every * cfg.train.log_every)
    spec = loop_config["meta"]["spec"]
    position = state.position
    train_shard, collate_for = ray.train.get_dataset_shard("train"), pretrainer.objective.collate(cfg, spec)
    pin = device.type == "cuda"  # page-locked host batches: asynchronous copies to the GPU
    batches = DeviceBatches(
        Prefetched(lambda own: epoch_batches(train_shard, own, "train", local_batch, cfg.train.seed, rank,
                                             collate_for=collate_for, shuffle_rows=loop_config.get("shuffle_rows", 0),
                                             pin_memory=pin),
                   position, "train", cfg.train.prefetch_batches),
        lambda host: to_model_batch(host, device), device)
    batches_2d = None
    if loop_config.get("has_2d"):
        shard_2d = ray.train.get_dataset_shard("train_2d")
        batches_2d = DeviceBatches(
            Prefetched(lambda own: epoch_batches(shard_2d, own, "train_2d", local_batch, cfg.train.seed, rank,
                                                 pin_memory=pin),
                       position, "train_2d", cfg.train.prefetch_batches),
            lambda host: to_model_batch({"image_2d": host["image"], "report_embedding_2d": host["report_embedding"]},
                                        device), device)
    valid = ray.train.get_dataset_shard("valid") if loop_config.get("has_valid") else None
    faults = parse_faults(loop_config.get("inject_fault", ""), world_size)
    window: list[dict] = []
    in_a_row = 0
    # throughput and step times leave out the step that compiles (model.compile): train/compile_s
    compiling, compile_s = cfg.model.compile, None
    started, samples, timed_steps = time.time(), 0, 0
    # this window's wall time, steps and data wait (time in next(batches)); CUDA is synchronised at log points only
    window_started, window_steps, data_wait = time.perf_counter(), 0, 0.0
    while step < cfg.train.max_steps:
        waited = time.perf_counter()
        batch = next(batches)
        if batches_2d is not None:
            batch.update(next(batches_2d))
        fetched = time.perf_counter()
        data_wait += fetched - waited
        if cfg.train.augment:
            augment_batch(batch, generator)
        if cfg.train.sentence_dropout and "sentence_embeddings" in batch:
            batch["report_embedding"] = drop_sentences(batch["sentence_embeddings"], batch["sentence_mask"],
                                                       cfg.train.sentence_dropout, generator)
        if any(mode == "nan" and rank == target and step + 1 >= at for at, target, mode in faults):
            _poison(batch)
        module.train()
        # FLOPs of one step (forward + backward, matmuls/convs/attention), counted by torch on rank 0
        # (not on the compiling step: a first call under FlopCounterMode would leave the encoder eager)
        counter = (FlopCounterMode(display=False) if rank == 0 and not compute["flops_per_step"] and not compiling
                   else None)
        effective = balancer.effective()  # the weights of this step (balancing moves them after it)
        with counter or contextlib.nullcontext(), compile_errors():
            metrics = train_step(module, effective, batch, optimizer, scheduler, cfg.train.precision, scaler,
                                 after_step=functools.partial(unwrapped.after_step, step + 1),
                                 measure_params=encoder_params if balancer.due(step + 1) else None)
        term_norms = metrics.pop("term_norms", None)
        if counter is not None:
            compute["flops_per_step"] = counter.get_total_flops() * world_size
            if logger and not resumed_from:  # MLflow params are write-once
                logger.log_params({f"compute/{k}": v for k, v in compute.items()})
        step += 1
        if compiling:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            compiling, compile_s = False, time.perf_counter() - fetched
            started, window_started, window_steps, data_wait = time.time(), time.perf_counter(), 0, 0.0
        else:
            samples += local_batch * world_size
            timed_steps += 1
            window_steps += 1
        for fault in faults:
            _inject_fault(fault, step, rank, loop_config["run_id"])
        if metrics.pop("skipped"):
            state.skipped_steps += 1
            in_a_row += 1
            what = ", ".join(metrics["nonfinite"])
            if logger:
                log.warning(f"step {step}: non-finite {what}; step skipped on every worker ({in_a_row} in a row, "
                            f"{state.skipped_steps} in all)")
            if in_a_row >= cfg.train.max_skipped_steps:
                _stop(loop_config, logger, f"training stopped at step {step}: {in_a_row} consecutive steps had a non-finite "
                      f"loss or gradient (train.max_skipped_steps = {cfg.train.max_skipped_steps}); non-finite at "
                      f"the last one: {what}. Lower train.lr, use train.precision = \"fp32\" or \"bf16\", or check "
                      "the data; the last checkpoint holds finite weights.")
                return
        else:
            in_a_row = 0
            metrics.update({f"weighted/{t}": effective[t] * metrics[f"loss/{t}"] for t in effective
                            if f"loss/{t}" in metrics})
            if term_norms:
                metrics.update(balancer.update(term_norms))
            window.append(metrics)
        last = step >= cfg.train.max_steps
        validate = valid is not None and (last or (cfg.train.val_every and step % cfg.train.val_every == 0))
        if step % cfg.train.log_every == 0 or last or validate:
            metrics = window_means(window)
            metrics["skipped_steps"] = state.skipped_steps
            metrics["temperature"] = 1.0 / unwrapped.model.scale().item()
            if compile_s is not None:  # once, at the first log point after the compiling step
                metrics["compile_s"], compile_s = compile_s, None
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the window's queued GPU work counts as its compute
            metrics.update(step_times(time.perf_counter() - window_started, window_steps, data_wait))
            if timed_steps:
                metrics["samples_per_s"] = samples / max(1e-9, time.time() - started)
            window.clear()
            window_started, window_steps, data_wait = time.perf_counter(), 0, 0.0
            if validate:
                metrics.update(validation_loss(module, weights, valid, cfg, spec, local_batch, device))
            if logger:
                logger.log_metrics({(k if k.startswith("val/") else f"train/{k}"): v
                                    for k, v in metrics.items()}, step)
                if loop_config.get("print_progress", True) and (step % print_every == 0 or last) and "loss" in metrics:
                    log.info(progress_line(step, cfg.train.max_steps, metrics, weights,
                                           eta_s=(time.time() - started) / timed_steps * (cfg.train.max_steps - step)
                                           if timed_steps else math.inf))
            metrics.update(compute, step=step)
            if step % cfg.train.checkpoint_every == 0 or last:
                bad = checkpoints.nonfinite_parameters(unwrapped)  # the same on every rank (DDP)
                if bad:
                    _stop(loop_config, logger, f"training stopped at step {step}: non-finite weights in {', '.join(bad[:5])}; "
                          "no checkpoint was written from them (the last checkpoint holds finite weights).")
                    return
                state.step, state.position = step, {k: list(v) for k, v in position.items()}
                state.term_multipliers = balancer.state_dict()
                state.rng = _gather(checkpoints.capture_rng(generator))
                with tempfile.TemporaryDirectory() as tmp:
                    ckpt = None
                    if rank == 0:
                        logger.flush(FLUSH_AT_CHECKPOINT_S)
                        state.unsent_logs = logger.pending()
                        checkpoints.save(tmp, unwrapped.model, unwrapped.objective, optimizer, scheduler, scaler,
                                         state, cfg, loop_config["meta"])
                        ckpt = ray.train.Checkpoint.from_directory(tmp)
                    ray.train.report(metrics, checkpoint=ckpt)
            elif validate:
                # Ray Train's report waits for its controller to collect the previous one (every
                # ~2 s): reporting every logged step measured 2.0 s/step against 0.33 s without.
                # MLflow gets every logged step from the rank-0 logger; Ray (and Tune's schedulers,
                # which stop trials on val/loss) gets checkpoints and validations.
                ray.train.report(metrics)


def step_times(window_s: float, steps: int, data_wait_s: float) -> dict[str, float]:
    """A logging window's step-time split, averaged over its `steps` timed steps: `time/data_wait_s`
    (waiting for the next batch: reading, collation and copy to the device not hidden by the
    prefetch), `time/compute_s` (the rest of the step: augmentation, forward, backward, optimizer,
    logging), `step_time_s` (their sum) and `data_wait_share` (of the window's wall time). Empty
    for a window without timed steps (only the compiling step)."""
    if steps <= 0:
        return {}
    window_s = max(1e-9, window_s)
    data_wait_s = min(data_wait_s, window_s)
    return {"time/data_wait_s": data_wait_s / steps, "time/compute_s": (window_s - data_wait_s) / steps,
            "step_time_s": window_s / steps, "data_wait_share": data_wait_s / window_s}


def window_means(window: list[dict]) -> dict[str, float]:
    """Each metric's mean over the steps of a logging window that have it (per-term gradient shares
    exist on measured steps only)."""
    keys = dict.fromkeys(k for m in window for k in m)
    return {k: sum(m[k] for m in window if k in m) / sum(k in m for m in window) for k in keys}


def progress_line(step: int, max_steps: int, metrics: dict, weights: dict[str, float], eta_s: float) -> str:
    """One line of training progress: step, loss and its terms, validation loss, learning rate,
    throughput, the share of wall time spent waiting for data, and the time left."""
    terms = " ".join(f"{t} {metrics[f'loss/{t}']:.3g}" for t in weights if f"loss/{t}" in metrics)
    parts = [f"step {step:>{len(str(max_steps))}}/{max_steps}",
             f"loss {metrics['loss']:.4f}" + (f" ({terms})" if terms and len(weights) > 1 else "")]
    if "val/loss" in metrics:
        parts.append(f"val {metrics['val/loss']:.4f}")
    parts.append(f"lr {metrics['lr']:.1e}")
    if "samples_per_s" in metrics:
        parts.append(f"{metrics['samples_per_s']:.1f} samples/s")
    if "data_wait_share" in metrics:
        parts.append(f"data wait {metrics['data_wait_share']:.0%}")
    if step < max_steps and math.isfinite(eta_s):
        parts.append(f"ETA {_duration(eta_s)}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _stop(loop_config: dict, logger, message: str) -> None:
    """Every rank ends its loop together (the decision is the same on all of them); rank 0 leaves
    `message` with the run's notes, from which the driver fails the run. (A raise would make Ray
    Train restart the group and hit the same wall until max_failures is spent.)"""
    if logger:
        import ray

        log.error(message)
        logger.log_text(message + "\n", "stopped.txt")
        logger.flush(30.0)
        ray.get(loop_config["notes"].stop.remote(message))


def _run_notes():
    """A small actor the workers tell why they stopped early (Ray Train's result only keeps what
    was reported with a checkpoint)."""
    import ray

    @ray.remote(num_cpus=0)
    class RunNotes:
        def __init__(self):
            self.stopped = ""

        def stop(self, message: str) -> None:
            self.stopped = message

        def get(self) -> str:
            return self.stopped

    return RunNotes.remote()


def _quiet_train_reports() -> None:
    """Ray Train 2.60 logs every report of every worker at INFO through a logger named after its
    module's file, which `RunConfig.logging_config` does not reach; keep those lines out of the log."""
    import logging

    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def validation_loss(module, weights: dict[str, float], shard, cfg: ExperimentConfig, manifest_spec: dict,
                    local_batch: int, device: torch.device) -> dict[str, float]:
    """`val/loss` (weighted, as trained) and `val/loss/<term>` on this worker's part of the held-out
    split, averaged over volumes and workers. Every worker holds as many rows (Ray's equal split),
    so the objectives' collectives line up; masks and crops are drawn from a fixed seed each time."""
    import torch.distributed as dist

    module.eval()
    names = list(weights)
    sums = torch.zeros(len(names) + 2, dtype=torch.float64)  # weighted loss, terms, volumes
    collate_for = objective_class(cfg.objective.name).collate(cfg, manifest_spec)
    collate = collate_for(VALIDATION_SEED) if collate_for else None
    devices = [device] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(VALIDATION_SEED)
        for batch in shard.iter_torch_batches(batch_size=local_batch, drop_last=False, collate_fn=collate):
            batch = to_model_batch(batch, device)
            rows = len(next(iter(batch.values())))
            if rows < 2:  # a contrastive loss needs a negative; equal splits make this the same on every rank
                continue
            with torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(cfg.train.precision, torch.float32),
                                enabled=cfg.train.precision in AUTOCAST_DTYPES):
                terms = module(batch)
            values = [float(terms[n]) for n in names]
            sums += torch.tensor([sum(weights[n] * v for n, v in zip(names, values, strict=True)), *values, 1.0],
                                 dtype=torch.float64) * rows
    module.train()
    if dist.is_available() and dist.is_initialized():
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    volumes = float(sums[-1])
    if not volumes:
        return {}
    out = {"val/loss": float(sums[0]) / volumes}
    out.update({f"val/loss/{n}": float(sums[i + 1]) / volumes for i, n in enumerate(names)})
    return out


def _training_dataset(cfg: ExperimentConfig, shard_dir: Path | str, modality: str = "ct", held_out: bool = False,
                      columns: Sequence[str] | None = None):
    """The columns the objective reads (`Objective.columns`, or `columns`): the training split's
    `data.fraction` subset, or (`held_out`) the first `train.val_volumes` rows of `data.eval_split`
    for the validation loss."""
    import ray
    from ray.data.expressions import col

    from vlp3d.data.shards import shard_files

    files = shard_files(shard_dir, modality)
    if not files:
        return None
    if columns is None:
        columns = objective_class(cfg.objective.name).columns if modality == "ct" else ("image", "report_embedding")
        if cfg.train.sentence_dropout and modality == "ct" and not held_out:  # re-averaged per step
            columns = (*columns, *(c for c in ("sentence_embeddings", "sentence_mask") if c not in columns))
    columns = list(columns)
    fs, paths = storage.for_reading(files)
    ds = ray.data.read_parquet(paths, columns=columns + ["split", "fraction_rank"], filesystem=fs)
    if held_out:
        ds = ds.filter(expr=col("split") == cfg.data.eval_split)
        if cfg.train.val_volumes:
            ds = ds.limit(cfg.train.val_volumes)
    else:
        ds = ds.filter(expr=col("split") == cfg.data.train_split)
        if cfg.data.fraction < 1.0:
            ds = ds.filter(expr=col("fraction_rank") < cfg.data.fraction)
    ds = ds.select_columns(columns)
    if cfg.data.materialize == "never":
        return ds
    size = sum(storage.file_sizes(files))
    budget = ray.available_resources().get("object_store_memory", 0) / 4
    if cfg.data.materialize == "always" or size * 2 < budget:
        return ds.materialize()
    return ds


def preflight(cfg: ExperimentConfig) -> tuple[Path | str, dict]:
    """Every check a run can fail before Ray starts (shards for this preprocessing spec, what the
    objective reads, batch split, encoder input, loss weights); returns (shard folder, manifest)."""
    if not cfg.data.shards:
        raise ValueError("data.shards is empty: set it to the folder `vlp3d prepare --out` wrote.")
    spec = spec_from_config(cfg)
    shard_dir = resolve_shard_dir(cfg.data.shards, spec.hash)
    manifest = read_manifest(shard_dir)
    if not manifest["spec"].get("text_embeddings"):
        raise ValueError(f"{shard_dir}: shards hold no report embeddings; prepare with data.text_embeddings=true.")
    if cfg.train.global_batch % cfg.cluster.num_workers:
        raise ValueError(f"train.global_batch={cfg.train.global_batch} must be divisible by "
                         f"cluster.num_workers={cfg.cluster.num_workers}.")
    objective_class(cfg.objective.name).check_shards(cfg, manifest["spec"], shard_dir)
    check_encoder_input(cfg)
    term_weights(cfg)
    return shard_dir, manifest



def torch_trainer(cfg: ExperimentConfig, loop, run_name: str, datasets: dict, callbacks: Sequence = (),
                  loop_config: dict | None = None):
    """The TorchTrainer of a pretraining or fine-tuning run: `cluster.num_workers` DDP workers of
    `cluster.cpus_per_worker` CPUs, run state and checkpoints on `tracking.storage`, `train.max_failures`
    restores, `train.keep_checkpoints` kept, and Ray Data in a fixed order (no locality reordering: the
    same blocks reach the same worker in every run and after every restart, which exact resume and
    reproducible runs rely on)."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    storage_path, storage_filesystem = run_storage(cfg)
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
            resources_per_worker={"CPU": cfg.cluster.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=list(callbacks),
            # Train's INFO lines (one per report and worker) would bury vlp3d's progress lines
            logging_config=ray.train.LoggingConfig(log_level="INFO" if logs.is_debug() else "WARNING"),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )


def pretrain(cfg: ExperimentConfig, run_name: str | None = None, progress=log.info, callbacks: Sequence = (),
             parent_run_id: str | None = None, register: bool = True, tags: dict[str, str] | None = None
             ) -> PretrainResult:
    """Train `cfg` on Ray; re-running with the same `run_name` resumes from its last checkpoint.

    Sweeps pass Ray Train `callbacks` (Tune's report callback), the MLflow `parent_run_id` and
    extra `tags` of the trial's child run, `register=False` (the model is logged, not registered)
    and `progress=None` (no progress lines, from here or from the rank-0 worker).
    """
    logs.ensure_configured()
    import ray

    started = time.time()
    shard_dir, manifest = preflight(cfg)
    init_ray(cfg)
    run_name = run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    extra_tags = dict(tags or {})
    if parent_run_id:
        extra_tags["mlflow.parentRunId"] = parent_run_id
    run_id = tracking.start_or_resume_run(cfg, run_name, manifest, shard_dir, extra_tags)
    text_dim = int(manifest["text_dim"])
    meta = {"spec": manifest["spec"], "spec_hash": manifest["spec_hash"], "label_names": manifest["label_names"],
            "text_dim": text_dim, "mlflow_run_id": run_id}
    datasets = {"train": _training_dataset(cfg, shard_dir)}
    if datasets["train"] is None:
        raise ValueError(f"{shard_dir}: no CT shard files; re-run `vlp3d prepare`.")
    # the validation loss needs at least two held-out volumes per worker (a negative for InfoNCE)
    if manifest["counts"]["by_split"].get(cfg.data.eval_split, 0) >= 2 * cfg.cluster.num_workers:
        datasets["valid"] = _training_dataset(cfg, shard_dir, held_out=True)
    if objective_class(cfg.objective.name).uses_2d:
        xray = _training_dataset(cfg, shard_dir, "xray")
        if xray is not None:
            datasets["train_2d"] = xray
    notes = _run_notes()
    trainer = torch_trainer(
        cfg, train_loop_per_worker, run_name, datasets, callbacks,
        {"experiment": to_dict(cfg), "tracking_uri": tracking.uri(cfg), "run_id": run_id,
         "text_dim": text_dim, "meta": meta, "has_2d": "train_2d" in datasets,
         "has_valid": "valid" in datasets, "print_progress": progress is not None,
         "log_level": logs.level_name(),
         "inject_fault": os.environ.get(FAULT_ENV, ""), "notes": notes,
         "shuffle_rows": shuffle_rows(shard_dir, manifest)})
    if progress is not None:
        progress(f"training {cfg.train.max_steps} steps on {cfg.cluster.num_workers} workers "
                 f"(global batch {cfg.train.global_batch}); run {run_name}")
    uri = tracking.uri(cfg)
    try:
        result = trainer.fit()
    except BaseException as err:  # a failed (or interrupted) run is never left RUNNING in MLflow
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        tracking.end_run_quietly(uri, run_id, status, f"{type(err).__name__}: {err}")
        raise
    metrics = dict(result.metrics or {})
    checkpoint_dir = checkpoint_location(cfg, result.checkpoint.path) if result.checkpoint is not None else None
    with contextlib.ExitStack() as stack:
        # a checkpoint on remote storage (tracking.storage = URI) is read from a local download
        local = stack.enter_context(result.checkpoint.as_directory()) if result.checkpoint is not None else None
        if local is not None:  # what rank 0 could not deliver to MLflow before it finished
            tracking.deliver(uri, run_id, checkpoints.restore_unsent(local))
        stopped = ray.get(notes.get.remote())
        ray.kill(notes)
        if stopped:
            tracking.end_run_quietly(uri, run_id, "FAILED", stopped)
            raise NonFiniteTrainingError(f"run {run_name}: {stopped}")
        if local is None:
            tracking.end_run_quietly(uri, run_id, "FAILED", f"finished without a checkpoint ({result.error})")
            raise RuntimeError(f"training run {run_name} finished without a checkpoint (error: {result.error})")
        bad = checkpoints.nonfinite_parameters_in(local)
        if bad:  # never registered (the worker refuses to write these; this guards older checkpoints)
            tracking.end_run_quietly(uri, run_id, "FAILED", f"non-finite weights in {', '.join(bad[:5])}")
            raise NonFiniteTrainingError(f"run {run_name}: checkpoint {checkpoint_dir} holds non-finite weights "
                                         f"({', '.join(bad[:5])}); not registered.")
        model_uri = tracking.finish_training(run_id, cfg, Path(local), metrics, register=register)
    return PretrainResult(run_id, run_name, checkpoint_dir, shard_dir, model_uri, metrics, time.time() - started)
