"""Image and text encoders, built by name from config.

Importing this package imports every image-encoder module, each of which registers its
builder in `vlp3d.encoders.registry.IMAGE_ENCODERS` (`@register(name)`).
"""

from vlp3d.encoders import resnet, swin, unimedi, vit  # noqa: F401  (each registers its builder)
from vlp3d.encoders.registry import IMAGE_ENCODERS, SIZES, accepted_options, build_image_encoder
from vlp3d.encoders.text import TextEncoder, resolve_text_encoder

__all__ = ["IMAGE_ENCODERS", "SIZES", "accepted_options", "TextEncoder", "build_image_encoder", "resolve_text_encoder"]
