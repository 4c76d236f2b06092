"""Downstream networks start from the pretrained encoder; Dice and HD95 on hand-made masks."""

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion
from scipy.spatial.distance import cdist

from vlp3d.downstream import NetworkSpec, build_network
from vlp3d.encoders import build_image_encoder
from vlp3d.evaluation.segmentation import baseline_table, dice_hd95, segmentation_table


def _pretrained_like(name: str, shape) -> dict[str, torch.Tensor]:
    """An encoder's state dict moved off its initialisation, as pretraining would."""
    torch.manual_seed(1)
    encoder = build_image_encoder(name, "tiny", img_size=shape)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in encoder.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return encoder.state_dict()


@pytest.mark.parametrize("name,prefix,shape", [("swin3d", "swinViT.", (64, 32, 32)), ("vit3d", "vit.", (32, 32, 16)),
                                               ("resnet3d", "encoder.", (24, 24, 24))])
def test_segmentation_network_starts_from_every_pretrained_encoder_weight(name, prefix, shape):
    state = _pretrained_like(name, shape)
    spec = NetworkSpec("segmentation", name, "tiny", shape, out_channels=3)
    torch.manual_seed(3)
    pretrained, load = build_network(spec, state)
    torch.manual_seed(3)  # the same seed: the decoders start equal, only the encoder weights differ
    random, random_load = build_network(spec)
    assert load.missing == [] and load.loaded and random_load.loaded == []
    net_state = pretrained.state_dict()
    encoder_keys = [k for k in net_state if k.startswith(prefix)]
    assert len(encoder_keys) == len(state)  # every encoder weight of the network is a pretrained one
    exported = {k.removeprefix(prefix): v for k, v in net_state.items() if k.startswith(prefix)}
    # the export renames nothing but the prefix: the encoder's own keys (`swinViT.*`, `vit.*`, the ResNet's)
    inner = "" if name == "resnet3d" else prefix
    assert all(torch.equal(exported[k.removeprefix(inner)], v) for k, v in state.items())
    decoder = [k for k in net_state if not k.startswith(prefix)]
    assert all(torch.equal(net_state[k], random.state_dict()[k]) for k in decoder)
    volume = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out_pretrained, out_random = pretrained.eval()(volume), random.eval()(volume)
    assert out_pretrained.shape == (1, 3, *shape)
    assert (out_pretrained - out_random).abs().max() > 1e-3  # the loaded weights change what it computes


def test_classifier_starts_from_the_encoder_and_resnet_is_any_size():
    state = _pretrained_like("resnet3d", (40, 36, 28))
    spec = NetworkSpec("classification", "resnet3d", "tiny", (40, 36, 28), out_channels=5, head="mlp")
    net, load = build_network(spec, state)
    assert load.missing == [] and all(torch.equal(net.encoder.state_dict()[k], v) for k, v in state.items())
    assert net(torch.rand(2, 1, 40, 36, 28)).shape == (2, 5)
    seg, _ = build_network(NetworkSpec("segmentation", "resnet3d", "tiny", (40, 36, 28), 4), state)
    assert seg(torch.rand(1, 1, 40, 36, 28)).shape == (1, 4, 40, 36, 28)


def test_encoders_without_a_decoder_and_weights_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="no decoder for model.image_encoder = 'unimedi_vit'"):
        build_network(NetworkSpec("segmentation", "unimedi_vit", "tiny", (32, 32, 32), 3))
    state = _pretrained_like("resnet3d", (24, 24, 24))
    with pytest.raises(ValueError, match="do not fit"):
        build_network(NetworkSpec("segmentation", "resnet3d", "small", (24, 24, 24), 3), state)


def _hd95_brute_force(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """Symmetric 95th-percentile surface distance by brute force (surface = mask minus its erosion)."""
    def surface(mask):
        return np.argwhere(mask & ~binary_erosion(mask)) * np.asarray(spacing)
    d = cdist(surface(a), surface(b))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_dice_and_hd95_on_hand_made_masks():
    spacing = (2.0, 1.0, 1.5)
    target = np.zeros((3, 16, 16, 16), dtype=np.uint8)
    prediction = np.zeros_like(target)
    # volume 0: class 1 a 4^3 cube, predicted shifted by 2 voxels in x (half overlap); class 2 exact
    target[0, 2:6, 2:6, 2:6], prediction[0, 4:8, 2:6, 2:6] = 1, 1
    target[0, 10:14, 10:14, 10:14] = prediction[0, 10:14, 10:14, 10:14] = 2
    # volume 1: class 1 a single voxel predicted 3 voxels away along x; class 2 missed entirely
    target[1, 4, 4, 4], prediction[1, 7, 4, 4] = 1, 1
    target[1, 10:12, 10:12, 10:12] = 2
    # volume 2: a 6 x 4 x 4 box predicted as its 3 x 4 x 4 half; class 2 absent from the target
    target[2, 2:8, 2:6, 2:6], prediction[2, 2:5, 2:6, 2:6] = 1, 1
    prediction[2, 12, 12, 12] = 2
    dice, hd95 = dice_hd95(prediction, target, num_classes=3, spacing_mm=spacing)
    np.testing.assert_allclose(dice[:, 0], [0.5, 0.0, 2 * 48 / (96 + 48)], rtol=1e-6)
    np.testing.assert_allclose(dice[:2, 1], [1.0, 0.0])
    assert np.isnan(dice[2, 1]) and np.isnan(hd95[2, 1])  # absent from the target: not counted
    assert hd95[0, 1] == 0.0 and hd95[1, 1] == np.inf  # exact / missed
    assert hd95[1, 0] == pytest.approx(3 * 2.0)  # one voxel, 3 voxels of 2 mm away
    for index in (0, 2):
        expected = _hd95_brute_force(prediction[index] == 1, target[index] == 1, spacing)
        assert hd95[index, 0] == pytest.approx(expected, rel=1e-5), index
    assert hd95[0, 0] == pytest.approx(4.0)  # 2 voxels of 2 mm
    table = segmentation_table(prediction, target, ["background", "a", "b"], spacing).set_index("class")
    assert table.loc["a", "volumes"] == 3 and table.loc["b", "volumes"] == 2
    assert table.loc["a", "dice"] == pytest.approx((0.5 + 0 + 2 * 48 / 144) / 3)
    assert table.loc["b", "dice"] == pytest.approx(0.5) and table.loc["b", "hd95_mm"] == np.inf  # median of 0, inf


def test_trivial_baselines_on_hand_made_masks():
    train = np.zeros((3, 8, 8, 8), dtype=np.uint8)
    train[:, :4] = 1  # class 1 always in the lower half of x
    train[:2, 6:, 6:, 6:] = 2  # class 2 in a corner, in 2 of 3 volumes
    target = np.zeros((1, 8, 8, 8), dtype=np.uint8)
    target[0, :4], target[0, 6:, 6:, 6:] = 1, 2
    table = baseline_table(train, target, ["background", "one", "two"]).set_index("class")
    assert table.loc["one", "dice_atlas"] == pytest.approx(1.0) and table.loc["two", "dice_atlas"] == pytest.approx(1.0)
    assert table.loc["one", "dice_everywhere"] == pytest.approx(2 * 256 / (512 + 256))
    assert table.loc["two", "dice_everywhere"] == pytest.approx(2 * 8 / (512 + 8))
