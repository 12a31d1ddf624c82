"""FeatureCodec: encoder f_θ + factorized prior + decoder g_φ, the unit shared by edge and server.

The edge runs :meth:`FeatureCodec.compress`; the server runs :meth:`decompress` then :meth:`decode`
and hands the rebuilt feature ``h`` to every task head. CompressAI's ``EntropyBottleneck`` is the
training-time model of the rate; the bytes are coded by :mod:`splitserve_edge.coder` (memory-safe,
torch-free) from the prior's own tables (:meth:`coding_tables`), so devices pay the modelled rate.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
from compressai.entropy_models import EntropyBottleneck
from torch import Tensor, nn

from splitserve_edge.coder import CodingTables, EntropyCoder

from ..errors import SplitserveError
from splitserve_edge.payload import bits_per_pixel


@dataclass(frozen=True)
class CodecOutput:
    """Training-path output: the rebuilt feature and the prior's likelihoods of the noisy latent."""

    features: Tensor
    likelihoods: Tensor

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
    ):
        super().__init__()
        self.family = family
        self.config = dict(config)
        self.encoder = encoder
        self.entropy_bottleneck = EntropyBottleneck(latent_channels)
        self.entropy_bottleneck.register_load_state_dict_pre_hook(self._tables_changed)
        self._coder: EntropyCoder | None = None
        self.decoder = decoder
        self.latent_channels = latent_channels
        self.feature_channels = feature_channels
        self.input_multiple = input_multiple

    # -- training path ---------------------------------------------------------------------
    def forward(self, x: Tensor) -> CodecOutput:
        """Noisy (training) or rounded (eval) path: z̃ = f(x) + U(-½, ½), h = g(z̃).

        The entropy model runs in float32 even under autocast: its likelihoods are differences of
        sigmoids that underflow in half precision, which would corrupt the rate term.
        """
        y = self.encoder(x)
        with _fp32(y):
            y_hat, likelihoods = self.entropy_bottleneck(y.float())
        return CodecOutput(self.decoder(y_hat), likelihoods)

    def aux_loss(self) -> Tensor:
        """The prior's quantile loss, in float32; optimise it every step so update() builds good CDFs."""
        with _fp32(self.entropy_bottleneck.quantiles):
            return self.entropy_bottleneck.loss()

    def update(self, force: bool = True) -> bool:
        """Rebuild the prior's CDF tables; must run after any change to the prior, before coding."""
        self._coder = None
        return self.entropy_bottleneck.update(force=force)

    def _tables_changed(self, module: nn.Module, state_dict, prefix, *args) -> None:
        """Load-state-dict pre-hook: the coding tables change shape with ``update()``, so size the
        buffers like the incoming ones first (the one place this happens: bundles, checkpoints),
        and forget the coder built from the old tables."""
        self._coder = None
        for name in _CODING_TABLES:
            incoming = state_dict.get(prefix + name)
            if incoming is not None and getattr(module, name).shape != incoming.shape:
                getattr(module, name).resize_(incoming.shape)

    def coding_tables(self) -> CodingTables:
        """The prior's tables in portable form (numpy): what the coder on both ends uses."""
        if not self.has_coding_tables:
            raise RuntimeError("call update() before coding: the prior has no CDF tables yet")
        eb = self.entropy_bottleneck
        return CodingTables(
            quantized_cdf=eb.quantized_cdf.detach().cpu().numpy(),
            cdf_length=eb.cdf_length.detach().cpu().numpy(),
            offset=eb.offset.detach().cpu().numpy(),
            medians=self.medians().detach().cpu().reshape(-1).numpy(),
        )

    @property
    def coder(self) -> EntropyCoder:
        if self._coder is None:
            self._coder = EntropyCoder(self.coding_tables())
        return self._coder

    def medians(self) -> Tensor:
        """Per-channel medians of the prior, shape (C, 1, 1): the centres latents are rounded around."""
        return self.entropy_bottleneck.quantiles.detach()[:, :, 1:2]

    @property
    def has_coding_tables(self) -> bool:
        return self.entropy_bottleneck.offset.numel() > 0

    # -- coding path -----------------------------------------------------------------------
    def quantize(self, x: Tensor) -> Tensor:
        """The latent the server will reconstruct, computed locally (round around the medians)."""
        y = self.encoder(x)
        return self.entropy_bottleneck.quantize(y, "dequantize", self.medians())

    @torch.no_grad()
    def compress(self, x: Tensor) -> tuple[list[bytes], tuple[int, int]]:
        """Encode a batch to one bitstream per image plus the latent's spatial size."""
        y = self.encoder(x)
        # the coder's own rounding: the same code a torch-free device runs, so payloads are identical
        symbols = self.coder.symbols(y.float().cpu().numpy())
        return self.coder.encode_batch(symbols), (int(y.shape[-2]), int(y.shape[-1]))

    @torch.no_grad()
    def decompress(self, strings: list[bytes], latent_hw: tuple[int, int]) -> Tensor:
        """Entropy-decode bitstreams back to the exact rounded latent (CoderError on a bad one)."""
        shape = (self.latent_channels, int(latent_hw[0]), int(latent_hw[1]))
        symbols = np.stack([self.coder.decode(s, shape) for s in strings])
        device = self.medians().device
        return torch.from_numpy(symbols).to(device=device, dtype=torch.float32) + self.medians()

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
        """SHA-256 over family, config, encoder weights and the prior's coding tables.

        Two codecs with the same fingerprint produce and decode identical bitstreams, so the
        edge and the server can prove they speak the same code. Requires :meth:`update`.
        """
        eb = self.entropy_bottleneck
        if not self.has_coding_tables:
            raise RuntimeError("call update() before fingerprint(): the prior has no CDF tables yet")
        h = hashlib.sha256()
        h.update(json.dumps({"family": self.family, "config": self.config}, sort_keys=True).encode())
        tensors = {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
        tensors.update(
            {
                "prior.quantized_cdf": eb.quantized_cdf,
                "prior.cdf_length": eb.cdf_length,
                "prior.offset": eb.offset,
                "prior.medians": self.medians(),
            }
        )
        for name in sorted(tensors):
            t = tensors[name].detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def parameter_counts(self) -> dict[str, int]:
        """Device side = encoder + prior (what the edge must hold); server side = decoder."""
        count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
        return {
            "encoder": count(self.encoder),
            "prior": count(self.entropy_bottleneck),
            "decoder": count(self.decoder),
        }


_CODING_TABLES = ("_quantized_cdf", "_offset", "_cdf_length")


def _fp32(t: Tensor):
    """Autocast off on ``t``'s device: the entropy model is always computed in float32."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a convolution, for exact shape arithmetic without a forward pass."""
    return math.floor((size + 2 * padding - kernel) / stride) + 1
