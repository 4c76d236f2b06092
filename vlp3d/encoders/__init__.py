"""Image and text encoders, built by name from config."""

from vlp3d.encoders.image import IMAGE_ENCODERS, build_image_encoder
from vlp3d.encoders.text import TextEncoder, resolve_text_encoder

__all__ = ["IMAGE_ENCODERS", "TextEncoder", "build_image_encoder", "resolve_text_encoder"]
