"""vlp3d.objectives.distributed: the one all-gather every objective uses (two gloo processes)."""

from __future__ import annotations

import warnings

import torch
import torch.multiprocessing as mp

from tests.unit.test_objectives import gloo
from tests.unit.test_objectives.gloo import WORLD
from vlp3d.objectives.distributed import all_gather, global_mean, world


def _worker(rank, port, queue):
    gloo.start_worker(rank, port)
    torch.set_num_threads(1)
    weight = torch.arange(2 * WORLD * 3, dtype=torch.float32).reshape(2 * WORLD, 3)
    results = {}
    for grad in (True, False):
        x = torch.full((2, 3), float(rank + 1), requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no deprecated collective underneath
            gathered = all_gather(x, grad=grad)
        (gathered * weight).sum().backward()
        results[grad] = (gathered.detach().tolist(), x.grad.tolist())
    # global_mean: rank r holds r + 1 items; DDP averages the gradients over workers
    w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    items = _items()[sum(range(1, rank + 1)):sum(range(1, rank + 2))]
    loss = global_mean((items @ w).square().sum(), len(items))
    loss.backward()
    torch.distributed.all_reduce(w.grad)
    results["global_mean"] = (loss.item(), (w.grad / WORLD).tolist())
    if rank == 1:
        queue.put((world(), results))
    gloo.end_worker()


def _items() -> torch.Tensor:
    """1 + 2 + ... + WORLD items of 3 features: rank r holds r + 1 of them."""
    return torch.arange(3 * sum(range(1, WORLD + 1)), dtype=torch.float32).reshape(-1, 3) / 10


def test_all_gather_orders_by_rank_and_routes_gradients():
    queue = mp.get_context("spawn").SimpleQueue()
    gloo.run(_worker, queue)
    (rank, world_size), results = queue.get()
    assert (rank, world_size) == (1, WORLD)
    weight = torch.arange(2 * WORLD * 3, dtype=torch.float32).reshape(2 * WORLD, 3)
    expected = [[1.0] * 3] * 2 + [[2.0] * 3] * 2
    for grad in (True, False):
        assert results[grad][0] == expected
    # with gradient: rank 1's slice gets its rows' gradient from both workers (summed)
    assert results[True][1] == (WORLD * weight[2:4]).tolist()
    # without: only the local use
    assert results[False][1] == weight[2:4].tolist()
    # global_mean under DDP = one process holding every item: same value, same gradient
    w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    expected_loss = (_items() @ w).square().mean()
    expected_loss.backward()
    value, grad = results["global_mean"]
    assert abs(value - expected_loss.item()) < 1e-5
    torch.testing.assert_close(torch.tensor(grad), w.grad)
    # a per-worker mean (what `mlm` used to be) would not be
    per_worker = sum((_items()[a:b] @ w).square().mean() for a, b in ((0, 1), (1, 3))) / WORLD
    assert abs(per_worker.item() - expected_loss.item()) > 1e-3


def test_single_process_is_the_identity():
    x = torch.randn(3, 4, requires_grad=True)
    assert all_gather(x) is x and all_gather(x, grad=False) is x
    assert global_mean(torch.tensor(6.0), 4).item() == 1.5 and global_mean(torch.tensor(0.0), 0).item() == 0.0
