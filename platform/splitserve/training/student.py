"""What ``distill`` and ``train`` share: both train a new codec (the student) against a teacher and
write a bundle that serves the teacher's task right away.

``--teacher`` may be given several times (``TASK=DIR``, one per task, one backbone), each with a
``--teacher-weight TASK=W`` (default 1); the first teacher is the one whose data and preprocessing
the run uses and whose task metric it reports."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..bundle import save_bundle
from ..errors import SplitserveError
from ..models import FeatureCodec, build_codec
from ..models.backbone import FEATURE_CHANNELS
from ..plugins import TrainingHooks
from . import common
from .rates import rate_entries, rate_weights
from .refit import refit_entropy_model
from .stage import Plan, Stage, bundle_workdir
from .teacher import Teacher, load_teachers


class StudentStage(Stage):
    """A stage that trains a codec of the asked family from ``--teacher`` and writes ``--out``; with
    several rate weights (``--betas``, ``--lmbdas``) a variable-rate codec, one rate per batch."""

    command: str  # "distill" or "train": the plugin check and the work dir's name
    rate_flag: str  # "beta" or "lmbda": the option weighting the rate term (--NAME, --NAMEs), the manifest's name

    def __init__(self, cfg: SimpleNamespace):
        super().__init__(cfg)
        self.rate_weights = rate_weights(getattr(cfg, self.rate_flag), getattr(cfg, f"{self.rate_flag}s", None),
                                         self.rate_flag)
        self.default_rate = default_rate(getattr(cfg, "default_rate", None), len(self.rate_weights))
        self.prior = getattr(cfg, "prior", None) or "per-rate"
        if self.prior != "per-rate" and len(self.rate_weights) == 1:
            raise SplitserveError(f"--prior {self.prior} needs --{self.rate_flag}s: a single-rate codec has one prior")
        self.plugins = common.registry()
        self.teachers = load_teachers(cfg.teacher, self.plugins)
        self.weights = teacher_weights(getattr(cfg, "teacher_weight", None), self.teachers, self.plugins)
        for teacher in self.teachers:
            common.training_plugin(self.plugins, teacher.task, self.command)
        self.teacher = self.teachers[0]
        self.plugin = common.training_plugin(self.plugins, self.teacher.task, self.command)

    def default_workdir(self) -> Path:
        return bundle_workdir(self.cfg.out, self.command)

    def new_codec(self, data_plugin: TrainingHooks) -> tuple[FeatureCodec, common.TaskData]:
        """A fresh codec of the asked family (seeded) and the data under the run's preprocessing
        (the teacher's unless overridden)."""
        torch.manual_seed(self.cfg.seed)
        codec = codec_for(self.cfg, self.teacher.arch, rates=len(self.rate_weights), prior=self.prior)
        return codec, common.task_data(data_plugin, self.cfg, self.teacher.preprocessing, codec)

    def refit(self, codec: FeatureCodec, data: common.TaskData, collate) -> Callable[[], dict[str, Any]] | None:
        """The plan's ``finish``: refit the trained codec's entropy model (``--refit-steps``,
        :func:`~splitserve.training.refit.refit_entropy_model`) on training images in a seeded order."""
        steps = getattr(self.cfg, "refit_steps", 0)
        if steps < 0:
            raise SplitserveError(f"--refit-steps must be >= 0, got {steps}")
        if not steps:
            return None

        def finish() -> dict[str, Any]:
            batches = torch.utils.data.DataLoader(data.train_set, batch_size=self.cfg.batch_size, shuffle=True,
                                                  collate_fn=collate,
                                                  generator=torch.Generator().manual_seed(self.cfg.seed))
            fit = refit_entropy_model(codec, batches, steps=steps, seed=self.cfg.seed, device=self.info.device)
            if not fit:
                return {}
            self.note(f"[{self.command}] refitted the entropy model on {fit['images']} training images: "
                      f"{fit['bits_before'] / 8:.1f} -> {fit['bits_after'] / 8:.1f} bytes per image as charged")
            return {"prior_refit": fit}

        return finish

    def save(self, plan: Plan, head: nn.Module, head_config: dict, metrics: dict[str, float],
             provenance: dict[str, Any], head_keys: tuple[str, ...], bundle_keys: tuple[str, ...],
             other_teachers: Sequence[Teacher] = ()) -> None:
        """Write the bundle: the codec with fresh coding tables (so the fingerprint covers what
        devices will use), ``head`` with its task metric next to the teacher's, and the heads of
        ``other_teachers`` as they are (the decoded feature was distilled toward their stems too)."""
        codec = plan.objective.codec.to("cpu").eval()
        codec.update(force=True)
        plugin, metric = self.plugin, self.plugin.metric_name
        rates = len(self.rate_weights)
        per_rate_keys = tuple(f"{key}_r{k}" for key in (metric, *head_keys) for k in range(rates)) if rates > 1 else ()
        head_metrics = {k: float(metrics[k]) for k in (metric, *head_keys, *per_rate_keys) if k in metrics}
        if metric in metrics and metric in self.teacher.metrics:
            head_metrics[f"teacher_{metric}"] = float(self.teacher.metrics[metric])
        heads = {plugin.name: (head.to("cpu").eval(), head_config)}
        all_metrics = {plugin.name: head_metrics} if head_metrics else {}
        for other in other_teachers:
            heads[other.task] = (other.head.to("cpu").eval(), other.config)
            other_metric = self.plugins.get(other.task).metric_name
            if other_metric in other.metrics:
                all_metrics[other.task] = {f"teacher_{other_metric}": float(other.metrics[other_metric])}
        save_bundle(self.cfg.out, codec, backbone=self.teacher.arch, preprocessing=plan.data.policy,
                    heads=heads, head_metrics=all_metrics,
                    metrics={k: float(metrics[k]) for k in bundle_keys if k in metrics}, provenance=provenance,
                    rates=rate_entries(metrics, rates, self.rate_flag, self.rate_weights),
                    default_rate=self.default_rate)

    def summary(self, metrics: dict[str, float], extra: str = "") -> str:
        """The line that says what was written: the rate (the default rate's, and every rate's bytes
        for a variable-rate codec), ``extra``, and the task metric."""
        metric = self.plugin.metric_name
        task = f", {self.plugin.name} {metric} {metrics[metric]:.2f}" if metric in metrics else ""
        line = (f"wrote bundle {self.cfg.out}: bpp {metrics['bpp']:.4f} (coded bytes), payload "
                f"{metrics['payload_bpp']:.4f} ({metrics['bytes']:.1f} B per image){extra}{task}")
        rates = len(self.rate_weights)
        if rates > 1:
            sizes = ", ".join(f"{metrics[f'bytes_r{k}']:.1f}" for k in range(rates))
            line += f"; {rates} rates at {sizes} B per image (default: rate {self.default_rate})"
        return line

    def rate_provenance(self) -> dict[str, Any]:
        """``beta: B`` (one rate), or ``betas: [...]`` (rate 0 first) and the default rate; and
        ``prior_lr`` when the entropy model had its own optimizer (a recipe may set it unseen in
        the command line)."""
        name, weights = self.rate_flag, self.rate_weights
        prior_lr = getattr(self.cfg, "prior_lr", None)
        out = {"prior_lr": prior_lr} if prior_lr is not None else {}
        if len(weights) == 1:
            return {name: weights[0], **out}
        return {f"{name}s": list(weights), "default_rate": self.default_rate, **out}


def default_rate(value: int | None, rates: int) -> int:
    """``--default-rate``: by default the highest rate (the largest payload, the most accurate)."""
    if value is None:
        return rates - 1
    if not 0 <= value < rates:
        raise SplitserveError(f"--default-rate {value} is outside the codec's rates 0..{rates - 1}")
    return int(value)


def codec_for(cfg: SimpleNamespace, arch: str, rates: int = 1, prior: str = "per-rate") -> FeatureCodec:
    """The codec a training command asked for: ``--encoder`` family, its output channels adapted to
    the teacher's backbone, plus ``--blocks`` / ``--latent-channels`` / ``--codec-option K=V``
    (whatever the family's builder accepts; it names what it does not), coding at ``rates`` rates
    with the rate model ``prior`` (``--prior``)."""
    config: dict = {"feature_channels": FEATURE_CHANNELS[arch], **dict(cfg.codec_option or {})}
    if cfg.blocks is not None:
        config["blocks"] = cfg.blocks
    if cfg.latent_channels is not None:
        config["latent_channels"] = cfg.latent_channels
    return build_codec(cfg.encoder, rates=rates, **{"prior": prior, **config})


def teacher_weights(value: Any, teachers: Sequence[Teacher], plugins) -> list[float]:
    """``--teacher-weight TASK=W`` pairs as one weight per teacher (1.0 where not given)."""
    weights = {t.task: 1.0 for t in teachers}
    for key, weight in value.items() if isinstance(value, dict) else (value or []):
        task = plugins.get(str(key)).name
        if task not in weights:
            raise SplitserveError(f"--teacher-weight {key}: no --teacher for that task")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise SplitserveError(f"--teacher-weight {key}={weight}: a weight is a number >= 0")
        weights[task] = float(weight)
    return [weights[t.task] for t in teachers]
