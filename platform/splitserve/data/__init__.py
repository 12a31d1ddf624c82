"""Datasets in real formats (ImageFolder, COCO 2017) and the fmnist-scenes generator.

The same loaders read real ImageNet/COCO trees and the synthetic fmnist-scenes trees. Every
user-fixable problem (missing path, broken annotation file) raises :class:`~splitserve.errors.DataError`
at construction time. Exports are resolved lazily so ``import splitserve.data.scenes`` does not pull
in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "classification_dataset": "imagefolder",
    "collate_classification": "imagefolder",
    "detection_dataset": "coco",
    "segmentation_dataset": "coco",
    "collate_detection": "coco",
    "collate_segmentation": "coco",
    "CocoDetection": "coco",
    "CocoSegmentation": "coco",
    "VOC_CATEGORY_IDS": "coco",
    "VOC_CLASSES": "coco",
    "make_fmnist_scenes": "scenes",
    "load_fashion_mnist": "fmnist",
    "FMNIST_CLASS_NAMES": "fmnist",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .coco import (
        VOC_CATEGORY_IDS,
        VOC_CLASSES,
        CocoDetection,
        CocoSegmentation,
        collate_detection,
        collate_segmentation,
        detection_dataset,
        segmentation_dataset,
    )
    from .fmnist import CLASS_NAMES as FMNIST_CLASS_NAMES
    from .fmnist import load_fashion_mnist
    from .imagefolder import classification_dataset, collate_classification
    from .scenes import make_fmnist_scenes


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    attr = "CLASS_NAMES" if name == "FMNIST_CLASS_NAMES" else name
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
