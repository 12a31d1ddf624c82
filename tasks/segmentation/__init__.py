"""Built-in segmentation plugin: torchvision DeepLabv3 (with FCN auxiliary head) on the feature h.

The plugin and its head are imported on first use, so that ``splitserve_tasks.segmentation.schema``
(the answer and ``full_mask``: numpy + Pillow) stays importable without torch."""

from importlib import import_module

from .schema import ClassShare, SegmentationResult, full_mask

_LAZY = {
    "OUTPUT_STRIDES": ".head", "DeepLabV3Head": ".head", "default_output_stride": ".head",
    "VOC_CATEGORIES": ".plugin", "SegmentationPlugin": ".plugin", "confusion_metrics": ".plugin",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "OUTPUT_STRIDES",
    "VOC_CATEGORIES",
    "ClassShare",
    "DeepLabV3Head",
    "SegmentationPlugin",
    "SegmentationResult",
    "confusion_metrics",
    "default_output_stride",
    "full_mask",
]
