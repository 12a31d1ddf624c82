"""Codec families and backbones. ``build_encoder("rac", blocks=4)`` / ``list_encoders()``."""

from . import entropic_student, rac  # noqa: F401  (register the families)
from .codec import CodecOutput, FeatureCodec
from .registry import build_encoder, list_encoders, register_encoder

__all__ = ["CodecOutput", "FeatureCodec", "build_encoder", "list_encoders", "register_encoder"]
