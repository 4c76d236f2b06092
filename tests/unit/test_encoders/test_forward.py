import pytest
import torch

from tests.unit.test_encoders.helpers import SMALL_INPUTS, build_small, loss_of, small_volume
from vlp3d.encoders import SIZES, build_image_encoder

ENCODERS = sorted(SMALL_INPUTS)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", ENCODERS)
def test_forward_backward_shapes_and_finite(name, size):
    encoder = build_small(name, size)
    volume = small_volume(name)
    shape, n_tokens, _ = SMALL_INPUTS[name]
    pooled, tokens = encoder(volume)
    assert pooled.shape == (shape[0], encoder.out_dim)
    assert tokens.shape == (shape[0], n_tokens, encoder.out_dim)
    assert torch.isfinite(pooled).all() and torch.isfinite(tokens).all()
    if name != "unimedi_vit":  # pooled = mean of tokens; unimedi pools with [CLS]
        torch.testing.assert_close(pooled, tokens.mean(dim=1))
    loss_of((pooled, tokens)).backward()
    grads = [p.grad for p in encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ENCODERS)
def test_gradient_checkpointing_gives_same_gradients(name, monkeypatch):
    volume = small_volume(name)
    plain = build_small(name).train()
    loss_plain = loss_of(plain(volume))
    loss_plain.backward()

    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    checkpointed = build_small(name, gradient_checkpointing=True).train()
    loss_ckpt = loss_of(checkpointed(volume))
    loss_ckpt.backward()
    assert calls, "gradient_checkpointing=True did not checkpoint anything"
    torch.testing.assert_close(loss_ckpt, loss_plain)
    for (key, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        if p.grad is None:
            assert q.grad is None, key
        else:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=key)

    calls.clear()
    with torch.no_grad():
        checkpointed.eval()(volume)
    assert not calls, "checkpointing must only run in training"


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(
        reason="torch 2.13 CPU (oneDNN) bf16 conv backward on the 2x1x1 last stage gives NaN weight gradients "
               "in some runs (nondeterministic, seen with and without checkpointing); bf16 is a GPU setting",
        strict=False)) if n == "resnet3d" else n
    for n in ENCODERS])
def test_bf16_autocast_on_cpu(name):
    encoder = build_small(name, gradient_checkpointing=True).train()
    volume = small_volume(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled, tokens = encoder(volume)
        loss = loss_of((pooled, tokens))
    loss.backward()
    assert torch.isfinite(pooled.float()).all() and torch.isfinite(tokens.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters() if p.grad is not None)
    with torch.no_grad():
        fp32 = encoder.eval()(volume)[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = encoder(volume)[0].float()
    # bf16 keeps ~3 significant digits; pooled features must still agree broadly
    assert torch.nn.functional.cosine_similarity(fp32, bf16, dim=-1).min() > 0.95


@pytest.mark.parametrize(
    ("name", "size", "tokens", "width"),
    [
        ("swin3d", "base", 4 * 4 * 3, 16 * 48),  # METHODS.md: 4 x 4 x 3 = 48 tokens of 768 channels
        ("swin3d", "large", 4 * 4 * 3, 16 * 96),
        ("vit3d", "base", 8 * 8 * 6, 768),
        ("unimedi_vit", "base", 8 * 8 * 24, 768),
    ],
)
def test_full_size_shapes_on_meta_device(name, size, tokens, width):
    # MG-3D's 128 x 128 x 96 input, shapes only: the meta device computes no numbers
    encoder = build_image_encoder(name, size, img_size=(128, 128, 96)).to("meta")
    pooled, out = encoder(torch.empty(2, 1, 128, 128, 96, device="meta"))
    assert pooled.shape == (2, width) and out.shape == (2, tokens, width)
