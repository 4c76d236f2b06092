"""Image and text encoders, built by name from config.

Each image-encoder module registers its builder in `vlp3d.encoders.registry.IMAGE_ENCODERS`
(`@register(name)`); the registry imports a module the first time its encoder is asked for.
"""

from vlp3d.encoders.registry import IMAGE_ENCODERS, SIZES, accepted_options, build_image_encoder
from vlp3d.encoders.text import TextEncoder, resolve_text_encoder

__all__ = ["IMAGE_ENCODERS", "SIZES", "accepted_options", "TextEncoder", "build_image_encoder", "resolve_text_encoder"]
