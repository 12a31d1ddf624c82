"""Int8 weight storage for packed bundles: one float32 scale per output channel.

Why: a ResNet-18 layer2..4 is 22 MB in float16 and a full-width RetinaNet head another 16 MB, so
a bundle that carries both does not fit a 30 MB budget; in int8 it does. This is weight-only
storage: loading dequantises to the modules' float32 and the server computes exactly as before,
so the only cost is the rounding of each weight to 1/127 of its channel's largest magnitude,
measured by scoring the packed bundle again (``platform bundle measure``).

A quantised file holds, for each conv/linear ``NAME.weight``, an int8 tensor under that name and
its scales under ``NAME.weight`` + :data:`SCALE_SUFFIX`; every other tensor (biases, norms, GDN
parameters, integer buffers) is stored as it was. Reading checks that the pairs fit, since a
bundle may come from elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

SCALE_SUFFIX = ".int8_scale"


def _quantizable(name: str, t: torch.Tensor) -> bool:
    """Conv and linear weights: floating, at least 2-D, named ``*.weight`` (GDN's ``gamma`` or a
    norm's 1-D weight are small and sensitive, and stay as they are)."""
    return t.is_floating_point() and t.dim() >= 2 and name.endswith(".weight")


def _per_channel(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``scale`` (one value per output channel) shaped to broadcast over ``weight``."""
    return scale.view(-1, *[1] * (weight.dim() - 1))


def quantize(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Symmetric int8 of every conv/linear weight, one scale per slice of its first dimension (the
    output channel of a conv or linear layer); the rest unchanged."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            raise ValueError(f"tensor name {name!r} ends with the reserved {SCALE_SUFFIX!r}")
        if not _quantizable(name, t):
            out[name] = t
            continue
        w = t.detach().float()
        peak = w.flatten(1).abs().amax(dim=1)
        scale = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak))
        out[name] = torch.round(w / _per_channel(scale, w)).clamp_(-127, 127).to(torch.int8)
        out[name + SCALE_SUFFIX] = scale
    return out


def dequantize(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 weights of a :func:`quantize`\\ d file; ``ValueError`` for pairs that do not fit."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in tensors:
                raise ValueError(f"scale {name!r} has no int8 weight")
            continue
        scale = tensors.get(name + SCALE_SUFFIX)
        if t.dtype != torch.int8:
            if scale is not None:
                raise ValueError(f"{name!r} has a scale but is {t.dtype}, not int8")
            out[name] = t
            continue
        if scale is None:
            raise ValueError(f"int8 weight {name!r} has no scale")
        if t.dim() < 2 or scale.dtype != torch.float32 or scale.shape != (t.shape[0],):
            raise ValueError(f"int8 weight {name!r} {tuple(t.shape)} and its scale {tuple(scale.shape)} "
                             f"({scale.dtype}) do not fit: one float32 per output channel expected")
        if not torch.isfinite(scale).all():
            raise ValueError(f"the scale of {name!r} is not finite")
        out[name] = t.float() * _per_channel(scale, t)
    return out
