"""The device side: load only encoder + prior from a bundle and turn images into payload bytes.

The same resize/normalise as training (:mod:`splitserve.preprocess`), so heads see what they
were trained on. Nothing here needs the decoder or any task head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .bundle import EDGE_PARTS, Manifest, load_codec, read_manifest
from .models import FeatureCodec
from .payload import Payload, bits_per_pixel, fingerprint_id
from .preprocess import load_image, to_input

ImageLike = str | Path | bytes | Image.Image | np.ndarray


@dataclass(frozen=True)
class Encoded:
    """One encoded batch: the bytes to send plus what they cost."""

    data: bytes
    payload: Payload

    @property
    def num_bytes(self) -> int:
        return len(self.data)

    @property
    def bpp(self) -> list[float]:
        """Bits per pixel of each original image, header share included."""
        return bits_per_pixel(self.payload)


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

    def __init__(self, codec: FeatureCodec, input_size: tuple[int, int]):
        codec.check_input_size(*input_size)
        self.codec = codec.eval()
        self.input_size = tuple(input_size)
        self.fingerprint = codec.fingerprint()
        self._fp_id = fingerprint_id(self.fingerprint)

    @classmethod
    def from_bundle(cls, path: str | Path, manifest: Manifest | None = None) -> "EdgeEncoder":
        manifest = manifest or read_manifest(path)
        return cls(load_codec(path, parts=EDGE_PARTS, manifest=manifest), manifest.input_size)

    def preprocess(self, images: Sequence[ImageLike]) -> tuple[Tensor, list[tuple[int, int]]]:
        """Load, resize and normalise; returns the batch and each image's original (h, w)."""
        pils = [load_image(img) for img in images]
        sizes = [(p.height, p.width) for p in pils]
        return torch.stack([to_input(p, self.input_size) for p in pils]), sizes

    @torch.inference_mode()
    def encode_tensor(self, x: Tensor, original_sizes: Sequence[tuple[int, int]]) -> Encoded:
        """Entropy-code an already normalised batch (B, 3, H, W)."""
        strings, latent_hw = self.codec.compress(x)
        payload = pack(self.codec, strings, latent_hw, original_sizes, self._fp_id)
        return Encoded(payload.to_bytes(), payload)

    def encode(self, images: Sequence[ImageLike] | ImageLike) -> Encoded:
        """Encode one image or a batch of images (paths, bytes, PIL images or uint8 arrays)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        x, sizes = self.preprocess(images)
        return self.encode_tensor(x, sizes)
