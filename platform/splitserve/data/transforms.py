"""Training/eval transforms for the three tasks, on torchvision's transforms v2 API, driven by the
bundle's declared :class:`~splitserve.preprocess.Preprocessing`.

Classification evaluation applies the policy itself (:meth:`Preprocessing.apply`, the code the
edge runs), so validation measures exactly what the gateway serves. Detection and segmentation
resize image and boxes/masks jointly on uint8 tensors to the size the policy gives each image
(torchvision's antialiased bilinear resize, which agrees with Pillow's to within one grey level);
the result is scaled to [0, 1] and normalised like the edge input.
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
from ..preprocess import Preprocessing, PreprocessingError, load_image, normalize

IGNORE_INDEX = 255  # segmentation label ignored by the loss (padding, crowd regions)
CROP_SCALE = (0.08, 1.0)  # classification RandomResizedCrop area range (torchvision's, the references')


def as_size(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``(height, width)`` from an int or a pair, validated."""
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise DataError(f"image_size must be (height, width) with positive sides, got {image_size!r}")
    return size  # type: ignore[return-value]


def as_policy(preprocessing: Preprocessing | int | tuple[int, int] | list[int]) -> Preprocessing:
    """A preprocessing policy; a bare size means the ``fixed`` policy at that size."""
    if isinstance(preprocessing, Preprocessing):
        return preprocessing
    return Preprocessing.fixed(*as_size(preprocessing))


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
    """Resize to the size the policy gives this image times a random factor in ``[lo, hi]``
    (images bilinear, masks nearest).

    The factor scales what evaluation feeds the network, aspect included (a shorter-side policy
    keeps it), so a factor of 1 is exactly the eval resize; scaling the nominal square instead
    would train on squashed images and evaluate on unsquashed ones.
    """

    def __init__(self, policy: Preprocessing, lo: float = 0.5, hi: float = 2.0) -> None:
        super().__init__()
        self.policy = policy
        self.lo, self.hi = lo, hi

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = self.policy.input_size(*F.get_size(next(i for i in flat_inputs if isinstance(i, tv_tensors.Image))))
        s = float(torch.empty(1).uniform_(self.lo, self.hi))
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resize(inpt, params["size"], antialias=True)


class ApplyPolicy(v2.Transform):
    """Resize image (and boxes/masks with it) to the size the policy gives this image."""

    def __init__(self, policy: Preprocessing) -> None:
        super().__init__()
        if not policy.keeps_geometry:
            raise DataError(f"preprocessing '{policy.describe()}' crops the image; boxes and masks need a policy "
                            "that keeps the whole image (fixed or shorter_side)")
        self.policy = policy

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = F.get_size(next(i for i in flat_inputs if isinstance(i, tv_tensors.Image)))
        return {"size": list(self.policy.input_size(h, w))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resize(inpt, params["size"], antialias=True)


def _policy_input(policy: Preprocessing):
    """The edge's own preprocessing on a PIL image, as a plain tensor."""

    def apply(img: Image.Image) -> Tensor:
        try:
            return torch.from_numpy(policy.apply(img))
        except PreprocessingError as e:
            raise DataError(str(e)) from None

    return apply


def classification_transform(train: bool, preprocessing) -> v2.Compose:
    policy = as_policy(preprocessing)
    if train:
        return v2.Compose([
            v2.ToImage(),
            # torchvision's default scale range, as both reference recipes train
            v2.RandomResizedCrop(list(policy.nominal_size), scale=CROP_SCALE, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.Lambda(to_normalized, tv_tensors.Image),
        ])
    # Exactly what the edge does: the bundle's policy applied by the same code.
    return v2.Compose([_policy_input(policy)])


def detection_transform(train: bool, preprocessing) -> v2.Compose:
    """On ``(Image, {"boxes": BoundingBoxes, "labels": ...})``: resize as the policy says (as the
    edge does), a consistent flip when training, and dropping boxes under 1 px."""
    ops: list = [ApplyPolicy(as_policy(preprocessing))]
    if train:
        ops.append(v2.RandomHorizontalFlip())
    ops.append(v2.SanitizeBoundingBoxes(min_size=1.0))
    return v2.Compose(ops)


def segmentation_transform(train: bool, preprocessing) -> v2.Compose:
    """On ``(Image, Mask)``: train = random scale 0.5-2 of the policy's size for this image (its
    aspect kept, as in evaluation) + random crop to the nominal size (pad image 0, mask 255) + flip;
    eval = resize as the policy says (mask nearest)."""
    policy = as_policy(preprocessing)
    if train:
        ops = [
            RandomScale(policy, 0.5, 2.0),
            v2.RandomCrop(list(policy.nominal_size), pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
            v2.RandomHorizontalFlip(),
        ]
    else:
        ops = [ApplyPolicy(policy)]
    return v2.Compose(ops)


def pad_batch(images: list[Tensor], fill: float = 0.0) -> Tensor:
    """Stack (3, H, W) tensors of different sizes, padded at the bottom/right to the largest
    (coordinates of boxes and masks are unchanged by such padding)."""
    h = max(int(i.shape[-2]) for i in images)
    w = max(int(i.shape[-1]) for i in images)
    if all(tuple(i.shape[-2:]) == (h, w) for i in images):
        return torch.stack(images)
    out = images[0].new_full((len(images), *images[0].shape[:-2], h, w), fill)
    for k, img in enumerate(images):
        out[k, ..., : img.shape[-2], : img.shape[-1]] = img
    return out
