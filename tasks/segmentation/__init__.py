"""Built-in segmentation plugin: torchvision DeepLabv3 (with FCN auxiliary head) on the feature h."""

from .head import DeepLabV3Head, uses_dilation
from .plugin import VOC_CATEGORIES, SegmentationPlugin, confusion_metrics
from .schema import ClassShare, SegmentationResult

__all__ = [
    "VOC_CATEGORIES",
    "ClassShare",
    "DeepLabV3Head",
    "SegmentationPlugin",
    "SegmentationResult",
    "confusion_metrics",
    "uses_dilation",
]
