"""The model input every head expects, as tensors — one definition for edge, gateway
(full-offloading mode) and training data, so train and serve never drift apart.

Loading, geometry and normalisation live in :mod:`splitserve_edge.preprocessing` (numpy + Pillow),
so the torch-free edge client produces bit-identical inputs; this module adds the torch side."""

from __future__ import annotations

import torch
from PIL import Image
from splitserve_edge.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_IMAGE_PIXELS,
    Preprocessing,
    PreprocessingError,
    load_image,
)

from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from .errors import SplitserveError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MAX_IMAGE_PIXELS", "Preprocessing", "PreprocessingError", "denormalize",
           "load_image", "normalize", "to_input"]


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
