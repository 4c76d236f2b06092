"""The Hugging Face format of an embedding model: safetensors weights, config.json, the text encoder with its
tokenizer and a model card, read back by `Vlp3dModel.from_pretrained` (huggingface_hub's PyTorchModelHubMixin).

    DIR/model.safetensors     the VisionLanguageModel's state dict (keys `model.*`)
    DIR/config.json           vlp3d_config (the run's config without locations), meta (preprocessing spec,
                              label names, text width), metadata (logit scale, prompt templates, ...)
    DIR/text_encoder/         the frozen text encoder: config.json, model.safetensors, tokenizer files
    DIR/README.md             model card: YAML front matter (license, tags, datasets, model-index with the
                              registered version's zero-shot AUROC and its 95% intervals) and a description

Embeddings of the loaded model come from the same code as the registered pyfunc's (`vlp3d.inference.Embedder`:
HU rules, preprocessing, sentence splitting), so they are equal to it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData, PyTorchModelHubMixin
from huggingface_hub.repocard_data import EvalResult
from torch import nn

from vlp3d.config import from_dict, migrate_stored, public_config, to_dict
from vlp3d.errors import InputError
from vlp3d.formats import new_output_dir
from vlp3d.inference import Embedder, VolumeInput
from vlp3d.objectives.model import build_model

TEXT_ENCODER_DIR = "text_encoder"
WEIGHTS = "model.safetensors"
# a tokenizer folder holds one of these (fast tokenizers: tokenizer.json; WordPiece: vocab.txt; BPE: vocab.json;
# SentencePiece: *.model)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
TAGS = ["vlp3d", "medical-imaging", "computed-tomography", "3d", "vision-language", "radiology"]


class Vlp3dModel(nn.Module, PyTorchModelHubMixin, library_name="vlp3d", pipeline_tag="feature-extraction",
                 tags=TAGS):
    """A vlp3d embedding model in Hugging Face format. `Vlp3dModel.from_pretrained(DIR_OR_REPO_ID)` loads it
    (strictly: every weight must be in model.safetensors); `embed_volume_files`, `embed_inputs` and
    `embed_reports` give the registered pyfunc's L2-normalised embeddings; `embedder` is the full
    `vlp3d.inference.Embedder` (logit scale, label names, stored-volume embedding)."""

    def __init__(self, vlp3d_config: dict, meta: dict, metadata: dict | None = None):
        super().__init__()
        self.cfg = from_dict(migrate_stored(vlp3d_config))
        self.meta = dict(meta)
        self.metadata = dict(metadata or {})
        self.model = build_model(self.cfg, text_dim=int(self.meta["text_dim"]))
        self.text_encoder_path: str | None = None  # the folder's text_encoder/ once loaded
        self._embedder: Embedder | None = None

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """Preprocessed volumes [B, 1, X, Y, Z] (window-scaled to [0, 1]) -> image embeddings [B, d]."""
        return self.model.encode_image(volume)

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            device = str(next(self.model.parameters()).device)
            self._embedder = Embedder.from_model(self.cfg, self.meta, self.model, device=device,
                                                 text_encoder=self.text_encoder_path)
        return self._embedder

    @property
    def logit_scale(self) -> float:
        """The zero-shot softmax scale (1 / the final temperature), as the pyfunc gives it."""
        return float(self.metadata.get("logit_scale") or self.embedder.logit_scale)

    def embed_volume_files(self, paths: list[str], assume_hu: bool = False) -> torch.Tensor:
        """NIfTI files or DICOM series -> [N, d] (HU rules and preprocessing: `vlp3d.inference.load_ct`)."""
        return self.embedder.embed_volume_files(paths, assume_hu=assume_hu)

    def embed_inputs(self, items: list[VolumeInput], assume_hu: bool = False) -> torch.Tensor:
        """Volume inputs (paths or arrays with their rescale) -> [N, d]."""
        return self.embedder.embed_inputs(items, assume_hu=assume_hu)

    def embed_reports(self, reports: list[str]) -> torch.Tensor:
        """Report or prompt texts -> [N, d]."""
        return self.embedder.embed_reports(reports)

    def _save_pretrained(self, save_directory: Path) -> None:
        super()._save_pretrained(save_directory)
        save_text_encoder(self.text_encoder_path or self.cfg.model.text_encoder, save_directory / TEXT_ENCODER_DIR)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir, force_download: bool,
                         local_files_only: bool, token, map_location: str = "cpu", strict: bool = True,
                         **model_kwargs) -> Vlp3dModel:
        import safetensors.torch

        if os.path.isdir(model_id):
            folder = Path(model_id)
        else:  # a hub repository: every file, the text encoder's included
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(repo_id=model_id, revision=revision, cache_dir=cache_dir,
                                            force_download=force_download, token=token,
                                            local_files_only=local_files_only))
        if not (folder / WEIGHTS).is_file():
            raise FileNotFoundError(f"{folder}: no {WEIGHTS}; give a folder `vlp3d export --format hf` wrote")
        model = cls(**model_kwargs)
        safetensors.torch.load_model(model, str(folder / WEIGHTS), strict=strict, device=map_location)
        model.text_encoder_path = str(folder / TEXT_ENCODER_DIR)
        return model.eval()


def check_tokenizer(text_encoder: str, where: str) -> None:
    """Raise ValueError unless the text encoder `text_encoder` (a folder, or a name transformers resolves) has
    its tokenizer: an export without it could not embed a report."""
    from vlp3d.encoders.text import load_tokenizer, resolve_text_encoder

    folder = Path(resolve_text_encoder(text_encoder))
    if folder.is_dir():
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise InputError(f"{where}: its text encoder folder {folder} has no tokenizer (none of "
                             f"{', '.join(TOKENIZER_FILES)}); save the tokenizer there "
                             "(tokenizer.save_pretrained(FOLDER)) and export again")
        return
    try:
        load_tokenizer(text_encoder)
    except (OSError, ValueError) as err:
        raise InputError(f"{where}: cannot load the tokenizer of its text encoder {text_encoder!r} ({err})") from None


def save_text_encoder(text_encoder: str, out: Path) -> None:
    """The text encoder `text_encoder` (a folder, or a name) as a transformers folder with its tokenizer."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from vlp3d.encoders.text import load_tokenizer, resolve_text_encoder

    hf_logging.disable_progress_bar()
    load_tokenizer(text_encoder).save_pretrained(out)
    AutoModel.from_pretrained(resolve_text_encoder(text_encoder)).save_pretrained(out)


@dataclass
class Evaluation:
    """One evaluated figure of the registered version, with its interval: zero-shot AUROC (macro or of one
    finding) on a split of `n` volumes, 95% bootstrap interval [ci_low, ci_high]."""

    split: str
    label: str  # "macro" or a finding
    value: float
    ci_low: float
    ci_high: float
    n: int = 0


@dataclass
class CardInfo:
    """What the model card says beyond the model itself: the source (`models:/NAME/VERSION` or a checkpoint
    folder), the license, the dataset name, the data's hash, the registered version's evaluation and its
    markdown description (vlp3d.platform.mlflow.card)."""

    source: str
    license: str = "other"
    dataset: str = ""
    data_hash: str = ""
    evaluations: list[Evaluation] = field(default_factory=list)
    description: str = ""


def model_card(info: CardInfo, cfg, metadata: dict) -> ModelCard:
    """README.md: YAML front matter (license, tags, datasets, model-index with every figure and its interval)
    and how to load, use and push the model."""
    dataset = info.dataset or (f"vlp3d-shards-{info.data_hash[:12]}" if info.data_hash else "")
    results = [EvalResult(
        task_type="zero-shot-classification", task_name="zero-shot classification of CT findings",
        dataset_type=dataset or "unknown", dataset_name=dataset or "unknown", dataset_split=e.split,
        dataset_revision=info.data_hash or None, metric_type="roc_auc",
        metric_name=(f"{'macro ' if e.label == 'macro' else ''}AUROC{'' if e.label == 'macro' else ' ' + e.label}"
                     f" (95% CI [{e.ci_low:.3f}, {e.ci_high:.3f}])"),
        metric_value=round(float(e.value), 4),
        metric_args={"finding": e.label, "ci_low": round(float(e.ci_low), 4), "ci_high": round(float(e.ci_high), 4),
                     "confidence": 0.95, "interval": "bootstrap over volumes", "volumes": int(e.n)})
        for e in info.evaluations if e.value == e.value]
    registered = info.source.removeprefix("models:/")
    name = registered.replace("/", "-v") if info.source.startswith("models:/") else f"vlp3d-{cfg.objective.name}"
    data = ModelCardData(license=info.license, library_name="vlp3d", pipeline_tag="feature-extraction",
                         tags=sorted(set(TAGS + [cfg.objective.name, cfg.model.image_encoder])),
                         datasets=[dataset] if dataset else None, model_name=name,
                         eval_results=results or None)
    body = [f"# {name}", "",
            f"A 3D CT vision-language embedding model ({cfg.objective.name}, image encoder "
            f"{cfg.model.image_encoder}/{cfg.model.size}, text encoder in `text_encoder/`) exported by "
            f"`vlp3d export --format hf` from `{info.source}`. CT volumes and report texts embed into one "
            "L2-normalised space.", "",
            "```python", "from vlp3d.formats.hf import Vlp3dModel", "",
            'model = Vlp3dModel.from_pretrained("THIS_FOLDER_OR_REPO_ID")',
            'image = model.embed_volume_files(["scan.nii.gz"])   # NIfTI or DICOM series, in HU',
            'report = model.embed_reports(["There is a pleural effusion."])',
            "similarity = image @ report.T                          # cosine similarity",
            "logits = model.logit_scale * similarity               # zero-shot: softmax over prompts",
            "```", "",
            "Preprocessing (inside `embed_volume_files`): Hounsfield units, RAS orientation, "
            f"{list(cfg.data.spacing_mm)} mm voxels, HU window {list(cfg.data.hu_window)} scaled to [0, 1], "
            f"{list(cfg.data.shape)} voxels; reports are split into sentences, each embedded by the text encoder, "
            "averaged and projected.", "",
            f"Label names: {', '.join(metadata.get('label_names', [])) or '-'}.", ""]
    if results:
        body += ["## Evaluation", "", "| split | finding | AUROC | 95% CI | volumes |", "|---|---|---|---|---|"]
        body += [f"| {e.split} | {e.label} | {e.value:.3f} | [{e.ci_low:.3f}, {e.ci_high:.3f}] | {e.n or ''} |"
                 for e in info.evaluations if e.value == e.value]
        body.append("")
    if info.description:
        body += ["## Provenance (the MLflow registry's model card)", "", info.description.strip(), ""]
    body += ["## Push to the Hugging Face Hub", "", "```bash",
             "hf upload USER/REPO THIS_FOLDER .   # or: huggingface-cli upload USER/REPO THIS_FOLDER .",
             "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def export_hf(embedder: Embedder, out: str | Path, metadata: dict, info: CardInfo) -> Path:
    """Write `embedder`'s model to the new folder `out` in Hugging Face format (module docstring); returns it.
    The text encoder's tokenizer must exist (`check_tokenizer`), checked before anything is written."""
    check_tokenizer(embedder.text_encoder_path, info.source)
    out = new_output_dir(out, "--out")
    model = Vlp3dModel(vlp3d_config=to_dict(public_config(embedder.cfg)), meta=embedder.meta,
                       metadata=_jsonable(metadata))
    model.model.load_state_dict(embedder.model.state_dict())
    model.text_encoder_path = embedder.text_encoder_path
    model_card(info, embedder.cfg, metadata).save(out / "README.md")  # save_pretrained keeps an existing card
    model.save_pretrained(out)
    return out


def _jsonable(value):
    """Metadata as JSON holds it (tuples -> lists), so that config.json reads back to the same dict."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
