"""The detection :class:`TaskPlugin`: RetinaNet serving, RetinaNet losses, COCO mAP (of the
head's output in training, of served answers in studies)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights
from torchvision.models.detection._utils import overwrite_eps
from torchvision.ops.misc import FrozenBatchNorm2d

from splitserve.data.transforms import pad_batch
from splitserve.errors import PluginError
from splitserve.models.backbone import check_arch, resnet_stem
from splitserve.plugins import (EvaluationHooks, FeatureFn, ImageMeta, ReferenceRecipe, Scorer, TaskBatch, TaskPlugin,
                                TrainingHooks, evaluating)

from .._common import (CocoData, class_list_config, label_of, merge_config, resolve_teacher_weights, source_dataset,
                       task_teacher)
from .head import ANCHOR_SIZES, FeatureRetinaNet, scale_boxes
from .schema import Detection, DetectionResult

COCO_CATEGORIES: list[str] = list(RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
"""torchvision's 91 COCO labels: index == COCO category id ("__background__"/"N/A" fill gaps)."""

EVAL_SCORE_THRESHOLD = 0.05  # COCO protocol: keep low-confidence boxes, mAP integrates over them
EVAL_MAX_DETECTIONS = 100
_CLS_LOGITS = "head.classification_head.cls_logits."


def _threshold(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise PluginError(f"detection: {name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _max_detections(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PluginError(f"detection: max_detections must be a positive integer, got {value!r}")
    return value


def coco_bbox_metrics(coco_gt, results: list[dict], image_ids: Iterable[int]) -> dict[str, float]:
    """COCOeval (iouType "bbox") of ``results`` (COCO result dicts) on ``image_ids``, quietly:
    ``{"mAP": AP@[.5:.95], "AP50": AP@.5}`` in percent."""
    from pycocotools.cocoeval import COCOeval

    image_ids = sorted(set(image_ids))
    if not image_ids:
        raise PluginError("detection: evaluate got no images")
    if not results:
        return {"mAP": 0.0, "AP50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval reports -1 where no ground truth exists
    return {"mAP": 100.0 * max(float(ev.stats[0]), 0.0), "AP50": 100.0 * max(float(ev.stats[1]), 0.0)}


class BoxScorer(Scorer):
    """COCO box mAP of served answers (targets: COCO image ids): the answers' boxes, already in
    original pixels, as COCO results with the dataset's category ids, through :func:`coco_bbox_metrics`."""

    def __init__(self, dataset: Any):
        self.dataset = dataset
        self.results: list[dict] = []
        self.image_ids: list[int] = []

    def update(self, predictions: Sequence[DetectionResult], targets: Sequence[int]) -> None:
        cat_ids = self.dataset.label_to_category_id
        for answer, image_id in zip(predictions, targets, strict=True):
            self.image_ids.append(int(image_id))
            for d in answer.detections:
                x1, y1, x2, y2 = d.box
                self.results.append({"image_id": int(image_id), "category_id": int(cat_ids[d.index]),
                                     "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(d.score)})

    def result(self) -> dict[str, float]:
        return coco_bbox_metrics(self.dataset.coco, self.results, self.image_ids)


class DetectionPlugin(CocoData, EvaluationHooks, TrainingHooks, TaskPlugin):
    """Object detection with torchvision's RetinaNet (ResNet-FPN, P3..P7); the default head
    mirrors ``retinanet_resnet50_fpn`` and its 91 COCO labels. Data: COCO boxes (:class:`CocoData`)."""

    name = "detection"
    aliases = ("det",)
    description = "Object detection (RetinaNet): boxes, scores and labels in original image pixels."
    response_model = DetectionResult
    metric_name = "mAP"
    metric_label = "box mAP@[.5:.95] (%)"
    coco_loader = "detection_dataset"
    reference_finetune = ReferenceRecipe(layers=("layer2",), feature_epochs=3, feature_lr=1e-3, epochs=2,
                                         optimizer="sgd", lr=1e-4)  # Entropic Student's RetinaNet stage 2

    # -- serving -------------------------------------------------------------------------
    def resolve_config(self, backbone: str, stored: Mapping[str, Any]) -> dict:
        """``num_classes`` (default 91 with COCO's labels), ``labels``, ``score_threshold`` (0.3),
        ``nms_threshold`` (0.5), ``max_detections`` (100), ``fpn_channels`` (FPN and head width, 256 as
        torchvision's RetinaNet), ``anchor_sizes`` (smallest anchor of each of the five FPN levels;
        torchvision's 32..512 suit COCO's ~800 px images, small inputs need small ones), optional
        ``category_ids`` (COCO ids per label)."""
        check_arch(backbone)
        defaults = {"num_classes": 91, "score_threshold": 0.3, "max_detections": 100, "nms_threshold": 0.5,
                    "fpn_channels": 256, "anchor_sizes": list(ANCHOR_SIZES)}
        cfg = merge_config(self.name, defaults, stored, COCO_CATEGORIES)
        _threshold("score_threshold", cfg["score_threshold"])
        _threshold("nms_threshold", cfg["nms_threshold"])
        _max_detections(cfg["max_detections"])
        fpn = cfg["fpn_channels"]
        if not isinstance(fpn, int) or isinstance(fpn, bool) or not 8 <= fpn <= 1024:
            raise PluginError(f"detection: fpn_channels must be an integer in 8..1024, got {fpn!r}")
        sizes = cfg["anchor_sizes"]
        if (not isinstance(sizes, (list, tuple)) or len(sizes) != len(ANCHOR_SIZES)
                or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096 for v in sizes)):
            raise PluginError(f"detection: anchor_sizes must be {len(ANCHOR_SIZES)} integers in 1..4096 "
                              f"(one per FPN level), got {sizes!r}")
        ids = cfg.get("category_ids")
        if ids is not None and len(ids) != cfg["num_classes"]:
            raise PluginError(f"detection: {len(ids)} category_ids for num_classes={cfg['num_classes']}")
        return cfg

    def summarize(self, answer: DetectionResult) -> str:
        dets = answer.detections
        best = ", ".join(f"{d.label} {d.score:.2f} @ {[round(v) for v in d.box]}" for d in dets[:3])
        return f"{len(dets)} objects" + (f": {best}" if dets else "")

    def build_head(self, backbone: str, config: Mapping[str, Any]) -> FeatureRetinaNet:
        cfg = config
        head = FeatureRetinaNet(
            backbone,
            cfg["num_classes"],
            cfg["labels"],
            score_thresh=cfg["score_threshold"],
            nms_thresh=cfg["nms_threshold"],
            detections_per_img=cfg["max_detections"],
            fpn_channels=cfg["fpn_channels"],
            anchor_sizes=cfg["anchor_sizes"],
        )
        head.category_ids = list(cfg["category_ids"]) if cfg.get("category_ids") is not None else None
        return head

    @torch.no_grad()
    def predict(self, head: nn.Module, features: Tensor, metas: Sequence[ImageMeta],
                config: Mapping[str, Any]) -> list[DetectionResult]:
        """Boxes in original-image pixels; ``score_threshold``, ``nms_threshold`` and
        ``max_detections`` come from the (resolved) config."""
        dets = head(features, [m.input_size for m in metas], score_thresh=config["score_threshold"],
                    nms_thresh=config["nms_threshold"], detections_per_img=config["max_detections"])
        out = []
        for det, meta in zip(dets, metas):
            boxes = scale_boxes(det["boxes"].float(), meta.input_size, meta.original_size).tolist()
            out.append(
                DetectionResult(
                    detections=[
                        Detection(box=box, score=min(max(score, 0.0), 1.0), index=i, label=label_of(head.labels, i))
                        for box, score, i in zip(boxes, det["scores"].tolist(), det["labels"].tolist())
                    ]
                )
            )
        return out

    # -- training hooks -------------------------------------------------------------------
    def build_teacher(self, backbone: str, config: Mapping[str, Any],
                      weights: str | None = None) -> tuple[nn.Module, nn.Module]:
        """Stem and head of torchvision's RetinaNet. ``weights`` "DEFAULT"/"COCO_V1" (resnet50)
        loads ``retinanet_resnet50_fpn``'s COCO weights (the classifier re-indexed by label name
        when the label set differs); a ResNet weights name loads ImageNet weights only."""
        cfg = self.resolve_config(backbone, config)
        kind, w = resolve_teacher_weights(f"retinanet_{backbone}_fpn", backbone, weights)
        if kind != "task":
            resnet, head = self.resnet_teacher(backbone, cfg, w, norm_layer=FrozenBatchNorm2d)
            return resnet_stem(resnet), head
        stem, head = task_teacher(self, backbone, cfg, w, body="backbone.body.", into="retinanet",
                                  class_rows=(_CLS_LOGITS,), norm_layer=FrozenBatchNorm2d)
        if w == RetinaNet_ResNet50_FPN_Weights.COCO_V1:  # trained with eps=0, as torchvision notes
            overwrite_eps(stem, 0.0)
            overwrite_eps(head, 0.0)
        return stem, head

    def config_for_classes(self, names: Sequence[str]) -> dict:
        return class_list_config(names)

    def dataset_config(self, dataset: Dataset) -> dict:
        cats = list(dataset.categories)
        return {
            "num_classes": len(cats),
            "labels": [str(c["name"]) for c in cats],
            "category_ids": [int(i) for i in dataset.label_to_category_id],
        }

    def collate(self, items: list) -> TaskBatch:
        images = pad_batch([img for img, _ in items])  # shorter_side policies give each image its own size
        targets, metas = [], []
        for img, t in items:
            input_size = (int(img.shape[-2]), int(img.shape[-1]))
            boxes = torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4)
            labels = torch.as_tensor(t["labels"], dtype=torch.long).reshape(-1)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # as torchvision's reference:
            targets.append({**t, "boxes": boxes[keep], "labels": labels[keep]})  # empty boxes make NaN losses
            orig = tuple(int(v) for v in t.get("orig_size", input_size))
            metas.append(ImageMeta(original_size=orig, input_size=input_size))
        return TaskBatch(images, targets, metas)

    def loss(self, head: nn.Module, features: Tensor, batch: TaskBatch, *, teacher_output: Any = None,
             options: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
        """RetinaNet's sigmoid focal loss (``classification``) and L1 box loss (``bbox_regression``)."""
        device = features.device
        targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in batch.targets]
        return head(features, [m.input_size for m in batch.metas] or None, targets)

    @torch.no_grad()
    def evaluate(self, head: nn.Module, features_fn: FeatureFn, batches: Iterable[TaskBatch], *,
                 dataset: Dataset | None = None) -> dict[str, float]:
        """COCO box mAP against ``dataset.coco`` (pycocotools), boxes mapped to original pixels
        and labels to COCO ids through ``dataset.label_to_category_id``."""
        ds = source_dataset(batches, dataset, "coco")
        if ds is None:
            raise PluginError(
                "detection: evaluate needs the COCO ground truth: pass dataset= (with a pycocotools `coco` attribute)"
            )
        cat_ids = getattr(ds, "label_to_category_id", None) or getattr(head, "category_ids", None)
        num_classes = getattr(head, "num_classes", None)
        if cat_ids is not None and num_classes is not None and len(cat_ids) != num_classes:
            raise PluginError(f"detection: the head has {num_classes} classes, the dataset {len(cat_ids)}")
        results, image_ids = [], []
        with evaluating(head) as device:
            for batch in batches:
                batch = batch.to(device)
                dets = head(
                    features_fn(batch.images),
                    [m.input_size for m in batch.metas],
                    score_thresh=EVAL_SCORE_THRESHOLD,
                    detections_per_img=EVAL_MAX_DETECTIONS,
                )
                for det, target, meta in zip(dets, batch.targets, batch.metas):
                    image_id = int(target["image_id"])
                    image_ids.append(image_id)
                    boxes = scale_boxes(det["boxes"].float(), meta.input_size, meta.original_size)
                    boxes[:, 2:] -= boxes[:, :2]  # xyxy → COCO xywh
                    for box, score, label in zip(boxes.tolist(), det["scores"].tolist(), det["labels"].tolist()):
                        results.append(
                            {
                                "image_id": image_id,
                                "category_id": int(cat_ids[label]) if cat_ids is not None else int(label),
                                "bbox": [round(v, 2) for v in box],
                                "score": float(score),
                            }
                        )
        return coco_bbox_metrics(ds.coco, results, image_ids)

    # -- evaluation hooks (eval_samples: CocoData's) ----------------------------------------
    def make_scorer(self, dataset: Dataset, config: Mapping[str, Any]) -> BoxScorer:
        return BoxScorer(dataset)

    def scoring_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The COCO protocol: keep boxes down to score 0.05, at most 100 per image (as ``evaluate``)."""
        return {**config, "score_threshold": EVAL_SCORE_THRESHOLD, "max_detections": EVAL_MAX_DETECTIONS}
