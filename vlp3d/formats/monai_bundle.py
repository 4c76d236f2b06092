"""A fine-tuned segmentation model as a MONAI bundle that MONAI's own runner runs
(`python -m monai.bundle run --config_file configs/inference.json --bundle_root DIR --datalist "[...]"`):

    DIR/configs/metadata.json    versions, task, network_data_format (input, classes of the output channels)
    DIR/configs/inference.json   preprocessing (`LoadCTd`: vlp3d's HU rules and preprocessing spec), the network
                                 (MONAI SwinUNETR / UNETR; vlp3d's ResNetUNet for resnet3d), MONAI's sliding-window
                                 inferer with the fine-tuning run's window and overlap, argmax, SaveImaged
    DIR/models/model.pt          the network's state dict
    DIR/docs/README.md           what it predicts, the input, how to run it

The preprocessing and the sliding window are those `vlp3d finetune` evaluated with, so the bundle's label maps
are the ones its Dice was computed from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from monai.transforms import MapTransform

from vlp3d.data.volume import PreprocessSpec, dequantise, preprocess_volume
from vlp3d.downstream import SEGMENTATION, UNETR_FEATURE_SIZE, FineTuned, NetworkSpec, build_network
from vlp3d.errors import InputError
from vlp3d.formats import new_output_dir
from vlp3d.inference import VolumeInput, load_ct

SW_BATCH_SIZE = 4  # vlp3d.downstream.sliding_window_logits' default: the same windows per forward


class LoadCTd(MapTransform):
    """Each key's path (NIfTI file, DICOM file or series folder) -> [1, X, Y, Z] float32 MetaTensor on the
    model's grid, exactly as `vlp3d prepare` makes it: HU by vlp3d's rules (header scaling, else the item's
    `rescale_slope` / `rescale_intercept`, e.g. CT-RATE's 1 and -1024; stored values all >= 0 with neither are
    refused unless `assume_hu`), RAS, the spec's spacing, window, crop/pad and storage rounding. The affine is
    the output grid's, so a saved prediction overlays the CT in any viewer."""

    def __init__(self, keys, spec: dict, assume_hu: bool = False, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.spec = PreprocessSpec.from_dict(spec)
        self.assume_hu = assume_hu

    def __call__(self, data: dict) -> dict:
        from monai.data import MetaTensor

        out = dict(data)
        for key in self.key_iterator(out):
            path = str(out[key])
            item = VolumeInput(path=path, rescale_slope=out.get("rescale_slope"),
                               rescale_intercept=out.get("rescale_intercept"), name=path)
            hu, affine, _ = load_ct(item, assume_hu=self.assume_hu)
            image, _, grid = preprocess_volume(hu, affine, self.spec, with_affine=True)
            volume = dequantise(torch.from_numpy(np.array(image)))[None]
            out[key] = MetaTensor(volume, affine=torch.from_numpy(grid), meta={"filename_or_obj": path})
        return out


def segmentation_network(network: dict) -> torch.nn.Module:
    """The network of a NetworkSpec dict, randomly initialised (the bundle loads models/model.pt into it)."""
    return build_network(NetworkSpec.from_dict(network))[0]


def network_def(spec: NetworkSpec) -> dict:
    """The bundle's `network_def`: MONAI's own SwinUNETR / UNETR with the fine-tuned network's arguments, or
    vlp3d's ResNetUNet (`segmentation_network`) for a resnet3d encoder."""
    from vlp3d.encoders import build_image_encoder
    from vlp3d.encoders.export import swinunetr_kwargs, unetr_kwargs

    if spec.encoder in ("swin3d", "vit3d"):
        encoder = build_image_encoder(spec.encoder, spec.size, img_size=spec.img_size)
        if spec.encoder == "swin3d":
            kwargs = {"_target_": "monai.networks.nets.SwinUNETR", **swinunetr_kwargs(encoder)}
        else:
            kwargs = {"_target_": "monai.networks.nets.UNETR", "feature_size": UNETR_FEATURE_SIZE,
                      **unetr_kwargs(encoder)}
        return json.loads(json.dumps({**kwargs, "out_channels": spec.out_channels}))
    return {"_target_": "vlp3d.formats.monai_bundle.segmentation_network", "network": spec.to_dict()}


def inference_config(model: FineTuned) -> dict:
    roi = list(model.network.img_size)
    return {
        "imports": ["$import glob", "$import numpy", "$import torch", "$import vlp3d.formats.monai_bundle"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "",
        # NIfTI files of dataset_dir, or a list given on the command line: paths, or dicts with `image` and
        # the metadata rescale (`rescale_slope`, `rescale_intercept`) where the file has none
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz'))) if @dataset_dir else []",
        "assume_hu": False,
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def(model.network),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "vlp3d.formats.monai_bundle.LoadCTd", "keys": "image", "spec": model.spec.to_dict(),
             "assume_hu": "@assume_hu"}]},
        "dataset": {"_target_": "Dataset", "transform": "@preprocessing",
                    "data": "$[i if isinstance(i, dict) else {'image': i} for i in @datalist]"},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": roi, "sw_batch_size": SW_BATCH_SIZE,
                    "overlap": model.overlap, "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_dtype": "$numpy.uint8", "separate_folder": False, "resample": False, "print_log": False}]},
        "checkpoint": "$torch.load(@bundle_root + '/models/model.pt', map_location=@device, weights_only=True)",
        "initialize": ["$@network.load_state_dict(@checkpoint)", "$@network.eval()"],
        # no_grad around the loop only: a global set_grad_enabled(False) would outlive an in-process run
        "run": ["$torch.no_grad()(lambda: [@postprocessing({**item, 'pred': @inferer(item['image'][None].to(@device), "
                "@network)[0]}) for item in @dataset])()"],
    }


def metadata(model: FineTuned, source: str) -> dict:
    import monai

    import vlp3d

    classes = {str(i): name for i, name in enumerate(model.names)}
    shape = list(model.network.img_size)
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by vlp3d {vlp3d.__version__} from {source}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"vlp3d": vlp3d.__version__, "nibabel": _version("nibabel")},
        "name": f"vlp3d {model.network.encoder} segmentation",
        "task": f"CT segmentation of {', '.join(model.names[1:])}",
        "description": (f"{model.network.encoder}/{model.network.size} fine-tuned by vlp3d for {len(model.names) - 1} "
                        f"classes; input: a CT volume path, preprocessed by vlp3d.formats.monai_bundle.LoadCTd"),
        "authors": "vlp3d",
        "copyright": "",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": shape, "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": len(model.names),
                                 "spatial_shape": shape, "dtype": "float32", "value_range": [],
                                 "is_patch_data": True, "channel_def": classes}},
        },
    }


def _version(distribution: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(distribution)


def readme(model: FineTuned, source: str) -> str:
    spec = model.spec
    classes = ", ".join(f"{i} = {name}" for i, name in enumerate(model.names))
    return "\n".join([
        f"# vlp3d {model.network.encoder} segmentation ({source})", "",
        f"Segments {', '.join(model.names[1:])} in CT volumes. Exported by `vlp3d export --format monai-bundle` "
        "from a `vlp3d finetune` model; the label maps this bundle writes are the ones the fine-tuning run's "
        "Dice was computed from.", "",
        "## Run", "", "```bash",
        "python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\",
        "    --bundle_root . --output_dir OUT \\",
        "    --datalist \"[{'image': 'scan.nii.gz', 'rescale_slope': 1.0, 'rescale_intercept': -1024.0}]\"",
        "# or every *.nii.gz of a folder whose headers hold the HU scaling: --dataset_dir DIR",
        "```", "",
        "Needs `vlp3d` importable (its `LoadCTd` preprocessing"
        + (" and its ResNetUNet network" if model.network.encoder not in ("swin3d", "vit3d") else "") + "), MONAI, "
        "torch and nibabel (pydicom for DICOM series).", "",
        "## Input", "",
        "A CT volume path (NIfTI, DICOM file or series folder). Hounsfield units come from the file's scaling, "
        "else from the item's `rescale_slope` / `rescale_intercept` (CT-RATE lists them in its metadata CSV); "
        "a volume whose stored values are all >= 0 with no rescale is refused (`--assume_hu true` if they are HU). "
        f"Preprocessing: RAS orientation, {list(spec.spacing_mm)} mm voxels ({spec.interpolation}), HU window "
        f"{list(spec.hu_window)} scaled to [0, 1], centre crop/pad to {list(spec.shape)} voxels"
        + (", body crop first" if spec.foreground_crop else "") + f", rounded to {spec.storage_dtype}.", "",
        "## Output", "",
        f"`OUT/<name>_seg.nii.gz`: uint8 label map on the preprocessed grid (its affine places it on the CT); "
        f"classes {classes}. Sliding window {list(model.network.img_size)}, overlap {model.overlap}, Gaussian "
        "weighting.", ""])


def export_monai_bundle(model: FineTuned, out: str | Path, source: str) -> Path:
    """Write the fine-tuned segmentation `model` as a MONAI bundle into the new folder `out`; returns it. A
    classification model is refused (ValueError) before anything is written."""
    if model.task != SEGMENTATION:
        raise InputError(f"{source} is a fine-tuned {model.task} model; a MONAI bundle holds a segmentation "
                         "model (vlp3d finetune with finetune.task = 'segmentation')")
    out = new_output_dir(out, "--out")
    for folder in ("configs", "models", "docs"):
        (out / folder).mkdir()
    torch.save({k: v.detach().cpu() for k, v in model.net.state_dict().items()}, out / "models" / "model.pt")
    (out / "configs" / "inference.json").write_text(json.dumps(inference_config(model), indent=2))
    (out / "configs" / "metadata.json").write_text(json.dumps(metadata(model, source), indent=2))
    (out / "docs" / "README.md").write_text(readme(model, source))
    return out
