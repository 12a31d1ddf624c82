"""The rate model of a codec: what charges bits for the latent at each rate, and the tables cut from it.

``"per-rate"`` (:class:`PerRatePriors`): one CompressAI ``EntropyBottleneck`` per rate, each a
density over its own gained latent g_k·y; a single-rate codec is the case K = 1. The codec reaches
its rate model only through :class:`RateModel`'s methods, so that issue 24's other option (one
shared prior with a per-rate quantisation step) can be a second kind beside it.

A rate model takes the *gained* latent (what the coder rounds) and the rate's gain, and returns
gained values; the codec owns the gains (device side) and the inverse gains (server side).
"""

from __future__ import annotations

import torch
from compressai.entropy_models import EntropyBottleneck
from torch import Tensor, nn

PRIORS = ("per-rate",)


class RateModel:
    """What :class:`~splitserve.models.codec.FeatureCodec` asks of its ``priors`` (a mixin of each kind)."""

    kind: str

    @property
    def rates(self) -> int:
        raise NotImplementedError

    def cdfs(self, rate: int) -> nn.Module:
        """Rate ``rate``'s CDF buffers (``quantized_cdf``, ``cdf_length``, ``offset``) as update() left them."""
        raise NotImplementedError

    @property
    def has_tables(self) -> bool:
        return all(self.cdfs(k).offset.numel() > 0 for k in range(self.rates))

    def densities(self) -> list[tuple[EntropyBottleneck, int | None]]:
        """Each density and the rate whose gained latent it models: what to fit when a density is
        fitted outside training (the encode benchmark)."""
        raise NotImplementedError


class PerRatePriors(RateModel, nn.ModuleList):
    """One ``EntropyBottleneck`` per rate over that rate's gained latent (state keys ``{k}.…``)."""

    kind = "per-rate"

    def __init__(self, channels: int, rates: int):
        super().__init__(EntropyBottleneck(channels) for _ in range(rates))

    @property
    def rates(self) -> int:
        return len(self)

    @property
    def device(self) -> torch.device:
        return self[0].quantiles.device

    def forward(self, u: Tensor, rate: int, gain: Tensor | None, training: bool | None = None) -> tuple[Tensor, Tensor]:
        """Noisy (training) or rounded gained latent, and rate ``rate``'s likelihoods of it."""
        return self[rate](u, training=training)

    def medians(self, rate: int, gain: Tensor | None) -> Tensor:
        return self[rate].quantiles.detach()[:, :, 1:2]

    def quantize(self, u: Tensor, rate: int, gain: Tensor | None) -> Tensor:
        return self[rate].quantize(u, "dequantize", self.medians(rate, gain))

    def loss(self) -> Tensor:
        return sum(prior.loss() for prior in self)

    def update(self, gains: Tensor | None, force: bool = True) -> bool:
        return any([prior.update(force=force) for prior in self])

    def cdfs(self, rate: int) -> nn.Module:
        return self[rate]

    def densities(self) -> list[tuple[EntropyBottleneck, int | None]]:
        return [(prior, k) for k, prior in enumerate(self)]


def build_rate_model(kind: str, channels: int, rates: int) -> PerRatePriors:
    if kind == "per-rate":
        return PerRatePriors(channels, rates)
    raise ValueError(f"prior must be one of {', '.join(PRIORS)}, got {kind!r}")
