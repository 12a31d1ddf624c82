"""Classification head: the ResNet tail plus torchvision's own pooling and fc."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from splitserve.models.backbone import TAIL_CHANNELS, ResNetTail, build_resnet


class ClassificationHead(nn.Module):
    """layer2..4 → global average pool → fc: a torchvision ResNet minus the stem the codec replaces."""

    def __init__(self, backbone: str, num_classes: int, labels: Sequence[str], top_k: int = 5):
        super().__init__()
        resnet = build_resnet(backbone, num_classes=num_classes)
        self.tail = ResNetTail.from_resnet(resnet)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = resnet.fc
        assert self.fc.in_features == TAIL_CHANNELS[backbone][2]
        # serving metadata, not weights: kept out of the state dict
        self.labels = list(labels)
        self.top_k = top_k

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def forward(self, h: Tensor) -> Tensor:
        """Logits (B, num_classes) for decoded features h (B, C, H/4, W/4)."""
        x = self.avgpool(self.tail(h)["layer4"])
        return self.fc(torch.flatten(x, 1))
