"""Pieces of the training worker's loop that need no Ray: the prefetch thread's data positions, the
device feed and the step-time split logged every log_every steps."""

import math

import pytest
import torch

from vlp3d.train.batches import to_model_batch
from vlp3d.train.feed import DeviceBatches, Prefetched
from vlp3d.train.loop import step_times


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
