"""A trained checkpoint as an embedding model: volumes and reports into the shared space (pure torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vlp3d import checkpoint as checkpoints
from vlp3d.data.report import split_sentences
from vlp3d.data.volume import PreprocessSpec, body_level, dequantise, load_volume_hu, preprocess_hu
from vlp3d.encoders.text import TextEncoder, embed_reports
from vlp3d.engine import VisionLanguageModel, build_model
from vlp3d.objectives import objective_class


class Embedder:
    """The embedding model of a checkpoint folder (vlp3d.checkpoint: model.pt, config.toml, meta.json)."""

    def __init__(self, checkpoint_dir: str | Path, device: str = "cpu"):
        checkpoint_dir = Path(checkpoint_dir)
        self.cfg = checkpoints.read_config(checkpoint_dir)
        self.meta = checkpoints.read_meta(checkpoint_dir)
        self.spec = PreprocessSpec.from_dict(self.meta["spec"])
        self.label_names: list[str] = list(self.meta["label_names"])
        self.device = torch.device(device)
        self.model: VisionLanguageModel = build_model(self.cfg, text_dim=int(self.meta["text_dim"]))
        self.model.load_state_dict(checkpoints.load_model_state(checkpoint_dir, map_location=self.device))
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

    @torch.no_grad()
    def embed_tiled(self, volumes: list[np.ndarray], batch_size: int = 16, min_body: float = 0.1) -> torch.Tensor:
        """High-resolution volumes of any shape (T3D) -> [N, d]: the volume is tiled into crops of
        `objective.t3d.crop_shape` (zero-padded at the edges), crops with at least `min_body` of their
        voxels inside the body are embedded, and their embeddings averaged (all crops if none is)."""
        from vlp3d.objectives.t3d import tile_corners

        shape = tuple(self.cfg.objective.t3d.crop_shape)
        body = body_level(self.spec, dequantised=True)
        out = []
        for stored in volumes:
            volume = dequantise(torch.from_numpy(np.array(stored)))  # a copy: shard bytes are read-only
            pad = [p for s, v in zip(reversed(shape), reversed(volume.shape), strict=True) for p in (0, max(0, s - v))]
            volume = torch.nn.functional.pad(volume, pad)
            crops = torch.stack([volume[c[0]:c[0] + shape[0], c[1]:c[1] + shape[1], c[2]:c[2] + shape[2]]
                                 for c in tile_corners(volume.shape, shape)])
            inside = (crops > body).float().mean(dim=(1, 2, 3)) >= min_body
            crops = crops[inside] if inside.any() else crops
            embedded = torch.cat([self.model.encode_image(crops[i:i + batch_size].unsqueeze(1).to(self.device)).cpu()
                                  for i in range(0, len(crops), batch_size)])
            out.append(torch.nn.functional.normalize(embedded.mean(0), dim=-1))
        return torch.stack(out) if out else torch.zeros(0, self.cfg.model.embed_dim)

    def embed_stored(self, images, shapes=None, batch_size: int = 16) -> torch.Tensor:
        """Shard `image` values (fixed-shape tensors, or high-resolution bytes with `image_shape`) -> [N, d]."""
        if shapes is not None:
            from vlp3d.data.shards import decode_image

            images = [decode_image(v, s, self.spec.storage_dtype) for v, s in zip(images, shapes, strict=True)]
        if objective_class(self.cfg.objective.name).evaluation == "tiles":
            return self.embed_tiled(list(images), batch_size)
        return self.embed_volumes(torch.from_numpy(np.stack(list(images))), batch_size)

    def embed_volume_files(self, paths: list[str]) -> torch.Tensor:
        """NIfTI files or DICOM series -> [N, d], preprocessed with the spec the model was trained on."""
        volumes = []
        for path in paths:
            hu, affine, _ = load_volume_hu(path)
            volumes.append(preprocess_hu(hu, affine, self.spec))
        return self.embed_stored(volumes) if volumes else torch.zeros(0, self.cfg.model.embed_dim)

    @torch.no_grad()
    def embed_report_embeddings(self, report_embedding: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Frozen text-encoder report embeddings (as stored in the shards) -> [N, d]."""
        pooled = torch.as_tensor(np.array(report_embedding, dtype=np.float32)).to(self.device)
        return self.model.encode_text(pooled).cpu()

    def embed_reports(self, reports: list[str]) -> torch.Tensor:
        """Report or prompt texts -> [N, d] (sentence-split exactly as at prepare time)."""
        pooled = embed_reports(self.text_encoder, [split_sentences(r) for r in reports])
        return self.embed_report_embeddings(pooled)
