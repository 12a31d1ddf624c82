"""The data package: fmnist-scenes generation, the COCO/ImageFolder loaders, errors, and the CLI."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from splitserve.cli import main
from splitserve.data import (
    VOC_CATEGORY_IDS,
    classification_dataset,
    collate_classification,
    collate_detection,
    collate_segmentation,
    detection_dataset,
    make_fmnist_scenes,
    segmentation_dataset,
)
from splitserve.data.fmnist import CLASS_SLUGS, load_fashion_mnist, read_idx
from splitserve.errors import DataError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# Only the tests that generate scenes need the Fashion-MNIST photos; COCO/VOC/ImageFolder tests on
# hand-made files run everywhere.
needs_fmnist = pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")

SIZE = 64
N_TRAIN, N_VAL = 24, 12


N_VAL_SEEN = 10


def _generate(out: Path, seed: int = 0, workers: int | None = None) -> dict:
    return make_fmnist_scenes(
        out, train_scenes=N_TRAIN, val_scenes=N_VAL, val_seen_scenes=N_VAL_SEEN, image_size=SIZE, seed=seed,
        progress=False, workers=workers,
    )


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    if not FMNIST_DIR.is_dir():
        pytest.skip("dataset-fashion-mnist not installed")
    out = tmp_path_factory.mktemp("fm")
    _generate(out)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# generation


def test_generated_tree_layout(scenes):
    coco = scenes / "coco"
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        assert (coco / "annotations" / f"instances_{split}2017.json").is_file()
        assert len(list((coco / f"{split}2017").iterdir())) == n
        folder = scenes / "imagefolder" / split
        assert sorted(p.name for p in folder.iterdir()) == sorted(CLASS_SLUGS)
        pngs = list(folder.rglob("*.png"))
        assert len(pngs) == n
        with Image.open(pngs[0]) as im:
            assert im.size == (SIZE, SIZE) and im.mode == "RGB"
    meta = json.loads((scenes / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["image_size"] == SIZE
    assert meta["counts"]["train"]["detection_scenes"] == N_TRAIN
    assert meta["source"]["backgrounds"]["train"] and meta["source"]["backgrounds"]["val"]
    assert (scenes / "README.md").read_text().startswith("# fmnist-scenes")


def _drawn(scenes: Path, split: str) -> set[str]:
    """The photographs a split's images were actually cut from: detection scenes name theirs in
    the COCO file; meta.json counts those of detection and classification images together."""
    coco = json.loads((scenes / f"coco/annotations/instances_{split}2017.json").read_text())
    per_scene = {img["background"] for img in coco["images"]}
    counted = json.loads((scenes / "meta.json").read_text())["counts"][split]["backgrounds_used"]
    assert per_scene <= set(counted) and sum(counted.values()) == 2 * len(coco["images"])
    return set(counted)


def test_val_backgrounds_are_photographs_no_train_scene_used(scenes):
    """val measures generalisation: no val image is cut from a photograph that a train image used;
    val_seen (the in-distribution twin) uses only train photographs."""
    meta = json.loads((scenes / "meta.json").read_text())
    declared = {split: {p["name"] for p in ps} for split, ps in meta["source"]["backgrounds"].items()}
    train, val, val_seen = _drawn(scenes, "train"), _drawn(scenes, "val"), _drawn(scenes, "val_seen")
    assert train and val and not train & val, (train, val)
    assert train <= declared["train"] and val <= declared["val"] and val_seen <= declared["train"]
    assert len(val) >= 2 and len(train) >= 5  # the splits really vary their backgrounds
    assert (scenes / "imagefolder/val_seen").is_dir()
    assert len(list((scenes / "imagefolder/val_seen").rglob("*.png"))) == N_VAL_SEEN


def test_background_sets_are_disjoint_and_licensed():
    from splitserve.data.backgrounds import BACKGROUND_SETS, BackgroundSet, Photo

    for spec in BACKGROUND_SETS.values():
        assert not {p.name for p in spec.train} & {p.name for p in spec.val}
        assert all(p.licence and p.author for p in spec.train + spec.val)
    assert len(BACKGROUND_SETS["photos"].val) >= 8 and len(BACKGROUND_SETS["photos"].train) >= 30
    shared = Photo("x", "skimage", "brick", "CC0", "a")
    with pytest.raises(ValueError, match="both train and val"):
        BackgroundSet("bad", train=(shared,), val=(shared,))


def test_missing_wallpaper_package_is_one_clear_error(tmp_path):
    from splitserve.data.backgrounds import Photo

    photo = Photo("Gone", "mate-backgrounds", str(tmp_path / "Gone.jpg"), "GPL-2+", "nobody")
    with pytest.raises(DataError, match="apt-get install -y mate-backgrounds plasma-workspace-wallpapers"):
        photo.load()


@needs_fmnist
def test_generation_is_deterministic_and_seeded(scenes, tmp_path):
    # same seed, different process layout (2 workers) -> byte-identical output
    _generate(tmp_path / "again", workers=2)
    assert _files(scenes) == _files(tmp_path / "again")
    _generate(tmp_path / "other", seed=1)
    a = (scenes / "coco/annotations/instances_train2017.json").read_bytes()
    b = (tmp_path / "other/coco/annotations/instances_train2017.json").read_bytes()
    assert a != b
    assert (scenes / "coco/train2017/000000000001.jpg").read_bytes() != (
        tmp_path / "other/coco/train2017/000000000001.jpg"
    ).read_bytes()


@needs_fmnist
def test_regenerating_into_same_dir_replaces_it(tmp_path):
    make_fmnist_scenes(tmp_path, train_scenes=12, val_scenes=3, image_size=SIZE, progress=False)
    make_fmnist_scenes(tmp_path, train_scenes=4, val_scenes=2, image_size=SIZE, progress=False)
    assert len(list((tmp_path / "coco/train2017").iterdir())) == 4
    assert len(list((tmp_path / "imagefolder/train").rglob("*.png"))) == 4


@needs_fmnist
def test_refuses_to_overwrite_foreign_tree(tmp_path):
    (tmp_path / "coco").mkdir()
    with pytest.raises(DataError, match="refusing to overwrite"):
        make_fmnist_scenes(tmp_path, train_scenes=2, val_scenes=2, image_size=SIZE, progress=False)


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_annotations_are_consistent(scenes, split):
    coco = COCO(str(scenes / f"coco/annotations/instances_{split}2017.json"))
    assert sorted(coco.getCatIds()) == list(range(1, 11))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASS_SLUGS
    assert len(coco.getImgIds()) == (N_TRAIN if split == "train" else N_VAL)
    n_anns = 0
    for image_id in coco.getImgIds():
        info = coco.imgs[image_id]
        assert (info["height"], info["width"]) == (SIZE, SIZE)
        with Image.open(scenes / f"coco/{split}2017" / info["file_name"]) as im:
            assert im.size == (SIZE, SIZE)
        anns = coco.imgToAnns[image_id]
        assert 1 <= len(anns) <= 4  # the last object pasted is never occluded
        union = np.zeros((SIZE, SIZE), dtype=np.int32)
        for ann in anns:
            n_anns += 1
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and w >= 1 and h >= 1 and x + w <= SIZE and y + h <= SIZE
            assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= 10
            m = coco.annToMask(ann)
            assert int(m.sum()) == ann["area"] > 0
            rle_box = mask_utils.toBbox(ann["segmentation"])
            assert np.allclose(rle_box, ann["bbox"], atol=1)
            ys, xs = np.nonzero(m)
            assert np.allclose([xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()], ann["bbox"], atol=1)
            union += m
        # occlusion is resolved: visible instance masks never overlap
        assert union.max() <= 1
    assert n_anns >= len(coco.getImgIds())


# ---------------------------------------------------------------------------------------------
# loaders on the generated trees


def test_detection_dataset_items(scenes):
    ds = detection_dataset(scenes / "coco", "val", train=False, preprocessing=(48, 80))
    assert len(ds) == N_VAL and ds.ids == sorted(ds.coco.getImgIds())
    assert [c["id"] for c in ds.categories] == list(range(1, 11))
    assert ds.label_to_category_id == list(range(1, 11))
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, 48, 80) and image.dtype == torch.float32
        assert type(image) is torch.Tensor and type(target["boxes"]) is torch.Tensor
        boxes, labels = target["boxes"], target["labels"]
        assert boxes.dtype == torch.float32 and boxes.shape[1] == 4 and labels.dtype == torch.long
        assert len(boxes) == len(labels) == len(ds.coco.imgToAnns[ds.ids[i]])
        assert ((0 <= labels) & (labels < 10)).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 80).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= 48).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert target["image_id"] == ds.ids[i] and target["orig_size"] == (SIZE, SIZE)
        # boxes are the annotation's boxes scaled to the input size
        anns = ds.coco.imgToAnns[ds.ids[i]]
        expect = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns])
        expect = expect * torch.tensor([80 / SIZE, 48 / SIZE, 80 / SIZE, 48 / SIZE])
        assert torch.allclose(boxes, expect, atol=1e-3)
        assert labels.tolist() == [ds.label_to_category_id.index(a["category_id"]) for a in anns]
    images, targets = collate_detection([ds[0], ds[1], ds[2]])
    assert images.shape == (3, 3, 48, 80) and len(targets) == 3


def test_detection_train_flip_is_consistent(scenes):
    ev = detection_dataset(scenes / "coco", "train", train=False, preprocessing=(SIZE, SIZE))
    tr = detection_dataset(scenes / "coco", "train", train=True, preprocessing=(SIZE, SIZE))
    assert tr.ids == ev.ids  # every generated scene has a box
    ref_image, ref = ev[0]
    flipped_boxes = ref["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor([SIZE, 0, SIZE, 0])
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        image, target = tr[0]
        if torch.equal(image, ref_image):
            assert torch.allclose(target["boxes"], ref["boxes"])
            seen.add("plain")
        else:
            assert torch.equal(image, ref_image.flip(-1))
            assert torch.allclose(target["boxes"], flipped_boxes)
            seen.add("flipped")
        assert torch.equal(target["labels"], ref["labels"])
    assert seen == {"plain", "flipped"}


def test_segmentation_dataset_items(scenes):
    ev = segmentation_dataset(scenes / "coco", "val", train=False, preprocessing=(SIZE, SIZE))
    assert ev.category_map == "all"
    assert ev.classes == ["background", *CLASS_SLUGS] and len(ev.classes) == 11
    for i in range(len(ev)):
        image, mask = ev[i]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        assert mask.shape == (SIZE, SIZE) and mask.dtype == torch.long
        # at the native size the mask is exactly the instances' masks painted with their classes
        expect = np.zeros((SIZE, SIZE), dtype=np.int64)
        for ann in ev.coco.imgToAnns[ev.ids[i]]:
            expect[ev.coco.annToMask(ann) > 0] = ann["category_id"]
        assert np.array_equal(mask.numpy(), expect)
    small = segmentation_dataset(scenes / "coco", "val", train=False, preprocessing=(32, 40))
    _, mask = small[0]
    assert mask.shape == (32, 40) and set(mask.unique().tolist()) <= set(range(11))  # nearest: no blended labels

    tr = segmentation_dataset(scenes / "coco", "train", train=True, preprocessing=(48, 48))
    torch.manual_seed(0)
    values, padded = set(), 0
    for i in range(len(tr)):
        image, mask = tr[i]
        assert image.shape == (3, 48, 48) and mask.shape == (48, 48) and mask.dtype == torch.long
        values |= set(mask.unique().tolist())
        padded += int((mask == 255).any())
    assert values <= set(range(11)) | {255}
    assert padded > 0, "random scale < 1 should pad some masks with 255"
    images, masks = collate_segmentation([tr[0], tr[1]])
    assert images.shape == (2, 3, 48, 48) and masks.shape == (2, 48, 48)


def test_segmentation_training_keeps_the_aspect_ratio():
    """Training scales what evaluation feeds the network (a shorter-side policy keeps a 2:1 photo
    2:1), not the nominal square; then crops to the nominal size."""
    from torchvision import tv_tensors

    from splitserve.data.transforms import RandomScale, segmentation_transform
    from splitserve.preprocess import Preprocessing

    policy = Preprocessing.shorter_side(32, 128)
    image = tv_tensors.Image(torch.zeros(3, 60, 120, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.zeros(60, 120, dtype=torch.long))
    torch.manual_seed(0)
    for _ in range(5):
        scaled, _ = RandomScale(policy, 0.5, 2.0)(image, mask)
        h, w = scaled.shape[-2:]
        assert abs(w / h - 2.0) < 0.1, (h, w)
    image_out, mask_out = segmentation_transform(True, policy)(image, mask)
    assert tuple(image_out.shape[-2:]) == policy.nominal_size == tuple(mask_out.shape[-2:])


def test_classification_dataset_items(scenes):
    for train in (True, False):
        ds = classification_dataset(scenes / "imagefolder", "train", train=train, preprocessing=(40, 40))
        assert ds.classes == sorted(CLASS_SLUGS) and len(ds) == N_TRAIN
        image, label = ds[0]
        assert image.shape == (3, 40, 40) and image.dtype == torch.float32 and isinstance(label, int)
        assert 0 <= label < 10
        # normalised, not raw [0, 1] pixels
        assert image.min() < 0
    loader = torch.utils.data.DataLoader(ds, batch_size=5, collate_fn=collate_classification)
    images, labels = next(iter(loader))
    assert images.shape == (5, 3, 40, 40) and labels.dtype == torch.long
    # the generator writes classes round-robin; names and labels agree
    assert sorted({ds.classes[label] for _, label in ds.samples}) == sorted(CLASS_SLUGS)


# ---------------------------------------------------------------------------------------------
# a hand-written COCO file: VOC mapping, crowd handling


def _write_coco(root: Path, split: str, data: dict, images: dict[str, tuple[int, int]]) -> None:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    for name, (h, w) in images.items():
        Image.new("RGB", (w, h), (120, 80, 40)).save(root / f"{split}2017" / name)


def _voc_coco(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    cats = [{"id": cid, "name": f"cat{cid}"} for cid in sorted(VOC_CATEGORY_IDS + [90])]
    crowd = np.zeros((40, 60), dtype=np.uint8)
    crowd[30:40, 0:20] = 1
    crowd_rle = mask_utils.encode(np.asfortranarray(crowd))
    crowd_rle["counts"] = crowd_rle["counts"].decode("ascii")
    data = {
        "images": [
            {"id": 7, "file_name": "a.png", "height": 40, "width": 60},
            {"id": 9, "file_name": "b.png", "height": 30, "width": 30},
        ],
        "annotations": [
            # person (COCO 1 -> VOC 15), polygon
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 5, 20, 10], "area": 200, "iscrowd": 0,
             "segmentation": [[10, 5, 30, 5, 30, 15, 10, 15]]},
            # crowd of cars: skipped for detection; painted as car for segmentation (torchvision's references)
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [0, 30, 20, 10], "area": 200, "iscrowd": 1,
             "segmentation": crowd_rle},
            # a non-VOC category: background under the VOC map
            {"id": 3, "image_id": 7, "category_id": 90, "bbox": [40, 20, 10, 10], "area": 100, "iscrowd": 0,
             "segmentation": [[40, 20, 50, 20, 50, 30, 40, 30]]},
            # a degenerate box (w < 1): skipped
            {"id": 4, "image_id": 7, "category_id": 1, "bbox": [5, 5, 0.5, 4], "area": 2, "iscrowd": 0,
             "segmentation": [[5, 5, 5.5, 5, 5.5, 9, 5, 9]]},
            {"id": 5, "image_id": 9, "category_id": 90, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0,
             "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10]]},
        ],
        "categories": cats,
    }
    _write_coco(root, "train", data, {"a.png": (40, 60), "b.png": (30, 30)})
    return root


def test_voc_mapping_and_crowd(tmp_path):
    root = _voc_coco(tmp_path)
    seg = segmentation_dataset(root, "train", train=False, preprocessing=(40, 60))
    assert seg.category_map == "voc" and len(seg.classes) == 21
    assert seg.classes[0] == "background" and seg.classes[15] == "person" and seg.classes[-1] == "tvmonitor"
    assert seg.ids == [7, 9]
    _, mask = seg[0]
    assert mask[10, 20] == 15  # person
    assert mask[35, 10] == seg.classes.index("car")  # crowd -> its class, as torchvision's references
    assert mask[25, 45] == 0  # category 90 is not VOC -> background
    assert set(mask.unique().tolist()) == {0, 7, 15}
    # train keeps images whose VOC objects cover more than 1000 px (torchvision's rule, for images
    # larger than 320x240) or, for smaller ones, 1.3 % of their area: image 7 (402 of 2400 px) is
    # kept, image 9 (no VOC object) is not
    trained = segmentation_dataset(root, "train", train=True, preprocessing=(32, 32))
    assert trained.ids == [7]
    assert trained.min_train_area(7) == pytest.approx(1000 / (320 * 240) * 2400)
    trained.coco.imgs[7].update(height=480, width=640)
    assert trained.min_train_area(7) == 1000  # at COCO's size: exactly torchvision's 1000 px
    # "all": background + every category of the file
    everything = segmentation_dataset(root, "train", train=False, preprocessing=(40, 60), category_map="all")
    assert len(everything.classes) == 22
    _, mask = everything[0]
    assert mask[25, 45] == everything.classes.index("cat90")
    with pytest.raises(DataError, match="category_map"):
        segmentation_dataset(root, "train", train=False, preprocessing=(40, 60), category_map="ade")

    det = detection_dataset(root, "train", train=False, preprocessing=(40, 60))
    assert len(det.categories) == 21
    _, target = det[0]
    assert [det.label_to_category_id[i] for i in target["labels"].tolist()] == [1, 90]  # crowd and w<1 skipped
    assert torch.allclose(target["boxes"][0], torch.tensor([10.0, 5.0, 30.0, 15.0]))
    assert target["orig_size"] == (40, 60)


def test_detection_keeps_empty_images_in_val_only(tmp_path):
    root = tmp_path / "coco"
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": 20, "width": 20}, {"id": 2, "file_name": "b.png", "height": 20, "width": 20}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 5, 5], "area": 25, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    _write_coco(root, "val", data, {"a.png": (20, 20), "b.png": (20, 20)})
    _write_coco(root, "train", data, {"a.png": (20, 20), "b.png": (20, 20)})
    val = detection_dataset(root, "val", train=False, preprocessing=(16, 16))
    assert val.ids == [1, 2]
    _, target = val[1]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert detection_dataset(root, "train", train=True, preprocessing=(16, 16)).ids == [1]


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_coco_root(tmp_path):
    with pytest.raises(DataError, match="no such directory") as e:
        detection_dataset(tmp_path / "nope", "val", train=False, preprocessing=(32, 32))
    assert str(tmp_path / "nope") in str(e.value) and "\n" not in str(e.value)


def test_missing_annotation_file(tmp_path):
    (tmp_path / "val2017").mkdir()
    with pytest.raises(DataError) as e:
        segmentation_dataset(tmp_path, "train", train=True, preprocessing=(32, 32))
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "annotations" / "instances_train2017.json")) and "no such file" in msg
    assert "COCO 2017 tree" in msg


def test_missing_image_dir(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    with pytest.raises(DataError, match="val2017: no such directory"):
        detection_dataset(tmp_path, "val", train=False, preprocessing=(32, 32))


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"images": [', "not valid JSON (line 1 column 13)"),
        ('{\n  "images": [],\n  "annotations": [}', "not valid JSON (line 3"),
        ('{"annotations": [], "categories": []}', "not a COCO instances file (missing 'images')"),
        ('[1, 2]', "not a COCO instances file (top level is a list"),
        ('{"images": [], "categories": []}', "missing 'annotations'"),
        ('{"images": [{"id": 1}], "annotations": [], "categories": []}', "images[0] lacks 'file_name'"),
        ('{"images": [], "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [0, 0, 1, 1]}], "categories": []}',
         "refers to image_id 5"),
    ],
)
def test_broken_annotation_files(tmp_path, content, message):
    _write_coco(tmp_path, "val", {}, {})
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        detection_dataset(tmp_path, "val", train=False, preprocessing=(32, 32))
    assert str(e.value).startswith(str(path)) and message in str(e.value) and "\n" not in str(e.value)


def test_missing_image_file_is_a_data_error(tmp_path):
    data = {"images": [{"id": 1, "file_name": "gone.png", "height": 8, "width": 8}], "annotations": [], "categories": []}
    _write_coco(tmp_path, "val", data, {})
    ds = detection_dataset(tmp_path, "val", train=False, preprocessing=(8, 8))
    with pytest.raises(DataError, match="gone.png: no such file"):
        ds[0]


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="no such directory") as e:
        classification_dataset(tmp_path / "nope", "train", train=True, preprocessing=(32, 32))
    assert str(tmp_path / "nope") in str(e.value)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders") as e:
        classification_dataset(tmp_path, "train", train=True, preprocessing=(32, 32))
    assert str(tmp_path / "train") in str(e.value)
    (tmp_path / "train" / "cats").mkdir()
    (tmp_path / "train" / "cats" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images"):
        classification_dataset(tmp_path, "train", train=False, preprocessing=(32, 32))
    with pytest.raises(DataError, match="val: no such directory"):
        classification_dataset(tmp_path, "val", train=False, preprocessing=(32, 32))


def test_missing_fashion_mnist(tmp_path):
    with pytest.raises(DataError) as e:
        make_fmnist_scenes(tmp_path / "out", train_scenes=2, val_scenes=2, image_size=SIZE, fmnist_dir=tmp_path / "nofm", progress=False)
    msg = str(e.value)
    assert str(tmp_path / "nofm") in msg and "apt-get install dataset-fashion-mnist" in msg and "--fmnist-dir" in msg
    assert not (tmp_path / "out").exists()  # nothing written before the sources are checked


def test_fashion_mnist_reader(tmp_path):
    images, labels = load_fashion_mnist("test", FMNIST_DIR)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and np.bincount(labels).tolist() == [1000] * 10
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"\x01\x02")  # header says 5 bytes, 2 follow
    with pytest.raises(DataError, match="idx header says"):
        read_idx(bad, 1)
    with pytest.raises(DataError, match="not an idx file of 3-D"):
        read_idx(bad, 3)
    bad.write_bytes(b"plain, not gzip")
    with pytest.raises(DataError, match="not a readable gzip file"):
        read_idx(bad, 1)


def test_missing_scikit_image(monkeypatch):
    import sys

    from splitserve.data.backgrounds import load_background_set

    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(DataError, match="pip install scikit-image"):
        load_background_set("builtin")


# ---------------------------------------------------------------------------------------------
# CLI


@needs_fmnist
def test_cli_fmnist_scenes(tmp_path, capsys):
    out = tmp_path / "fm"
    rc = main(["data", "fmnist-scenes", "--out", str(out), "--train", "8", "--val", "4", "--size", "64", "--no-progress",
               "--backgrounds", "builtin"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "train: 8 scenes" in printed and "val_seen: 4 scenes" in printed and str(out / "coco") in printed
    assert len(list((out / "coco/val2017").iterdir())) == 4
    assert len(list((out / "imagefolder/train").rglob("*.png"))) == 8
    ds = detection_dataset(out / "coco", "val", train=False, preprocessing=(64, 64))
    assert len(ds) == 4


def test_cli_fmnist_scenes_missing_source(tmp_path, capsys):
    rc = main(["data", "fmnist-scenes", "--out", str(tmp_path / "fm"), "--fmnist-dir", "/nonexistent"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "/nonexistent" in err and err.startswith("platform data fmnist-scenes: error:")


def test_cli_data_help(capsys):
    assert main(["data"]) == 0
    assert "fmnist-scenes" in capsys.readouterr().out
