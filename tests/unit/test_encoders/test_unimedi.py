import pytest
import torch

from vlp3d.encoders import build_image_encoder


@pytest.fixture(scope="module")
def unimedi():
    torch.manual_seed(0)
    return build_image_encoder("unimedi_vit", "tiny", img_size=(32, 32, 8), image_size_2d=(32, 32))


def test_2d_and_3d_share_the_transformer(unimedi):
    image_2d = torch.rand(2, 1, 32, 48)  # 2 x 3 patches
    volume_3d = torch.rand(2, 1, 32, 32, 8)  # 2 x 2 x 2 tubelets
    shared = unimedi.blocks[0].attn.qkv.weight

    unimedi.zero_grad(set_to_none=True)
    pooled, tokens = unimedi(image_2d)
    assert pooled.shape == (2, 192) and tokens.shape == (2, 6, 192)
    (pooled.square().mean() + tokens.square().mean()).backward()
    grad_2d = shared.grad.clone()
    assert grad_2d.abs().sum() > 0
    assert unimedi.patch_embed_3d.weight.grad is None and unimedi.pos_embed_3d.grad is None

    unimedi.zero_grad(set_to_none=True)
    pooled, tokens = unimedi(volume_3d)
    assert pooled.shape == (2, 192) and tokens.shape == (2, 8, 192)
    (pooled.square().mean() + tokens.square().mean()).backward()
    assert shared.grad.abs().sum() > 0
    assert unimedi.patch_embed_2d.weight.grad is None and unimedi.pos_embed_2d.grad is None
    assert not torch.equal(shared.grad, grad_2d)
    unimedi.zero_grad(set_to_none=True)

    # one set of transformer parameters: only tokenizers and positional tables are per-dimensionality
    names = {name for name, _ in unimedi.named_parameters()}
    per_dim = {
        n
        for n in names
        if n.endswith(("_2d.weight", "_2d.bias", "_3d.weight", "_3d.bias", "_2d", "_3d"))
    }
    assert per_dim == {
        "patch_embed_2d.weight",
        "patch_embed_2d.bias",
        "patch_embed_3d.weight",
        "patch_embed_3d.bias",
        "pos_embed_2d",
        "pos_embed_3d",
    }


def test_same_block_objects_for_both_dimensionalities(unimedi):
    seen = {"2d": [], "3d": []}
    hooks = [
        block.register_forward_hook(lambda module, *_: seen[current[0]].append(id(module)))
        for block in unimedi.blocks
    ]
    current = ["2d"]
    with torch.no_grad():
        unimedi(torch.rand(1, 1, 32, 32))
        current[0] = "3d"
        unimedi(torch.rand(1, 1, 32, 32, 8))
    for hook in hooks:
        hook.remove()
    assert seen["2d"] == seen["3d"] == [id(b) for b in unimedi.blocks]


def test_explicit_attention_path_matches_sdpa(unimedi):
    x = unimedi.embed(torch.rand(2, 1, 32, 32, 8))
    block = unimedi.blocks[0]
    with torch.no_grad():
        fast, none = block(x)
        slow, attention = block(x, return_attention=True)
    assert none is None and attention.shape == (2, 3, 9, 9)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 3, 9))


def test_cls_attention_is_uniform_when_queries_and_keys_are_zero():
    torch.manual_seed(0)
    model = build_image_encoder("unimedi_vit", "tiny", img_size=(32, 32, 8))
    with torch.no_grad():
        for block in model.blocks:
            dim = block.attn.qkv.in_features
            block.attn.qkv.weight[: 2 * dim] = (
                0  # q = k = 0 -> every logit 0 -> softmax 1 / (1 + N)
            )
            block.attn.qkv.bias[: 2 * dim] = 0
        volume = torch.rand(2, 1, 32, 32, 8)  # N = 2 * 2 * 2 = 8 tokens
        per_layer = model.cls_attention(volume, average_layers=False)
        averaged = model.cls_attention(volume)
    assert per_layer.shape == (2, 12, 8) and averaged.shape == (2, 8)
    torch.testing.assert_close(per_layer, torch.full((2, 12, 8), 1 / 9))
    torch.testing.assert_close(averaged, torch.full((2, 8), 1 / 9))
    # 8 slices along z, 2 tubelet slabs of 4; each slab holds 2 x 2 tokens of 1/9 -> 4/9 per slab, /4 per slice
    per_slice = model.attention_by_slice(averaged, volume.shape)
    torch.testing.assert_close(per_slice, torch.full((2, 8), 1 / 9))
    torch.testing.assert_close(per_slice.sum(1), averaged.sum(1))


def test_attention_by_slice_follows_the_z_axis(unimedi):
    # tokens in (x, y, z) raster order: z fastest, so token index % 2 is the slab for a 2x2x2 grid
    attention = torch.tensor([[1.0, 0.0] * 4])  # slab 0 (slices 0-3) holds all of it: 4 per slab
    per_slice = unimedi.attention_by_slice(attention, (1, 1, 32, 32, 8))
    # slab centres at z = 1.5 and 5.5: constant 4 up to 1.5, linear down to 0 at 5.5, then 0;
    # scaled to the total (4)
    ramp = torch.tensor([4.0, 4.0, 3.5, 2.5, 1.5, 0.5, 0.0, 0.0])
    torch.testing.assert_close(per_slice, (ramp * 4 / ramp.sum())[None])
    assert per_slice[0, :4].sum() > per_slice[0, 4:].sum()


def test_token_mask_replaces_tokens_with_mask_token(unimedi):
    volume = torch.rand(2, 1, 32, 32, 8)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :4] = True
    with torch.no_grad():
        unmasked = unimedi.embed(volume)
        masked = unimedi.embed(volume, mask)
        expected = unimedi.mask_token[0, 0] + unimedi.pos_embed_3d[0, :4]
        torch.testing.assert_close(masked[0, 1:5], expected)
        torch.testing.assert_close(masked[1], unmasked[1])
        torch.testing.assert_close(masked[0, 5:], unmasked[0, 5:])
        assert unimedi(volume, mask)[1].shape == (2, 8, 192)
    with pytest.raises(ValueError, match=r"token_mask must be bool \[B, N\] = \(2, 8\)"):
        unimedi(volume, mask.float())


def test_positional_embedding_is_resampled_for_other_sizes(unimedi):
    with torch.no_grad():
        pooled, tokens = unimedi(
            torch.rand(1, 1, 64, 32, 16)
        )  # grid 4 x 2 x 4, learned on 2 x 2 x 2
        assert tokens.shape == (1, 32, 192) and torch.isfinite(pooled).all()
        pooled, tokens = unimedi(torch.rand(1, 1, 64, 64))
        assert tokens.shape == (1, 16, 192)


def test_bad_input_shapes_name_the_patch():
    model = build_image_encoder("unimedi_vit", "tiny")
    with pytest.raises(ValueError, match=r"3D volume size \(32, 32, 6\).*\(16, 16, 4\)"):
        model(torch.rand(1, 1, 32, 32, 6))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\] or \[B, C, X, Y, Z\]"):
        model(torch.rand(1, 32, 32))
