"""Detection and semantic-segmentation data from a COCO 2017 tree.

    root/annotations/instances_{split}2017.json
    root/{split}2017/<file_name>

The annotation file is parsed and checked eagerly (one clear :class:`DataError` line for a missing
path, invalid JSON or a file that is not a COCO instances file), then indexed by pycocotools.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from ..errors import DataError
from .transforms import (
    IGNORE_INDEX,
    as_policy,
    detection_transform,
    load_rgb,
    pad_batch,
    segmentation_transform,
    to_normalized,
)

COCO_LAYOUT = "expected a COCO 2017 tree: annotations/instances_{train,val}2017.json, train2017/, val2017/"

# The COCO -> Pascal VOC mapping of the torchvision references / the papers: COCO category ids of
# the 20 VOC classes, in VOC order (label i+1); every other COCO category is background.
VOC_CATEGORY_IDS = [5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72]
VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
CATEGORY_MAPS = ("auto", "voc", "all")


# ----------------------------------------------------------------------------------------------
# loading and checking the annotation file


def _check_list(path: Path, data: dict, key: str, required: tuple[str, ...]) -> None:
    if key not in data:
        raise DataError(f"{path}: not a COCO instances file (missing '{key}')")
    entries = data[key]
    if not isinstance(entries, list):
        raise DataError(f"{path}: not a COCO instances file ('{key}' is a {type(entries).__name__}, expected a list)")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: {key}[{i}] is a {type(entry).__name__}, expected an object")
        missing = [k for k in required if k not in entry]
        if missing:
            raise DataError(f"{path}: {key}[{i}] lacks {', '.join(repr(k) for k in missing)}")


def load_coco(root: Path, split: str):
    """Check the tree and return ``(pycocotools COCO, image directory)``."""
    from pycocotools.coco import COCO

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory ({COCO_LAYOUT})")
    ann_path = root / "annotations" / f"instances_{split}2017.json"
    if not ann_path.is_file():
        raise DataError(f"{ann_path}: no such file ({COCO_LAYOUT})")
    image_dir = root / f"{split}2017"
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: no such directory ({COCO_LAYOUT})")
    try:
        data = json.loads(ann_path.read_bytes())
    except json.JSONDecodeError as e:
        raise DataError(f"{ann_path}: not valid JSON (line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise DataError(f"{ann_path}: not valid JSON (not UTF-8 text)") from None
    except OSError as e:
        raise DataError(f"{ann_path}: cannot read ({e.strerror or type(e).__name__})") from None
    if not isinstance(data, dict):
        raise DataError(f"{ann_path}: not a COCO instances file (top level is a {type(data).__name__}, expected an object)")
    _check_list(ann_path, data, "images", ("id", "file_name", "height", "width"))
    _check_list(ann_path, data, "annotations", ("id", "image_id", "category_id", "bbox"))
    _check_list(ann_path, data, "categories", ("id", "name"))
    image_ids = {img["id"] for img in data["images"]}
    for i, ann in enumerate(data["annotations"]):
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise DataError(f"{ann_path}: annotations[{i}] has bbox {bbox!r}, expected [x, y, w, h]")
        if ann["image_id"] not in image_ids:
            raise DataError(f"{ann_path}: annotations[{i}] refers to image_id {ann['image_id']!r}, which is not in 'images'")
    coco = COCO()  # no file: pycocotools would re-read and print; index the checked data quietly
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, image_dir


def _usable_for_detection(ann: dict) -> bool:
    return not ann.get("iscrowd", 0) and ann["bbox"][2] >= 1 and ann["bbox"][3] >= 1


class _CocoBase(Dataset):
    def __init__(self, root: Path, split: str, train: bool, preprocessing) -> None:
        self.root = Path(root)
        self.split = split
        self.train = train
        self.preprocessing = as_policy(preprocessing)
        self.coco, self.image_dir = load_coco(self.root, split)

    def __len__(self) -> int:
        return len(self.ids)

    def _load(self, image_id: int):
        info = self.coco.imgs[image_id]
        return info, load_rgb(self.image_dir / info["file_name"])


# ----------------------------------------------------------------------------------------------
# detection


class CocoDetection(_CocoBase):
    """Items: ``(image float (3,H,W) normalised, target)`` with ``target`` =
    ``{"boxes": float[N,4] xyxy in input pixels, "labels": long[N] in 0..K-1, "image_id": int,
    "orig_size": (height, width)}``. Boxes are scaled back to the original image with
    ``orig_size / input size`` for COCO evaluation against ``dataset.coco``."""

    def __init__(self, root: Path, split: str, *, train: bool, preprocessing) -> None:
        super().__init__(root, split, train, preprocessing)
        cats = sorted(self.coco.cats.values(), key=lambda c: c["id"])
        self.categories: list[dict] = [{"id": int(c["id"]), "name": str(c["name"])} for c in cats]
        self.label_to_category_id: list[int] = [c["id"] for c in self.categories]
        self.category_id_to_label: dict[int, int] = {cid: i for i, cid in enumerate(self.label_to_category_id)}
        ids = sorted(self.coco.imgs)
        if train:  # images without a usable box teach nothing to a detector
            ids = [i for i in ids if any(self._usable(a) for a in self.coco.imgToAnns.get(i, []))]
        self.ids: list[int] = ids
        self.transforms = detection_transform(train, self.preprocessing)

    def _usable(self, ann: dict) -> bool:
        return _usable_for_detection(ann) and ann["category_id"] in self.category_id_to_label

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        image_id = self.ids[index]
        _, img = self._load(image_id)
        w, h = img.size
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if self._usable(ann):
                x, y, bw, bh = ann["bbox"]
                boxes.append([x, y, x + bw, y + bh])
                labels.append(self.category_id_to_label[ann["category_id"]])
        box_array = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        box_array[:, 0::2] = box_array[:, 0::2].clip(0, w)
        box_array[:, 1::2] = box_array[:, 1::2].clip(0, h)
        image = tv_tensors.Image(img)
        target = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(box_array), format="XYXY", canvas_size=(h, w)),
            "labels": torch.as_tensor(labels, dtype=torch.long),
        }
        image, target = self.transforms(image, target)
        return to_normalized(image), {
            "boxes": target["boxes"].as_subclass(Tensor).float(),
            "labels": target["labels"].as_subclass(Tensor).long(),
            "image_id": int(image_id),
            "orig_size": (h, w),
        }


def detection_dataset(root: Path, split: str, *, train: bool, preprocessing) -> Dataset:
    """COCO 2017 detection (see :class:`CocoDetection`). Crowd boxes and boxes under 1 px are
    skipped; images without boxes are kept for val and dropped for train."""
    return CocoDetection(root, split, train=train, preprocessing=preprocessing)


def collate_detection(items) -> tuple[Tensor, list[dict]]:
    images, targets = zip(*items)
    return pad_batch(list(images)), list(targets)


# ----------------------------------------------------------------------------------------------
# semantic segmentation


class CocoSegmentation(_CocoBase):
    """Items: ``(image float (3,H,W) normalised, mask long (H,W))``; mask values are class indices
    into ``dataset.classes`` (0 = background) or 255 (ignore: crop padding, overlapping instances).

    COCO → VOC masks as torchvision's segmentation references build them (and the papers use):
    every instance of a kept category is painted with its class, crowd regions included; pixels
    covered by more than one instance become 255; training keeps only images whose kept instances
    cover more than 1000 pixels of area in total — for images of COCO's size (more than 320×240
    pixels, exactly torchvision's rule); smaller images need the 1.3 % of their area that 1000 px
    is of a 320×240 image, or a 64-pixel scene could never qualify.
    """

    MIN_TRAIN_AREA = 1000
    MIN_TRAIN_FRACTION = MIN_TRAIN_AREA / (320 * 240)

    def __init__(self, root: Path, split: str, *, train: bool, preprocessing, category_map: str = "auto") -> None:
        super().__init__(root, split, train, preprocessing)
        if category_map not in CATEGORY_MAPS:
            raise DataError(f"unknown category_map {category_map!r} (expected one of {', '.join(CATEGORY_MAPS)})")
        file_ids = set(self.coco.cats)
        if category_map == "auto":
            category_map = "voc" if set(VOC_CATEGORY_IDS) <= file_ids else "all"
        self.category_map = category_map
        if category_map == "voc":
            self.classes: list[str] = list(VOC_CLASSES)
            self.category_id_to_label: dict[int, int] = {cid: i + 1 for i, cid in enumerate(VOC_CATEGORY_IDS)}
        else:
            cats = sorted(self.coco.cats.values(), key=lambda c: c["id"])
            self.classes = ["background"] + [str(c["name"]) for c in cats]
            self.category_id_to_label = {int(c["id"]): i + 1 for i, c in enumerate(cats)}
        ids = sorted(self.coco.imgs)
        if train:  # as torchvision's references: too little labelled area teaches nothing
            ids = [i for i in ids if self._kept_area(i) > self.min_train_area(i)]
        self.ids: list[int] = ids
        self.transforms = segmentation_transform(train, self.preprocessing)

    def _kept(self, image_id: int) -> list[dict]:
        return [a for a in self.coco.imgToAnns.get(image_id, []) if a["category_id"] in self.category_id_to_label]

    def min_train_area(self, image_id: int) -> float:
        info = self.coco.imgs[image_id]
        return min(self.MIN_TRAIN_AREA, self.MIN_TRAIN_FRACTION * int(info["height"]) * int(info["width"]))

    def _kept_area(self, image_id: int) -> float:
        return sum(float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in self._kept(image_id))

    def semantic_mask(self, image_id: int) -> np.ndarray:
        """uint8 (H,W) class-index mask of one image at its original size."""
        info = self.coco.imgs[image_id]
        mask = np.zeros((int(info["height"]), int(info["width"])), dtype=np.uint8)
        count = np.zeros(mask.shape, dtype=np.uint16)
        for ann in self._kept(image_id):
            if "segmentation" not in ann:
                continue
            try:
                m = self.coco.annToMask(ann).astype(bool)
            except Exception as e:  # noqa: BLE001 — pycocotools raises bare errors on bad segmentations
                raise DataError(f"annotation {ann.get('id')} of image {image_id}: unreadable segmentation ({type(e).__name__})") from None
            np.maximum(mask, m.astype(np.uint8) * self.category_id_to_label[ann["category_id"]], out=mask)
            count += m
        mask[count > 1] = IGNORE_INDEX
        return mask

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image_id = self.ids[index]
        info, img = self._load(image_id)
        if (img.height, img.width) != (int(info["height"]), int(info["width"])):
            raise DataError(
                f"{self.image_dir / info['file_name']}: image is {img.width}x{img.height} but the annotation file says "
                f"{info['width']}x{info['height']}"
            )
        image = tv_tensors.Image(img)
        mask = tv_tensors.Mask(torch.from_numpy(self.semantic_mask(image_id)))
        image, mask = self.transforms(image, mask)
        return to_normalized(image), mask.as_subclass(Tensor).long()


def segmentation_dataset(
    root: Path, split: str, *, train: bool, preprocessing, category_map: str = "auto"
) -> Dataset:
    """COCO 2017 semantic segmentation (see :class:`CocoSegmentation`). ``category_map``: "voc" =
    the 21-class COCO->VOC mapping, "all" = background + every category in the file, "auto" = voc
    when the file has all 20 VOC category ids, else all."""
    return CocoSegmentation(root, split, train=train, preprocessing=preprocessing, category_map=category_map)


def collate_segmentation(items) -> tuple[Tensor, Tensor]:
    images, masks = zip(*items)
    return pad_batch(list(images)), pad_batch(list(masks), fill=IGNORE_INDEX)
