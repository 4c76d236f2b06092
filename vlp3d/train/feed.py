"""Batches for the training loop: rows of a runtime's dataset, shuffled, batched, collated, read ahead
in a thread and copied to the device a step ahead. The same code for every runtime, so a one-process
run and a Ray Train run read the same batches in the same order.

A `RowSource` hands out one pass over a rank's rows as numpy blocks, always in the same order (Ray
Data's dataset shard with `preserve_order`, or `LocalRows` over the shard files). Everything after that
is ours: the shuffle buffer, the batches and their data position, which the checkpoint records so a
resumed run continues with the very batch an uninterrupted run would have taken next.

Collate functions (an objective's, fine-tuning's) draw their randomness per row, from (epoch seed,
row id), never in batch order: skipped batches of a resumed epoch are never collated.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np
import torch

from vlp3d import storage
from vlp3d.data.rows import Block, block_rows, read_blocks
from vlp3d.errors import InputError

MEMORY_SHARE = 0.25  # LocalRows holds a split in memory when it takes at most this share of RAM (twice its files)


class RowSource(Protocol):
    """One rank's rows of a dataset: every call of `blocks()` is one pass over them, in a fixed order."""

    def blocks(self) -> Iterator[Block]: ...


# splits held by this process for the next run in it: the trials of a sweep that Tune runs one after another
# in one reused actor (one-worker trials, tune.trial_runtime 'auto'/'local') read the same shards once. Keyed by
# what was read (files and their sizes, columns, split, fraction, limit); the last few kept.
_HELD: OrderedDict[tuple, list[Block]] = OrderedDict()
HELD_SPLITS = 3


class LocalRows:
    """A split of shard files read in this process (no Ray): `columns` of the rows in `split` inside the
    nested `fraction` subset (with a non-empty `nonempty` column when given), at most `limit` rows;
    held in memory after the first pass when small (`materialize`: 'auto' as `data.materialize`,
    'always', 'never')."""

    def __init__(self, files: Sequence[str], columns: Sequence[str], split: str | None = None,
                 fraction: float = 1.0, limit: int = 0, materialize: str = "auto", nonempty: str = ""):
        self.files, self.columns, self.split, self.fraction, self.limit = list(files), list(columns), split, fraction, limit
        self.nonempty = nonempty
        sizes = storage.file_sizes(self.files) if self.files else []
        self.keep = materialize == "always" or (materialize == "auto" and 2 * sum(sizes) <= MEMORY_SHARE * _memory_bytes())
        self._key = (tuple(self.files), tuple(sizes), tuple(self.columns), split, fraction, limit, nonempty)
        self._held: list[Block] | None = _HELD.get(self._key) if self.keep else None

    def blocks(self) -> Iterator[Block]:
        if self._held is not None:
            yield from self._held
            return
        held = []
        for block in read_blocks(self.files, self.columns, self.split, self.fraction, self.limit, self.nonempty):
            if self.keep:
                held.append(block)
            yield block
        if self.keep:
            self._held = _HELD[self._key] = held
            _HELD.move_to_end(self._key)
            while len(_HELD) > HELD_SPLITS:
                _HELD.popitem(last=False)

    def rows(self) -> int:
        return sum(block_rows(b) for b in self.blocks())


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def data_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of one rank's pass over its rows in one epoch: shuffle order and per-row collation
    (T3D crops, fine-tuning crops) depend on (train.seed, rank, epoch) only, so a resumed run replays
    an epoch exactly."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


def shuffled(blocks: Iterator[Block], capacity: int, rng: np.random.Generator) -> Iterator[tuple[Block, int]]:
    """(block, row index) of every row, through a shuffle buffer of `capacity` rows: each arriving row
    replaces a random one of a full buffer, which is handed out; the rest leave in random order. With
    `capacity` at least the rows of a pass, every pass is a full permutation."""
    buffer: list[tuple[Block, int]] = []
    for block in blocks:
        for index in range(block_rows(block)):
            if len(buffer) < capacity:
                buffer.append((block, index))
                continue
            slot = int(rng.integers(len(buffer)))
            yield buffer[slot]
            buffer[slot] = (block, index)
    for slot in rng.permutation(len(buffer)):
        yield buffer[slot]


def in_order(blocks: Iterator[Block]) -> Iterator[tuple[Block, int]]:
    for block in blocks:
        for index in range(block_rows(block)):
            yield block, index


def stack_rows(rows: Sequence[tuple[Block, int]]) -> Block:
    """The numpy batch of `rows` (each column stacked; bytes and strings as object arrays)."""
    batch = {}
    for name, column in rows[0][0].items():
        if column.dtype == object:
            values = np.empty(len(rows), dtype=object)
            for i, (block, index) in enumerate(rows):
                values[i] = block[name][index]
            batch[name] = values
        else:
            batch[name] = np.stack([block[name][index] for block, index in rows])
    return batch


def to_tensors(batch: Block) -> dict:
    """Default collation: numeric columns as torch tensors (object columns stay numpy)."""
    return {k: v if v.dtype == object else torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def batches_of(rows: Iterator[tuple[Block, int]], batch_size: int, drop_last: bool) -> Iterator[list]:
    chunk: list = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk and not drop_last:
        yield chunk


def epoch_batches(source: RowSource, position: dict[str, list[int]], name: str, batch_size: int, seed: int,
                  rank: int, collate_for: Callable[[int], Callable] | None = None, shuffle_rows: int = 0,
                  pin_memory: bool = False) -> Iterator[dict]:
    """Endless batches of `source`, epoch after epoch. `position[name]` = [epoch, batches of it
    consumed] always names the next batch, so the checkpoint a resumed run starts from says where to
    continue: the epoch is replayed with its seed and the batches already trained on are skipped
    (never collated). Rows are shuffled in a buffer of `shuffle_rows` (at least 4 batches): the source
    hands each rank the same rows in the same order every epoch (the price of determinism), so the
    buffer is what mixes an epoch's batches. Batches stay in host memory (`DeviceBatches` copies them
    to the device), page-locked with `pin_memory` so that those copies can run asynchronously."""
    while True:
        epoch, done = position.setdefault(name, [0, 0])
        epoch_seed = data_seed(seed, rank, epoch)
        collate = collate_for(epoch_seed) if collate_for else to_tensors
        rows = shuffled(source.blocks(), max(4 * batch_size, shuffle_rows), np.random.default_rng(epoch_seed))
        found = 0
        for index, chunk in enumerate(batches_of(rows, batch_size, drop_last=True)):
            found += 1
            if index < done:
                continue
            batch = collate(stack_rows(chunk))
            if pin_memory:
                batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            position[name] = [epoch, index + 1]
            yield batch
        if not found:
            raise InputError(f"dataset '{name}': rank {rank} holds fewer rows than its batch of {batch_size}; "
                             "lower the global batch or cluster.num_workers, or add data.")
        position[name] = [epoch + 1, 0]


def ordered_batches(source: RowSource, batch_size: int, collate: Callable | None = None) -> Iterator[dict]:
    """One pass over `source` in its order, the last batch possibly smaller (validation)."""
    for chunk in batches_of(in_order(source.blocks()), batch_size, drop_last=False):
        yield (collate or to_tensors)(stack_rows(chunk))


class Prefetched:
    """`epoch_batches` run `depth` batches ahead in a background thread, so that reading, shuffling
    and collating the next batches (and the shuffle buffer's refill at each epoch start) overlap the
    training step. Each batch travels with the data position after it, which is written to the
    shared `position` only when the batch is taken: a checkpoint never counts batches still queued."""

    def __init__(self, make_batches: Callable[[dict], Iterator[dict]], position: dict[str, list[int]], name: str,
                 depth: int):
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
    """Model batches on `device` (`convert`: host batch -> model batch on the device) from a
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


def device_feed(source: RowSource, position: dict[str, list[int]], name: str, batch_size: int, seed: int, rank: int,
                convert, device: torch.device, prefetch: int, collate_for=None, shuffle_rows: int = 0) -> DeviceBatches:
    """`epoch_batches` of `source`, read `prefetch` batches ahead, as model batches on `device`."""
    pin = device.type == "cuda"  # page-locked host batches: asynchronous copies to the GPU
    return DeviceBatches(Prefetched(lambda own: epoch_batches(source, own, name, batch_size, seed, rank,
                                                              collate_for=collate_for, shuffle_rows=shuffle_rows,
                                                              pin_memory=pin),
                                    position, name, prefetch), convert, device)
