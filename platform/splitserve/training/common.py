"""Pieces the training commands share: plugins and data, weight matching, the real coding path."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import DataError, SplitserveError
from ..models import FeatureCodec
from ..plugins import EvaluationHooks, PluginRegistry, TaskPlugin, TrainingHooks, trainable
from ..preprocess import Preprocessing, PreprocessingError
from .stopping import StopSafeLoader


def registry() -> PluginRegistry:
    return PluginRegistry.discover()


def training_plugin(plugins: PluginRegistry, task: str, command: str) -> TrainingHooks:
    """The installed plugin for ``task``, which must implement the training hooks."""
    return trainable(plugins.get(task), command)


def image_size(value: Sequence[int] | int | None, default: Sequence[int]) -> tuple[int, int]:
    if value is None or value == []:
        return (int(default[0]), int(default[1]))
    if isinstance(value, int):
        value = [value]
    value = [int(v) for v in value]
    if len(value) == 1:
        value = value * 2
    if len(value) != 2 or min(value) < 8:
        raise SplitserveError(f"--image-size takes one side or H W (>= 8), got {' '.join(map(str, value))}")
    return (value[0], value[1])


def preprocessing(cfg: SimpleNamespace, inherited: Preprocessing, multiple: int = 1) -> Preprocessing:
    """The run's preprocessing: ``--preprocessing SPEC``, else ``--image-size`` (a fixed size), else
    the one ``inherited`` from the teacher/bundle — rounded to the codec's input ``multiple``."""
    try:
        if getattr(cfg, "preprocessing", None):
            return Preprocessing.from_spec(cfg.preprocessing, multiple)
        if cfg.image_size:
            return Preprocessing.fixed(*image_size(cfg.image_size, inherited.nominal_size), multiple=multiple)
        return inherited.with_multiple(multiple)
    except PreprocessingError as e:
        raise SplitserveError(str(e)) from None


def resolve_data_root(plugin: TaskPlugin, root: Path, data_format: str = "auto") -> Path:
    """``root`` itself, or its ``imagefolder/`` / ``coco/`` part when it is an fmnist-scenes tree
    (or any directory holding both)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such data directory")
    if data_format not in ("auto", "", None):
        sub = root / data_format
        return sub if sub.is_dir() else root
    has_both = (root / "imagefolder").is_dir() and (root / "coco").is_dir()
    if has_both:
        sub = getattr(plugin, "data_layout", None)  # the plugin names the layout its loader reads
        if sub and (root / sub).is_dir():
            return root / sub
    return root


def fixed_subset(dataset: Dataset, limit: int | None, seed: int = 0) -> Dataset:
    """A fixed random subset of ``limit`` items (independent of --seed, so runs compare)."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise SplitserveError(f"a data limit must be >= 1, got {limit}")
    g = torch.Generator().manual_seed(1234 + seed)
    idx = sorted(torch.randperm(len(dataset), generator=g)[:limit].tolist())
    return Subset(dataset, idx)


def base_dataset(ds: Dataset) -> Dataset:
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


@dataclass
class TaskData:
    """A run's data: the preprocessing it trains with, the task's datasets made under it (limits
    applied), where they were found, and what they say about the head (classes, labels)."""

    policy: Preprocessing
    train_set: Dataset
    val_set: Dataset
    root: Path
    config: dict[str, Any]


def task_data(plugin: TrainingHooks, cfg: SimpleNamespace, inherited: Preprocessing,
              codec: FeatureCodec | None = None, data_format: str = "auto") -> TaskData:
    """The datasets of ``cfg.data`` through the plugin's hooks, under the run's preprocessing (see
    :func:`preprocessing`; fitted to ``codec``'s input when there is one)."""
    policy = preprocessing(cfg, inherited, codec.input_multiple if codec is not None else 1)
    if codec is not None:
        codec.check_input_size(*policy.nominal_size)
    root = resolve_data_root(plugin, cfg.data, data_format)
    splits = []
    for split in ("train", "val"):
        dataset = plugin.build_dataset(root, split, train=split == "train", preprocessing=policy)
        if len(dataset) == 0:
            raise DataError(f"{root}: the {split} split is empty")
        splits.append(fixed_subset(dataset, cfg.train_limit if split == "train" else cfg.val_limit))
    return TaskData(policy, *splits, root, plugin.dataset_config(base_dataset(splits[0])))


def eval_loader(plugin: TaskPlugin, dataset: Dataset, cfg: SimpleNamespace) -> DataLoader:
    return StopSafeLoader(  # stop signals are the main process's to handle
        dataset,
        batch_size=cfg.val_batch_size or cfg.batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        collate_fn=plugin.collate,
        generator=torch.Generator().manual_seed(0),
    )


# -- weights -----------------------------------------------------------------------------------
def load_matching(module: nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    """Load the entries of ``state`` whose name and shape fit ``module``; return the names of the
    module's entries left as initialised (missing from ``state`` or of another shape)."""
    own = module.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    module.load_state_dict(usable, strict=False)
    return [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]


def describe_keys(keys: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# -- the real coding path ----------------------------------------------------------------------
def coded_features(codec: FeatureCodec, rate: int = 0):
    """Images → encoder → (rate ``rate``'s gain) → rounding around the prior's medians → decoder:
    exactly what the gateway computes after lossless entropy decoding (which does not change the latent)."""

    @torch.no_grad()
    def features(x: Tensor) -> Tensor:
        return codec.decode(codec.quantize(x, rate))

    return features


@torch.no_grad()
def measure_rate(codec: FeatureCodec, policy: Preprocessing, plugin: TrainingHooks, dataset: Dataset,
                 device: torch.device, estimate: bool = True) -> list[dict[str, float]]:
    """What ``codec`` costs on ``dataset``'s images at each of its rates, measured as ``platform
    evaluate`` measures a bundle: every image alone, at its own (unpadded) input size, made from its
    file by the device's preprocessing and coded by the device's encoder into a one-image payload
    (the transform once, then :meth:`splitserve.edge.EdgeEncoder.encode_latent` at each rate), and evaluation's own
    :func:`~splitserve.evaluation.methods.rate_of` for the bytes and bpp per image. Images come from
    their files where the plugin lists them (:meth:`~splitserve.plugins.EvaluationHooks.eval_samples`),
    else from the dataset's items one at a time.

    One dict per rate: ``bytes`` (payload bytes per image, header included), ``payload_bpp`` (each
    image's payload bits over its input pixels, averaged), ``bpp`` (the same for the entropy-coded
    bitstream alone) and, with ``estimate``, ``bpp_estimate`` (the prior's likelihoods of the
    rounded latent). Runs on a copy with fresh coding tables, so the model being trained is not touched."""
    from ..edge import EdgeEncoder
    from ..evaluation.methods import rate_of

    c = copy.deepcopy(codec).to(device).eval()
    c.update(force=True)
    edge = EdgeEncoder(c, policy)
    payload_bytes: list[list[int]] = [[] for _ in range(c.rates)]
    coded: list[list[int]] = [[] for _ in range(c.rates)]
    estimated: list[list[float]] = [[] for _ in range(c.rates)]
    input_hws: list[tuple[int, int]] = []
    for x, sizes in single_images(plugin, dataset, edge):
        x = x.to(device)
        input_hws.append((int(x.shape[-2]), int(x.shape[-1])))
        y = c.encoder(x)  # once: every rate codes this latent, as on the device
        latent = y.float().cpu().numpy()
        for k in range(c.rates):
            encoded = edge.encode_latent(latent, sizes, input_hws[-1], rate=k)
            payload_bytes[k].append(encoded.num_bytes)
            coded[k].append(len(encoded.payload.strings[0]))
            if estimate:
                estimated[k].append(float(-torch.log2(c.through_prior(y, k)[1]).sum()) / 8)
    if not input_hws:
        raise DataError("no validation images to measure the rate on")
    out = []
    for k in range(c.rates):
        per_image, payload_bpp = rate_of(payload_bytes[k], input_hws)
        rate = {"bpp": rate_of(coded[k], input_hws)[1], "payload_bpp": payload_bpp, "bytes": per_image}
        if estimate:
            rate["bpp_estimate"] = rate_of(estimated[k], input_hws)[1]
        out.append(rate)
    return out


def single_images(plugin: TrainingHooks, dataset: Dataset, edge) -> Iterator[tuple[Tensor, list[tuple[int, int]]]]:
    """``dataset``'s images one at a time as (1, 3, H, W) model inputs with their original sizes:
    from their files through ``edge``'s preprocessing (as ``platform evaluate`` encodes them) where
    the plugin lists the files, else the dataset's items (a batch of one is never padded)."""
    files = image_files(plugin, dataset)
    if files is not None:
        for path in files:
            yield edge.preprocess([path])
        return
    for i in range(len(dataset)):
        batch = plugin.collate([dataset[i]])
        yield batch.images, [m.original_size for m in batch.metas] or [tuple(batch.images.shape[-2:])]


def image_files(plugin: TrainingHooks, dataset: Dataset) -> list[Path] | None:
    """The files of ``dataset``'s items (a plugin's dataset, or a subset of one), in order, as the
    plugin's evaluation hooks list them; None where the plugin has none."""
    if not isinstance(plugin, EvaluationHooks):
        return None
    indices = list(range(len(dataset)))
    while isinstance(dataset, Subset):
        indices = [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    samples = plugin.eval_samples(dataset)
    return [Path(samples[i].path) for i in indices]


def config_for_json(config: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(config), default=str))


def options_of(cfg: SimpleNamespace) -> dict[str, Any]:
    """Loss options for the plugin: ``--option KEY=VALUE`` pairs, then the named flags."""
    from .options import options_dict

    out = options_dict(getattr(cfg, "option", None))
    for key in ("temperature", "kd_alpha"):
        value = getattr(cfg, key, None)
        if value is not None:
            out[key] = value
    return out
