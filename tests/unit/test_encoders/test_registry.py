import pytest

from vlp3d.encoders import IMAGE_ENCODERS, SIZES, build_image_encoder
from vlp3d.errors import InputError


def test_all_encoders_registered():
    assert {"resnet3d", "swin3d", "vit3d", "unimedi_vit"} <= set(IMAGE_ENCODERS)


def test_unknown_encoder_names_config_key_and_choices():
    with pytest.raises(InputError, match=r"model\.image_encoder = 'nope'.*swin3d"):
        build_image_encoder("nope", "tiny")


@pytest.mark.parametrize("name", ["resnet3d", "swin3d", "vit3d", "unimedi_vit"])
def test_unknown_size_names_config_key_and_presets(name):
    with pytest.raises(InputError, match=r"model\.size = 'huge'.*'base'.*'large'.*'small'.*'tiny'"):
        build_image_encoder(name, "huge")


def test_unknown_kwarg_lists_valid_ones():
    with pytest.raises(TypeError, match=r"does not take \['depth'\].*img_size"):
        build_image_encoder("resnet3d", "tiny", depth=3)


@pytest.mark.parametrize("name", sorted(IMAGE_ENCODERS))
def test_every_builder_takes_img_size_and_checkpointing(name):
    # engine can pass img_size=data.shape and gradient_checkpointing to any encoder
    encoder = build_image_encoder(name, "tiny", img_size=(64, 64, 32), gradient_checkpointing=True)
    assert encoder.gradient_checkpointing is True
    assert encoder.out_dim > 0


def test_swin_rejects_shape_not_divisible_by_32():
    with pytest.raises(ValueError, match=r"divisible by 32.*\(48, 48, 48\)"):
        build_image_encoder("swin3d", "tiny", img_size=(48, 48, 48))


def test_vit3d_rejects_other_input_shape():
    import torch

    encoder = build_image_encoder("vit3d", "tiny", img_size=(32, 32, 16))
    with pytest.raises(ValueError, match=r"img_size \(32, 32, 16\).*\(32, 32, 32\)"):
        encoder(torch.zeros(1, 1, 32, 32, 32))


def test_sizes_constant_matches_presets():
    assert SIZES == ("tiny", "small", "base", "large")


def _vlp3d_imports(module: str) -> set[str]:
    """The vlp3d modules `module` imports anywhere in its source (top level or inside functions)."""
    import ast
    import importlib.util

    tree = ast.parse(open(importlib.util.find_spec(module).origin).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n.startswith("vlp3d")}


def test_no_import_circles_between_registry_encoders_and_hu():
    """Encoder modules import the registry, never the reverse; the DICOM and NIfTI readers share
    `vlp3d.data.hounsfield` instead of importing each other."""
    leaf = {"vlp3d.errors"}  # imports nothing: no circle through it
    assert _vlp3d_imports("vlp3d.encoders.registry") - leaf == set()
    for module in ("resnet", "swin", "vit", "unimedi"):
        assert "vlp3d.encoders.registry" in _vlp3d_imports(f"vlp3d.encoders.{module}")
    assert sorted(IMAGE_ENCODERS) == ["resnet3d", "swin3d", "unimedi_vit", "vit3d"]
    assert _vlp3d_imports("vlp3d.data.hounsfield") - leaf == set()
    assert "vlp3d.data.volume" not in _vlp3d_imports("vlp3d.data.dicom")
