"""Job: export a model for other tools: the image encoder for MONAI SwinUNETR / UNETR fine-tuning, an embedding
model in Hugging Face or ONNX format, a fine-tuned segmentation model as a MONAI bundle (docs/formats.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlp3d.errors import InputError
from vlp3d.jobs.common import add_tracking_arguments, run_main, tracking_uri_from

ENCODER_FORMATS = ("swinunetr", "unetr")
FOLDER_FORMATS = ("hf", "onnx", "monai-bundle")
FORMATS = ENCODER_FORMATS + FOLDER_FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = (
        "Export a model. 'swinunetr' / 'unetr': the pretrained image encoder as a state dict MONAI's SwinUNETR "
        "(swinViT.* keys, model.image_encoder = swin3d) or UNETR (vit.*, vit3d) loads with strict=False, into "
        "a .pt file. 'hf': an embedding model in Hugging Face format (safetensors, config.json, text encoder and "
        "tokenizer, model card) that vlp3d.formats.hf.Vlp3dModel.from_pretrained loads. 'onnx': its image and "
        "text encoders as ONNX graphs for onnxruntime. 'monai-bundle': a fine-tuned segmentation model as a MONAI "
        "bundle that `python -m monai.bundle run` runs. The folder formats write into a new or empty folder."
    )
    parser.add_argument("--model", required=True,
                        help="MLflow model URI (models:/vlp3d-clip@champion; monai-bundle: a `vlp3d finetune` "
                             "model, e.g. models:/vlp3d-clip-segmentation/1), or a vlp3d checkpoint folder")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument("out", nargs="?", help="output: a .pt file (swinunetr, unetr) or a new folder")
    parser.add_argument("--out", dest="out_flag", metavar="OUT", help="the output, as an option")
    parser.add_argument("--license", default="other",
                        help="hf: the model card's license (a Hugging Face license id, e.g. cc-by-nc-sa-4.0 for "
                             "weights trained on CT-RATE; default 'other')")
    parser.add_argument("--dataset", default="",
                        help="hf: the training data's name in the model card (default: vlp3d-shards-<data hash>)")
    add_tracking_arguments(parser)
    return parser


def export_encoder(encoder, fmt: str) -> tuple[dict, dict]:
    """(state dict, MONAI constructor kwargs) for `fmt`."""
    from vlp3d.encoders import export

    if fmt == "swinunetr":
        return export.swinunetr_state_dict(encoder), export.swinunetr_kwargs(encoder)
    return export.unetr_state_dict(encoder), export.unetr_kwargs(encoder)


def _is_checkpoint(model: str) -> bool:
    from vlp3d.train import checkpoint as checkpoints

    folder = Path(model)
    if folder.is_dir() and not (folder / checkpoints.META).is_file():
        raise InputError(f"--model {model} is a folder without {checkpoints.META}: give a vlp3d checkpoint folder "
                         "(model.pt, config.toml, meta.json) or an MLflow model URI")
    return folder.is_dir()


def load_embedder(args: argparse.Namespace) -> tuple[object, dict]:
    """(Embedder, the logged model's metadata) of --model: a checkpoint folder or a logged embedding model."""
    if _is_checkpoint(args.model):
        from vlp3d.inference import Embedder

        embedder = Embedder(args.model)
        if "finetune" in embedder.meta:
            raise InputError(f"--model {args.model} is a fine-tuning checkpoint, not an embedding model")
        return embedder, {"label_names": embedder.label_names, "logit_scale": embedder.logit_scale}
    from vlp3d.platform.mlflow.models import load_embedder as load_logged
    from vlp3d.platform.mlflow.store import client

    client(tracking_uri_from(args))
    model, embedder = load_logged(args.model)
    return embedder, dict(model.unwrap_python_model().metadata)


def load_finetuned(args: argparse.Namespace):
    """The `vlp3d.downstream.FineTuned` of --model: a fine-tuning checkpoint folder or a logged fine-tuned model."""
    from vlp3d.downstream import FineTuned

    if _is_checkpoint(args.model):
        from vlp3d.train import checkpoint as checkpoints

        if "finetune" not in checkpoints.read_meta(args.model):
            raise InputError(f"--model {args.model} is a pretraining checkpoint; a MONAI bundle holds a fine-tuned "
                             "segmentation model (vlp3d finetune with finetune.task = 'segmentation')")
        return FineTuned(args.model)
    from vlp3d.platform.mlflow.models import load_pyfunc
    from vlp3d.platform.mlflow.store import client

    client(tracking_uri_from(args))
    python_model = load_pyfunc(args.model).unwrap_python_model()
    model = getattr(python_model, "model", None)
    if not isinstance(model, FineTuned):
        raise InputError(f"--model {args.model} is an embedding model ({type(python_model).__name__}); a MONAI "
                         "bundle holds a fine-tuned segmentation model (vlp3d finetune with finetune.task = "
                         "'segmentation')")
    return model


def source_name(model: str) -> str:
    """How an export names its source: the model URI, or a checkpoint folder by its own name only (the
    files may be shared; the local path stays here)."""
    return f"checkpoint folder {Path(model).resolve().name}" if Path(model).is_dir() else model


def card_info(args: argparse.Namespace):
    """The hf model card's facts: the registered version's evaluation, or only the source for a folder."""
    from vlp3d.formats.hf import CardInfo, Evaluation

    if Path(args.model).is_dir():
        return CardInfo(source=source_name(args.model), license=args.license, dataset=args.dataset)
    from vlp3d.platform.mlflow.card import registered_evaluation

    if not args.model.startswith("models:/"):  # a run's model (runs:/...): nothing registered to describe
        return CardInfo(source=args.model, license=args.license, dataset=args.dataset)
    facts = registered_evaluation(tracking_uri_from(args), args.model)
    return CardInfo(source=facts["model_uri"], license=args.license, dataset=args.dataset,
                    data_hash=facts["data_hash"], description=facts["description"],
                    evaluations=[Evaluation(**e) for e in facts["evaluations"]])


def run(args: argparse.Namespace) -> int:
    if args.out and args.out_flag and args.out != args.out_flag:
        raise InputError(f"two outputs given ({args.out} and --out {args.out_flag}); give one")
    out = args.out or args.out_flag
    if not out:
        raise InputError(f"--format {args.format}: give the output {'file' if args.format in ENCODER_FORMATS else 'folder'}"
                         " (vlp3d export --model URI --format FORMAT OUT)")
    if args.format in ENCODER_FORMATS:
        return _export_encoder(args, Path(out))
    if args.format == "monai-bundle":
        from vlp3d.formats.monai_bundle import export_monai_bundle

        model = load_finetuned(args)
        written = export_monai_bundle(model, out, source_name(args.model))
        print(f"wrote a MONAI bundle of {args.model} ({model.network.encoder}, classes {', '.join(model.names)}) to "
              f"{written}. Run it:\n  python -m monai.bundle run --config_file {written}/configs/inference.json "
              f"--bundle_root {written} --output_dir OUT --datalist \"['scan.nii.gz']\"")
        return 0
    embedder, metadata = load_embedder(args)
    if args.format == "hf":
        from vlp3d.formats.hf import export_hf

        written = export_hf(embedder, out, metadata, card_info(args))
        print(f"wrote {args.model} in Hugging Face format to {written}. Load it:\n"
              f"  from vlp3d.formats.hf import Vlp3dModel\n  model = Vlp3dModel.from_pretrained('{written}')\n"
              f"Push it to the Hub: hf upload USER/REPO {written} .")
        return 0
    from vlp3d.formats.onnx_export import export_onnx

    written = export_onnx(embedder, out, source_name(args.model))
    print(f"wrote the image and text encoders of {args.model} as ONNX graphs to {written}. Run them:\n"
          f"  from vlp3d.formats.onnx_export import OnnxEmbedder\n  model = OnnxEmbedder('{written}')\n"
          "(the preprocessing the graphs leave out: docs/formats.md)")
    return 0


def _export_encoder(args: argparse.Namespace, out: Path) -> int:
    import torch

    embedder, _ = load_embedder(args)
    try:
        state, kwargs = export_encoder(embedder.model.image_encoder, args.format)
    except TypeError as err:
        raise InputError(f"--format {args.format}: {err} (this model's model.image_encoder = "
                         f"{embedder.cfg.model.image_encoder!r})") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    net = "SwinUNETR" if args.format == "swinunetr" else "UNETR"
    arguments = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    print(f"wrote {len(state)} tensors to {out}. Fine-tune in MONAI:\n"
          f"  from monai.networks.nets import {net}\n"
          f"  net = {net}({arguments}, out_channels=NUM_CLASSES)\n"
          f"  net.load_state_dict(torch.load('{out}'), strict=False)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
