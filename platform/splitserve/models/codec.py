"""FeatureCodec: encoder f_θ + factorized prior + decoder g_φ, the unit shared by edge and server.

The edge runs :meth:`FeatureCodec.compress`; the server runs :meth:`decompress` then :meth:`decode`
and hands the rebuilt feature ``h`` to every task head. A codec may code at several rates
(``rates=K``): one transform, a gain and coding tables per rate, from a prior per rate or one shared
prior (:mod:`.priors`). CompressAI's ``EntropyBottleneck`` is the training-time model of the rate;
the bytes are coded by :mod:`splitserve_edge.coder` (memory-safe, torch-free) from the prior's own
tables (:meth:`coding_tables`), so devices pay the modelled rate.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from compressai.entropy_models import EntropyBottleneck
from torch import Tensor, nn

from splitserve_edge.coder import CodingTables
from splitserve_edge.rates import RateCoder, RateTables, is_rate_index

from ..errors import SplitserveError
from .priors import PRIORS, SharedPrior, build_rate_model
from splitserve_edge.payload import bits_per_pixel


@dataclass(frozen=True)
class CodecOutput:
    """Training-path output: the rebuilt feature, the prior's likelihoods of the noisy latent, and the
    transform's un-gained output (what every other rate's prior is fitted to, :meth:`FeatureCodec.fit_priors`)."""

    features: Tensor
    likelihoods: Tensor
    latent: Tensor | None = None

    def bits(self) -> Tensor:
        """Total information content in bits (the rate term), summed over the batch."""
        return -torch.log2(self.likelihoods).sum()

    def bits_per_image(self) -> Tensor:
        """Mean bits per image of the batch: the rate term of Entropic Student's Eq. 2."""
        return self.bits() / self.likelihoods.shape[0]

    def bpp(self, input_hw: tuple[int, int]) -> Tensor:
        """Bits per pixel of the model input (``input_hw`` = the encoder's input height, width)."""
        return bits_per_pixel(self.bits(), self.likelihoods.shape[0], input_hw)


class FeatureCodec(nn.Module):
    """Encoder + entropy bottleneck + decoder with the CompressAI calling conventions.

    ``stride`` is the downsampling factor of the decoded feature relative to the input (4, the
    ResNet layer1 scale); ``input_multiple`` is what input sides must be divisible by for the
    decoded feature to be exactly ``input/stride`` (8 for patch-embedding encoders).

    With ``rates=K > 1`` the codec is variable-rate (gain units, Cui et al. 2021; CompressAI's
    ``vbr``): one encoder and decoder, and per rate k a per-channel gain g_k applied to the latent
    on the device, coding tables, and an inverse gain on the server. Rate 0 is the smallest
    payload. The tables come from a factorized prior per rate (``prior="per-rate"``, the default)
    or from one shared prior over the un-gained latent read at step 1/g_k (``prior="shared"``); see
    :mod:`.priors`. ``rates=1`` is the single-rate codec, without gains, unchanged.
    """

    stride: int = 4

    def __init__(
        self,
        family: str,
        config: dict,
        encoder: nn.Module,
        decoder: nn.Module,
        latent_channels: int,
        feature_channels: int,
        input_multiple: int,
        rates: int = 1,
    ):
        super().__init__()
        self.family = family
        self.encoder = encoder
        self.decoder = decoder
        self.latent_channels = latent_channels
        self.feature_channels = feature_channels
        self.input_multiple = input_multiple
        self._register_load_state_dict_pre_hook(_single_prior_keys)
        self.set_rates(rates, config)

    def set_rates(self, rates: int, config: dict | None = None, prior: str = "per-rate") -> "FeatureCodec":
        """Give the codec ``rates`` fresh priors (and gains when > 1); the registry's ``rates=K``.

        Any family becomes variable-rate this way: the rates live around the transform, not in it.
        ``prior`` is the rate model (:data:`~.priors.PRIORS`); the config names it only when it is
        ``"shared"``, so per-rate configs and fingerprints are what they were before the choice.
        """
        if isinstance(rates, bool) or not isinstance(rates, int) or not 1 <= rates <= 64:
            raise SplitserveError(f"rates must be an int in [1, 64], got {rates!r}")
        if prior not in PRIORS:
            raise SplitserveError(f"prior must be one of {', '.join(PRIORS)}, got {prior!r}")
        if prior == "shared" and rates == 1:
            raise SplitserveError("prior='shared' needs rates > 1: a single-rate codec has one prior")
        config = {k: v for k, v in (self.config if config is None else config).items() if k not in ("rates", "prior")}
        named = {"prior": prior} if prior != "per-rate" else {}
        self.config = config if rates == 1 else {**config, "rates": rates, **named}
        c = self.latent_channels
        self.priors = build_rate_model(prior, c, rates)
        for k in range(rates):
            self.priors.cdfs(k).register_load_state_dict_pre_hook(self._tables_changed)
        if rates > 1:
            # log-gains spread the quantisation step over 4x (2x either side of 1) before training
            # one Parameter per rate, like the priors: a step at rate k leaves every other rate's
            # gains and optimizer state alone (a zero gradient would still move them on momentum)
            spread = torch.linspace(-math.log(2.0), math.log(2.0), rates)[:, None].repeat(1, c)
            self.gains = nn.ParameterList([nn.Parameter(row.clone()) for row in spread])
            self.inverse_gains = nn.ParameterList([nn.Parameter(-row.clone()) for row in spread])
        self._coder: RateCoder | None = None
        return self

    @property
    def rates(self) -> int:
        return self.priors.rates

    @property
    def entropy_bottleneck(self) -> EntropyBottleneck:
        """The prior of a single-rate codec (CompressAI's name); a variable-rate one has ``priors``."""
        if self.rates != 1:
            if isinstance(self.priors, SharedPrior):
                raise AttributeError("a shared-prior codec has one density for every rate: codec.priors.density")
            raise AttributeError("a variable-rate codec has one prior per rate: use codec.priors[rate]")
        return self.priors[0]

    @property
    def log_gain(self) -> Tensor:
        """(K, C): every rate's device-side log-gains, row k for rate k."""
        return torch.stack(tuple(self.gains))

    @property
    def log_inverse_gain(self) -> Tensor:
        """(K, C): every rate's server-side log inverse gains."""
        return torch.stack(tuple(self.inverse_gains))

    def prior_parameters(self) -> list[nn.Parameter]:
        """The priors' and gains' parameters (frozen with the encoder when heads are fine-tuned)."""
        params = list(self.priors.parameters())
        if self.rates > 1:
            params += [*self.gains, *self.inverse_gains]
        return params

    def check_rate(self, rate: int) -> int:
        if not is_rate_index(rate, self.rates):
            raise SplitserveError(f"rate index {rate!r} is outside this codec's rates 0..{self.rates - 1}")
        return int(rate)

    def gain(self, rate: int) -> Tensor | None:
        """Rate ``rate``'s device-side gain (C, 1, 1), or None for a single-rate codec."""
        return None if self.rates == 1 else self.gains[self.check_rate(rate)].exp().reshape(-1, 1, 1)

    def inverse_gain(self, rate: int) -> Tensor | None:
        return None if self.rates == 1 else self.inverse_gains[self.check_rate(rate)].exp().reshape(-1, 1, 1)

    # -- training path ---------------------------------------------------------------------
    def forward(self, x: Tensor, rate: int = 0) -> CodecOutput:
        """Noisy (training) or rounded (eval) path at rate ``rate``: z̃ = g·f(x) + U(-½, ½), h = g(z̃ / g).

        The entropy model runs in float32 even under autocast: its likelihoods are differences of
        sigmoids that underflow in half precision, which would corrupt the rate term.
        """
        y = self.encoder(x)
        y_hat, likelihoods = self.through_prior(y, rate)
        return CodecOutput(self.decoder(y_hat), likelihoods, y)

    def through_prior(self, y: Tensor, rate: int = 0) -> tuple[Tensor, Tensor]:
        """The transform's output ``y`` at rate ``rate``: its gain, the prior (noise while training,
        rounding in eval), the inverse gain; returns (ŷ, the prior's likelihoods of the gained latent)."""
        with _fp32(y.device):
            y = y.float()
            gain = self.gain(rate)
            if gain is not None:
                y = y * gain
            y_hat, likelihoods = self.priors(y, self.check_rate(rate), gain)
            inverse = self.inverse_gain(rate)
            if inverse is not None:
                y_hat = y_hat * inverse
        return y_hat, likelihoods

    def fit_priors(self, y: Tensor, rate: int) -> dict[int, Tensor]:
        """Every other rate's likelihoods of this step's latent ``y`` (noisy, at its gain), with ``y``
        and the gains detached, so that only those rates' densities learn from them.

        A training step codes its batch at one drawn rate; with one prior per rate, only that rate's
        density would learn, from 1/K of the steps, and lag behind the latent the transform learns
        (measured on a six-rate run: after 3 of 9 epochs the priors charged 2.6-3.3x the empirical
        entropy of the rounded latent). Weighted as the drawn rate's term is, these fit every
        density every step and move neither the transform nor the gains. Empty in eval mode, for a
        single-rate codec and for a shared prior, whose one density learns at every step already.
        """
        if self.rates == 1 or self.priors.kind != "per-rate" or not self.training:
            return {}
        out = {}
        with _fp32(y.device):
            y = y.detach().float()
            for k in range(self.rates):
                if k != rate:
                    _, out[k] = self.priors(y * self.gain(k).detach(), k, None)
        return out

    def aux_loss(self) -> Tensor:
        """The priors' quantile losses, in float32; optimise them every step so update() builds good CDFs."""
        with _fp32(self.priors.device):
            return self.priors.loss()

    def update(self, force: bool = True) -> bool:
        """Rebuild the priors' CDF tables; must run after any change to a prior or gain, before coding."""
        self._coder = None
        gains = None if self.rates == 1 else self.log_gain.detach().float().exp()
        return self.priors.update(gains, force=force)

    def _tables_changed(self, module: nn.Module, state_dict, prefix, *args) -> None:
        """Load-state-dict pre-hook: the coding tables change shape with ``update()``, so size the
        buffers like the incoming ones first (the one place this happens: bundles, checkpoints),
        and forget the coder built from the old tables."""
        self._coder = None
        for name in _CODING_TABLES:
            incoming = state_dict.get(prefix + name)
            if incoming is not None and getattr(module, name).shape != incoming.shape:
                getattr(module, name).resize_(incoming.shape)

    def coding_tables(self, rate: int = 0) -> CodingTables:
        """Rate ``rate``'s prior tables in portable form (numpy)."""
        if not self.has_coding_tables:
            raise RuntimeError("call update() before coding: the prior has no CDF tables yet")
        eb = self.priors.cdfs(self.check_rate(rate))
        return CodingTables(
            quantized_cdf=eb.quantized_cdf.detach().cpu().numpy(),
            cdf_length=eb.cdf_length.detach().cpu().numpy(),
            offset=eb.offset.detach().cpu().numpy(),
            medians=self.medians(rate).detach().cpu().reshape(-1).numpy(),
        )

    def rate_tables(self) -> RateTables:
        """Every rate's tables and gains: what the coder on both ends uses (the edge export's file)."""
        gains = None
        if self.rates > 1:
            gains = self.log_gain.detach().float().exp().cpu().numpy()
        return RateTables(tuple(self.coding_tables(k) for k in range(self.rates)), gains)

    def __getstate__(self) -> dict:
        """Copies (``copy.deepcopy``, as the rate measurement makes) leave the coder out: its
        constriction models cannot be copied, and it is rebuilt from the tables on first use."""
        return {**super().__getstate__(), "_coder": None}

    @property
    def coder(self) -> RateCoder:
        if self._coder is None:
            self._coder = RateCoder(self.rate_tables())
        return self._coder

    def medians(self, rate: int = 0) -> Tensor:
        """Per-channel medians of rate ``rate``, shape (C, 1, 1): the centres its gained latents are rounded
        around (its prior's; with a shared prior, the gained shared median g_k·m)."""
        rate = self.check_rate(rate)
        return self.priors.medians(rate, self.gain(rate))

    @property
    def has_coding_tables(self) -> bool:
        return self.priors.has_tables

    # -- coding path -----------------------------------------------------------------------
    def quantize(self, x: Tensor, rate: int = 0) -> Tensor:
        """The latent the server will reconstruct at rate ``rate``, computed locally (rounded, gain undone)."""
        y = self.encoder(x)
        gain = self.gain(rate)
        if gain is not None:
            y = y * gain
        y_hat = self.priors.quantize(y, self.check_rate(rate), gain)
        inverse = self.inverse_gain(rate)
        return y_hat if inverse is None else y_hat * inverse

    @torch.no_grad()
    def compress(self, x: Tensor, rates: int | Sequence[int] = 0) -> tuple[list[bytes], tuple[int, int]]:
        """Encode a batch to one bitstream per image (image i at ``rates[i]``) plus the latent's spatial size."""
        y = self.encoder(x)
        # the coder's own gain and rounding: the code a torch-free device runs, so payloads are identical
        strings = self.coder.encode(y.float().cpu().numpy(), rates)
        return strings, (int(y.shape[-2]), int(y.shape[-1]))

    @torch.no_grad()
    def decompress(self, strings: Sequence[bytes], latent_hw: tuple[int, int],
                   rates: Sequence[int] | None = None) -> Tensor:
        """Entropy-decode bitstreams (image i at ``rates[i]``, default all rate 0) back to the exact
        latent the decoder takes, inverse gain applied (CoderError on a bad one). Images of
        different rates come back as one batch."""
        shape = (self.latent_channels, int(latent_hw[0]), int(latent_hw[1]))
        rates = list(rates) if rates is not None else [0] * len(strings)
        if len(rates) != len(strings):
            raise SplitserveError(f"{len(rates)} rate indices for {len(strings)} bitstreams")
        latents = torch.from_numpy(np.stack([self.coder.decode(s, shape, r) for s, r in zip(strings, rates)]))
        device = self.priors.device
        latents = latents.to(device=device, dtype=torch.float32)
        if self.rates > 1:
            latents = latents * self.log_inverse_gain.detach()[torch.tensor(rates)].exp()[:, :, None, None].to(device)
        return latents

    def decode(self, y_hat: Tensor) -> Tensor:
        """Rebuild the backbone feature h from a (de)quantized latent."""
        return self.decoder(y_hat)

    # -- geometry --------------------------------------------------------------------------
    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the latent for an input of ``height × width`` (shape arithmetic only)."""
        return self.encoder.output_hw(height, width)

    def input_hw(self, latent_h: int, latent_w: int) -> tuple[int, int]:
        """Input size that produced a latent of this size (inputs are multiples of ``input_multiple``)."""
        return self.encoder.input_hw(latent_h, latent_w)

    def check_input_size(self, height: int, width: int) -> None:
        m = self.input_multiple
        if height % m or width % m or height < 2 * m or width < 2 * m:
            raise SplitserveError(f"{self.family} needs input sides that are multiples of {m} (>= {2 * m}), got {height}x{width}")

    # -- identity --------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """SHA-256 over family, config, encoder weights, every rate's coding tables and the gains.

        Two codecs with the same fingerprint produce and decode identical bitstreams, so the
        edge and the server can prove they speak the same code. Requires :meth:`update`. A
        single-rate codec's fingerprint is what it was before rates existed.
        """
        if not self.has_coding_tables:
            raise RuntimeError("call update() before fingerprint(): the prior has no CDF tables yet")
        h = hashlib.sha256()
        h.update(json.dumps({"family": self.family, "config": self.config}, sort_keys=True).encode())
        tensors = {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
        for k in range(self.rates):
            eb = self.priors.cdfs(k)
            name = "prior" if self.rates == 1 else f"prior{k}"
            tensors.update(
                {
                    f"{name}.quantized_cdf": eb.quantized_cdf,
                    f"{name}.cdf_length": eb.cdf_length,
                    f"{name}.offset": eb.offset,
                    f"{name}.medians": self.medians(k),
                }
            )
        if self.rates > 1:
            tensors["gains"] = torch.from_numpy(self.rate_tables().gains.copy())
        for name in sorted(tensors):
            t = tensors[name].detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    # -- the prior file of a bundle ----------------------------------------------------------
    def prior_state(self) -> dict[str, Tensor]:
        """The ``prior`` file's tensors: a single-rate codec's EntropyBottleneck state (the file
        bundles always had); a variable-rate one's rate model (per-rate: ``{k}.…`` per prior; shared:
        ``density.…`` and each rate's ``tables.{k}.…``) plus the (inverse) log-gains."""
        if self.rates == 1:
            return dict(self.priors[0].state_dict())
        state = dict(self.priors.state_dict())
        state.update(log_gain=self.log_gain.detach(), log_inverse_gain=self.log_inverse_gain.detach())
        return state

    def load_prior_state(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of :meth:`prior_state` (RuntimeError when the tensors do not fit)."""
        if self.rates == 1:
            self.priors[0].load_state_dict(tensors)
            return
        state = {key: t for key, t in tensors.items() if key not in ("log_gain", "log_inverse_gain")}
        missing = {"log_gain", "log_inverse_gain"} - set(tensors)
        if missing:
            raise RuntimeError(f"missing gains: {', '.join(sorted(missing))}")
        shape = (self.rates, self.latent_channels)
        with torch.no_grad():
            for key, params in (("log_gain", self.gains), ("log_inverse_gain", self.inverse_gains)):
                if tuple(tensors[key].shape) != shape:  # copy_ would broadcast a (C,) or (1, C) silently
                    raise RuntimeError(f"{key} has shape {tuple(tensors[key].shape)}, expected {shape} "
                                       f"({self.rates} rates × {self.latent_channels} channels)")
                for param, row in zip(params, tensors[key]):
                    param.copy_(row)
        if set(state) != set(self.priors.state_dict()):
            raise RuntimeError(f"prior tensors do not fit {self.rates} rates with a {self.priors.kind} prior")
        self.priors.load_state_dict(state)
        self._coder = None

    def parameter_counts(self) -> dict[str, int]:
        """Device side = encoder + priors (+ gains) (what the edge must hold); server side = decoder."""
        count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
        return {
            "encoder": count(self.encoder),
            "prior": sum(p.numel() for p in self.prior_parameters()),
            "decoder": count(self.decoder),
        }


def _single_prior_keys(state_dict, prefix, *args) -> None:
    """Checkpoints from before rates existed name the one prior ``entropy_bottleneck``: read it as rate 0's."""
    old = prefix + "entropy_bottleneck."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "priors.0." + key[len(old):]] = state_dict.pop(key)


_CODING_TABLES = ("_quantized_cdf", "_offset", "_cdf_length")


def _fp32(device: torch.device):
    """Autocast off on ``device``: the entropy model is always computed in float32."""
    return torch.autocast(device_type=device.type, enabled=False)


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a convolution, for exact shape arithmetic without a forward pass."""
    return math.floor((size + 2 * padding - kernel) / stride) + 1
