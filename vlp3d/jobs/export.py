"""Job: export a registered model's image encoder for MONAI SwinUNETR / UNETR fine-tuning."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlp3d.errors import InputError
from vlp3d.jobs.common import add_tracking_arguments, run_main, tracking_uri_from

FORMATS = ("swinunetr", "unetr")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = (
        "Write the pretrained image encoder as a state dict that MONAI loads: 'swinunetr' gives "
        "swinViT.* keys for monai.networks.nets.SwinUNETR (model.image_encoder = swin3d), 'unetr' "
        "gives vit.* keys for UNETR (vit3d). Load with net.load_state_dict(torch.load(FILE), strict=False)."
    )
    parser.add_argument("--model", required=True, help="MLflow model URI, e.g. models:/vlp3d-clip@champion")
    parser.add_argument("--format", required=True, choices=FORMATS, help="target MONAI network")
    parser.add_argument("--out", required=True, help="output .pt file")
    add_tracking_arguments(parser)
    return parser


def export_encoder(encoder, fmt: str) -> tuple[dict, dict]:
    """(state dict, MONAI constructor kwargs) for `fmt`."""
    from vlp3d.encoders import export

    if fmt == "swinunetr":
        return export.swinunetr_state_dict(encoder), export.swinunetr_kwargs(encoder)
    return export.unetr_state_dict(encoder), export.unetr_kwargs(encoder)


def run(args: argparse.Namespace) -> int:
    import torch

    from vlp3d.platform.mlflow.models import load_embedder
    from vlp3d.platform.mlflow.store import client

    client(tracking_uri_from(args))
    _, embedder = load_embedder(args.model)
    try:
        state, kwargs = export_encoder(embedder.model.image_encoder, args.format)
    except TypeError as err:
        raise InputError(f"--format {args.format}: {err} (this model's model.image_encoder = "
                         f"{embedder.cfg.model.image_encoder!r})") from None
    out = Path(args.out)
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
