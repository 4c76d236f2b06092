"""A trained checkpoint as an embedding model: volumes and reports into the shared space (pure torch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from vlp3d.config import load_config
from vlp3d.data.report import split_sentences
from vlp3d.data.volume import PreprocessSpec, dequantise, load_nifti_hu, preprocess_hu
from vlp3d.encoders.text import TextEncoder, embed_reports
from vlp3d.engine import VisionLanguageModel, build_model


class Embedder:
    """Loads `model.pt`, `config.toml` and `meta.json` from a checkpoint folder."""

    def __init__(self, checkpoint_dir: str | Path, device: str = "cpu"):
        checkpoint_dir = Path(checkpoint_dir)
        self.cfg = load_config(checkpoint_dir / "config.toml")
        self.meta = json.loads((checkpoint_dir / "meta.json").read_text())
        spec = dict(self.meta["spec"])
        spec.pop("quantisation_error_hu", None)
        self.spec = PreprocessSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
        self.label_names: list[str] = list(self.meta["label_names"])
        self.device = torch.device(device)
        self.model: VisionLanguageModel = build_model(self.cfg, text_dim=int(self.meta["text_dim"]))
        state = torch.load(checkpoint_dir / "model.pt", map_location=self.device)
        self.model.load_state_dict(state)
        self.model.to(self.device).eval()
        self._text_encoder: TextEncoder | None = None

    @property
    def text_encoder(self) -> TextEncoder:
        if self._text_encoder is None:
            self._text_encoder = TextEncoder(self.spec.text_encoder, max_tokens=self.spec.max_tokens)
        return self._text_encoder

    @property
    def logit_scale(self) -> float:
        return self.model.scale().item()

    @torch.no_grad()
    def embed_volumes(self, stored: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Shard tensors [N, X, Y, Z] (float16 or uint8) -> [N, d]."""
        out = []
        for start in range(0, len(stored), batch_size):
            volume = dequantise(stored[start:start + batch_size]).unsqueeze(1).to(self.device)
            out.append(self.model.encode_image(volume).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.cfg.model.embed_dim)

    def embed_volume_files(self, paths: list[str]) -> torch.Tensor:
        """NIfTI files -> [N, d], preprocessed with the spec the model was trained on."""
        volumes = []
        for path in paths:
            hu, affine, _ = load_nifti_hu(path)
            volumes.append(torch.from_numpy(preprocess_hu(hu, affine, self.spec)))
        return self.embed_volumes(torch.stack(volumes)) if volumes else torch.zeros(0, self.cfg.model.embed_dim)

    @torch.no_grad()
    def embed_report_embeddings(self, report_embedding: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Frozen text-encoder report embeddings (as stored in the shards) -> [N, d]."""
        pooled = torch.as_tensor(np.array(report_embedding, dtype=np.float32)).to(self.device)
        return self.model.encode_text(pooled).cpu()

    def embed_reports(self, reports: list[str]) -> torch.Tensor:
        """Report or prompt texts -> [N, d] (sentence-split exactly as at prepare time)."""
        pooled = embed_reports(self.text_encoder, [split_sentences(r) for r in reports])
        return self.embed_report_embeddings(pooled)
