"""fmnist-scenes: a small, real-format stand-in for COCO and ImageNet built from real images.

Objects are real Fashion-MNIST items (train split for our train scenes, test split for val),
tinted and alpha-composited — using the item's own intensity as the alpha — onto crops of real
photographs (:mod:`.backgrounds`). Val scenes take their backgrounds only from photographs that
no train scene used, so val measures generalisation; ``val_seen`` (val objects on the train
photographs) is the in-distribution twin. The output is an ordinary COCO 2017 tree and an ordinary
ImageFolder tree, loaded by the same code as the real datasets:

    out/coco/annotations/instances_{train,val,val_seen}2017.json   (bbox, area, RLE segmentation)
    out/coco/{train,val,val_seen}2017/<image_id>.jpg
    out/imagefolder/{train,val,val_seen}/<class>/<n>.png            (one object per image)
    out/meta.json (counts, the photographs each split drew, licences), out/README.md

Every image is drawn from its own ``numpy`` Generator seeded with ``(seed, split, kind, index)``,
so the output is identical for a given seed however the work is split across processes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from .fmnist import CLASS_NAMES, CLASS_SLUGS, DEFAULT_FMNIST_DIR, load_fashion_mnist

from .backgrounds import load_background_set

DET_OBJECTS = (1, 4)  # objects per detection scene (inclusive)
DET_SIDE = (0.20, 0.60)  # object side as a fraction of the image side
CLS_SIDE = (0.50, 0.90)
ALPHA_LO, ALPHA_HI = 16.0, 64.0  # Fashion-MNIST intensity ramp mapped to alpha 0..1
MASK_THRESHOLD = 40  # intensity (after resize) above which a pixel belongs to the instance mask
MIN_VISIBLE = 0.4  # drop an instance when less than this fraction of it stays visible
MIN_PIXELS = 10  # ... or fewer pixels than this
JPEG_QUALITY = 95

# our split -> (Fashion-MNIST split, seed code, background split). ``val`` scenes use photographs no
# train scene used; ``val_seen`` scenes are val objects on the train photographs (in-distribution).
_SPLITS = {"train": ("train", 0, "train"), "val": ("test", 1, "val"), "val_seen": ("test", 2, "train")}
_KIND_DET, _KIND_CLS = 0, 1
_TRANSPOSES = [
    Image.Transpose.FLIP_LEFT_RIGHT,
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_180,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSPOSE,
    Image.Transpose.TRANSVERSE,
]

# Per-process state, filled by _init_worker (in the parent too when running inline).
_CTX: dict = {}


# ----------------------------------------------------------------------------------------------
# sources


def _init_worker(fmnist_dir: str, image_size: int, backgrounds: str) -> None:
    _CTX.clear()
    _CTX["size"] = image_size
    for our_split, (fm_split, _, _) in _SPLITS.items():
        images, labels = load_fashion_mnist(fm_split, Path(fmnist_dir))
        _CTX[our_split] = (images, labels, [np.flatnonzero(labels == c) for c in range(len(CLASS_NAMES))])
    _CTX["backgrounds"] = load_background_set(backgrounds)


# ----------------------------------------------------------------------------------------------
# rendering


def _rng(seed: int, split: str, kind: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLITS[split][1], kind, index])


def _background(rng: np.random.Generator, size: int, split: str) -> tuple[str, np.ndarray]:
    """A random crop at a random scale of a random photo of the split's background set,
    colour-jittered: ``(photo name, float32 HxWx3)``."""
    photos = _CTX["backgrounds"].images(_SPLITS[split][2])
    name, img = photos[rng.integers(len(photos))]
    w, h = img.size
    side = rng.uniform(0.25, 1.0) * min(w, h)
    aspect = np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
    cw, ch = min(w, side * np.sqrt(aspect)), min(h, side / np.sqrt(aspect))
    x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    crop = img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch), reducing_gap=2.0)
    k = int(rng.integers(8))  # one of the 8 rotations/flips of the square
    if k:
        crop = crop.transpose(_TRANSPOSES[k - 1])
    # Colour jitter as one affine colour map: saturation, per-channel tint (which colours the grey
    # textures), contrast around the mean, brightness.
    sat = rng.uniform(0.3, 1.3)
    gain = rng.uniform(0.6, 1.4, size=3)
    contrast = rng.uniform(0.5, 1.2)
    brightness = rng.uniform(-40, 40)
    m = np.diag(gain) @ (sat * np.eye(3) + (1.0 - sat) / 3.0)  # tint after saturation
    pixels = np.asarray(crop, dtype=np.float32).reshape(-1, 3)
    mean = float((m @ pixels[::7].mean(axis=0)).mean())  # a subsample is plenty for the mean
    m = (contrast * m).astype(np.float32)
    offset = np.float32((1.0 - contrast) * mean + brightness)
    bg = pixels @ m.T
    bg += offset
    np.clip(bg, 0, 255, out=bg)
    return name, bg.reshape(size, size, 3)


def _paste(rng: np.random.Generator, canvas: np.ndarray, item: np.ndarray, side_range: tuple[float, float]):
    """Paste one tinted Fashion-MNIST item; return ``(mask, y0, x0)`` of its full (unoccluded) mask."""
    size = canvas.shape[0]
    side = rng.uniform(*side_range) * size
    aspect = np.exp(rng.uniform(np.log(0.8), np.log(1.25)))
    w = int(np.clip(round(side * np.sqrt(aspect)), 8, size))
    h = int(np.clip(round(side / np.sqrt(aspect)), 8, size))
    v = np.asarray(Image.fromarray(item).resize((w, h), Image.BILINEAR), dtype=np.float32)
    x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    alpha = np.clip((v - ALPHA_LO) / (ALPHA_HI - ALPHA_LO), 0.0, 1.0)[..., None]
    tint = rng.uniform(0.15, 1.0, size=3).astype(np.float32) * 255.0
    colour = tint * (0.35 + 0.65 * v / 255.0)[..., None]
    region = canvas[y0 : y0 + h, x0 : x0 + w]
    region *= 1.0 - alpha
    region += alpha * colour
    return v > MASK_THRESHOLD, y0, x0


def _save(arr: np.ndarray, path: Path) -> None:
    img = Image.fromarray(np.ascontiguousarray(arr.round().astype(np.uint8)))
    if path.suffix == ".jpg":
        img.save(path, quality=JPEG_QUALITY)
    else:
        img.save(path, compress_level=1)


def _render_detection(seed: int, split: str, index: int, image_dir: Path) -> dict:
    from pycocotools import mask as mask_utils

    size = _CTX["size"]
    images, labels, _ = _CTX[split]
    rng = _rng(seed, split, _KIND_DET, index)
    background, canvas = _background(rng, size, split)
    owner = np.zeros((size, size), dtype=np.int16)  # which object each pixel shows (0 = none)
    objects = []  # (label, full-mask area)
    for _ in range(int(rng.integers(DET_OBJECTS[0], DET_OBJECTS[1] + 1))):
        sample = int(rng.integers(len(images)))
        mask, y0, x0 = _paste(rng, canvas, images[sample], DET_SIDE)
        if not mask.any():
            continue
        objects.append((int(labels[sample]), int(mask.sum())))
        owner[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask] = len(objects)
    image_id = index + 1
    file_name = f"{image_id:012d}.jpg"
    _save(canvas, image_dir / file_name)
    anns = []
    for k, (label, full_area) in enumerate(objects, start=1):
        visible = owner == k
        area = int(visible.sum())
        if area < MIN_PIXELS or area < MIN_VISIBLE * full_area:
            continue  # mostly hidden by later objects
        ys, xs = np.nonzero(visible)
        x_min, y_min = int(xs.min()), int(ys.min())
        rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
        anns.append(
            {
                "image_id": image_id,
                "category_id": label + 1,
                "bbox": [x_min, y_min, int(xs.max()) - x_min + 1, int(ys.max()) - y_min + 1],
                "area": area,
                "iscrowd": 0,
                "segmentation": {"size": [size, size], "counts": rle["counts"].decode("ascii")},
            }
        )
    image = {"id": image_id, "file_name": file_name, "height": size, "width": size, "background": background}
    return {"image": image, "annotations": anns}


def _render_classification(seed: int, split: str, index: int, class_root: Path) -> tuple[int, str]:
    size = _CTX["size"]
    images, _, by_class = _CTX[split]
    rng = _rng(seed, split, _KIND_CLS, index)
    label = index % len(CLASS_NAMES)  # balanced: every class present once count >= 10
    sample = int(by_class[label][rng.integers(len(by_class[label]))])
    background, canvas = _background(rng, size, split)
    _paste(rng, canvas, images[sample], CLS_SIDE)
    _save(canvas, class_root / CLASS_SLUGS[label] / f"{index:06d}.png")
    return label, background


def _work(task: tuple) -> tuple[str, str, list]:
    kind, seed, split, start, stop, directory = task
    directory = Path(directory)
    if kind == _KIND_DET:
        return "det", split, [_render_detection(seed, split, i, directory) for i in range(start, stop)]
    return "cls", split, [_render_classification(seed, split, i, directory) for i in range(start, stop)]


# ----------------------------------------------------------------------------------------------
# driver


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    ours = (out / "meta.json").is_file()
    for sub in ("coco", "imagefolder"):
        if (out / sub).exists():
            if not ours:
                raise DataError(f"{out / sub}: already exists and {out} holds no fmnist-scenes meta.json; refusing to overwrite")
            shutil.rmtree(out / sub)


def _coco_json(split: str, records: list[dict], seed: int, backgrounds: str) -> dict:
    annotations = []
    for rec in records:
        for ann in rec["annotations"]:
            annotations.append({"id": len(annotations) + 1, **ann})
    return {
        "info": {
            "description": f"fmnist-scenes {split} (Fashion-MNIST objects on the '{backgrounds}' background photos)",
            "version": "2.0",
            "year": 2017,
            "contributor": "splitserve",
            "url": "",
            "date_created": "",
            "seed": seed,
        },
        "licenses": [],
        "images": [rec["image"] for rec in records],
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": slug, "supercategory": "fashion"} for i, slug in enumerate(CLASS_SLUGS)
        ],
    }


def make_fmnist_scenes(
    out: Path,
    *,
    train_scenes: int = 4000,
    val_scenes: int = 1000,
    val_seen_scenes: int = 0,
    image_size: int = 128,
    seed: int = 0,
    backgrounds: str = "builtin",
    fmnist_dir: Path = DEFAULT_FMNIST_DIR,
    progress: bool = True,
    workers: int | None = None,
) -> dict:
    """Generate the fmnist-scenes COCO + ImageFolder trees under ``out``; return a summary dict.

    ``train_scenes``/``val_scenes``/``val_seen_scenes`` count both the detection scenes and the
    classification images of each split. ``val`` is cut from photographs of ``backgrounds`` that
    no train scene uses; ``val_seen`` (written only when asked for) puts val objects on the train
    photographs. ``workers`` defaults to the number of CPUs (1 runs inline); the output does not
    depend on it.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    if min(train_scenes, val_scenes, val_seen_scenes) < 0:
        raise DataError("scene counts must be >= 0")
    if not 32 <= image_size <= 4096:
        raise DataError(f"image size {image_size} out of range (32..4096)")
    t0 = time.perf_counter()
    # Validate the sources in the parent first, so errors are raised once and cleanly.
    _init_worker(str(fmnist_dir), image_size, backgrounds)
    _prepare_out(out)
    coco, folder = out / "coco", out / "imagefolder"
    counts = {"train": train_scenes, "val": val_scenes}
    if val_seen_scenes:
        counts["val_seen"] = val_seen_scenes
    (coco / "annotations").mkdir(parents=True, exist_ok=True)
    tasks = []
    chunk = 64
    for split, n in counts.items():
        (coco / f"{split}2017").mkdir(parents=True, exist_ok=True)
        for slug in CLASS_SLUGS:
            (folder / split / slug).mkdir(parents=True, exist_ok=True)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            tasks.append((_KIND_DET, seed, split, start, stop, str(coco / f"{split}2017")))
            tasks.append((_KIND_CLS, seed, split, start, stop, str(folder / split)))
    total = sum(counts.values())
    if workers is None:  # a pool only pays off for more than a few hundred images
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = min(cpus, 8) if total >= 400 else 1
    workers = max(1, min(workers, len(tasks) or 1))

    results: dict = {(kind, s): {} for s in counts for kind in ("det", "cls")}
    pool = None
    bar = tqdm(total=2 * total, desc="fmnist-scenes", unit="img", disable=not progress)
    try:
        if workers == 1:
            done = map(_work, tasks)
        else:
            import multiprocessing as mp

            # fork is cheap and inherits nothing the workers use besides numpy/PIL; the
            # initializer reloads the sources so spawn-only platforms work the same way.
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            pool = ProcessPoolExecutor(
                workers,
                mp_context=mp.get_context(method),
                initializer=_init_worker,
                initargs=(str(fmnist_dir), image_size, backgrounds),
            )
            done = pool.map(_work, tasks)
        for task, (kind, split, recs) in zip(tasks, done):
            results[(kind, split)][task[3]] = recs
            bar.update(len(recs))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    summary: dict = {
        "out": str(out),
        "coco": str(coco),
        "imagefolder": str(folder),
        "image_size": image_size,
        "seed": seed,
        "backgrounds": backgrounds,
        "splits": list(counts),
    }
    split_meta = {}
    for split in counts:
        records = [r for start in sorted(results[("det", split)]) for r in results[("det", split)][start]]
        data = _coco_json(split, records, seed, backgrounds)
        ann_path = coco / "annotations" / f"instances_{split}2017.json"
        ann_path.write_text(json.dumps(data, separators=(",", ":")))
        drawn = [d for start in sorted(results[("cls", split)]) for d in results[("cls", split)][start]]
        labels = [label for label, _ in drawn]
        used = [r["image"]["background"] for r in records] + [bg for _, bg in drawn]
        split_meta[split] = {
            "detection_scenes": len(records),
            "annotations": len(data["annotations"]),
            "classification_images": len(labels),
            "classification_per_class": {CLASS_SLUGS[c]: labels.count(c) for c in range(len(CLASS_SLUGS))},
            # what the scenes actually drew, so disjointness is checked on the output, not the spec
            "backgrounds_used": {name: used.count(name) for name in sorted(set(used))},
        }
        summary[f"{split}_scenes"] = len(records)
        summary[f"{split}_annotations"] = len(data["annotations"])
        summary[f"{split}_classification_images"] = len(labels)
        summary[f"{split}_annotation_file"] = str(ann_path)

    spec = _CTX["backgrounds"].spec
    meta = {
        "name": "fmnist-scenes",
        "version": 2,
        "seed": seed,
        "image_size": image_size,
        "counts": split_meta,
        "categories": [{"id": i + 1, "name": slug, "fashion_mnist_name": name} for i, (slug, name) in enumerate(zip(CLASS_SLUGS, CLASS_NAMES))],
        "source": {
            "objects": f"Fashion-MNIST idx files from {Path(fmnist_dir)} (train split -> train, test split -> val, val_seen)",
            "background_set": backgrounds,
            "backgrounds": {
                split: [
                    {"name": p.name, "source": p.source, "file": p.locator, "licence": p.licence, "author": p.author}
                    for p in spec.photos(split)
                ]
                for split in ("train", "val")
            },
            "background_of_split": {split: _SPLITS[split][2] for split in counts},
        },
        "generator": {
            "objects_per_scene": list(DET_OBJECTS),
            "detection_object_side": list(DET_SIDE),
            "classification_object_side": list(CLS_SIDE),
            "mask_threshold": MASK_THRESHOLD,
            "min_visible_fraction": MIN_VISIBLE,
        },
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    (out / "README.md").write_text(_readme(meta))
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def _readme(meta: dict) -> str:
    c = meta["counts"]
    src = meta["source"]
    rows = "\n".join(
        f"| {split} | {src['background_of_split'][split]} | {c[split]['detection_scenes']} | {c[split]['annotations']} "
        f"| {c[split]['classification_images']} |"
        for split in c
    )
    photos = "\n".join(
        f"| {split} | {p['name']} | {p['source']} | {p['licence']} | {p['author']} |"
        for split, ps in src["backgrounds"].items()
        for p in ps
    )
    return f"""# fmnist-scenes

Generated by `platform data fmnist-scenes` (seed {meta['seed']}, {meta['image_size']}x{meta['image_size']} px,
background set `{src['background_set']}`).

Real Fashion-MNIST items (train split for `train`, test split for `val` and `val_seen`), tinted and
alpha-composited with their own intensity as alpha onto random crops (scale, position, rotation/flip,
colour) of real photographs. `val` scenes use only photographs that no `train` scene used;
`val_seen` scenes put val objects on the train photographs (in-distribution, for continuity).
Later objects occlude earlier ones; masks and boxes are of the visible part, and instances less
than {int(MIN_VISIBLE * 100)}% visible are dropped.

| split | photographs | detection scenes | annotations | classification images |
|---|---|---|---|---|
{rows}

- `coco/annotations/instances_<split>2017.json`, `coco/<split>2017/*.jpg`: a COCO 2017 tree
  (bbox xywh, area, RLE segmentation, iscrowd 0; categories 1..10; each image names its background).
- `imagefolder/<split>/<class>/*.png`: one object per image, ImageNet-style layout.

## Background photographs

| photographs of | name | source | licence | author |
|---|---|---|---|---|
{photos}
"""
