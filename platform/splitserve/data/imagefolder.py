"""Classification data in the ImageNet layout ``root/<split>/<class>/<image>``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import DataError
from .transforms import as_policy, classification_transform, load_rgb


def _layout(root: Path, split: str) -> str:
    return f"expected an ImageFolder tree: {root}/{split}/<class>/<image>"


def classification_dataset(root: Path, split: str, *, train: bool, preprocessing) -> Dataset:
    """``ImageFolder`` over ``root/split``; items are ``(normalised float (3,H,W), label int)``.

    Train: RandomResizedCrop(scale 0.08-1, torchvision's default) to the policy's nominal size + horizontal flip; eval: the
    bundle's ``preprocessing`` policy (or a fixed size), exactly as the edge encoder applies it. ``dataset.classes`` lists the class folder names (sorted, index = label).
    Class folders may be empty (so train and val always share the same label indices) but the
    split must hold at least one image.
    """
    root = Path(root)
    policy = as_policy(preprocessing)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory ({_layout(root, split)})")
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"{folder}: no such directory ({_layout(root, split)})")
    if not any(p.is_dir() for p in folder.iterdir()):
        raise DataError(f"{folder}: no class folders ({_layout(root, split)})")
    try:
        dataset = ImageFolder(str(folder), transform=classification_transform(train, policy), loader=load_rgb, allow_empty=True)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"{folder}: {e}") from None
    if len(dataset) == 0:
        raise DataError(
            f"{folder}: no images in its {len(dataset.classes)} class folders "
            f"(looked for {', '.join(sorted(IMG_EXTENSIONS))})"
        )
    return dataset


def collate_classification(items) -> tuple[Tensor, Tensor]:
    images, labels = zip(*items)
    return torch.stack(images), torch.as_tensor(labels, dtype=torch.long)
