"""The classification :class:`TaskPlugin`: serving (top-k), training hooks (CE + KD, top-1/5) and
evaluation hooks (top-1/5 of served answers)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.utils.data import Dataset

from splitserve.errors import PluginError
from splitserve.models.backbone import check_arch, resnet_stem
from splitserve.plugins import (EvaluationHooks, FeatureFn, ImageFolderData, ImageMeta, Scorer, TaskBatch, TaskPlugin,
                                TrainingHooks, evaluating)

from .._common import class_list_config, label_of, merge_config
from .head import ClassificationHead
from .schema import ClassificationResult, ClassScore


def _imagenet_categories(backbone: str) -> list[str]:
    return list(torchvision.models.get_model_weights(backbone).DEFAULT.meta["categories"])


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PluginError(f"classification: {name} must be a positive integer, got {value!r}")
    return value


class TopKScorer(Scorer):
    """Top-1 and top-5 accuracy (%) of served answers: the answer's first class, and any of its
    first five, against the label (targets: class indices)."""

    def __init__(self) -> None:
        self.top1 = self.top5 = self.total = 0

    def update(self, predictions: Sequence[ClassificationResult], targets: Sequence[int]) -> None:
        for answer, label in zip(predictions, targets, strict=True):
            ranked = [c.index for c in answer.top]
            self.top1 += int(ranked[:1] == [label])
            self.top5 += int(label in ranked[:5])
            self.total += 1

    def result(self) -> dict[str, float]:
        if self.total == 0:
            raise PluginError("classification: no answers to score")
        return {"top1": 100.0 * self.top1 / self.total, "top5": 100.0 * self.top5 / self.total}


class ClassificationPlugin(ImageFolderData, EvaluationHooks, TrainingHooks, TaskPlugin):
    """Image classification; the default head mirrors torchvision's ImageNet ResNet. Its data hooks
    (ImageFolder tree, class-index targets) are :class:`ImageFolderData`'s."""

    name = "classification"
    aliases = ("cls",)
    description = "Image classification (top-k classes with probabilities)."
    response_model = ClassificationResult
    metric_name = "top1"
    metric_label = "top-1 (%)"

    # -- serving -------------------------------------------------------------------------
    def resolve_config(self, backbone: str, stored: Mapping[str, Any]) -> dict:
        """``num_classes`` (default 1000), ``labels`` (ImageNet names for 1000 classes, else
        "0".."n-1" unless given), ``top_k`` (5)."""
        check_arch(backbone)
        cfg = merge_config(self.name, {"num_classes": 1000, "top_k": 5}, stored, _imagenet_categories(backbone))
        _positive_int("top_k", cfg["top_k"])
        return cfg

    def build_head(self, backbone: str, config: Mapping[str, Any]) -> ClassificationHead:
        return ClassificationHead(backbone, config["num_classes"], config["labels"], config["top_k"])

    def summarize(self, answer: ClassificationResult) -> str:
        return ", ".join(f"{t.label} {t.probability:.1%}" for t in answer.top[:3])

    @torch.no_grad()
    def predict(self, head: nn.Module, features: Tensor, metas: Sequence[ImageMeta],
                config: Mapping[str, Any]) -> list[ClassificationResult]:
        k = min(_positive_int("top_k", config["top_k"]), head.num_classes)
        probs = head(features).float().softmax(dim=1)
        values, indices = probs.topk(k, dim=1)
        return [
            ClassificationResult(
                top=[
                    ClassScore(index=i, label=label_of(head.labels, i), probability=min(max(p, 0.0), 1.0))
                    for p, i in zip(vs, ix)
                ]
            )
            for vs, ix in zip(values.tolist(), indices.tolist())
        ]

    # -- training hooks -------------------------------------------------------------------
    def build_teacher(self, backbone: str, config: Mapping[str, Any],
                      weights: str | None = None) -> tuple[nn.Module, nn.Module]:
        """Stem and head of a torchvision ResNet; with ``weights`` the ImageNet fc is kept when
        num_classes is 1000 and replaced by a fresh one otherwise."""
        config = self.resolve_config(backbone, config)
        resnet, head = self.resnet_teacher(backbone, config, weights, num_classes=config["num_classes"])
        if resnet.fc.out_features == head.num_classes:
            head.fc.load_state_dict(resnet.fc.state_dict())
        return resnet_stem(resnet), head

    def config_for_classes(self, names: Sequence[str]) -> dict:
        return class_list_config(names)

    def dataset_config(self, dataset: Dataset) -> dict:
        classes = list(dataset.classes)
        return {"num_classes": len(classes), "labels": classes}

    def head_output(self, head: nn.Module, features: Tensor, batch: TaskBatch) -> Tensor:
        return head(features)

    def loss(self, head: nn.Module, features: Tensor, batch: TaskBatch, *, teacher_output: Any = None,
             options: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
        """Cross-entropy; with a teacher, ``(1-kd_alpha)*CE + kd_alpha*T²*KL(teacher_T ‖ student_T)``
        (Hinton et al. knowledge distillation)."""
        options = options or {}
        logits = head(features)
        targets = batch.targets.to(logits.device)
        ce = F.cross_entropy(logits, targets)
        if teacher_output is None:
            return {"ce": ce}
        t = float(options.get("temperature", 1.0))
        alpha = float(options.get("kd_alpha", 0.5))
        if t <= 0 or not 0.0 <= alpha <= 1.0:
            raise PluginError(f"classification: need temperature > 0 and 0 <= kd_alpha <= 1, got {t}, {alpha}")
        kd = F.kl_div(
            F.log_softmax(logits / t, dim=1),
            F.log_softmax(teacher_output.detach().to(logits.device) / t, dim=1),
            reduction="batchmean",
            log_target=True,
        ) * (t * t)
        return {"ce": (1.0 - alpha) * ce, "kd": alpha * kd}

    @torch.no_grad()
    def evaluate(self, head: nn.Module, features_fn: FeatureFn, batches: Iterable[TaskBatch], *,
                 dataset: Dataset | None = None) -> dict[str, float]:
        """Top-1 / top-5 accuracy in percent (top-5 is top-num_classes below 5 classes)."""
        correct1 = correct5 = total = 0
        with evaluating(head) as device:
            for batch in batches:
                batch = batch.to(device)
                logits = head(features_fn(batch.images))
                hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == batch.targets[:, None]
                correct1 += int(hits[:, 0].sum())
                correct5 += int(hits.any(dim=1).sum())
                total += batch.targets.numel()
        if total == 0:
            raise PluginError("classification: evaluate got no batches")
        return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}

    # -- evaluation hooks (eval_samples: ImageFolderData's) ---------------------------------
    def make_scorer(self, dataset: Dataset, config: Mapping[str, Any]) -> TopKScorer:
        return TopKScorer()
