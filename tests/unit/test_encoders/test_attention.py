"""model.attention: the fused (SDPA) and manual attention paths of swin3d and vit3d agree, 'auto'
measures and picks one, exported weights stay MONAI's, and checkpointing saves activations."""

import pytest
import torch
from monai.networks.nets import UNETR, SwinUNETR
from monai.networks.nets.swin_unetr import WindowAttention, compute_mask

from tests.unit.test_encoders.helpers import loss_of
from vlp3d.config import load_config
from vlp3d.encoders import attention as attention_module
from vlp3d.encoders import build_image_encoder
from vlp3d.encoders.attention import ATTENTION_PATHS, FusedWindowAttention
from vlp3d.encoders.export import (
    saved_activation_bytes,
    swinunetr_kwargs,
    swinunetr_state_dict,
    unetr_kwargs,
    unetr_state_dict,
)
from vlp3d.objectives.model import build_model

TOL = {"rtol": 1e-5, "atol": 1e-5}
# swin3d at 32^3: stage 1 (16^3 tokens) and 2 (8^3) pad to whole 7^3 windows and have shifted
# blocks with a shift mask; stage 3 (4^3) shrinks the window to 4^3 without shift
SWIN_INPUT = (2, 1, 32, 32, 32)
VIT_INPUT, VIT_IMG = (2, 1, 32, 32, 16), (32, 32, 16)


def _step(encoder, volume):
    """Outputs, input gradient and parameter gradients of one training step."""
    volume = volume.clone().requires_grad_(True)
    encoder.zero_grad(set_to_none=True)
    pooled, tokens = encoder(volume)
    loss_of((pooled, tokens)).backward()
    grads = {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}
    return pooled.detach(), tokens.detach(), volume.grad, grads


def _assert_paths_agree(encoder, volume):
    encoder.train()
    encoder.set_attention_path("manual")
    manual = _step(encoder, volume)
    encoder.set_attention_path("fused")
    fused = _step(encoder, volume)
    for ours, theirs in zip(fused[:3], manual[:3], strict=True):
        torch.testing.assert_close(ours, theirs, **TOL)
    assert fused[3].keys() == manual[3].keys() and len(manual[3]) > 10
    for name in manual[3]:
        torch.testing.assert_close(fused[3][name], manual[3][name], **TOL, msg=name)
    return fused


def test_swin3d_fused_matches_manual_outputs_and_gradients():
    torch.manual_seed(0)
    encoder = build_image_encoder("swin3d", "tiny", attention="fused")
    modules = [m for m in encoder.modules() if isinstance(m, WindowAttention)]
    assert modules and all(type(m) is FusedWindowAttention for m in modules)
    volume = torch.rand(SWIN_INPUT, generator=torch.Generator().manual_seed(1))
    fused = _assert_paths_agree(encoder, volume)
    # the relative-position bias learns through SDPA's additive mask
    table = "swinViT.layers1.0.blocks.1.attn.relative_position_bias_table"
    assert fused[3][table].abs().sum() > 0


def test_fused_window_attention_matches_with_shift_mask_and_keeps_dropout_to_training():
    torch.manual_seed(0)
    window, dim, heads = (2, 2, 2), 12, 3
    module = WindowAttention(dim, heads, window, qkv_bias=True, attn_drop=0.5)
    reference = WindowAttention(dim, heads, window, qkv_bias=True, attn_drop=0.5)
    reference.load_state_dict(module.state_dict())
    module.__class__ = FusedWindowAttention
    assert module.state_dict().keys() == reference.state_dict().keys()
    mask = compute_mask((4, 4, 4), window, (1, 1, 1), "cpu")  # 8 windows of a shifted 4^3 grid
    x = torch.randn(3 * mask.shape[0], 8, dim)  # 3 volumes' windows, volume-major
    module.eval(), reference.eval()
    for m in (mask, None):
        torch.testing.assert_close(module(x, m), reference(x, m), **TOL)
    module.train()
    assert not torch.allclose(module(x, mask), reference(x, mask))  # attention dropout in training


def test_vit3d_fused_matches_manual_outputs_and_gradients():
    torch.manual_seed(0)
    encoder = build_image_encoder("vit3d", "tiny", img_size=VIT_IMG, attention="fused")
    assert all(block.attn.use_flash_attention for block in encoder.vit.blocks)
    volume = torch.rand(VIT_INPUT, generator=torch.Generator().manual_seed(1))
    _assert_paths_agree(encoder, volume)
    encoder.set_attention_path("manual")
    assert not any(block.attn.use_flash_attention for block in encoder.vit.blocks)


def test_vit3d_fused_attention_dropout_only_in_training():
    torch.manual_seed(0)
    encoder = build_image_encoder("vit3d", "tiny", img_size=(16, 16, 32), dropout_rate=0.5, attention="fused")
    volume = torch.rand(1, 1, 16, 16, 32)
    encoder.eval()
    with torch.no_grad():
        first, second = encoder(volume)[1], encoder(volume)[1]
    torch.testing.assert_close(first, second)
    assert all(block.attn.dropout_rate == 0.0 for block in encoder.vit.blocks)
    encoder.train()
    assert all(block.attn.dropout_rate == 0.5 for block in encoder.vit.blocks)


def test_auto_measures_once_per_configuration_and_matches_manual(monkeypatch, caplog):
    monkeypatch.setattr(attention_module, "_CHOICES", {})
    monkeypatch.setattr(attention_module, "MEASURE_REPS", 1)
    calls = []
    measure = attention_module.measure_paths
    monkeypatch.setattr(attention_module, "measure_paths", lambda *a, **k: calls.append(1) or measure(*a, **k))
    torch.manual_seed(0)
    auto = build_image_encoder("vit3d", "tiny", img_size=(16, 16, 32), attention="auto").train()
    torch.manual_seed(0)
    manual = build_image_encoder("vit3d", "tiny", img_size=(16, 16, 32), attention="manual").train()
    volume = torch.rand(2, 1, 16, 16, 32)
    with torch.no_grad():
        auto(volume)
    auto.eval()(volume)
    assert auto.attention_path is None and not calls  # measured only in a training forward with a graph
    auto.train()
    with caplog.at_level("INFO", logger="vlp3d.encoders.attention"):
        ours = auto(volume)
    assert auto.attention == "auto" and auto.attention_path in ATTENTION_PATHS
    assert set(auto.attention_timings) == set(ATTENTION_PATHS) and len(calls) == 1
    assert f"-> {auto.attention_path}" in caplog.text
    fused = auto.attention_path == "fused"
    assert all(block.attn.use_flash_attention == fused for block in auto.vit.blocks)
    for a, b in zip(ours, manual(volume), strict=True):
        torch.testing.assert_close(a, b, **TOL)
    # a second encoder of the same configuration, device and input shape reuses the choice
    again = build_image_encoder("vit3d", "tiny", img_size=(16, 16, 32), attention="auto").train()
    again(volume)
    assert again.attention_path == auto.attention_path and len(calls) == 1


def test_unknown_attention_mode_is_refused():
    with pytest.raises(ValueError, match="model.attention"):
        build_image_encoder("vit3d", "tiny", img_size=(16, 16, 16), attention="flash")


@pytest.mark.parametrize("name, path", [("swin3d", "fused"), ("vit3d", "manual"), ("resnet3d", "fused")])
def test_config_attention_reaches_swin3d_and_vit3d_and_others_ignore_it(name, path):
    cfg = load_config(None, [f"model.image_encoder={name}", f"model.attention={path}", "data.shape=[32,32,32]"])
    encoder = build_model(cfg, text_dim=384).image_encoder
    assert getattr(encoder, "attention_path", None) == (None if name == "resnet3d" else path)


def test_fused_swin3d_export_loads_into_swinunetr():
    torch.manual_seed(0)
    encoder = build_image_encoder("swin3d", "tiny", attention="fused").eval()
    manual = build_image_encoder("swin3d", "tiny", attention="manual")
    assert encoder.state_dict().keys() == manual.state_dict().keys()
    net = SwinUNETR(out_channels=2, **swinunetr_kwargs(encoder)).eval()
    result = net.load_state_dict(swinunetr_state_dict(encoder), strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if k.startswith("swinViT.")]
    volume = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.swinViT(volume, net.normalize)[-1], encoder.hidden_states(volume)[-1], **TOL)


def test_fused_vit3d_export_loads_into_unetr():
    torch.manual_seed(0)
    encoder = build_image_encoder("vit3d", "tiny", img_size=VIT_IMG, attention="fused").eval()
    net = UNETR(out_channels=2, feature_size=16, **unetr_kwargs(encoder)).eval()
    result = net.load_state_dict(unetr_state_dict(encoder), strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if k.startswith("vit.")]
    volume = torch.rand(VIT_INPUT)
    with torch.no_grad():
        torch.testing.assert_close(net.vit(volume)[0], encoder(volume)[1], **TOL)


@pytest.mark.parametrize("path", ATTENTION_PATHS)
def test_swin3d_checkpointing_saves_activation_memory(path):
    volume = torch.rand(1, 1, 32, 32, 32)
    saved = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        encoder = build_image_encoder("swin3d", "tiny", gradient_checkpointing=checkpointing, attention=path).train()
        saved[checkpointing] = saved_activation_bytes(lambda e=encoder: e(volume), encoder.parameters())
    assert saved[True] < saved[False] / 4, saved
