"""Built-in detection plugin: torchvision RetinaNet (ResNet-FPN) on the feature h."""

from .head import FeatureFPN, FeatureRetinaNet, scale_boxes
from .plugin import COCO_CATEGORIES, DetectionPlugin, coco_bbox_metrics
from .schema import Detection, DetectionResult

__all__ = [
    "COCO_CATEGORIES",
    "Detection",
    "DetectionPlugin",
    "DetectionResult",
    "FeatureFPN",
    "FeatureRetinaNet",
    "coco_bbox_metrics",
    "scale_boxes",
]
