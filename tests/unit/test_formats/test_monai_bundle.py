"""MONAI bundle: a fine-tuning checkpoint of a tiny random segmentation network exported as a bundle and run
by MONAI's own runner (monai.bundle.run) writes the label maps vlp3d's FineTuned predicts for the same files;
SwinUNETR bundles need nothing but MONAI for their network; bad input is refused."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.unit.test_formats.helpers import phantom_ct
from vlp3d.data.volume import PreprocessSpec, preprocess_hu
from vlp3d.downstream import FineTuned, NetworkSpec, build_network
from vlp3d.formats.monai_bundle import export_monai_bundle
from vlp3d.inference import VolumeInput, load_ct

# MONAI warns that a bundle config runs code: these are the bundles the tests just wrote
pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")
NAMES = ["background", "lung", "heart"]
AFFINE = np.diag([7.0, 7.5, 9.0, 1.0])


def finetuning_checkpoint(folder, network: NetworkSpec, spec: PreprocessSpec, seed: int = 0):
    """The files FineTuned reads: model.pt and meta.json (spec, network, class names, window overlap)."""
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    net, _ = build_network(network)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(0.05 * torch.randn(param.shape))
    torch.save(net.state_dict(), folder / "model.pt")
    (folder / "meta.json").write_text(json.dumps({
        "spec": spec.to_dict(), "finetune": {"network": network.to_dict(), "names": NAMES, "overlap": 0.25}}))
    return FineTuned(folder)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    model = finetuning_checkpoint(root / "checkpoint", NetworkSpec("segmentation", "resnet3d", "tiny", (16, 16, 16), 3),
                                  PreprocessSpec(shape=(32, 32, 32), spacing_mm=(8.0, 8.0, 8.0)))
    return model, export_monai_bundle(model, root / "bundle", "models:/vlp3d-clip-segmentation/2"), root


def test_monai_runner_writes_the_label_maps_vlp3d_predicts(bundle):
    from monai.bundle import run

    model, out, root = bundle
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == {
        "configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md"}
    hu = phantom_ct(seed=3)
    # CT-RATE's two cases: HU from the header's scaling; raw values + the metadata CSV's rescale
    scaled = nib.Nifti1Image(np.round(hu + 1024).astype(np.int16), AFFINE)
    scaled.header.set_slope_inter(1.0, -1024.0)
    nib.save(scaled, root / "scaled.nii.gz")
    nib.save(nib.Nifti1Image(np.round(hu + 1024).astype(np.int16), AFFINE), root / "raw.nii.gz")
    items = [{"image": str(root / "scaled.nii.gz")},
             {"image": str(root / "raw.nii.gz"), "rescale_slope": 1.0, "rescale_intercept": -1024.0}]
    run(config_file=str(out / "configs" / "inference.json"), meta_file=str(out / "configs" / "metadata.json"),
        bundle_root=str(out), output_dir=str(root / "predicted"), datalist=items)
    for item, name in zip(items, ("scaled", "raw"), strict=True):
        written = nib.load(root / "predicted" / f"{name}_seg.nii.gz")
        volume = VolumeInput(path=item["image"], rescale_slope=item.get("rescale_slope"),
                             rescale_intercept=item.get("rescale_intercept"))
        hu_loaded, affine, _ = load_ct(volume)
        expected = model.predict([preprocess_hu(hu_loaded, affine, model.spec)])[0]
        labels = np.asarray(written.dataobj).squeeze()
        assert written.get_data_dtype() == np.uint8 and labels.shape == (32, 32, 32)
        np.testing.assert_array_equal(labels, expected)
        assert len(np.unique(labels)) > 1
        # the output grid's affine: 8 mm voxels in RAS
        np.testing.assert_allclose(np.abs(np.diag(written.affine)[:3]), [8.0, 8.0, 8.0])


def test_metadata_names_the_classes_and_the_input(bundle):
    _, out, _ = bundle
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "lung", "2": "heart"}
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [16, 16, 16]
    config = json.loads((out / "configs" / "inference.json").read_text())
    assert config["inferer"] == {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "sw_batch_size": 4,
                                 "overlap": 0.25, "mode": "gaussian"}


def test_swinunetr_bundle_builds_monai_network_that_loads_the_weights(tmp_path):
    from monai.bundle import ConfigParser

    model = finetuning_checkpoint(tmp_path / "checkpoint", NetworkSpec("segmentation", "swin3d", "tiny", (64, 32, 32), 3),
                                  PreprocessSpec(shape=(64, 32, 32), spacing_mm=(8.0, 8.0, 8.0)))
    out = export_monai_bundle(model, tmp_path / "bundle", "checkpoint")
    parser = ConfigParser()
    parser.read_config(str(out / "configs" / "inference.json"))
    assert parser["network_def"]["_target_"] == "monai.networks.nets.SwinUNETR"
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True), strict=True)
    volume = torch.rand(1, 1, 64, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(volume), model.net(volume), rtol=0, atol=1e-6)


def test_refuses_a_classification_model_and_a_folder_that_is_not_empty(tmp_path):
    classifier = finetuning_checkpoint(tmp_path / "classifier", NetworkSpec("classification", "resnet3d", "tiny",
                                                                            (32, 32, 32), 2),
                                       PreprocessSpec(shape=(32, 32, 32)))
    with pytest.raises(ValueError, match="is a fine-tuned classification model; a MONAI bundle holds a segmentation"):
        export_monai_bundle(classifier, tmp_path / "out", "models:/m-classification/1")
    assert not (tmp_path / "out").exists()
    segmenter = finetuning_checkpoint(tmp_path / "segmenter", NetworkSpec("segmentation", "resnet3d", "tiny",
                                                                          (16, 16, 16), 3), PreprocessSpec(shape=(32, 32, 32)))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        export_monai_bundle(segmenter, tmp_path / "out", "ck")
