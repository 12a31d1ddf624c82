"""Codec families and backbones. ``build_codec("rac", blocks=4)`` / ``list_codecs()``."""

from . import entropic_student, rac  # noqa: F401  (register the built-in families)
from .codec import CodecOutput, FeatureCodec
from .registry import ENTRY_POINT_GROUP, build_codec, list_codecs, register_codec

__all__ = ["ENTRY_POINT_GROUP", "CodecOutput", "FeatureCodec", "build_codec", "list_codecs",
           "register_codec"]
