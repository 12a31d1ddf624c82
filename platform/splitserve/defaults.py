"""The default bundle, so ``make serve`` answers real requests with no download or build step.

The package ships a trained bundle (``assets/default-bundle``: a feature codec on fmnist-scenes at
64 px, a head for each built-in task plugin on one shared trunk, server side in fp16;
``make default-bundle`` rebuilds it). On first use it is copied into the cache directory, so that
``platform finetune`` without ``--bundle`` changes the user's copy, never the installed package.
A source tree without the asset falls back to an untrained bundle with deterministic initial
weights (seed 0) for the built-in tasks: real coding and decoding, untrained predictions.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from importlib.metadata import distribution
from pathlib import Path

import torch

UNTRAINED_BUNDLE = "default-untrained-v2"  # bump with the bundle format: a stale cache is rebuilt, not refused
PACKAGED_BUNDLE = Path(__file__).parent / "assets" / "default-bundle"
DEFAULT_BACKBONE = "resnet18"
DEFAULT_INPUT_SIZE = (224, 224)
DEFAULT_SEED = 0
DISTRIBUTION = "splitserve"
FMNIST_LABELS = [
    "t-shirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
]  # fmt: skip


def builtin_tasks() -> list[str]:
    """The tasks this distribution registers itself: its own ``splitserve.tasks`` entry points,
    whatever other plugins are installed. The core names none of them."""
    from .plugins import ENTRY_POINT_GROUP

    return sorted(ep.name for ep in distribution(DISTRIBUTION).entry_points if ep.group == ENTRY_POINT_GROUP)


def cache_dir() -> Path:
    """``$SPLITSERVE_HOME`` or ``~/.cache/splitserve``."""
    env = os.environ.get("SPLITSERVE_HOME")
    return Path(env) if env else Path.home() / ".cache" / "splitserve"


def default_bundle_name() -> str:
    """The cache name of the default: a hash of the packaged manifest (which holds every file's
    SHA-256), so a package whose default changed in any file, heads included, is copied afresh
    instead of a stale copy being served."""
    manifest = PACKAGED_BUNDLE / "manifest.json"
    if manifest.is_file():
        return "default-" + hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    return UNTRAINED_BUNDLE


def default_bundle_path() -> Path:
    return cache_dir() / "bundles" / default_bundle_name()


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
    """Path of the default bundle, copied (or, without the asset, built) on first use."""
    path = default_bundle_path()
    if (path / "manifest.json").is_file():
        return path
    if (PACKAGED_BUNDLE / "manifest.json").is_file():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(PACKAGED_BUNDLE, tmp)
        try:
            tmp.rename(path)  # atomic: a concurrent first use sees a whole bundle or none
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (path / "manifest.json").is_file():
                raise
        return path
    build_untrained_bundle(path, tasks=builtin_tasks())
    return path


def resolve_bundle(path: str | Path | None) -> Path:
    """``--bundle`` / ``$SPLITSERVE_BUNDLE`` / the default bundle, in that order."""
    chosen = path or os.environ.get("SPLITSERVE_BUNDLE")
    return Path(chosen) if chosen else ensure_default_bundle()
