import pytest
import torch
from monai.networks.nets import UNETR, SwinUNETR
from torch import nn

from vlp3d.encoders import build_image_encoder
from vlp3d.encoders.export import (
    count_parameters,
    image_encoder_state_dict,
    measure_memory,
    swinunetr_kwargs,
    swinunetr_state_dict,
    unetr_kwargs,
    unetr_state_dict,
)
from vlp3d.encoders.vit import ViTEncoder3d
from vlp3d.errors import InputError


def _trained_like(encoder: nn.Module, seed: int) -> nn.Module:
    # move every weight off its init so a copy cannot match by accident
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in encoder.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return encoder.eval()


def test_swinunetr_loads_export_and_reproduces_features():
    torch.manual_seed(0)
    encoder = _trained_like(build_image_encoder("swin3d", "tiny"), seed=1)
    volume = torch.rand(1, 1, 64, 32, 32)
    torch.manual_seed(2)
    net = SwinUNETR(out_channels=3, **swinunetr_kwargs(encoder)).eval()
    with torch.no_grad():
        assert not torch.allclose(net.swinViT(volume)[-1], encoder.hidden_states(volume)[-1])
    result = net.load_state_dict(swinunetr_state_dict(encoder), strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if k.startswith("swinViT.")]
    assert result.missing_keys  # the decoder stays as initialised
    with torch.no_grad():
        theirs = net.swinViT(volume, net.normalize)
        ours = encoder.hidden_states(volume)
        pooled, tokens = encoder(volume)
        assert net(volume).shape == (1, 3, 64, 32, 32)
    for a, b in zip(theirs, ours, strict=True):
        torch.testing.assert_close(a, b)
    assert theirs[-1].shape == (1, 192, 2, 1, 1)  # 16 * feature_size 12 channels at /32
    torch.testing.assert_close(tokens, theirs[-1].flatten(2).transpose(1, 2))


def test_swinunetr_default_constructor_loads_feature_size_48():
    # the plain SwinUNETR(in_channels=1, out_channels=K, feature_size=F) from METHODS.md
    encoder = build_image_encoder("swin3d", "base")
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=48)
    result = net.load_state_dict(swinunetr_state_dict(encoder), strict=False)
    assert not result.unexpected_keys and not [
        k for k in result.missing_keys if k.startswith("swinViT.")
    ]
    assert encoder.out_dim == 768


def test_unetr_loads_export_and_reproduces_tokens():
    torch.manual_seed(0)
    encoder = _trained_like(build_image_encoder("vit3d", "tiny", img_size=(32, 32, 16)), seed=1)
    volume = torch.rand(2, 1, 32, 32, 16)
    torch.manual_seed(2)
    net = UNETR(out_channels=3, feature_size=16, **unetr_kwargs(encoder)).eval()
    result = net.load_state_dict(unetr_state_dict(encoder), strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if k.startswith("vit.")]
    with torch.no_grad():
        theirs, _ = net.vit(volume)
        pooled, tokens = encoder(volume)
    torch.testing.assert_close(tokens, theirs)
    torch.testing.assert_close(pooled, theirs.mean(1))


def test_unetr_export_refuses_other_depths():
    with pytest.raises(ValueError, match="UNETR has 12 blocks"):
        unetr_state_dict(
            ViTEncoder3d(
                img_size=(32, 32, 32), hidden_size=96, mlp_dim=192, num_layers=4, num_heads=2
            )
        )


def test_export_refuses_wrong_encoder():
    with pytest.raises(TypeError, match="swin3d"):
        swinunetr_state_dict(build_image_encoder("resnet3d", "tiny"))


def test_image_encoder_weights_from_full_model_state_dict():
    from vlp3d.objectives.model import VisionLanguageModel

    encoder = build_image_encoder("swin3d", "tiny")
    model = VisionLanguageModel(encoder, text_dim=384)
    full = {f"module.{k}": v for k, v in model.state_dict().items()}  # as saved from a DDP wrapper
    own = image_encoder_state_dict(full)
    assert set(own) == set(encoder.state_dict())
    fresh = build_image_encoder("swin3d", "tiny")
    fresh.load_state_dict(own)
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12)
    result = net.load_state_dict(swinunetr_state_dict(fresh), strict=False)
    assert not [k for k in result.missing_keys if k.startswith("swinViT.")]
    with pytest.raises(InputError, match=r"no key starts with 'image_encoder\.'.*'image_proj'"):
        image_encoder_state_dict({"image_proj.0.weight": torch.zeros(1)})


def test_count_parameters_by_hand():
    shared = nn.Linear(3, 4)  # 3 * 4 + 4 = 16
    model = nn.Sequential(shared, shared, nn.Linear(4, 1))  # + 4 + 1 = 21, shared once
    assert count_parameters(model) == 21
    model[2].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 16


class _Linear(nn.Module):
    """tokens = volume flattened to [B, N, 1024] times a 1024 x 1024 weight."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1024, 1024, bias=False)
        self.out_dim = 1024

    def forward(self, volume):
        tokens = self.linear(volume.flatten(2).transpose(1, 2))
        return tokens.mean(1), tokens


def test_measure_memory_counts_gradients_and_activations():
    report = measure_memory(_Linear(), (1, 1024, 256, 1, 1))
    mib = 2**20
    # weight 4 MiB + input 1 MiB resident; the step holds the 4 MiB weight gradient, the 1 MiB
    # output and its 1 MiB gradient at once (plus a few bytes of scalars)
    assert report.resident_bytes == 5 * mib
    assert 6 * mib <= report.step_peak_bytes < 7 * mib
    assert report.peak_bytes == report.resident_bytes + report.step_peak_bytes
    assert "profiler" in report.method
