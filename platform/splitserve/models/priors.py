"""The rate model of a codec: what charges bits for the latent at each rate, and the tables cut from it.

Issue 24 leaves two ways to model the rate of a variable-rate codec open, to be measured:

* ``"per-rate"`` (:class:`PerRatePriors`, the default): one CompressAI ``EntropyBottleneck`` per
  rate, each a density over its own gained latent g_k·y. A single-rate codec is the case K = 1.
* ``"shared"`` (:class:`SharedPrior`): one ``EntropyBottleneck`` density over the un-gained latent
  y, which rate k reads with the quantisation step Δ_k = 1/g_k (CompressAI's ``vbr`` models, Kamisli
  et al. 2024). Every rate's step trains the same density.

Both keep the coder's convention, so the wire format and :mod:`splitserve_edge` do not know which
one made the tables: rate k codes the symbol s = round(g_k·y − μ_k) with rate k's tables, μ_k its
per-channel median. For the shared density C with median m, μ_k = g_k·m, and symbol s is the bin
g_k·y ∈ [μ_k + s − ½, μ_k + s + ½), i.e. y ∈ m + [(s − ½)Δ_k, (s + ½)Δ_k): its probability is
C(m + (s + ½)Δ_k) − C(m + (s − ½)Δ_k), what training charges (noise U(−½, ½) on g_k·y is noise of
width Δ_k on y) and what :meth:`SharedPrior.update` tabulates. In the gained domain u = g_k·y the
shared density is C(u/g_k) with quantiles g_k·q, and its tables are exactly what
``EntropyBottleneck.update`` builds for that density.

Both take the *gained* latent (what the coder rounds) and the rate's gain, and return gained values;
the codec owns the gains (device side) and the inverse gains (server side).
"""

from __future__ import annotations

import torch
from compressai.entropy_models import EntropyBottleneck
from torch import Tensor, nn

PRIORS = ("per-rate", "shared")


class RateModel:
    """What :class:`~splitserve.models.codec.FeatureCodec` asks of its ``priors`` (a mixin of the two kinds)."""

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
        """Each density and the rate whose gained latent it models (None: the un-gained latent, read by
        every rate at its own step): what to fit when a density is fitted outside training."""
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


class CodingBuffers(nn.Module):
    """One rate's coding tables, in ``EntropyBottleneck``'s buffer names (resized on load like its)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("_offset", torch.IntTensor())
        self.register_buffer("_quantized_cdf", torch.IntTensor())
        self.register_buffer("_cdf_length", torch.IntTensor())

    @property
    def offset(self) -> Tensor:
        return self._offset

    @property
    def quantized_cdf(self) -> Tensor:
        return self._quantized_cdf

    @property
    def cdf_length(self) -> Tensor:
        return self._cdf_length


class SharedPrior(RateModel, nn.Module):
    """One density over the un-gained latent y, read by rate k with the step Δ_k = 1/g_k.

    ``density`` is a CompressAI ``EntropyBottleneck`` used for its density (``_logits_cumulative``),
    its quantiles (aux loss) and its CDF quantisation (``_pmf_to_cdf``); its own tables stay empty.
    ``tables[k]`` holds rate k's tables, derived from the density by :meth:`update`.
    """

    kind = "shared"

    def __init__(self, channels: int, rates: int):
        super().__init__()
        self.density = EntropyBottleneck(channels)
        self.tables = nn.ModuleList(CodingBuffers() for _ in range(rates))

    @property
    def rates(self) -> int:
        return len(self.tables)

    @property
    def device(self) -> torch.device:
        return self.density.quantiles.device

    def medians(self, rate: int, gain: Tensor) -> Tensor:
        """μ_k = g_k·m: the shared median in rate ``rate``'s gained domain, (C, 1, 1)."""
        return gain.detach().reshape(-1, 1, 1) * self.density.quantiles.detach()[:, :, 1:2]

    def quantize(self, u: Tensor, rate: int, gain: Tensor) -> Tensor:
        return self.density.quantize(u, "dequantize", self.medians(rate, gain))

    def likelihood(self, u: Tensor, gain: Tensor) -> Tensor:
        """C((u + ½)/g) − C((u − ½)/g) for a gained latent u (N, C, H, W): the mass of the width-Δ
        bin around u/g, in float32 with CompressAI's likelihood bound."""
        n, c = u.shape[:2]
        v = u.transpose(0, 1).reshape(c, 1, -1)  # CompressAI's (C, 1, samples) layout
        g = gain.reshape(c, 1, 1)
        lower = self.density._logits_cumulative((v - 0.5) / g, stop_gradient=False)
        upper = self.density._logits_cumulative((v + 0.5) / g, stop_gradient=False)
        likelihood = torch.sigmoid(upper) - torch.sigmoid(lower)
        if self.density.use_likelihood_bound:
            likelihood = self.density.likelihood_lower_bound(likelihood)
        return likelihood.reshape(c, n, *u.shape[2:]).transpose(0, 1)

    def forward(self, u: Tensor, rate: int, gain: Tensor, training: bool | None = None) -> tuple[Tensor, Tensor]:
        """u + U(−½, ½) (training) or u rounded around μ_k, and the shared density's likelihoods of it
        at step 1/g (gradients reach the gain through both)."""
        training = self.training if training is None else training
        noisy = self.density.quantize(u, "noise" if training else "dequantize", self.medians(rate, gain))
        return noisy, self.likelihood(noisy, gain)

    def loss(self) -> Tensor:
        return self.density.loss()

    @torch.no_grad()
    def update(self, gains: Tensor, force: bool = True) -> bool:
        """Cut every rate's tables from the density: ``EntropyBottleneck.update`` applied to the
        density of u = g_k·y (CDF C(u/g_k), quantiles g_k·q), bins of width 1 around μ_k."""
        if self.has_tables and not force:
            return False
        eb = self.density
        quantiles = eb.quantiles.detach()
        for k, table in enumerate(self.tables):
            g = gains[k].detach().reshape(-1)
            q = quantiles[:, 0, :] * g[:, None]
            medians = self.medians(k, g)[:, 0, 0]
            minima = torch.clamp(torch.ceil(q[:, 1] - q[:, 0]).int(), min=0)
            maxima = torch.clamp(torch.ceil(q[:, 2] - q[:, 1]).int(), min=0)
            pmf_start = medians - minima
            pmf_length = maxima + minima + 1
            max_length = pmf_length.max().item()
            samples = torch.arange(max_length, device=pmf_start.device)[None, :] + pmf_start[:, None, None]
            lower = eb._logits_cumulative((samples - 0.5) / g[:, None, None], stop_gradient=True)
            upper = eb._logits_cumulative((samples + 0.5) / g[:, None, None], stop_gradient=True)
            pmf = (torch.sigmoid(upper) - torch.sigmoid(lower))[:, 0, :]
            tail_mass = torch.sigmoid(lower[:, 0, :1]) + torch.sigmoid(-upper[:, 0, -1:])
            table._offset = -minima
            table._quantized_cdf = eb._pmf_to_cdf(pmf, tail_mass, pmf_length, max_length)
            table._cdf_length = pmf_length + 2
        return True

    def cdfs(self, rate: int) -> nn.Module:
        return self.tables[rate]

    def densities(self) -> list[tuple[EntropyBottleneck, int | None]]:
        return [(self.density, None)]


def build_rate_model(kind: str, channels: int, rates: int) -> PerRatePriors | SharedPrior:
    if kind == "per-rate":
        return PerRatePriors(channels, rates)
    if kind == "shared":
        return SharedPrior(channels, rates)
    raise ValueError(f"prior must be one of {', '.join(PRIORS)}, got {kind!r}")
