"""``platform finetune``: stage 2 for any task plugin, on a bundle's frozen encoder and prior.

Features come from the real inference path (encoder → rounding around the prior's medians →
decoder), so the head learns on exactly what the gateway will hand it. The encoder and prior
never change, hence neither does the bundle's fingerprint: every deployed device keeps working.
As in both papers' stage 2 (Entropic Student Fig. 3 right, the reference configs), the decoder is
trained with the head; ``--freeze-decoder`` keeps it fixed (a deviation, for bundles whose other
heads must keep seeing the same features).
The loss is the plugin's own (``plugin.loss``); with a teacher of the same task it also gets the
teacher's output for knowledge distillation where the plugin defines one (classification: 0.5·CE +
0.5·KL at ``--temperature``); detection and segmentation take only their initial head from it.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..bundle import load_codec, load_head, load_trunk, read_manifest, update_heads
from ..defaults import resolve_bundle
from ..errors import BundleError, SplitserveError
from ..models import FeatureCodec
from ..models.backbone import SharedTrunk, attach_trunk, own_state, tail_path
from ..plugins import TaskBatch, TaskPlugin
from . import common
from .objective import Objective, freeze
from .rates import PerStepRate, every_rate, is_per_rate, per_rate
from .stage import Plan, Stage, bundle_workdir
from .teacher import Teacher, evaluate, load_teacher


class CodedObjective(PerStepRate, Objective):
    """An objective on a bundle's codec with the encoder, every rate's prior and the gains frozen
    (the fingerprint cannot change): features come from the real coding path, at the rate drawn
    for each step on a variable-rate codec (:class:`~splitserve.training.rates.PerStepRate`), so what
    is trained serves every rate. ``train_decoder``: the decoder learns too."""

    aux_terms = ()

    def __init__(self, codec: FeatureCodec, train_decoder: bool, seed: int = 0):
        super().__init__()
        self.codec = codec
        freeze(codec.encoder)
        freeze(codec.priors)  # every rate's prior, or the shared one and its tables
        for p in codec.prior_parameters():  # the gains too
            p.requires_grad_(False)
        if not train_decoder:
            freeze(codec.decoder)
        self.train_decoder = train_decoder
        self.draw_rates(codec.rates, seed)
        self.frozen = ("codec.encoder", "codec.priors") + (() if train_decoder else ("codec.decoder",))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y_hat = self.codec.quantize(images, self.rate)
        if self.train_decoder:
            return self.codec.decode(y_hat)
        with torch.no_grad():
            return self.codec.decode(y_hat)

    def rate_logs(self) -> dict[str, torch.Tensor]:
        return {"rate_index": torch.tensor(float(self.rate))} if self.codec.rates > 1 else {}

    def decoder_state(self) -> dict[str, torch.Tensor]:
        """The decoder's weights when it trains (part of what the best epoch remembers), else nothing."""
        if not self.train_decoder:
            return {}
        return {f"codec.decoder.{k}": v for k, v in self.codec.decoder.state_dict().items()}


class FinetuneObjective(CodedObjective):
    def __init__(self, plugin: TaskPlugin, codec: FeatureCodec, head: nn.Module, teacher: Teacher | None,
                 options: dict[str, Any], train_decoder: bool, frozen_trunk: str | None = None, seed: int = 0):
        super().__init__(codec, train_decoder, seed)
        self.plugin = plugin
        self.head = head
        self.teacher_stem = freeze(teacher.stem) if teacher is not None else None
        self.teacher_head = freeze(teacher.head) if teacher is not None else None
        self.options = options
        self.frozen += ("teacher_stem", "teacher_head") + ((f"head.{frozen_trunk}",) if frozen_trunk else ())

    def forward(self, batch: TaskBatch):
        h = self.features(batch.images)
        teacher_output = None
        if self.teacher_head is not None:
            with torch.no_grad():
                teacher_output = self.plugin.head_output(self.teacher_head, self.teacher_stem(batch.images), batch)
        return self.plugin.loss(self.head, h, batch, teacher_output=teacher_output, options=self.options), \
            self.rate_logs()

    def export_state(self):
        skip = tuple(f"{n}." for n in self.frozen_modules())
        return {**{f"head.{k}": v for k, v in self.head.state_dict().items() if not f"head.{k}".startswith(skip)},
                **self.decoder_state()}


class FinetuneStage(Stage):
    def __init__(self, cfg: SimpleNamespace, start: tuple[dict[str, Any], str] | None = None):
        """``start``: (objective state, how it was made) the head and decoder start from instead
        (the reference procedure's feature-distillation step)."""
        super().__init__(cfg)
        self.start = start
        plugins = common.registry()
        self.plugin = common.training_plugin(plugins, cfg.task, "finetune")
        self.bundle, self.manifest, self.codec = open_bundle(cfg.bundle)
        self.teacher = load_teacher(cfg.teacher, plugins) if cfg.teacher else None
        backbone = self.manifest.backbone
        if self.teacher is not None and self.teacher.arch != backbone:
            raise SplitserveError(f"teacher {self.teacher.path} is a {self.teacher.arch}, the bundle's backbone is "
                                  f"{backbone}")
        self.plugin.feature_spec(backbone).require(self.plugin.name, self.codec.feature_channels, self.codec.stride)
        self.shared = bool(cfg.shared_trunk)
        self.others = [t for t in self.manifest.tasks if t != self.plugin.name]
        # other heads on a shared trunk need the decoder as it is; so do other heads under the
        # reference procedure (one decoder feeds every head: decode once)
        self.train_decoder = not (cfg.freeze_decoder or self.shared or (reference(cfg) and self.others))
        self.trunk = load_trunk(self.bundle, self.manifest)
        self.new_trunk: SharedTrunk | None = None

    def default_workdir(self) -> Path:
        return bundle_workdir(self.bundle, f"finetune-{self.plugin.name}")

    def plan(self) -> Plan:
        cfg, plugin, manifest, teacher = self.cfg, self.plugin, self.manifest, self.teacher
        data = common.task_data(plugin, cfg, manifest.policy, self.codec)
        if data.policy != manifest.policy:
            self.note(f"warning: training with preprocessing '{data.policy.describe()}' but the bundle declares "
                      f"'{manifest.policy.describe()}', which the edge applies; the head will see other features "
                      "in serving")
        torch.manual_seed(cfg.seed)
        head, self.config, source, fresh = self._init_head({**data.config, **dict(cfg.head_config or {})})
        if self.shared:  # train only the task's own part on the bundle's frozen layer2..4
            if self.trunk is None:  # the first shared head: its layer2..4 become the trunk
                self.trunk = self.new_trunk = SharedTrunk.from_head(head, manifest.backbone)
            attach_trunk(head, self.trunk)
            freeze(self.trunk)
            freeze(head.tail)
        if fresh:
            self.note(f"note: {common.describe_keys(fresh)} re-initialised (the data's config differs from the "
                      "source head's)")
        others = self.others
        if self.train_decoder and others:
            self.note(f"note: stage 2 trains the decoder, which the other heads ({', '.join(others)}) consume too; "
                      "re-fine-tune or re-evaluate them, or pass --freeze-decoder")
        self.same_task = teacher if teacher is not None and teacher.task == plugin.name else None
        kd_teacher = self.same_task if self.same_task is not None and plugin.distills else None
        if teacher is not None and kd_teacher is None:
            what = (f"the {plugin.name} plugin's loss has no distillation term: the teacher starts the head"
                    if self.same_task is not None else
                    f"the teacher is a {teacher.task} model: used to initialise layer2..4 only")
            self.note(f"note: {what}, no distillation loss")

        objective = FinetuneObjective(plugin, self.codec, head, kd_teacher, common.options_of(cfg),
                                      self.train_decoder, frozen_trunk=tail_path(head) if self.shared else None,
                                      seed=cfg.seed)
        if self.start is not None:
            objective.load_state_dict(self.start[0], strict=False)
            source += f", {self.start[1]}"
        params = [p for p in head.parameters() if p.requires_grad]
        params += list(self.codec.decoder.parameters()) if self.train_decoder else []
        self.val_loader = common.eval_loader(plugin, data.val_set, cfg)

        def validate() -> dict[str, float]:
            return every_rate(objective.codec, self.manifest.default_rate, lambda features: plugin.evaluate(
                objective.head, features, self.val_loader, dataset=data.val_set), plugin.metric_name)

        provenance = {"init": source, "teacher": str(teacher.path) if teacher is not None else None,
                      "distillation": kd_teacher is not None, "train_decoder": self.train_decoder,
                      "shared_trunk": self.shared, "procedure": "reference" if reference(cfg) else "direct"}
        return Plan(f"finetune {plugin.name}", "finetune (stage 2; encoder and prior frozen)", objective,
                    {"main": params}, data, plugin.collate, validate,
                    best_metric=selection_metric(plugin.metric_name, self.codec.rates),
                    provenance=provenance)

    def _init_head(self, data_config: dict) -> tuple[nn.Module, dict, str, list[str]]:
        return initial_head(self.plugin, self.bundle, self.manifest, self.teacher, self.cfg.init, self.trunk,
                            data_config)

    def write(self, plan, result, metrics, provenance) -> str:
        objective, plugin, metric, device = plan.objective, self.plugin, self.plugin.metric_name, self.info.device
        teacher = {}  # the uncompressed reference on the same val split, next to the head's metrics
        if self.same_task is not None:
            stem, head = self.same_task.stem.to(device), self.same_task.head.to(device)
            teacher = evaluate(plugin, stem, head, self.val_loader, plan.data.val_set)
        chosen, chosen_epoch = best_epoch(objective, result, metrics, plan.best_metric)
        objective.to(device).eval()
        rate = per_rate(common.measure_rate(objective.codec, plan.data.policy, plugin, plan.data.val_set, device,
                                            estimate=False), self.manifest.default_rate)
        objective.to("cpu")
        head_metrics = {**chosen, **{f"last_{k}": v for k, v in metrics.items()}, "epoch": float(chosen_epoch),
                        **rate}
        head_metrics.update({f"teacher_{k}": v for k, v in teacher.items()})
        provenance["selected_epoch"] = chosen_epoch
        new = update_heads(self.bundle, {plugin.name: (objective.head, self.config)},
                           head_metrics={plugin.name: head_metrics}, head_provenance={plugin.name: provenance},
                           decoder=objective.codec.decoder if self.train_decoder else None,
                           trunk=self.new_trunk.tail if self.new_trunk is not None else None,
                           shared_tasks={plugin.name} if self.shared else ())
        if new.fingerprint != self.manifest.fingerprint:  # update_heads never touches encoder/prior; be sure
            raise BundleError(f"{self.bundle}: fingerprint changed during finetune; the bundle is inconsistent")
        shown = ", ".join(f"{k} {v:.2f}" for k, v in chosen.items() if not is_per_rate(k))
        teacher_part = f" (teacher {metric} {teacher[metric]:.2f})" if metric in teacher else ""
        return (f"updated {self.bundle}: {plugin.name} head from epoch {chosen_epoch}: {shown}{teacher_part}; "
                f"bpp {rate['bpp']:.4f}; fingerprint unchanged")


def open_bundle(value: Path | None) -> tuple[Path, Any, FeatureCodec]:
    """The bundle finetune updates (like serve/encode: ``--bundle``, ``$SPLITSERVE_BUNDLE``, the
    default), its manifest and its codec."""
    bundle = resolve_bundle(value)
    if value is None:
        print(f"finetune: no --bundle given; updating {bundle}")
    manifest = read_manifest(bundle)
    return bundle, manifest, load_codec(bundle, manifest=manifest)


def initial_head(plugin: TaskPlugin, bundle: Path, manifest, teacher: Teacher | None, init: str | None,
                 trunk: SharedTrunk | None, data_config: dict) -> tuple[nn.Module, dict, str, list[str]]:
    """The head to fine-tune: the bundle's (same task), else the teacher's (same task), else a
    fresh one (its layer2..4 from any teacher); ``init`` ``"scratch"`` / ``"teacher"``
    (``--from-scratch`` / ``--from-teacher``) skip to those. Returns (head, config, source,
    re-initialised keys)."""
    backbone = manifest.backbone
    if init == "teacher" and (teacher is None or teacher.task != plugin.name):
        raise BundleError(f"--from-teacher needs --teacher DIR of a {plugin.name} teacher "
                          f"(`platform teacher --task {plugin.name}`)")
    if plugin.name in manifest.tasks and init is None:
        src_cfg = plugin.resolve_config(backbone, manifest.tasks[plugin.name].config)
        src = load_head(bundle, plugin.name, plugin.build_head(backbone, src_cfg), manifest, trunk=trunk)
        source = f"bundle head ({bundle})"
    elif teacher is not None and teacher.task == plugin.name and init != "scratch":
        src_cfg, src = plugin.resolve_config(backbone, teacher.config), teacher.head
        source = f"teacher head ({teacher.path})"
    else:
        src_cfg, src = {}, None
        source = "fresh head"
        if teacher is not None:
            source += f", layer2..4 from teacher {teacher.path}"
        elif init != "scratch":
            have = ", ".join(manifest.tasks) or "none"
            raise BundleError(
                f"{bundle}: bundle has no {plugin.name!r} head (it has: {have}) and no --teacher was given; "
                f"pass --teacher DIR (a `platform teacher --task {plugin.name}` directory) or --from-scratch"
            )
    config = plugin.resolve_config(backbone, {**src_cfg, **data_config})
    head = plugin.build_head(backbone, config)
    fresh: list[str] = []
    if src is not None:  # a head on the shared trunk gives its layer2..4 too
        fresh = common.load_matching(head, own_state(src))
    elif teacher is not None:
        common.load_matching(head.tail, teacher.head.tail.state_dict())
    return head, config, source, fresh


def selection_metric(metric: str, rates: int) -> str:
    """The validation metric that picks the best epoch (see :func:`every_rate`)."""
    return metric if rates == 1 else f"{metric}_mean"


def best_epoch(objective: Objective, result, metrics: dict[str, float], best_metric: str | None) -> tuple[dict, int]:
    """Load the best epoch's weights (``result.best``) into ``objective`` when they beat the last
    ones on ``best_metric``; returns the chosen epoch's metrics and number."""
    best = result.best
    if best is not None and best.get("state") and best["value"] > metrics.get(best_metric, float("-inf")):
        objective.load_state_dict(best["state"], strict=False)
        return dict(best["metrics"]), best["epoch"]
    return dict(metrics), result.epoch


def reference(cfg: SimpleNamespace) -> bool:
    """Whether the run follows the task's reference recipe (see :mod:`.reference`)."""
    return getattr(cfg, "procedure", None) == "reference"
