"""Encoder-family registry in the style of torchvision's ``get_model``/``list_models``."""

from __future__ import annotations

from typing import Callable

from ..errors import SplitserveError

_FAMILIES: dict[str, Callable[..., "object"]] = {}


def register_encoder(name: str):
    """Decorator: make a codec builder available as ``build_encoder(name, **cfg)``."""

    def wrap(fn):
        if name in _FAMILIES:
            raise ValueError(f"encoder family {name!r} registered twice")
        _FAMILIES[name] = fn
        return fn

    return wrap


def list_encoders() -> list[str]:
    return sorted(_FAMILIES)


def build_encoder(name: str, **cfg):
    """Build a :class:`~splitserve.models.codec.FeatureCodec` of family ``name``."""
    try:
        builder = _FAMILIES[name]
    except KeyError:
        raise SplitserveError(
            f"unknown encoder family {name!r}; available: {', '.join(list_encoders())}"
        ) from None
    try:
        return builder(**cfg)
    except TypeError as e:
        raise SplitserveError(f"bad config for encoder family {name!r}: {e}") from None
