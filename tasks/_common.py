"""What the built-in plugins share: config merging, the COCO tasks' data hooks, teachers from
torchvision task weights. (The ImageFolder data hooks and the ``evaluate`` helpers are public, in
:mod:`splitserve.plugins`, for third-party plugins too.)"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torchvision
from torch import Tensor, nn
from torch.utils.data import Dataset

from splitserve.errors import PluginError, SplitserveError
from splitserve.models.backbone import build_resnet, resnet_stem
from splitserve.plugins import EvalSample, TaskPlugin
from splitserve.preprocess import Preprocessing


def merge_config(
    task: str, defaults: Mapping[str, Any], config: Mapping[str, Any], category_names: Sequence[str] | None
) -> dict:
    """``defaults | config`` with ``num_classes`` and ``labels`` made consistent.

    Labels default to ``category_names`` when their count matches ``num_classes`` (the
    torchvision dataset the default head mirrors), otherwise to ``"0", "1", ...``.
    """
    cfg = {**defaults, **config}
    if "labels" in config and "num_classes" not in config:
        cfg["num_classes"] = len(config["labels"])
    n = cfg["num_classes"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise PluginError(f"{task}: num_classes must be a positive integer, got {n!r}")
    if "labels" not in config:
        names = category_names if category_names is not None and len(category_names) == n else None
        cfg["labels"] = list(names) if names is not None else [str(i) for i in range(n)]
    cfg["labels"] = [str(label) for label in cfg["labels"]]
    if len(cfg["labels"]) != n:
        raise PluginError(f"{task}: {len(cfg['labels'])} labels given for num_classes={n}")
    return cfg


def class_list_config(names: Sequence[str]) -> dict:
    """The head config of a dataset whose classes are ``names``: one output per name."""
    return {"num_classes": len(names), "labels": list(names)}


def label_of(labels: Sequence[str], index: int) -> str:
    return labels[index] if 0 <= index < len(labels) else str(index)


def source_dataset(batches: Iterable, dataset: Dataset | None, attr: str) -> Any:
    """The dataset carrying ``attr``: ``dataset``, else ``batches.dataset``; Subsets unwrapped."""
    ds = dataset if dataset is not None else getattr(batches, "dataset", None)
    while ds is not None and not hasattr(ds, attr) and hasattr(ds, "dataset"):
        ds = ds.dataset
    return ds if ds is not None and hasattr(ds, attr) else None


class CocoData:
    """The data hooks of a task on a COCO tree (mixed in before the hooks, as
    :class:`splitserve.plugins.ImageFolderData`): ``data_layout = "coco"``, :meth:`build_dataset`
    through the ``splitserve.data`` loader named by ``coco_loader``, and :meth:`eval_samples`: every
    image with its COCO image id as the target."""

    data_layout: ClassVar[str | None] = "coco"
    coco_loader: ClassVar[str]  # "detection_dataset" or "segmentation_dataset"

    def build_dataset(self, root: Path, split: str, *, train: bool, preprocessing: Preprocessing) -> Dataset:
        import splitserve.data

        return getattr(splitserve.data, self.coco_loader)(root, split, train=train, preprocessing=preprocessing)

    def eval_samples(self, dataset: Dataset) -> list[EvalSample]:
        return [EvalSample(dataset.image_dir / dataset.coco.imgs[i]["file_name"], int(i)) for i in dataset.ids]


def resolve_teacher_weights(task_model: str, backbone: str, weights: str | None):
    """Interpret a teacher's ``weights`` name: ``("task", WeightsEnum member)`` for torchvision
    weights of the whole task model ``task_model`` (which wins for "DEFAULT"), ``("backbone",
    name)`` for ImageNet weights of the ResNet, ``(None, None)`` for none."""
    if weights is None:
        return None, None
    task_enum = None
    try:
        task_enum = torchvision.models.get_model_weights(task_model)
    except ValueError:  # torchvision has no such task model for this backbone
        pass
    if task_enum is not None:
        if weights == "DEFAULT":
            return "task", task_enum.DEFAULT
        if weights in task_enum.__members__:
            return "task", task_enum[weights]
    backbone_enum = torchvision.models.get_model_weights(backbone)
    if weights == "DEFAULT" or weights in backbone_enum.__members__:
        return "backbone", weights
    names = ["DEFAULT", *(task_enum.__members__ if task_enum is not None else ()), *backbone_enum.__members__]
    raise SplitserveError(f"unknown weights {weights!r} for {task_model}; choose one of {', '.join(names)}")


def download_state_dict(w) -> dict[str, Tensor]:
    """``w.get_state_dict()``, or one clear line when the download is impossible."""
    try:
        return w.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; hash mismatch a RuntimeError
        raise SplitserveError(
            f"could not download torchvision weights {w} ({type(e).__name__}); pass a local checkpoint instead"
        ) from None


def split_stem_state(sd: Mapping[str, Tensor], prefix: str) -> tuple[dict, dict]:
    """Split a torchvision task state dict whose ResNet lives under ``prefix`` into the stem's
    part (renamed to :func:`resnet_stem`'s Sequential indices) and everything else."""
    stem_names = {"conv1": "0", "bn1": "1", "layer1": "4"}
    stem, rest = {}, {}
    for k, v in sd.items():
        name, _, sub = k[len(prefix):].partition(".") if k.startswith(prefix) else ("", "", "")
        if name in stem_names:
            stem[f"{stem_names[name]}.{sub}"] = v
        else:
            rest[k] = v
    return stem, rest


def task_teacher(
    plugin: TaskPlugin, backbone: str, config: Mapping[str, Any], w, *, body: str, class_rows: tuple[str, ...],
    into: str | None = None, rename: tuple[str, str] | None = None, **resnet_kwargs: Any,
) -> tuple[nn.Module, nn.Module]:
    """(stem, head) of a torchvision task model from its weights ``w`` (a ``WeightsEnum`` member),
    for a resolved ``config``: the ResNet's stem part of the state dict (under ``body``) goes into
    :func:`resnet_stem` (``resnet_kwargs`` for :func:`build_resnet`), the rest into the head (or its
    attribute ``into``), keys starting with ``rename[0]`` renamed to ``rename[1]``. When ``config``'s
    labels differ from the weights' categories, the class rows of the output layers (keys starting
    with one of ``class_rows``) are re-indexed by label name (:func:`adapt_class_rows`)."""
    stem_sd, sd = split_stem_state(download_state_dict(w), body)  # fail fast: before building anything
    head = plugin.build_head(backbone, config)
    stem = resnet_stem(build_resnet(backbone, **resnet_kwargs))
    stem.load_state_dict(stem_sd)
    if rename is not None:
        old, new = rename
        sd = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in sd.items()}
    target = getattr(head, into) if into else head
    src_names = list(w.meta["categories"])
    if config["labels"] != src_names:
        init = target.state_dict()
        for key in [k for k in sd if k.startswith(class_rows)]:
            sd[key], _ = adapt_class_rows(sd[key], init[key], src_names, config["labels"])
    target.load_state_dict(sd)
    return stem, head


def _norm_name(name: str) -> str:
    return name.strip("_ ").lower()


def adapt_class_rows(
    src: Tensor, init: Tensor, src_names: Sequence[str], dst_names: Sequence[str]
) -> tuple[Tensor, int]:
    """Re-index the class rows of a pretrained output layer to another label set, by name.

    ``src`` has ``A * len(src_names)`` rows (A anchors per location, class-minor, as in
    RetinaNet's ``cls_logits``; A=1 for plain classifiers); ``init`` is the freshly initialised
    target of ``A * len(dst_names)`` rows. Classes whose name the pretrained model knows
    (``background`` matches ``__background__``) take its rows; the others keep ``init``.
    Returns the new tensor and the number of classes matched.
    """
    k0, k = len(src_names), len(dst_names)
    a = src.shape[0] // k0
    src = src.reshape(a, k0, *src.shape[1:])
    out = init.detach().clone().reshape(a, k, *init.shape[1:])
    index = {_norm_name(n): i for i, n in enumerate(src_names) if _norm_name(n) not in ("n/a", "")}
    matched = 0
    for j, name in enumerate(dst_names):
        i = index.get(_norm_name(name))
        if i is not None:
            out[:, j] = src[:, i]
            matched += 1
    return out.reshape(init.shape), matched
