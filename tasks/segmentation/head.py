"""DeepLabv3 on the feature h: torchvision's DeepLabHead (ASPP) on layer4 and FCNHead on layer3."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from splitserve.models.backbone import TAIL_CHANNELS, ResNetTail, build_resnet, has_basic_blocks


OUTPUT_STRIDES = {8: (False, True, True), 16: (False, False, True), 32: None}
"""DeepLabv3's output stride → which of layer2..4 trade stride for dilation (torchvision's
``deeplabv3_resnet50`` runs at 8)."""


def default_output_stride(backbone: str) -> int:
    """8 for Bottleneck ResNets (50/101), as torchvision's DeepLabv3. 32 (undilated) for BasicBlock
    ResNets (18/34): what heads stored without ``output_stride`` were trained with, so they keep
    loading as they were; ask for 8 to dilate them (:func:`~splitserve.models.backbone.dilate_basic_blocks`)."""
    return 32 if has_basic_blocks(backbone) else 8


def deeplab_head(in_channels: int, num_classes: int, width: int = 256,
                 atrous_rates: Sequence[int] = (12, 24, 36)) -> nn.Sequential:
    """torchvision's ``DeepLabHead`` (ASPP at ``atrous_rates`` → 3×3 conv → BN → ReLU → 1×1),
    ``width`` channels wide (torchvision: 256, rates 12/24/36). Same layout and names at any width
    and rates, so torchvision's checkpoints load; a 10-class head can be narrower, and a small
    feature map wants rates that fit inside it."""
    if width == 256 and tuple(atrous_rates) == (12, 24, 36):
        return DeepLabHead(in_channels, num_classes)
    return nn.Sequential(
        ASPP(in_channels, tuple(atrous_rates), out_channels=width),
        nn.Conv2d(width, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, num_classes, 1),
    )


class DeepLabV3Head(nn.Module):
    """torchvision's DeepLabV3 minus the stem the codec replaces: ``tail`` → ``classifier``
    (``DeepLabHead``) and ``aux_classifier`` (``FCNHead``), named as in torchvision."""

    def __init__(self, backbone: str, num_classes: int, labels: Sequence[str], aspp_channels: int = 256,
                 output_stride: int | None = None, atrous_rates: Sequence[int] = (12, 24, 36)):
        super().__init__()
        stride = default_output_stride(backbone) if output_stride is None else output_stride
        resnet = build_resnet(backbone, dilation=OUTPUT_STRIDES[stride])
        self.tail = ResNetTail.from_resnet(resnet)
        _, c3, c4 = TAIL_CHANNELS[backbone]
        self.classifier = deeplab_head(c4, num_classes, aspp_channels, atrous_rates)
        self.aux_classifier = FCNHead(c3, num_classes)
        self.num_classes = num_classes
        self.labels = list(labels)  # serving metadata, not weights

    def forward(self, h: Tensor, output_size: Sequence[int] | None = None) -> dict[str, Tensor]:
        """``{"out", "aux"}`` logits (B, K, H, W), bilinearly upsampled to ``output_size``
        (default: the input size, 4× h's)."""
        size = tuple(output_size) if output_size is not None else (4 * h.shape[-2], 4 * h.shape[-1])
        feats = self.tail(h)
        out = F.interpolate(self.classifier(feats["layer4"]), size=size, mode="bilinear", align_corners=False)
        aux = F.interpolate(self.aux_classifier(feats["layer3"]), size=size, mode="bilinear", align_corners=False)
        return {"out": out, "aux": aux}

    def logits(self, h: Tensor) -> Tensor:
        """Main logits at the network's own resolution (serving: no aux branch, no upsampling)."""
        return self.classifier(self.tail(h)["layer4"])
