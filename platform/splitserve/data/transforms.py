"""Training/eval transforms for the three tasks, on torchvision's transforms v2 API.

Geometry runs on uint8 tensors (``tv_tensors.Image``) jointly with ``BoundingBoxes``/``Mask``, the
same way :func:`splitserve.preprocess.to_input` resizes on the edge (antialiased resize of a uint8
tensor); the result is then scaled to [0, 1] and normalised with
:func:`splitserve.preprocess.normalize`, so training inputs match served inputs exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..errors import DataError, SplitserveError
from ..preprocess import load_image, normalize

IGNORE_INDEX = 255  # segmentation label ignored by the loss (padding, crowd regions)


def as_size(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``(height, width)`` from an int or a pair, validated."""
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise DataError(f"image_size must be (height, width) with positive sides, got {image_size!r}")
    return size  # type: ignore[return-value]


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file as RGB; any problem is a :class:`DataError` naming the file."""
    try:
        return load_image(Path(path))
    except DataError:
        raise
    except SplitserveError as e:
        raise DataError(str(e)) from None


def to_normalized(image: Tensor) -> Tensor:
    """uint8 (3,H,W) (possibly a tv_tensor) -> plain float tensor normalised like the edge input."""
    return normalize(image.as_subclass(Tensor).float().div_(255))


class RandomScale(v2.Transform):
    """Resize to ``base_size`` times a random factor in ``[lo, hi]`` (images bilinear, masks nearest).

    The factor scales the fixed network input size, so a factor of 1 is exactly the eval resize.
    """

    def __init__(self, base_size: tuple[int, int], lo: float = 0.5, hi: float = 2.0) -> None:
        super().__init__()
        self.base_size = base_size
        self.lo, self.hi = lo, hi

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        s = float(torch.empty(1).uniform_(self.lo, self.hi))
        return {"size": [max(1, round(self.base_size[0] * s)), max(1, round(self.base_size[1] * s))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resize(inpt, params["size"], antialias=True)


def classification_transform(train: bool, image_size: tuple[int, int]) -> v2.Compose:
    if train:
        ops = [
            v2.ToImage(),
            v2.RandomResizedCrop(list(image_size), scale=(0.35, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:
        # Exactly what the edge does (splitserve.preprocess.to_input): the whole image resized to
        # the bundle's input size, no centre crop, so validation measures what the gateway serves.
        ops = [v2.ToImage(), v2.Resize(list(image_size), antialias=True)]
    return v2.Compose([*ops, v2.Lambda(to_normalized, tv_tensors.Image)])


def detection_transform(train: bool, image_size: tuple[int, int]) -> v2.Compose:
    """On ``(Image, {"boxes": BoundingBoxes, "labels": ...})``: exact resize to the input size
    (as the edge does), a consistent flip when training, and dropping boxes under 1 px."""
    ops: list = [v2.Resize(list(image_size), antialias=True)]
    if train:
        ops.append(v2.RandomHorizontalFlip())
    ops.append(v2.SanitizeBoundingBoxes(min_size=1.0))
    return v2.Compose(ops)


def segmentation_transform(train: bool, image_size: tuple[int, int]) -> v2.Compose:
    """On ``(Image, Mask)``: train = random scale 0.5-2 + random crop (pad image 0, mask 255) + flip;
    eval = resize to the input size (mask nearest)."""
    if train:
        ops = [
            RandomScale(image_size, 0.5, 2.0),
            v2.RandomCrop(
                list(image_size), pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
            ),
            v2.RandomHorizontalFlip(),
        ]
    else:
        ops = [v2.Resize(list(image_size), antialias=True)]
    return v2.Compose(ops)
