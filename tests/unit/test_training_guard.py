"""The NaN/inf guard of `engine.train_step` (alone and across two gloo ranks) and the checkpoint
folder round trip (vlp3d.train.checkpoint)."""

import math
import random

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from tests.unit.test_objectives import gloo
from vlp3d.config import ExperimentConfig, replace
from vlp3d.train import checkpoint as checkpoints
from vlp3d.train.step import train_step


class Toy(nn.Module):
    """Two terms over a linear layer; `poison` makes one term (or only the gradient) non-finite."""

    terms = ("align", "mlm")

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 4)
        self.poison = ""

    def forward(self, batch):
        out = self.linear(batch["x"])
        align, mlm = out.pow(2).mean(), out.abs().mean()
        if self.poison == "loss":
            mlm = mlm * float("nan")
        if self.poison == "gradient":  # finite value, NaN gradient
            out.register_hook(lambda g: g * float("nan"))
        return {"align": align, "mlm": mlm}


def _setup():
    model = Toy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler, {"x": torch.ones(3, 4)}


def _snapshot(model, optimizer, scheduler):
    return ({k: v.clone() for k, v in model.state_dict().items()}, str(optimizer.state_dict()),
            scheduler.state_dict()["last_epoch"])


@pytest.mark.parametrize("poison, named", [("loss", ["mlm", "gradients"]), ("gradient", ["gradients"])])
def test_non_finite_step_is_skipped_and_changes_nothing(poison, named):
    model, optimizer, scheduler, batch = _setup()
    weights = {"align": 1.0, "mlm": 0.5}
    first = train_step(model, weights, batch, optimizer, scheduler)  # a normal step: optimizer has state
    assert first["skipped"] == 0.0 and math.isfinite(first["loss"])
    before = _snapshot(model, optimizer, scheduler)
    model.poison = poison
    out = train_step(model, weights, batch, optimizer, scheduler, after_step=lambda: pytest.fail("EMA ran"))
    assert out == {"skipped": 1.0, "nonfinite": named}
    after = _snapshot(model, optimizer, scheduler)
    for key in before[0]:
        torch.testing.assert_close(after[0][key], before[0][key], rtol=0, atol=0)
    assert after[1:] == before[1:]  # optimizer moments and step count, scheduler position
    assert all(p.grad is None for p in model.parameters())
    model.poison = ""
    assert train_step(model, weights, batch, optimizer, scheduler)["skipped"] == 0.0  # training goes on


def _worker(rank, port, queue):
    gloo.start_worker(rank, port)
    torch.set_num_threads(1)
    model, optimizer, scheduler, batch = _setup()
    ddp = nn.parallel.DistributedDataParallel(model)
    if rank == 1:
        model.poison = "loss"  # only this rank's loss is NaN
    before = [p.detach().clone() for p in model.parameters()]
    out = train_step(ddp, {"align": 1.0, "mlm": 1.0}, batch, optimizer, scheduler)
    unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    queue.put((rank, out, unchanged))
    gloo.end_worker()


def _measure_worker(rank, port, queue):
    gloo.start_worker(rank, port)
    torch.set_num_threads(1)
    weights = {"align": 1.0, "mlm": 0.5}
    batch = {"x": torch.full((3, 4), float(rank + 1))}  # the ranks' gradients differ
    steps = []
    for measure in (True, False):
        model, optimizer, scheduler, _ = _setup()
        ddp = nn.parallel.DistributedDataParallel(model)
        out = train_step(ddp, weights, batch, optimizer, scheduler,
                         measure_params=list(model.parameters()) if measure else None)
        train_step(ddp, weights, batch, optimizer, scheduler)  # DDP carries on normally afterwards
        steps.append((out.get("term_norms"), [p.detach().tolist() for p in model.parameters()]))  # no tensors

    queue.put((rank, steps))
    gloo.end_worker()


def test_measuring_term_gradients_under_ddp_is_averaged_and_leaves_the_update_alone():
    queue = mp.get_context("spawn").SimpleQueue()
    gloo.run(_measure_worker, queue)
    results = dict(queue.get() for _ in range(gloo.WORLD))
    (norms, measured), (none, plain) = results[0]
    assert none is None and results[1][0][0] == norms  # every rank logs the same, averaged norms
    assert measured == plain
    # the average over ranks of each rank's own weighted-term gradient norm
    expected = {}
    for name, weight in (("align", 1.0), ("mlm", 0.5)):
        per_rank = []
        for rank in range(gloo.WORLD):
            model = Toy()
            term = model({"x": torch.full((3, 4), float(rank + 1))})[name] * weight
            grads = torch.autograd.grad(term, list(model.parameters()))
            per_rank.append(torch.sqrt(sum((g ** 2).sum() for g in grads)).item())
        expected[name] = sum(per_rank) / gloo.WORLD
    assert norms == pytest.approx(expected, rel=1e-5)


def test_a_non_finite_rank_makes_every_rank_skip():
    queue = mp.get_context("spawn").SimpleQueue()
    gloo.run(_worker, queue)
    results = sorted(queue.get() for _ in range(gloo.WORLD))
    for rank, out, unchanged in results:
        assert out["skipped"] == 1.0 and "mlm" in out["nonfinite"], rank  # rank 0 names rank 1's term
        assert unchanged, rank


def test_checkpoint_round_trip(tmp_path):
    cfg = replace(ExperimentConfig(), tracking={"tracking_uri": "https://user:hunter2@mlflow.example"},
                  data={"corpus": "/data/patients", "shards": "/data/shards"})
    model, optimizer, scheduler, batch = _setup()
    objective = nn.Linear(2, 2)
    train_step(model, {"align": 1.0, "mlm": 1.0}, batch, optimizer, scheduler)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    generator = torch.Generator().manual_seed(5)
    checkpoints.seed_everything(11, generator)
    state = checkpoints.TrainState(step=7, skipped_steps=2, position={"train": [1, 3]},
                                   rng=[checkpoints.capture_rng(generator)], unsent_logs=[("text", {"text": "x"})],
                                   term_multipliers={"align": 0.5, "mlm": 1.5}, skipped_in_a_row=3)
    draws = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=generator).item())
    checkpoints.save(tmp_path, model, objective, optimizer, scheduler, scaler, state, cfg, {"spec": {}})

    model2, optimizer2, scheduler2, _ = _setup()
    nn.init.zeros_(model2.linear.weight)
    objective2, scaler2, generator2 = nn.Linear(2, 2), torch.amp.GradScaler("cpu"), torch.Generator()
    restored = checkpoints.restore(tmp_path, model2, objective2, optimizer2, scheduler2, scaler2)
    assert (restored.step, restored.skipped_steps, restored.position, restored.unsent_logs) == (
        7, 2, {"train": [1, 3]}, [("text", {"text": "x"})])
    assert restored.term_multipliers == {"align": 0.5, "mlm": 1.5}
    assert restored.skipped_in_a_row == 3  # before: not in the checkpoint, a resumed run counted from 0
    for name in (checkpoints.MODEL, checkpoints.OBJECTIVE, checkpoints.TRAIN_STATE):  # before: train_state.pt
        torch.load(tmp_path / name, weights_only=True)  # needed weights_only=False (NumPy's pickled state)
    checkpoints.restore_rng(restored.rng[0], generator2)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=generator2).item()) == draws
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(objective.weight, objective2.weight)
    assert str(optimizer.state_dict()) == str(optimizer2.state_dict())
    assert scheduler.state_dict() == scheduler2.state_dict() and scaler2.get_scale() == 1024.0
    assert checkpoints.read_meta(tmp_path)["step"] == 7
    assert checkpoints.restore_unsent(tmp_path) == [("text", {"text": "x"})]
    text = (tmp_path / checkpoints.CONFIG).read_text()  # stored with the model: no locations, no secret
    assert "hunter2" not in text and "/data/" not in text
    assert checkpoints.read_config(tmp_path).train == cfg.train

    with torch.no_grad():
        model.linear.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"step 7: non-finite values in linear.weight"):
        checkpoints.save(tmp_path / "bad", model, objective, optimizer, scheduler, None, state, cfg, {})
    assert not (tmp_path / "bad").exists()
    with torch.no_grad():
        model2.linear.bias[1] = float("nan")
    torch.save(model2.state_dict(), tmp_path / checkpoints.MODEL)
    assert checkpoints.nonfinite_parameters_in(tmp_path) == ["linear.bias"]


class Payload:
    """What a hostile train_state.pt could pickle: unpickling it would run code."""

    def __reduce__(self):
        return (print, ("unpickled and ran",))


def test_a_train_state_holding_pickled_objects_is_refused_not_unpickled(tmp_path, capsys):
    torch.save({"step": 1, "rng": [{"numpy": np.random.get_state()}], "payload": Payload()},
               tmp_path / checkpoints.TRAIN_STATE)
    with pytest.raises(ValueError, match="weights_only=True.*Start the run afresh"):
        checkpoints.load_train_state(tmp_path)
    assert "unpickled and ran" not in capsys.readouterr().out

