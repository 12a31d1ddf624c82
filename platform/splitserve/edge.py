"""The device side (PyTorch): load only encoder + prior from a bundle and turn images into payload bytes.

Images become model inputs by the bundle's declared preprocessing (:mod:`splitserve.preprocess`),
as in training, so heads see what they were trained on. Nothing here needs the decoder or any
task head.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from splitserve_edge.payload import Encoded, Payload, fingerprint_id
from splitserve_edge.preprocessing import ImageLike
from torch import Tensor

from .bundle import EDGE_PARTS, Manifest, load_codec, read_manifest
from .models import FeatureCodec
from .preprocess import Preprocessing

__all__ = ["EdgeEncoder", "Encoded", "ImageLike", "pack"]


def pack(codec: FeatureCodec, strings: Sequence[bytes], latent_hw: tuple[int, int],
         original_sizes: Sequence[tuple[int, int]], fingerprint: bytes | None = None) -> Payload:
    """The payload a device sends for ``codec.compress`` output: the one place the container is
    assembled, so rates measured in training are exactly what devices pay."""
    return Payload(
        fingerprint=fingerprint if fingerprint is not None else fingerprint_id(codec.fingerprint()),
        latent_shape=(codec.latent_channels, *latent_hw),
        original_sizes=tuple((int(a), int(b)) for a, b in original_sizes),
        strings=tuple(strings),
    )


class EdgeEncoder:
    """Encode images for a server that serves the same bundle (same fingerprint)."""

    def __init__(self, codec: FeatureCodec, preprocessing: Preprocessing):
        codec.check_input_size(*preprocessing.nominal_size)
        self.codec = codec.eval()
        self.preprocessing = preprocessing
        self.fingerprint = codec.fingerprint()
        self._fp_id = fingerprint_id(self.fingerprint)

    @classmethod
    def from_bundle(cls, path: str | Path, manifest: Manifest | None = None) -> "EdgeEncoder":
        manifest = manifest or read_manifest(path)
        return cls(load_codec(path, parts=EDGE_PARTS, manifest=manifest), manifest.policy)

    def preprocess(self, images: Sequence[ImageLike]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Load and apply the bundle's preprocessing; returns the batch and each image's original (h, w).

        One payload carries one latent shape, so every image must map to the same input size
        (always true for fixed-size policies; under ``shorter_side`` images of different aspect
        ratios go in separate payloads).
        """
        x, sizes = self.preprocessing.batch(images)
        return torch.from_numpy(x), sizes

    @torch.inference_mode()
    def encode_tensor(self, x: Tensor, original_sizes: Sequence[tuple[int, int]]) -> Encoded:
        """Entropy-code an already normalised batch (B, 3, H, W)."""
        strings, latent_hw = self.codec.compress(x)
        payload = pack(self.codec, strings, latent_hw, original_sizes, self._fp_id)
        return Encoded(payload.to_bytes(), payload, (int(x.shape[-2]), int(x.shape[-1])))

    def encode(self, images: Sequence[ImageLike] | ImageLike) -> Encoded:
        """Encode one image or a batch of images (paths, bytes, PIL images or uint8 arrays)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        x, sizes = self.preprocess(images)
        return self.encode_tensor(x, sizes)
