"""The embedded default bundle, so ``make serve`` answers real requests with no download.

Until a trained default ships, it is an Entropic Student codec with a ResNet-18 backbone and
one head per installed plugin, all with deterministic initial weights (seed 0): real coding,
real decoding, real heads — untrained predictions. Built once into the cache directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

DEFAULT_BUNDLE = "default-untrained-v2"  # bump with the bundle format: a stale cache is rebuilt, not refused
DEFAULT_BACKBONE = "resnet18"
DEFAULT_INPUT_SIZE = (224, 224)
DEFAULT_SEED = 0
BUILTIN_TASKS = ("classification", "detection", "segmentation")
FMNIST_LABELS = [
    "t-shirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
]  # fmt: skip


def cache_dir() -> Path:
    """``$SPLITSERVE_HOME`` or ``~/.cache/splitserve``."""
    env = os.environ.get("SPLITSERVE_HOME")
    return Path(env) if env else Path.home() / ".cache" / "splitserve"


def default_bundle_path() -> Path:
    return cache_dir() / "bundles" / DEFAULT_BUNDLE


def build_untrained_bundle(path: Path, *, family: str = "entropic_student", backbone: str = DEFAULT_BACKBONE,
                           input_size: tuple[int, int] = DEFAULT_INPUT_SIZE, tasks: list[str] | None = None,
                           seed: int = DEFAULT_SEED, codec_config: dict | None = None) -> Path:
    """Write a bundle with deterministic initial weights for every requested (default: installed) task."""
    from .bundle import default_provenance, save_bundle
    from .models import build_codec
    from .models.backbone import FEATURE_CHANNELS
    from .plugins import PluginRegistry, TrainingHooks

    registry = PluginRegistry.discover()
    plugins = registry.resolve(tasks) if tasks else list(registry)
    torch.manual_seed(seed)
    codec = build_codec(family, feature_channels=FEATURE_CHANNELS[backbone], **(codec_config or {})).eval()
    heads = {}
    for plugin in plugins:  # heads speak the fmnist-scenes label set (the benchmark we train on)
        stored = plugin.config_for_classes(FMNIST_LABELS) if isinstance(plugin, TrainingHooks) else {}
        config = plugin.resolve_config(backbone, stored)
        heads[plugin.name] = (plugin.build_head(backbone, config).eval(), config)
    save_bundle(
        path, codec, backbone=backbone, input_size=input_size, heads=heads,
        provenance=default_provenance(training="none: deterministic initial weights", seed=seed),
    )
    return path


def ensure_default_bundle() -> Path:
    """Path of the default bundle, building it on first use (a few seconds)."""
    path = default_bundle_path()
    if not (path / "manifest.json").is_file():
        build_untrained_bundle(path, tasks=list(BUILTIN_TASKS))
    return path


def resolve_bundle(path: str | Path | None) -> Path:
    """``--bundle`` / ``$SPLITSERVE_BUNDLE`` / the default bundle, in that order."""
    chosen = path or os.environ.get("SPLITSERVE_BUNDLE")
    return Path(chosen) if chosen else ensure_default_bundle()
