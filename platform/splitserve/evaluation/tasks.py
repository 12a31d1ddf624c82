"""The evaluation side of each built-in task: which images, what ground truth, how answers score.

Every method — our bundles through the gateway runtime, input codecs through the uncompressed
teacher — ends in the same thing: the plugin's own response objects (``predict``), one per image,
in the original image's coordinates. They are scored here, once, with the plugins' metric code:

- classification: top-1 (%), the response's best class against the ImageFolder label (and top-5,
  among the classes the response lists);
- detection: COCO box mAP@[.5:.95] (%), the responses' boxes as COCO results, through
  ``splitserve_tasks.detection.plugin.coco_bbox_metrics`` (pycocotools COCOeval);
- segmentation: mIoU (%), the response's class-index PNG against the COCO semantic mask at the
  original resolution, through ``splitserve_tasks.segmentation.plugin.confusion_metrics``.

Detection answers are produced with the COCO protocol's settings (score ≥ 0.05, at most 100 boxes,
as the plugin's own ``evaluate`` does), not the serving default threshold.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import SplitserveError

SUPPORTED = ("classification", "detection", "segmentation")


def eval_overrides(task: str) -> dict[str, Any]:
    """Head-config settings for scoring (COCO protocol for detection)."""
    if task == "detection":
        from splitserve_tasks.detection.plugin import EVAL_MAX_DETECTIONS, EVAL_SCORE_THRESHOLD

        return {"score_threshold": EVAL_SCORE_THRESHOLD, "max_detections": EVAL_MAX_DETECTIONS}
    return {}


@dataclass
class Item:
    path: Path
    target: Any  # classification: label; detection/segmentation: COCO image id


@dataclass
class TaskData:
    """One task's evaluation images and ground truth."""

    task: str
    metric: str
    root: Path
    dataset: Any
    items: list[Item]

    def score(self, answers: Sequence[Any], num_classes: int | None = None) -> dict[str, float]:
        if len(answers) != len(self.items):
            raise SplitserveError(f"{self.task}: {len(answers)} answers for {len(self.items)} images")
        if self.task == "classification":
            n = len(self.items)
            top1 = sum(int(a.top[0].index == it.target) for a, it in zip(answers, self.items))
            top5 = sum(int(it.target in [t.index for t in a.top[:5]]) for a, it in zip(answers, self.items))
            return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}
        if self.task == "detection":
            return score_detection(self.dataset, answers, [it.target for it in self.items])
        return score_segmentation(self.dataset, answers, [it.target for it in self.items], num_classes)


def score_detection(dataset, answers, image_ids: Sequence[int]) -> dict[str, float]:
    from splitserve_tasks.detection.plugin import coco_bbox_metrics

    cat_ids = dataset.label_to_category_id
    results = []
    for ans, image_id in zip(answers, image_ids):
        for d in ans.detections:
            x1, y1, x2, y2 = d.box
            results.append({"image_id": int(image_id), "category_id": int(cat_ids[d.index]),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(d.score)})
    return coco_bbox_metrics(dataset.coco, results, image_ids)


def decode_mask(answer) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(answer.mask))) as img:
        return np.asarray(img)


def score_segmentation(dataset, answers, image_ids: Sequence[int], num_classes: int | None) -> dict[str, float]:
    import torch
    from splitserve_tasks.segmentation.plugin import confusion_metrics

    k = int(num_classes or len(dataset.classes))
    confusion = np.zeros(k * k, dtype=np.int64)
    for ans, image_id in zip(answers, image_ids):
        truth = dataset.semantic_mask(image_id).astype(np.int64)
        pred = decode_mask(ans).astype(np.int64)
        if pred.shape != truth.shape:
            raise SplitserveError(f"segmentation: mask of image {image_id} is {pred.shape}, the truth {truth.shape}")
        valid = (truth < k) & (pred < k)
        confusion += np.bincount(truth[valid] * k + pred[valid], minlength=k * k)
    return confusion_metrics(torch.from_numpy(confusion.reshape(k, k)))


def resolve_root(plugin, root: Path) -> Path:
    """An fmnist-scenes tree's part the task reads (``imagefolder/`` or ``coco/``), else ``root``."""
    sub = getattr(plugin, "data_layout", None)
    if sub and (root / "imagefolder").is_dir() and (root / "coco").is_dir() and (root / sub).is_dir():
        return root / sub
    return root


def evenly(n: int, limit: int | None) -> list[int]:
    if not limit or limit >= n:
        return list(range(n))
    step = n / limit
    return [int(i * step) for i in range(limit)]


def load_task_data(plugin, root: Path, split: str, preprocessing, limit: int | None) -> TaskData:
    """The images and ground truth of ``plugin``'s task in ``split`` (an evenly spaced subset)."""
    task = plugin.name
    if task not in SUPPORTED:
        raise SplitserveError(f"task {task!r}: `platform evaluate` scores {', '.join(SUPPORTED)} "
                              "(a plugin's own metric needs its ground-truth format here)")
    data_root = resolve_root(plugin, Path(root))
    dataset = plugin.build_dataset(data_root, split, train=False, preprocessing=preprocessing)
    if task == "classification":
        samples = [(Path(p), int(label)) for p, label in dataset.samples]
        items = [Item(*samples[i]) for i in evenly(len(samples), limit)]
    else:
        ids = list(dataset.ids)
        items = [Item(dataset.image_dir / dataset.coco.imgs[ids[i]]["file_name"], int(ids[i]))
                 for i in evenly(len(ids), limit)]
    if not items:
        raise SplitserveError(f"{data_root}: no {split} images for {task}")
    return TaskData(task, plugin.metric_name, data_root, dataset, items)
