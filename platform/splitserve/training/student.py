"""What ``distill`` and ``train`` share: both train a new codec (the student) against a teacher and
write a bundle that serves the teacher's task right away."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..bundle import save_bundle
from ..models import FeatureCodec, build_codec
from ..models.backbone import FEATURE_CHANNELS
from ..plugins import TrainingHooks
from . import common
from .stage import Plan, Stage, bundle_workdir
from .teacher import load_teacher


class StudentStage(Stage):
    """A stage that trains a codec of the asked family from ``--teacher`` and writes ``--out``."""

    command: str  # "distill" or "train": the plugin check and the work dir's name

    def __init__(self, cfg: SimpleNamespace):
        super().__init__(cfg)
        self.plugins = common.registry()
        self.teacher = load_teacher(cfg.teacher, self.plugins)
        self.plugin = common.training_plugin(self.plugins, self.teacher.task, self.command)

    def default_workdir(self) -> Path:
        return bundle_workdir(self.cfg.out, self.command)

    def new_codec(self, data_plugin: TrainingHooks) -> tuple[FeatureCodec, common.TaskData]:
        """A fresh codec of the asked family (seeded) and the data under the run's preprocessing
        (the teacher's unless overridden)."""
        torch.manual_seed(self.cfg.seed)
        codec = codec_for(self.cfg, self.teacher.arch)
        return codec, common.task_data(data_plugin, self.cfg, self.teacher.preprocessing, codec)

    def save(self, plan: Plan, head: nn.Module, head_config: dict, metrics: dict[str, float],
             provenance: dict[str, Any], head_keys: tuple[str, ...], bundle_keys: tuple[str, ...]) -> None:
        """Write the bundle: the codec with fresh coding tables (so the fingerprint covers what
        devices will use) and ``head`` with its task metric next to the teacher's."""
        codec = plan.objective.codec.to("cpu").eval()
        codec.update(force=True)
        plugin, metric = self.plugin, self.plugin.metric_name
        head_metrics = {k: float(metrics[k]) for k in (metric, *head_keys) if k in metrics}
        if metric in metrics and metric in self.teacher.metrics:
            head_metrics[f"teacher_{metric}"] = float(self.teacher.metrics[metric])
        save_bundle(self.cfg.out, codec, backbone=self.teacher.arch, preprocessing=plan.data.policy,
                    heads={plugin.name: (head.to("cpu").eval(), head_config)},
                    head_metrics={plugin.name: head_metrics} if head_metrics else {},
                    metrics={k: float(metrics[k]) for k in bundle_keys if k in metrics}, provenance=provenance)


def codec_for(cfg: SimpleNamespace, arch: str) -> FeatureCodec:
    """The codec a training command asked for: ``--encoder`` family, its output channels adapted to
    the teacher's backbone, plus ``--blocks`` / ``--latent-channels`` / ``--codec-option K=V``
    (whatever the family's builder accepts; it names what it does not)."""
    config: dict = {"feature_channels": FEATURE_CHANNELS[arch], **dict(cfg.codec_option or {})}
    if cfg.blocks is not None:
        config["blocks"] = cfg.blocks
    if cfg.latent_channels is not None:
        config["latent_channels"] = cfg.latent_channels
    return build_codec(cfg.encoder, **config)
