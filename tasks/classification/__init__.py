"""Built-in classification plugin: ImageNet-style top-k classification from the feature h."""

from .head import ClassificationHead
from .plugin import ClassificationPlugin
from .schema import ClassificationResult, ClassScore

__all__ = ["ClassificationHead", "ClassificationPlugin", "ClassificationResult", "ClassScore"]
