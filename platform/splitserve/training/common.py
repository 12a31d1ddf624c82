"""Pieces the training commands share: data, work dirs, weight matching, the real coding path."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..edge import pack
from ..errors import DataError, SplitserveError
from ..models import FeatureCodec
from splitserve_edge.payload import fingerprint_id
from ..plugins import PluginRegistry, TaskPlugin, TrainingHooks, trainable
from ..preprocess import Preprocessing, PreprocessingError
from .engine import EngineConfig
from .sampling import move_to
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


def build_datasets(plugin: TaskPlugin, root: Path, policy: Preprocessing, cfg: SimpleNamespace,
                   data_format: str = "auto", need_train: bool = True) -> tuple[Dataset | None, Dataset, Path]:
    """(train, val, resolved root) through the plugin's hooks; limits applied."""
    data_root = resolve_data_root(plugin, root, data_format)
    train = None
    if need_train:
        train = plugin.build_dataset(data_root, "train", train=True, preprocessing=policy)
        if len(train) == 0:
            raise DataError(f"{data_root}: the train split is empty")
        train = fixed_subset(train, cfg.train_limit)
    val = plugin.build_dataset(data_root, "val", train=False, preprocessing=policy)
    if len(val) == 0:
        raise DataError(f"{data_root}: the val split is empty")
    val = fixed_subset(val, cfg.val_limit)
    return train, val, data_root


def eval_loader(plugin: TaskPlugin, dataset: Dataset, cfg: SimpleNamespace) -> DataLoader:
    return StopSafeLoader(  # stop signals are the main process's to handle
        dataset,
        batch_size=cfg.val_batch_size or cfg.batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        collate_fn=plugin.collate,
        generator=torch.Generator().manual_seed(0),
    )


def engine_config(cfg: SimpleNamespace, workdir: Path, signature: Mapping[str, Any]) -> EngineConfig:
    for name in ("epochs", "batch_size", "num_workers", "log_every"):
        value = getattr(cfg, name)
        if value < (0 if name in ("epochs", "num_workers") else 1):
            raise SplitserveError(f"--{name.replace('_', '-')} must be >= {0 if name in ('epochs', 'num_workers') else 1}, got {value}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise SplitserveError(f"--max-steps must be >= 1, got {cfg.max_steps}")
    return EngineConfig(
        workdir=Path(workdir),
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        seed=cfg.seed,
        max_steps=cfg.max_steps,
        checkpoint_every=cfg.checkpoint_every,
        resume=cfg.resume,
        keep_checkpoint=cfg.keep_checkpoint,
        log_every=cfg.log_every,
        progress=cfg.progress,
        amp=cfg.amp,
        clip_grad=cfg.clip_grad,
        tensorboard=cfg.tensorboard,
        signature=dict(signature),
    )


# Options that may differ between an interrupted run and its --resume.
_RESUME_FREE = {
    "resume", "max_steps", "num_workers", "progress", "tensorboard", "log_every", "checkpoint_every", "device",
    "workdir", "keep_checkpoint", "val_batch_size", "recipe", "command", "command_line",
}


def signature(cfg: SimpleNamespace) -> dict[str, Any]:
    return {k: v for k, v in json.loads(json.dumps(vars(cfg), default=str)).items() if k not in _RESUME_FREE}


def bundle_workdir(out: Path, name: str) -> Path:
    """Logs/checkpoints of a bundle-producing command live next to the bundle, not inside it
    (bundles are written atomically by replacing the directory)."""
    out = Path(out)
    return out.parent / f"{out.name}.runs" / name


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
def coded_features(codec: FeatureCodec):
    """Images → encoder → rounding around the prior's medians → decoder: exactly what the gateway
    computes after lossless entropy decoding (which does not change the latent)."""

    @torch.no_grad()
    def features(x: Tensor) -> Tensor:
        return codec.decode(codec.quantize(x))

    return features


@torch.no_grad()
def measure_rate(codec: FeatureCodec, loader, device: torch.device, estimate: bool = True) -> dict[str, float]:
    """Rates on real data: ``bpp`` from the actual bitstreams of ``codec.compress``,
    ``payload_bpp`` from a one-image payload per image (container header included, as an edge
    device sending images one by one pays), ``bpp_estimate`` (when ``estimate``) from the prior's
    likelihoods of the rounded latent.
    Runs on a copy with fresh coding tables, so the model being trained is not touched."""
    c = copy.deepcopy(codec).to(device).eval()
    c.update(force=True)
    fp = fingerprint_id(c.fingerprint())
    bits = est_bits = payload_bits = 0.0
    pixels = 0
    for batch in loader:
        images = move_to(batch.images if hasattr(batch, "images") else batch[0], device)
        n, _, h, w = images.shape
        strings, (lh, lw) = c.compress(images)
        bits += 8.0 * sum(len(s) for s in strings)
        for s in strings:  # one payload per image, as a device sending images one by one
            payload_bits += 8.0 * len(pack(c, [s], (lh, lw), [(h, w)], fp).to_bytes())
        if estimate:
            est_bits += float(c(images).bits())
        pixels += n * h * w
    if pixels == 0:
        raise DataError("no validation images to measure the rate on")
    out = {"bpp": bits / pixels, "payload_bpp": payload_bits / pixels}
    if estimate:
        out["bpp_estimate"] = est_bits / pixels
    return out


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


def save_codec_run(out: Path, result, validate, codec: FeatureCodec, *, teacher, plugin: TaskPlugin,
                   policy: Preprocessing, head: nn.Module, head_config: Mapping[str, Any],
                   head_keys: Sequence[str], bundle_keys: Sequence[str], provenance: Mapping[str, Any]) -> dict:
    """Write the bundle of a run that trained a codec (distill, train) and return its final metrics.

    The metrics are the last epoch's, or a fresh validation when the run stopped mid-epoch; the
    prior's CDF tables are rebuilt before saving so the fingerprint covers what devices will use.
    """
    from ..bundle import save_bundle

    metrics = (result.last_metrics if result.status == "done" and result.history else {}) or validate(result.epoch)
    codec = codec.to("cpu").eval()
    codec.update(force=True)
    metric = plugin.metric_name
    head_metrics = {plugin.name: {k: float(metrics[k]) for k in (metric, *head_keys) if k in metrics}}
    if metric in metrics and metric in teacher.metrics:
        head_metrics[plugin.name][f"teacher_{metric}"] = float(teacher.metrics[metric])
    save_bundle(out, codec, backbone=teacher.arch, preprocessing=policy,
                heads={plugin.name: (head.to("cpu").eval(), head_config)},
                head_metrics={k: v for k, v in head_metrics.items() if v},
                metrics={k: float(metrics[k]) for k in bundle_keys if k in metrics}, provenance=provenance)
    return metrics
