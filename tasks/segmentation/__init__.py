"""Built-in segmentation plugin: torchvision DeepLabv3 (with FCN auxiliary head) on the feature h."""

from .head import OUTPUT_STRIDES, DeepLabV3Head, default_output_stride
from .plugin import VOC_CATEGORIES, SegmentationPlugin, confusion_metrics
from .schema import ClassShare, SegmentationResult

__all__ = [
    "OUTPUT_STRIDES",
    "VOC_CATEGORIES",
    "ClassShare",
    "DeepLabV3Head",
    "SegmentationPlugin",
    "SegmentationResult",
    "confusion_metrics",
    "default_output_stride",
]
