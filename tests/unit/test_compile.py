"""model.compile: the compiled image encoder trains as the eager one does, checkpoints keep the plain
state-dict keys, and a backend that cannot compile is a ConfigError naming model.compile. (CPU;
the training loop's compile timing is tests/e2e/test_demo.py's business.)"""

import pytest
import torch

from vlp3d.config import ConfigError, load_config
from vlp3d.train import checkpoint as checkpoints
from vlp3d.train.step import compile_errors, train_step
from vlp3d.train.tasks.pretrain import (
    build_optimizer,
    build_pretrainer,
    build_scheduler,
    compile_image_encoder,
)

OVERRIDES = ["data.shape=[16,16,16]", "model.embed_dim=32", "model.text_head='linear'", "train.max_steps=4"]


def _pretrainer(*overrides):
    cfg = load_config(None, [*OVERRIDES, *overrides])
    pretrainer, weights = build_pretrainer(cfg, text_dim=24)
    return cfg, pretrainer, weights


def _batch():
    generator = torch.Generator().manual_seed(3)
    return {"volume": torch.rand(4, 1, 16, 16, 16, generator=generator),
            "report_embedding": torch.randn(4, 24, generator=generator)}


def _two_steps(pretrainer, cfg, weights, batch):
    optimizer = build_optimizer(pretrainer, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    with compile_errors():
        return [train_step(pretrainer, weights, dict(batch), optimizer, scheduler)["loss"] for _ in range(2)]


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= rtol * b.abs().max() + 1e-7)


def test_compiled_training_matches_eager_and_checkpoints_plain_keys(tmp_path, backend="aot_eager"):
    """Two AdamW steps of a tiny CLIP pretrainer (resnet3d/tiny), eager and with the encoder compiled:
    the same losses, encoder outputs and weights within fp32 tolerance (1e-5 relative). The backend is
    `aot_eager`: the same Dynamo graphs and AOT autograd as training's `inductor`, without code
    generation. `inductor` passes this test too (backend="inductor"), but its first, uncached C++
    build of even this tiny ResNet took 6 minutes on the 2-core CI machine."""
    batch = _batch()
    cfg, eager, weights = _pretrainer()
    _, compiled, _ = _pretrainer()
    compile_image_encoder(compiled.model, backend=backend)
    assert _two_steps(compiled, cfg, weights, batch) == pytest.approx(_two_steps(eager, cfg, weights, batch),
                                                                      rel=1e-5)
    with torch.no_grad():
        assert _close(compiled.model.encode_image(batch["volume"]), eager.model.encode_image(batch["volume"]))
    for (name, value), (plain_name, plain) in zip(compiled.state_dict().items(), eager.state_dict().items(),
                                                  strict=True):
        assert name == plain_name and _close(value.float(), plain.float()), name
    # what training saves, exports and registers: the module itself, keys without `_orig_mod.`
    optimizer = build_optimizer(compiled, cfg)
    checkpoints.save(tmp_path, compiled.model, compiled.objective, optimizer, build_scheduler(optimizer, cfg), None,
                     checkpoints.TrainState(step=2), cfg, {})
    saved = checkpoints.load_model_state(tmp_path)
    assert list(saved) == list(eager.model.state_dict())
    assert not any("_orig_mod" in key for key in saved)
    _, restored, _ = _pretrainer()
    restored.model.load_state_dict(saved)  # strict: a plain model loads it as it is


def test_a_backend_that_cannot_build_is_a_config_error_naming_model_compile(monkeypatch):
    """inductor without a working C++ compiler (here: one that does not exist; the caches are off so
    that nothing built before is reused)."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("vlp3d-test-no-such-compiler",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    monkeypatch.setattr(inductor_config, "autotune_local_cache", False)
    torch._dynamo.reset()

    class Pointwise(torch.nn.Module):  # a generated C++ kernel (a Linear alone calls a library matmul)
        def forward(self, x):
            return torch.tanh(x) * 3 + x.sin()

    module = Pointwise()
    module.compile()
    with pytest.raises(ConfigError, match=r"model\.compile = true.*C\+\+ compiler.*model\.compile = false") as err:
        with compile_errors():
            module(torch.randn(5, 7))
    assert "vlp3d-test-no-such-compiler" in str(err.value)
    torch._dynamo.reset()
