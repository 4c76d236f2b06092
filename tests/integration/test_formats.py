"""The tiny demo's models in other formats, checked against what vlp3d itself computes (docs/formats.md):
the champion embedder exported to Hugging Face (within 1e-6) and ONNX (within 1e-4) embeds the demo's
validation volumes and reports as the registered pyfunc does; a segmentation model fine-tuned from it
(`vlp3d finetune --local`, 2 steps, 16^3 crops) exported as a MONAI bundle and run by MONAI's own runner
writes the label maps, and so the Dice, that the fine-tuning run logged."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from huggingface_hub import ModelCard
from mlflow.tracking import MlflowClient

from tests.mlflow_store import current_store
from vlp3d.cli import main
from vlp3d.inference import VolumeInput

# MONAI warns that a bundle config runs code: these are the bundles the tests just wrote
pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")
HF_TOLERANCE, ONNX_TOLERANCE, DICE_TOLERANCE = 1e-6, 1e-4, 1e-6
CHAMPION = "models:/vlp3d-clip@champion"


def _uri(tiny_demo) -> str:
    return f"sqlite:///{tiny_demo / 'mlflow.db'}"


@pytest.fixture(scope="module")
def demo_inputs(tiny_demo) -> pd.DataFrame:
    """The demo's validation volumes with their metadata rescale (CT-RATE's CSV) and their reports."""
    corpus = tiny_demo / "corpus"
    rescale = pd.read_csv(corpus / "metadata" / "validation_metadata.csv").set_index("VolumeName")
    reports = pd.read_csv(corpus / "radiology_text_reports" / "validation_reports.csv").set_index("VolumeName")
    paths = sorted((corpus / "valid").rglob("*.nii.gz"))
    names = [p.name for p in paths]
    return pd.DataFrame({"image": [str(p) for p in paths], "volume_name": names,
                         "rescale_slope": rescale.loc[names, "RescaleSlope"].astype(float).to_numpy(),
                         "rescale_intercept": rescale.loc[names, "RescaleIntercept"].astype(float).to_numpy(),
                         "report": (reports.loc[names, "Findings_EN"] + "\n" + reports.loc[names, "Impressions_EN"]).to_numpy()})


@pytest.fixture(scope="module")
def pyfunc_embeddings(tiny_demo, demo_inputs) -> tuple[np.ndarray, np.ndarray]:
    with current_store(_uri(tiny_demo)):
        # a served model reads no paths unless told which folder it may read (docs/security.md)
        model = mlflow.pyfunc.load_model(CHAMPION, model_config={"allowed_root": str(tiny_demo)})
        out = model.predict(demo_inputs[["image", "rescale_slope", "rescale_intercept", "report"]])
    return np.stack(out["image_embedding"]), np.stack(out["report_embedding"])


def _volume_inputs(frame: pd.DataFrame) -> list[VolumeInput]:
    return [VolumeInput(path=r.image, rescale_slope=r.rescale_slope, rescale_intercept=r.rescale_intercept)
            for r in frame.itertuples()]


def test_hf_export_of_the_champion_embeds_as_the_registered_pyfunc(tiny_demo, tmp_path, demo_inputs,
                                                                   pyfunc_embeddings):
    from vlp3d.formats.hf import Vlp3dModel

    out = tmp_path / "hf"
    assert main(["export", "--model", CHAMPION, "--format", "hf", str(out), "--tracking-uri", _uri(tiny_demo),
                 "--license", "apache-2.0"]) == 0
    model = Vlp3dModel.from_pretrained(out)
    images = model.embed_inputs(_volume_inputs(demo_inputs)).numpy()
    reports = model.embed_reports(list(demo_inputs["report"])).numpy()
    assert np.abs(images - pyfunc_embeddings[0]).max() <= HF_TOLERANCE
    assert np.abs(reports - pyfunc_embeddings[1]).max() <= HF_TOLERANCE
    # the card carries the registered version's zero-shot AUROC with its interval, as the run logged them
    client = MlflowClient(tracking_uri=_uri(tiny_demo), registry_uri=_uri(tiny_demo))
    version = client.get_model_version_by_alias("vlp3d-clip", "champion")
    metrics = client.get_run(version.run_id).data.metrics
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and card.data.datasets
    [macro] = [r for r in card.data.eval_results if r.metric_args["finding"] == "macro"]
    assert macro.metric_value == round(metrics["eval/valid/macro_auroc"], 4)
    assert macro.metric_args["ci_low"] == round(metrics["eval/valid/macro_auroc_ci_low"], 4)
    assert macro.metric_args["ci_high"] == round(metrics["eval/valid/macro_auroc_ci_high"], 4)
    assert f"models:/vlp3d-clip/{version.version}" in card.text
    assert str(tiny_demo) not in (out / "README.md").read_text() + (out / "config.json").read_text()


def test_onnx_export_of_the_champion_embeds_as_the_registered_pyfunc(tiny_demo, tmp_path, demo_inputs,
                                                                     pyfunc_embeddings):
    from vlp3d.formats.onnx_export import OnnxEmbedder

    out = tmp_path / "onnx"
    assert main(["export", "--model", CHAMPION, "--format", "onnx", str(out), "--tracking-uri", _uri(tiny_demo)]) == 0
    model = OnnxEmbedder(out)
    images = model.embed_inputs(_volume_inputs(demo_inputs))
    reports = model.embed_reports(list(demo_inputs["report"]))
    assert np.abs(images - pyfunc_embeddings[0]).max() <= ONNX_TOLERANCE
    assert np.abs(reports - pyfunc_embeddings[1]).max() <= ONNX_TOLERANCE


@pytest.fixture(scope="module")
def segmentation_bundle(tiny_demo, tmp_path_factory):
    """A segmentation model fine-tuned on the demo (2 steps, 16^3 crops, registered under its own name) and
    its MONAI bundle, exported from the registry."""
    uri = _uri(tiny_demo)
    assert main(["finetune", str(tiny_demo / "config.toml"), "finetune.max_steps=2", "finetune.global_batch=2",
                 "finetune.roi_size=[16, 16, 16]", 'finetune.classes=["lung", "heart"]', "train.checkpoint_every=2",
                 "finetune.registered_model=vlp3d-formats-segmentation", "--model", CHAMPION,
                 "--run-name", "formats-bundle", "--local"]) == 0
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    assert main(["export", "--model", "models:/vlp3d-formats-segmentation/1", "--format", "monai-bundle", str(out),
                 "--tracking-uri", uri]) == 0
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(client.get_model_version("vlp3d-formats-segmentation", "1").run_id)
    return out, run.data.metrics


def test_monai_bundle_reproduces_the_finetuning_runs_dice(tiny_demo, tmp_path, demo_inputs, segmentation_bundle):
    from monai.bundle import run

    from vlp3d.data.rows import block_rows, read_blocks
    from vlp3d.data.shards import decode_label_map, read_manifest, resolve_shard_dir, shard_files
    from vlp3d.evaluation.segmentation import segmentation_table
    from vlp3d.train.tasks.finetune import class_lookup

    bundle, metrics = segmentation_bundle
    # the validation volumes with label maps, as the run evaluated them (targets from the shards)
    shard_dir = resolve_shard_dir(tiny_demo / "shards")
    spec = read_manifest(shard_dir)["spec"]
    classes = read_manifest(shard_dir)["label_maps"]["classes"]
    names = [classes[0], "lung", "heart"]
    lookup = class_lookup([0, classes.index("lung"), classes.index("heart")])
    targets = {}
    for block in read_blocks(shard_files(shard_dir, "ct"), ["volume_name", "label_map", "image_shape"], "valid",
                             nonempty="label_map"):
        for i in range(block_rows(block)):
            targets[block["volume_name"][i]] = lookup[decode_label_map(block["label_map"][i], block["image_shape"][i])]
    items = demo_inputs[demo_inputs["volume_name"].isin(targets)]
    assert len(items) == len(targets) >= 3
    run(config_file=str(bundle / "configs" / "inference.json"), meta_file=str(bundle / "configs" / "metadata.json"),
        bundle_root=str(bundle), output_dir=str(tmp_path / "predicted"),
        datalist=items[["image", "rescale_slope", "rescale_intercept"]].to_dict("records"))
    import nibabel as nib

    predicted = np.stack([np.asarray(nib.load(tmp_path / "predicted" / name.replace(".nii.gz", "_seg.nii.gz")).dataobj)
                          .squeeze() for name in items["volume_name"]])
    target = np.stack([targets[name] for name in items["volume_name"]])
    table = segmentation_table(predicted, target, names, spec["spacing_mm"]).set_index("class")
    for name in ("lung", "heart"):
        # the same label maps; the mean Dice over volumes is taken in float32 in another volume order
        assert abs(table.loc[name, "dice"] - metrics[f"eval/valid/dice/{name}"]) <= DICE_TOLERANCE, name
    assert json.loads((bundle / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"]["pred"][
        "channel_def"] == {"0": names[0], "1": "lung", "2": "heart"}
