"""`[model]`: the image and text encoders and the shared embedding space."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vlp3d.config.fields import _f


@dataclass(frozen=True)
class ModelConfig:
    image_encoder: str = _f("resnet3d", "Registered image encoder (`vlp3d models` lists them).")
    size: Literal["tiny", "small", "base", "large"] = _f("tiny", "Size preset of the image encoder.")
    gradient_checkpointing: bool = _f(
        False,
        "Recompute image-encoder activations in backward (less memory, ~1.5x compute); MG-3D also "
        "recomputes its masked-view encoder pass, fusion and decoder.",
    )
    attention: Literal["auto", "fused", "manual"] = _f(
        "auto",
        "Attention kernel of transformer image encoders (swin3d, vit3d): 'fused' = "
        "torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels on GPU), "
        "'manual' = MONAI's matmul-softmax-matmul, 'auto' = whichever a short measurement on this device "
        "finds faster. Weights and state-dict keys are the same either way.",
    )
    compile: bool = _f(
        False, "Compile the image encoder with torch.compile (inductor) in each training worker, before the DDP "
        "wrapper; weights and state-dict keys are unchanged. The first step compiles: its time is logged as "
        "train/compile_s and left out of throughput and step times. Needs a C++ compiler on CPU, Triton on CUDA.",
    )
    text_encoder: str = _f("minilm", "'minilm' (offline package) or a Hugging Face model path or hub name.")
    embed_dim: int = _f(384, "Dimension of the shared embedding space ('locked'/'residual' text heads: the text encoder's width).", ge=1)
    text_head: Literal["locked", "residual", "linear"] = _f(
        "locked",
        "Text side of the shared space: 'locked' = frozen report embedding as is (LiT-style; zero-shot "
        "prompts keep the text encoder's geometry), 'residual' = x + Wx with W zero-initialised, "
        "'linear' = a learned projection to embed_dim.",
    )
    freeze_text: bool = _f(True, "Keep the text encoder frozen (only its projection head trains).")
