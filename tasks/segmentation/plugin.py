"""The segmentation :class:`TaskPlugin`: class maps as PNG at the model's resolution (with the
geometry to the original image), CE + aux loss, mIoU."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.models.segmentation import DeepLabV3_ResNet50_Weights

from splitserve.data.transforms import pad_batch
from splitserve.errors import PluginError
from splitserve.models.backbone import check_arch
from splitserve.plugins import (EvaluationHooks, FeatureFn, ImageMeta, ReferenceRecipe, Scorer, TaskBatch, TaskPlugin,
                                TrainingHooks, evaluating)

from .._common import CocoData, label_of, merge_config, resolve_teacher_weights, task_teacher
from .head import OUTPUT_STRIDES, DeepLabV3Head, default_output_stride
from .schema import ClassShare, SegmentationResult, encode_mask, full_mask

VOC_CATEGORIES: list[str] = list(DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1.meta["categories"])
IGNORE_INDEX = 255  # VOC's "void" label; also why at most 255 classes fit an 8-bit mask


def confusion_counts(truth: Tensor, pred: Tensor, k: int) -> Tensor:
    """The (k·k,) confusion counts (row: truth) of two label maps, over pixels whose truth is a class
    (not ``IGNORE_INDEX``) and whose prediction is one of the ``k``."""
    valid = (truth >= 0) & (truth < k) & (pred < k)
    return torch.bincount(truth[valid] * k + pred[valid], minlength=k * k)


def confusion_metrics(confusion: Tensor) -> dict[str, float]:
    """``{"mIoU", "pixel_acc"}`` in percent from a (K, K) confusion matrix (rows: truth); mIoU
    averages over the classes that occur in the truth or the prediction."""
    confusion = confusion.double()
    total = confusion.sum()
    if total == 0:
        raise PluginError("segmentation: evaluate saw no labelled pixels")
    diag = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - diag
    present = union > 0
    iou = diag[present] / union[present]
    return {"mIoU": 100.0 * float(iou.mean()), "pixel_acc": 100.0 * float(diag.sum() / total)}


class MaskScorer(Scorer):
    """mIoU of served answers: each answer's :func:`full_mask` against the COCO semantic mask at
    the original resolution (targets: COCO image ids)."""

    def __init__(self, dataset: Any, num_classes: int):
        self.dataset, self.k = dataset, num_classes
        self.confusion = torch.zeros(num_classes * num_classes, dtype=torch.long)

    def update(self, predictions: Sequence[SegmentationResult], targets: Sequence[int]) -> None:
        for answer, image_id in zip(predictions, targets, strict=True):
            truth = torch.from_numpy(self.dataset.semantic_mask(image_id).astype(np.int64))
            pred = torch.from_numpy(full_mask(answer).astype(np.int64))
            if pred.shape != truth.shape:
                raise PluginError(f"segmentation: mask of image {image_id} is {tuple(pred.shape)}, "
                                  f"the truth {tuple(truth.shape)}")
            self.confusion += confusion_counts(truth, pred, self.k)

    def result(self) -> dict[str, float]:
        return confusion_metrics(self.confusion.view(self.k, self.k))


def _width(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 8 <= value <= 1024:
        raise PluginError(f"segmentation: {name} must be an integer in 8..1024, got {value!r}")
    return value


class SegmentationPlugin(CocoData, EvaluationHooks, TrainingHooks, TaskPlugin):
    """Semantic segmentation with torchvision's DeepLabv3; the default head mirrors
    ``deeplabv3_resnet50`` and its 21 VOC labels. Data: COCO masks (:class:`CocoData`)."""

    name = "segmentation"
    aliases = ("seg",)
    description = ("Semantic segmentation (DeepLabv3): a class-index PNG at the model's resolution, with the "
                   "scale to the original image.")
    response_model = SegmentationResult
    metric_name = "mIoU"
    metric_label = "mIoU (%)"
    coco_loader = "segmentation_dataset"
    reference_finetune = ReferenceRecipe(layers=("layer2", "layer3", "layer4"), feature_epochs=3, feature_lr=1e-3,
                                         epochs=5, optimizer="sgd", lr=0.0025, scheduler="poly")  # ES's DeepLabv3

    # -- serving -------------------------------------------------------------------------
    def resolve_config(self, backbone: str, stored: Mapping[str, Any]) -> dict:
        """``num_classes`` (default 21 with VOC's labels, background first), ``labels``,
        ``aspp_channels`` (ASPP width, default 256), ``atrous_rates`` (default 12/24/36) and
        ``output_stride`` (8, 16 or 32; default 8 on ResNet-50/101, 32 on ResNet-18/34, see
        :func:`default_output_stride`) — torchvision's DeepLabv3 at the defaults. Every key is
        written out, so a stored head always rebuilds with the geometry it was trained with."""
        check_arch(backbone)
        defaults = {"num_classes": 21, "aspp_channels": 256, "atrous_rates": [12, 24, 36],
                    "output_stride": default_output_stride(backbone)}
        cfg = merge_config(self.name, defaults, stored, VOC_CATEGORIES)
        _width("aspp_channels", cfg["aspp_channels"])
        if cfg["output_stride"] not in OUTPUT_STRIDES or isinstance(cfg["output_stride"], bool):
            raise PluginError(f"segmentation: output_stride must be one of 8, 16, 32, got {cfg['output_stride']!r}")
        rates = cfg["atrous_rates"]
        if (not isinstance(rates, list) or len(rates) != 3
                or not all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= 64 for r in rates)):
            raise PluginError(f"segmentation: atrous_rates must be three integers in 1..64, got {rates!r}")
        if cfg["num_classes"] > IGNORE_INDEX:
            raise PluginError(f"segmentation: at most {IGNORE_INDEX} classes fit an 8-bit mask, got {cfg['num_classes']}")
        return cfg

    def build_head(self, backbone: str, config: Mapping[str, Any]) -> DeepLabV3Head:
        return DeepLabV3Head(backbone, config["num_classes"], config["labels"], config["aspp_channels"],
                             config["output_stride"], config["atrous_rates"])

    def summarize(self, answer: SegmentationResult) -> str:
        return ", ".join(f"{c.label} {c.fraction:.1%}" for c in sorted(answer.classes, key=lambda c: -c.fraction)[:4])

    @torch.no_grad()
    def predict(self, head: nn.Module, features: Tensor, metas: Sequence[ImageMeta],
                config: Mapping[str, Any]) -> list[SegmentationResult]:
        """One class map per image at its model input's size (the logits upsampled bilinearly, then
        argmax): the work and the answer are bounded by the model, whatever original size a payload
        declares; the answer carries the scale to the original (``full_mask`` applies it)."""
        logits = head.logits(features).float()  # one forward for the batch
        classes: dict[int, np.ndarray] = {}
        for size in {m.input_size for m in metas}:  # one upsampling per model input size
            rows = [i for i, m in enumerate(metas) if m.input_size == size]
            up = F.interpolate(logits[rows], size=size, mode="bilinear", align_corners=False)
            classes.update(zip(rows, up.argmax(1).to(torch.uint8).cpu().numpy()))
        out = []
        for i, meta in enumerate(metas):
            c, (ih, iw), (oh, ow) = classes[i], meta.input_size, meta.original_size
            counts = np.bincount(c.ravel(), minlength=head.num_classes)
            shares = [ClassShare(index=int(k), label=label_of(head.labels, int(k)), fraction=float(counts[k]) / c.size)
                      for k in np.flatnonzero(counts)]
            out.append(SegmentationResult(width=ow, height=oh, mask_width=iw, mask_height=ih, scale=[ow / iw, oh / ih],
                                          mask=encode_mask(c), classes=shares))
        return out

    # -- training hooks -------------------------------------------------------------------
    def build_teacher(self, backbone: str, config: Mapping[str, Any],
                      weights: str | None = None) -> tuple[nn.Module, nn.Module]:
        """Stem and head of torchvision's DeepLabV3. ``weights`` "DEFAULT"/"COCO_WITH_VOC_LABELS_V1"
        (resnet50/101) loads ``deeplabv3_<backbone>``'s weights (classifiers re-indexed by label
        name when the label set differs); a ResNet weights name loads ImageNet weights only."""
        cfg = self.resolve_config(backbone, config)
        kind, w = resolve_teacher_weights(f"deeplabv3_{backbone}", backbone, weights)
        if kind != "task":
            return super().build_teacher(backbone, cfg, w)  # dilation changes no parameter shapes
        return task_teacher(self, backbone, cfg, w, body="backbone.", rename=("backbone.", "tail."),
                            class_rows=("classifier.4.", "aux_classifier.4."))

    def config_for_classes(self, names: Sequence[str]) -> dict:
        return {"num_classes": len(names) + 1, "labels": ["background", *names]}  # index 0: background

    def dataset_config(self, dataset: Dataset) -> dict:
        classes = [str(c) for c in dataset.classes]
        return {"num_classes": len(classes), "labels": classes}

    def collate(self, items: list) -> TaskBatch:
        images = pad_batch([img for img, _ in items])  # shorter_side policies give each image its own size
        masks = pad_batch([torch.as_tensor(m, dtype=torch.long) for _, m in items], fill=IGNORE_INDEX)
        metas = [ImageMeta(original_size=tuple(img.shape[-2:]), input_size=tuple(img.shape[-2:])) for img, _ in items]
        return TaskBatch(images, masks, metas)

    def loss(self, head: nn.Module, features: Tensor, batch: TaskBatch, *, teacher_output: Any = None,
             options: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
        """Cross-entropy on ``out`` plus ``aux_weight`` (0.5) × cross-entropy on ``aux`` (as in
        torchvision's segmentation reference); label 255 is ignored."""
        options = options or {}
        targets = batch.targets.to(features.device)
        outputs = head(features, targets.shape[-2:])
        ce = F.cross_entropy(outputs["out"], targets, ignore_index=IGNORE_INDEX)
        aux = F.cross_entropy(outputs["aux"], targets, ignore_index=IGNORE_INDEX)
        return {"ce": ce, "aux": float(options.get("aux_weight", 0.5)) * aux}

    @torch.no_grad()
    def evaluate(self, head: nn.Module, features_fn: FeatureFn, batches: Iterable[TaskBatch], *,
                 dataset: Dataset | None = None) -> dict[str, float]:
        """mIoU and pixel accuracy (percent) over the labelled pixels of the batches' masks."""
        k = head.num_classes
        with evaluating(head) as device:
            confusion = torch.zeros(k * k, dtype=torch.long, device=device)
            for batch in batches:
                batch = batch.to(device)
                logits = head.logits(features_fn(batch.images))
                truth = batch.targets
                pred = F.interpolate(logits, size=truth.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
                confusion += confusion_counts(truth, pred, k)
        return confusion_metrics(confusion.view(k, k).cpu())

    # -- evaluation hooks (eval_samples: CocoData's) ----------------------------------------
    def make_scorer(self, dataset: Dataset, config: Mapping[str, Any]) -> MaskScorer:
        """mIoU over ``config``'s classes (default: the dataset's, background included)."""
        return MaskScorer(dataset, int(config.get("num_classes") or len(dataset.classes)))
