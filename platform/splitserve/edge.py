"""The device side (PyTorch): load only encoder + prior from a bundle and turn images into payload bytes.

Images become model inputs by the bundle's declared preprocessing (:mod:`splitserve.preprocess`),
as in training, so heads see what they were trained on. After the encoder transform, the latent
goes through :class:`splitserve_edge.packing.Packer` — gain, rounding, entropy coding, the rate
choice (a fixed rate or a byte budget) and the container — the very code the torch-free client
runs, so both produce the same bytes. Nothing here needs the decoder or any task head.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from splitserve_edge.packing import Packer, image_names
from splitserve_edge.payload import Encoded
from splitserve_edge.preprocessing import ImageLike
from torch import Tensor

from .bundle import EDGE_PARTS, Manifest, load_codec, read_manifest
from .models import FeatureCodec
from .preprocess import Preprocessing

__all__ = ["EdgeEncoder", "Encoded", "ImageLike"]


class EdgeEncoder:
    """Encode images for a server that serves the same bundle (same fingerprint)."""

    def __init__(self, codec: FeatureCodec, preprocessing: Preprocessing, default_rate: int = 0):
        codec.check_input_size(*preprocessing.nominal_size)
        self.codec = codec.eval()
        self.preprocessing = preprocessing
        self.fingerprint = codec.fingerprint()
        self.packer = Packer(codec.coder, self.fingerprint, codec.latent_channels, default_rate)

    @classmethod
    def from_bundle(cls, path: str | Path, manifest: Manifest | None = None) -> "EdgeEncoder":
        manifest = manifest or read_manifest(path)
        return cls(load_codec(path, parts=EDGE_PARTS, manifest=manifest), manifest.policy, manifest.default_rate)

    @property
    def rates(self) -> int:
        """How many rates the bundle codes at (1: single-rate)."""
        return self.packer.rates

    @property
    def default_rate(self) -> int:
        return self.packer.default_rate

    def preprocess(self, images: Sequence[ImageLike]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Load and apply the bundle's preprocessing; returns the batch and each image's original (h, w).

        One payload carries one latent shape, so every image must map to the same input size
        (always true for fixed-size policies; under ``shorter_side`` images of different aspect
        ratios go in separate payloads).
        """
        x, sizes = self.preprocessing.batch(images)
        return torch.from_numpy(x), sizes

    @torch.inference_mode()
    def encode_tensor(self, x: Tensor, original_sizes: Sequence[tuple[int, int]], *, rate: int | None = None,
                      max_bytes: int | None = None, names: Sequence[str] | None = None) -> Encoded:
        """Entropy-code an already normalised batch (B, 3, H, W) (rate choice: see :meth:`encode`)."""
        y = self.codec.encoder(x).float().cpu().numpy()
        return self.encode_latent(y, original_sizes, (int(x.shape[-2]), int(x.shape[-1])), rate=rate,
                                  max_bytes=max_bytes, names=names)

    def encode_latent(self, y: np.ndarray, original_sizes: Sequence[tuple[int, int]], input_hw: tuple[int, int], *,
                      rate: int | None = None, max_bytes: int | None = None,
                      names: Sequence[str] | None = None) -> Encoded:
        """Entropy-code the transform's output ``y`` (B, C, h, w) of a (B, 3, *input_hw) batch: every
        rate codes the same latent, so a device (or a rate measurement) runs the transform once."""
        payload = self.packer.encode(y, original_sizes, rate=rate, max_bytes=max_bytes, names=names)
        return Encoded(payload.to_bytes(), payload, input_hw)

    def encode(self, images: Sequence[ImageLike] | ImageLike, *, rate: int | None = None,
               max_bytes: int | None = None, names: Sequence[str] | None = None) -> Encoded:
        """Encode one image or a batch of images (paths, bytes, PIL images or uint8 arrays) into one
        payload: every image at ``rate`` (default: the bundle's default rate) or, with
        ``max_bytes``, each at the highest rate whose one-image payload has at most that many bytes
        (:class:`~splitserve_edge.rates.BudgetError` naming the smallest size when none fits;
        ``names`` name the images in it, by default their paths)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        x, sizes = self.preprocess(images)
        return self.encode_tensor(x, sizes, rate=rate, max_bytes=max_bytes,
                                  names=image_names(images) if names is None else names)
