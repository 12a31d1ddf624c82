"""Image loading and the model input every head expects — one definition for edge, gateway
(full-offloading mode) and training data, so train and serve never drift apart.

The geometry and normalisation live in :mod:`splitserve_edge.preprocessing` (numpy + Pillow), so
the torch-free edge client produces bit-identical inputs; this module adds loading and tensors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from .errors import SplitserveError

from splitserve_edge.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, PreprocessingError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Preprocessing", "denormalize", "load_image", "normalize", "to_input"]
MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs with a clear message


def load_image(source: str | Path | bytes | Image.Image | np.ndarray) -> Image.Image:
    """Open a path, encoded bytes, PIL image or HxWx{1,3,4} uint8 array as an RGB PIL image."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3):
            raise SplitserveError(f"array images must be HxW or HxWxC uint8, got {source.dtype} {source.shape}")
        return Image.fromarray(source).convert("RGB")
    name = "image bytes"
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise SplitserveError(f"{path}: no such file")
        source = path.read_bytes()
    try:
        with Image.open(io.BytesIO(source)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise SplitserveError(f"{name}: image of {img.width}x{img.height} pixels is too large")
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        raise SplitserveError(f"{name}: not a readable image ({type(e).__name__})") from None


def to_input(img: Image.Image, preprocessing: Preprocessing) -> Tensor:
    """The bundle's declared policy applied to ``img``: the (3, H, W) tensor the encoder consumes."""
    try:
        return torch.from_numpy(preprocessing.apply(img))
    except PreprocessingError as e:
        raise SplitserveError(str(e)) from None


def normalize(x: Tensor) -> Tensor:
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def denormalize(x: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(-1, 1, 1)
    return x * std + mean
