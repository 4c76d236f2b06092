import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from tests.unit.test_objectives import gloo
from tests.unit.test_objectives.gloo import WORLD
from vlp3d.objectives.clip import ClipLoss


def test_identical_embeddings_give_ln_n():
    for n in (2, 8, 32):
        e = F.normalize(torch.ones(n, 16), dim=-1)
        assert ClipLoss()(e, e, torch.tensor(10.0)).item() == pytest.approx(math.log(n), rel=1e-6)


def test_perfectly_separated_embeddings_give_zero():
    e = torch.eye(8)
    assert ClipLoss()(e, e, torch.tensor(100.0)).item() == pytest.approx(0.0, abs=1e-12)


def test_hand_computed_two_by_two():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = 2.0
    # image->text rows: [2, 1.2], [0, 1.6]; text->image rows (columns): [2, 0], [1.2, 1.6]
    def ce(row, target):
        return -row[target] + math.log(sum(math.exp(v) for v in row))
    expected = 0.5 * ((ce([2, 1.2], 0) + ce([0, 1.6], 1)) / 2 + (ce([2, 0], 0) + ce([1.2, 1.6], 1)) / 2)
    assert ClipLoss()(image, text, torch.tensor(scale)).item() == pytest.approx(expected, rel=1e-6)


LOCAL_B, DIM = 3, 5


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(DIM, DIM, generator=g)
    x_image = torch.randn(WORLD * LOCAL_B, DIM, generator=g)
    x_text = torch.randn(WORLD * LOCAL_B, DIM, generator=g)
    return weight, x_image, x_text


def _embed(weight, x_image, x_text):
    return F.normalize(x_image @ weight, dim=-1), F.normalize(x_text @ weight.T, dim=-1)


def _worker(rank, port, local_loss, queue):
    gloo.start_worker(rank, port)
    torch.set_num_threads(1)
    weight, x_image, x_text = _setup()
    weight.requires_grad_(True)
    rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
    image, text = _embed(weight, x_image[rows], x_text[rows])
    loss = ClipLoss(gather_with_grad=True, local_loss=local_loss)(image, text, torch.tensor(7.0))
    loss.backward()
    # what DDP does: average gradients and report the mean loss
    grad = weight.grad.clone()
    dist.all_reduce(grad)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    if rank == 0:
        queue.put((float(mean_loss) / WORLD, (grad / WORLD).tolist(), float(loss.detach())))
    gloo.end_worker()


@pytest.mark.parametrize("local_loss", [False, True])
def test_two_process_gather_matches_single_process(local_loss):
    weight, x_image, x_text = _setup()
    weight.requires_grad_(True)
    image, text = _embed(weight, x_image, x_text)
    reference = ClipLoss()(image, text, torch.tensor(7.0))
    reference.backward()

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    gloo.run(_worker, local_loss, queue)
    mean_loss, grad, rank0_loss = queue.get()
    assert mean_loss == pytest.approx(reference.item(), rel=1e-5)
    if not local_loss:  # every worker holds the full G x G loss
        assert rank0_loss == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(torch.tensor(grad), weight.grad, rtol=1e-4, atol=1e-6)
