"""The image and text encoders of an embedding model as ONNX graphs (torch.onnx's exporter), and running them
with onnxruntime on the CPU (`OnnxEmbedder`) with the preprocessing the graphs leave out.

    DIR/image_encoder.onnx    volume [B, 1, X, Y, Z] float32 -> image_embedding [B, d] (L2-normalised)
    DIR/text_encoder.onnx     input_ids, attention_mask [R, S, T] int64 (R reports x S sentences x T tokens;
                              a padding sentence has an all-zero mask) -> report_embedding [R, d]
    DIR/tokenizer/            the text encoder's tokenizer (tokenizer.json: any Hugging Face tokenizers runtime)
    DIR/preprocessing.json    what a caller does before the graphs: the preprocessing spec, max_tokens,
                              the input and output names

Outside the graphs (docs/formats.md states it step by step): the volume's HU conversion, RAS orientation,
resampling, HU window, crop/pad and the storage dtype's rounding (`vlp3d.inference.load_ct` +
`vlp3d.data.volume.preprocess_hu` + `dequantise`); a report's sentence split (`split_sentences`) and tokenization.
Inside the text graph: the text encoder, mean pooling over tokens, L2 norm per sentence, the mean over a report's
sentences, L2 norm, the model's text projection and L2 norm.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vlp3d.data.report import split_sentences
from vlp3d.data.volume import dequantise, preprocess_hu
from vlp3d.encoders.text import mean_pool
from vlp3d.formats import new_output_dir
from vlp3d.inference import Embedder, VolumeInput, load_ct

IMAGE_GRAPH, TEXT_GRAPH, TOKENIZER_DIR, PREPROCESSING = (
    "image_encoder.onnx", "text_encoder.onnx", "tokenizer", "preprocessing.json")
OPSET = 18


class ImageGraph(nn.Module):
    """Preprocessed volumes [B, 1, X, Y, Z] in [0, 1] -> L2-normalised image embeddings [B, d]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(volume)


class TextGraph(nn.Module):
    """Tokenized sentences of R reports [R, S, T] -> report embeddings [R, d], as `Embedder.embed_reports`
    computes them: each sentence mean-pooled and L2-normalised, the report the L2-normalised mean of its
    sentences (those with any token), then the model's text projection."""

    def __init__(self, text_model: nn.Module, text_proj: nn.Module):
        super().__init__()
        self.text_model = text_model
        self.text_proj = text_proj

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        reports, sentences, tokens = input_ids.shape
        flat_mask = attention_mask.reshape(reports * sentences, tokens)
        hidden = self.text_model(input_ids=input_ids.reshape(reports * sentences, tokens),
                                 attention_mask=flat_mask).last_hidden_state
        sentence = F.normalize(mean_pool(hidden, flat_mask), dim=-1).reshape(reports, sentences, -1)
        present = (attention_mask.sum(-1, keepdim=True) > 0).to(sentence.dtype)  # padding sentences: 0
        report = F.normalize((sentence * present).sum(1) / present.sum(1).clamp(min=1.0), dim=-1)
        return F.normalize(self.text_proj(report), dim=-1)


def tokenize_reports(tokenizer, reports: list[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) [R, S, T] int64 of report texts: split into sentences (`split_sentences`; a
    report without one is the empty sentence, as at prepare time), each tokenized and truncated to `max_tokens`,
    padded to the longest sentence; reports with fewer sentences padded with all-zero rows."""
    split = [split_sentences(str(report)) or [""] for report in reports]
    flat = [sentence for sentences in split for sentence in sentences]
    batch = tokenizer(flat, padding=True, truncation=True, max_length=max_tokens, return_tensors="np")
    width = max(len(sentences) for sentences in split)
    ids = np.zeros((len(split), width, batch["input_ids"].shape[1]), dtype=np.int64)
    mask = np.zeros_like(ids)
    start = 0
    for row, sentences in enumerate(split):
        ids[row, :len(sentences)] = batch["input_ids"][start:start + len(sentences)]
        mask[row, :len(sentences)] = batch["attention_mask"][start:start + len(sentences)]
        start += len(sentences)
    return ids, mask


class MissingExtra(RuntimeError):
    """The ONNX packages are not installed (`vlp3d export` prints it and exits 2)."""

    exit_code = 2


def require_onnx() -> None:
    """Raise MissingExtra unless onnx, onnxscript (torch.onnx's exporter) and onnxruntime import."""
    import importlib.util

    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtra(f"the ONNX export needs {', '.join(missing)}: pip install 'vlp3d[onnx]'")


def _export(module: nn.Module, example: tuple, path: Path, input_names: list[str], output_name: str,
            dynamic_shapes) -> None:
    """torch.onnx.export (the torch.export-based exporter) of `module` in eval mode, quietly."""
    for name in ("torch.onnx", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), example, dynamo=True, input_names=input_names,
                                    output_names=[output_name], dynamic_shapes=dynamic_shapes, opset_version=OPSET,
                                    verbose=False)
        program.save(str(path))


def export_onnx(embedder: Embedder, out: str | Path, source: str) -> Path:
    """Write `embedder`'s image and text encoders as ONNX graphs, the tokenizer and preprocessing.json into the
    new folder `out` (module docstring); returns it. A model whose text encoder has no tokenizer is refused
    before anything is written."""
    from vlp3d.formats.hf import check_tokenizer
    from vlp3d.objectives import objective_class

    require_onnx()
    check_tokenizer(embedder.text_encoder_path, source)
    text_encoder = embedder.text_encoder  # loads the tokenizer and weights before the folder exists
    out = new_output_dir(out, "--out")
    shape = tuple(int(s) for s in _input_shape(embedder))
    batch = torch.export.Dim("batch")
    _export(ImageGraph(embedder.model).cpu(), (torch.rand(2, 1, *shape),), out / IMAGE_GRAPH, ["volume"],
            "image_embedding", ({0: batch},))
    ids, mask = tokenize_reports(text_encoder.tokenizer, ["First sentence here. A second one.", "One."],
                                 embedder.spec.max_tokens)
    reports, sentences, tokens = (torch.export.Dim(n) for n in ("reports", "sentences", "tokens"))
    dims = {0: reports, 1: sentences, 2: tokens}
    _export(TextGraph(text_encoder.model, embedder.model.text_proj).cpu(),
            (torch.from_numpy(ids), torch.from_numpy(mask)), out / TEXT_GRAPH, ["input_ids", "attention_mask"],
            "report_embedding", {"input_ids": dims, "attention_mask": dims})
    embedder.model.to(embedder.device)
    text_encoder.tokenizer.save_pretrained(out / TOKENIZER_DIR)
    evaluation = objective_class(embedder.cfg.objective.name).evaluation
    (out / PREPROCESSING).write_text(json.dumps({
        "source": source,
        "spec": embedder.spec.to_dict(),
        "image_input": {"name": "volume", "shape": ["batch", 1, *shape], "dtype": "float32",
                        "whole_volume": evaluation == "volume"},
        "text_input": {"names": ["input_ids", "attention_mask"], "max_tokens": embedder.spec.max_tokens},
        "outputs": ["image_embedding", "report_embedding"],
        "label_names": list(embedder.label_names),
        "logit_scale": embedder.logit_scale,
    }, indent=2))
    return out


def _input_shape(embedder: Embedder) -> tuple[int, ...]:
    from vlp3d.objectives.model import model_input_shape

    return model_input_shape(embedder.cfg)


class OnnxEmbedder:
    """The ONNX graphs of a folder `export_onnx` wrote, run by onnxruntime on the CPU, with vlp3d's preprocessing
    in front of them: the same inputs as `vlp3d.inference.Embedder`, the same embeddings within float tolerance."""

    def __init__(self, folder: str | Path):
        import onnxruntime
        from transformers import AutoTokenizer

        from vlp3d.data.volume import PreprocessSpec

        folder = Path(folder)
        self.config = json.loads((folder / PREPROCESSING).read_text())
        self.spec = PreprocessSpec.from_dict(self.config["spec"])
        providers = ["CPUExecutionProvider"]
        self.image = onnxruntime.InferenceSession(str(folder / IMAGE_GRAPH), providers=providers)
        self.text = onnxruntime.InferenceSession(str(folder / TEXT_GRAPH), providers=providers)
        self.tokenizer = AutoTokenizer.from_pretrained(folder / TOKENIZER_DIR)

    def embed_volumes(self, stored: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """Preprocessed volumes [N, X, Y, Z] (the stored dtype, or [0, 1] floats) -> [N, d]."""
        out = []
        for start in range(0, len(stored), batch_size):
            volume = dequantise(torch.from_numpy(np.asarray(stored[start:start + batch_size])))
            out.append(self.image.run(None, {"volume": volume.unsqueeze(1).numpy().astype(np.float32)})[0])
        return np.concatenate(out)

    def embed_inputs(self, items: list[VolumeInput], assume_hu: bool = False) -> np.ndarray:
        """Volume inputs (paths or arrays, with their rescale) -> [N, d], preprocessed as the pyfunc does."""
        volumes = []
        for item in items:
            hu, affine, _ = load_ct(item, assume_hu=assume_hu)
            volumes.append(preprocess_hu(hu, affine, self.spec))
        return self.embed_volumes(np.stack(volumes))

    def embed_volume_files(self, paths: list[str], assume_hu: bool = False) -> np.ndarray:
        return self.embed_inputs([VolumeInput(path=str(p)) for p in paths], assume_hu=assume_hu)

    def embed_reports(self, reports: list[str]) -> np.ndarray:
        """Report or prompt texts -> [N, d]."""
        ids, mask = tokenize_reports(self.tokenizer, reports, int(self.config["text_input"]["max_tokens"]))
        return self.text.run(None, {"input_ids": ids, "attention_mask": mask})[0]
