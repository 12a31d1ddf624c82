"""Codec-family registry in the style of torchvision's ``get_model``/``list_models``.

The registry is the single source of truth for which families exist: the CLI's choices, bundle
loading and training all ask it. Families register with :func:`register_codec`; an installed
package adds its own through the ``splitserve.codecs`` entry-point group (the entry point names a
module that registers on import, or a builder function registered under the entry point's name),
so a family defined elsewhere can be trained, served and encoded with no edit to the core.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points

from ..errors import SplitserveError

ENTRY_POINT_GROUP = "splitserve.codecs"
_FAMILIES: dict[str, Callable[..., "object"]] = {}
_discovered = False


def register_codec(name: str):
    """Decorator: make a codec builder available as ``build_codec(name, **cfg)``."""

    def wrap(fn):
        if name in _FAMILIES and _FAMILIES[name] is not fn:
            raise ValueError(f"codec family {name!r} registered twice")
        _FAMILIES[name] = fn
        return fn

    return wrap


def _discover() -> None:
    """Load the families installed packages declare (once; a broken one names itself)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 — a third-party import error of any kind
            raise SplitserveError(f"codec family {ep.name!r} ({ep.value}) failed to import: {e}") from e
        if callable(obj) and ep.name not in _FAMILIES:
            register_codec(ep.name)(obj)
        if ep.name not in _FAMILIES:
            raise SplitserveError(f"entry point {ep.name!r} ({ep.value}) registered no codec family named {ep.name!r}")


def list_codecs() -> list[str]:
    _discover()
    return sorted(_FAMILIES)


def build_codec(name: str, rates: int = 1, prior: str = "per-rate", **cfg):
    """Build a :class:`~splitserve.models.codec.FeatureCodec` of family ``name``, coding at
    ``rates`` rates (any family: the gains and priors sit around its transform) with a prior per
    rate or, ``prior="shared"``, one prior every rate reads at its own step (see
    :mod:`~splitserve.models.priors`). A codec's ``config`` names both, so it rebuilds the same."""
    _discover()
    try:
        builder = _FAMILIES[name]
    except KeyError:
        raise SplitserveError(f"unknown codec family {name!r}; available: {', '.join(list_codecs())}") from None
    try:
        codec = builder(**cfg)
    except TypeError as e:
        raise SplitserveError(f"bad config for codec family {name!r}: {e}") from None
    return codec if rates == 1 and prior == "per-rate" else codec.set_rates(rates, prior=prior)
