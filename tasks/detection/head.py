"""RetinaNet on the feature h: torchvision's own RetinaNet, with the image stem and the
resize/normalise transform removed because the edge already did both."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import Tensor, nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from splitserve.models.backbone import TAIL_CHANNELS, ResNetTail, build_resnet

FPN_CHANNELS = 256
ANCHOR_SIZES = (32, 64, 128, 256, 512)
"""Smallest anchor per FPN level (P3..P7), torchvision's RetinaNet default, sized for COCO's ~800 px."""


def anchor_generator(sizes: Sequence[int]) -> AnchorGenerator:
    """torchvision's RetinaNet anchors (three scales a third of an octave apart, aspect ratios 0.5,
    1, 2 at every level) from the smallest size of each level: small images need small anchors."""
    scales = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes)  # as torchvision
    return AnchorGenerator(scales, ((0.5, 1.0, 2.0),) * len(scales))


class FeatureFPN(nn.Module):
    """torchvision's ``BackboneWithFPN`` for ``retinanet_resnet50_fpn`` (layer2..4 → FPN P3..P5,
    ``LastLevelP6P7(256, 256)`` from P5), fed with h instead of images. Submodule names
    ``body``/``fpn`` match torchvision's, so its RetinaNet checkpoints load unchanged."""

    def __init__(self, body: ResNetTail, in_channels_list: Sequence[int], out_channels: int = FPN_CHANNELS):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            list(in_channels_list), out_channels, extra_blocks=LastLevelP6P7(out_channels, out_channels)
        )
        self.out_channels = out_channels

    def forward(self, h: Tensor) -> "OrderedDict[str, Tensor]":
        return self.fpn(self.body(h))


class FeatureRetinaNet(nn.Module):
    """A real ``torchvision.models.detection.RetinaNet`` (default anchors, ``RetinaNetHead``,
    focal/L1 losses, post-processing) whose backbone consumes h. Its ResNet body uses
    ``FrozenBatchNorm2d`` as torchvision's detection models do (batches are small)."""

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        labels: Sequence[str],
        *,
        score_thresh: float = 0.3,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        fpn_channels: int = FPN_CHANNELS,
        anchor_sizes: Sequence[int] = ANCHOR_SIZES,
    ):
        super().__init__()
        resnet = build_resnet(backbone, norm_layer=FrozenBatchNorm2d)
        fpn = FeatureFPN(ResNetTail.from_resnet(resnet), TAIL_CHANNELS[backbone], fpn_channels)
        self.retinanet = RetinaNet(
            fpn,
            num_classes,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            detections_per_img=detections_per_img,
            anchor_generator=anchor_generator(anchor_sizes),
        )
        self.num_classes = num_classes
        self.labels = list(labels)  # serving metadata, not weights

    @property
    def tail(self) -> ResNetTail:
        """The ResNet layer2..4 (a property, so the state dict holds it once, under torchvision's
        ``retinanet.backbone.body`` name)."""
        return self.retinanet.backbone.body

    def forward(
        self,
        h: Tensor,
        input_sizes: Sequence[tuple[int, int]] | None = None,
        targets: list[dict[str, Tensor]] | None = None,
        *,
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
        detections_per_img: int | None = None,
    ):
        """With ``targets`` (boxes xyxy in input pixels, labels 0..K-1): the RetinaNet losses
        ``{"classification", "bbox_regression"}``. Without: one ``{"boxes", "scores", "labels"}``
        per image, boxes in input pixels, clipped to ``input_sizes`` (default 4× h's size).
        The thresholds override the configured ones for this call only (thread-safe)."""
        m = self.retinanet
        b, _, fh, fw = h.shape
        size = (4 * fh, 4 * fw)
        input_sizes = [tuple(int(v) for v in s) for s in input_sizes] if input_sizes is not None else [size] * b
        if len(input_sizes) != b:
            raise ValueError(f"{len(input_sizes)} input sizes for a batch of {b}")
        # AnchorGenerator only reads the padded batch's shape (for the strides): no real pixels needed
        images = ImageList(h.new_zeros(1, 1, 1, 1).expand(b, 3, *size), input_sizes)
        features = list(m.backbone(h).values())
        head_outputs = m.head(features)
        anchors = m.anchor_generator(images, features)
        if targets is not None:
            return m.compute_loss(targets, head_outputs, anchors)

        # split outputs per level, exactly as RetinaNet.forward does
        num_anchors_per_level = [x.size(2) * x.size(3) for x in features]
        a = head_outputs["cls_logits"].size(1) // sum(num_anchors_per_level)
        num_anchors_per_level = [hw * a for hw in num_anchors_per_level]
        split_outputs = {k: list(v.split(num_anchors_per_level, dim=1)) for k, v in head_outputs.items()}
        split_anchors = [list(x.split(num_anchors_per_level)) for x in anchors]
        # torchvision's own post-processing, reading the thresholds from a per-call view rather
        # than from the shared module (concurrent requests may ask for different ones)
        view = SimpleNamespace(
            score_thresh=m.score_thresh if score_thresh is None else float(score_thresh),
            nms_thresh=m.nms_thresh if nms_thresh is None else float(nms_thresh),
            detections_per_img=m.detections_per_img if detections_per_img is None else int(detections_per_img),
            topk_candidates=m.topk_candidates,
            box_coder=m.box_coder,
        )
        return RetinaNet.postprocess_detections(view, split_outputs, split_anchors, input_sizes)


def scale_boxes(boxes: Tensor, input_size: tuple[int, int], original_size: tuple[int, int]) -> Tensor:
    """Boxes from input pixels to original pixels (x and y scaled separately, as the edge's resize
    did not keep the aspect ratio), clamped to the original image."""
    (ih, iw), (oh, ow) = input_size, original_size
    scale = torch.tensor([ow / iw, oh / ih, ow / iw, oh / ih], dtype=boxes.dtype, device=boxes.device)
    out = boxes * scale
    out[:, 0::2] = out[:, 0::2].clamp(0, ow)
    out[:, 1::2] = out[:, 1::2].clamp(0, oh)
    return out
