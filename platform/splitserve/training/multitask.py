"""``platform finetune --tasks cls,det,seg``: one shared trunk (layer2..4) fine-tuned on every
named task at once, each task with its own head layers, on a bundle's frozen encoder and prior.

Every step draws one batch from each task's own training set (``--batch-size`` images each, from
that plugin's ``build_dataset``) and sums the tasks' losses, each the plugin's own ``loss`` (its
terms summed, with a same-task teacher's output for distillation where the plugin has one)::

    L = Σ_t w_t · L_t        w_t = --task-weight TASK=W (default 1 each)

An epoch is one pass over the largest task's training set; a smaller one is visited again within
the epoch (its items augmented anew), so every step has a batch of every task. The data order is
the engine's (seeded per epoch, resumable). The trunk starts from the bundle's trunk, else from the
first task's head's layer2..4, and is trained by every task's loss; its batch norms keep their
running statistics (batches alternate between tasks, whose image statistics differ). The decoder
trains with them when every head of the bundle is among the tasks (else it stays as it is: the
other heads consume it). The bundle gets every head on the shared trunk (``trunk.safetensors``
once, each head without its layer2..4), so the gateway runs layer2..4 once for all of them.

The best epoch is the one with the highest mean over the tasks of each task's metric (at every
rate of a variable-rate bundle: its mean over the rates). Only the plugins' :class:`TrainingHooks`
are used: this module names no task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from ..bundle import load_trunk, update_heads
from ..errors import BundleError, PluginError, SplitserveError
from ..models.backbone import SharedTrunk, attach_trunk
from ..plugins import TaskBatch, TrainingHooks
from . import common
from .finetune import CodedObjective, best_epoch, initial_head, open_bundle, selection_metric
from .objective import freeze
from .options import options_dict
from .rates import every_rate, is_per_rate, per_rate
from .stage import Plan, Stage, bundle_workdir
from .teacher import Teacher, evaluate, load_teachers

SELECTION = "tasks_mean"  # the validation metric that picks the best epoch


@dataclass
class TaskPart:
    """One task of the run: its plugin, data, head and where the head came from."""

    name: str
    plugin: TrainingHooks
    weight: float
    teacher: Teacher | None = None
    data: common.TaskData | None = None
    head: nn.Module | None = None
    config: dict | None = None
    source: str = ""
    val_loader: Any = None


class TaskTuples(Dataset):
    """Item ``i``: item ``i mod len`` of every task's training set, as a tuple (one pass over the
    largest set is an epoch)."""

    def __init__(self, datasets: Sequence[Dataset]):
        self.datasets = list(datasets)

    def __len__(self) -> int:
        return max(len(d) for d in self.datasets)

    def __getitem__(self, index: int) -> tuple:
        return tuple(d[index % len(d)] for d in self.datasets)


class CollateTasks:
    """A list of :class:`TaskTuples` items → {task: that plugin's :class:`TaskBatch`}."""

    def __init__(self, parts: Sequence[TaskPart]):
        self.collates = [(p.name, p.plugin.collate) for p in parts]

    def __call__(self, items: list[tuple]) -> dict[str, TaskBatch]:
        return {name: collate([item[i] for item in items]) for i, (name, collate) in enumerate(self.collates)}


class MultitaskObjective(CodedObjective):
    """Σ_t w_t · (task t's loss on its batch), every head on one trainable shared trunk."""

    def __init__(self, parts: Sequence[TaskPart], codec, trunk: SharedTrunk, options: dict[str, Any],
                 train_decoder: bool, seed: int = 0):
        super().__init__(codec, train_decoder, seed)
        self.plugins = {p.name: p.plugin for p in parts}
        self.weights = {p.name: float(p.weight) for p in parts}
        self.heads = nn.ModuleDict({p.name: p.head for p in parts})
        self.trunk = trunk
        kd = [p for p in parts if p.teacher is not None and p.plugin.distills]
        self.teacher_stems = nn.ModuleDict({p.name: freeze(p.teacher.stem) for p in kd})
        self.teacher_heads = nn.ModuleDict({p.name: freeze(p.teacher.head) for p in kd})
        self.options = options
        self.frozen += ("teacher_stems", "teacher_heads")

    def train(self, mode: bool = True) -> "MultitaskObjective":
        super().train(mode)
        for module in self.trunk.modules():  # batch norms of the shared trunk keep their running statistics
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def forward(self, batch: dict[str, TaskBatch]):
        losses = {}
        for name, task_batch in batch.items():
            plugin, head = self.plugins[name], self.heads[name]
            teacher_output = None
            if name in self.teacher_heads:
                with torch.no_grad():
                    teacher_output = plugin.head_output(self.teacher_heads[name],
                                                        self.teacher_stems[name](task_batch.images), task_batch)
            terms = plugin.loss(head, self.features(task_batch.images), task_batch, teacher_output=teacher_output,
                                options=self.options)
            losses.update({f"{name}/{k}": self.weights[name] * v for k, v in terms.items()})
        return losses, self.rate_logs()

    def export_state(self):
        return {**{f"heads.{k}": v for k, v in self.heads.state_dict().items()}, **self.decoder_state()}


class MultitaskStage(Stage):
    def __init__(self, cfg: SimpleNamespace):
        super().__init__(cfg)
        if cfg.procedure == "reference":
            raise SplitserveError("--tasks trains one shared trunk on every task (the direct procedure); "
                                  "--procedure reference is for one --task")
        plugins = common.registry()
        names = [plugins.get(t).name for t in cfg.tasks]
        if len(names) < 2 or len(set(names)) != len(names):
            raise SplitserveError(f"--tasks names at least two different tasks, got {','.join(cfg.tasks)}")
        weights = {plugins.get(str(k)).name: v for k, v in options_dict(cfg.task_weight).items()}
        for task, weight in weights.items():
            if task not in names:
                raise SplitserveError(f"--task-weight {task}: not one of --tasks")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
                raise SplitserveError(f"--task-weight {task}={weight}: a weight is a number >= 0")
        self.roots = {plugins.get(str(k)).name: Path(str(v)) for k, v in options_dict(cfg.task_data).items()}
        self.bundle, self.manifest, self.codec = open_bundle(cfg.bundle)
        backbone = self.manifest.backbone
        teachers = {t.task: t for t in load_teachers(cfg.teacher, plugins)} if cfg.teacher else {}
        self.parts = []
        for name in names:
            plugin = common.training_plugin(plugins, name, "finetune")
            plugin.feature_spec(backbone).require(name, self.codec.feature_channels, self.codec.stride)
            self.parts.append(TaskPart(name, plugin, float(weights.get(name, 1.0)), teachers.pop(name, None)))
        if teachers:
            raise SplitserveError(f"--teacher: {', '.join(teachers)} is not one of --tasks")
        for part in self.parts:
            if part.teacher is not None and part.teacher.arch != backbone:
                raise SplitserveError(f"teacher {part.teacher.path} is a {part.teacher.arch}, the bundle's backbone "
                                      f"is {backbone}")
        others = [t for t in self.manifest.tasks if t not in names]
        on_trunk = [t for t in others if self.manifest.tasks[t].trunk == "shared"]
        if on_trunk:
            raise SplitserveError(f"--tasks trains the bundle's shared trunk, which the {', '.join(on_trunk)} head "
                                  "uses too; add it to --tasks")
        self.others = others
        self.train_decoder = not (cfg.freeze_decoder or others)
        self.trunk = load_trunk(self.bundle, self.manifest)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parts]

    def default_workdir(self) -> Path:
        return bundle_workdir(self.bundle, "finetune-" + "+".join(self.names))

    def plan(self) -> Plan:
        cfg, manifest, info = self.cfg, self.manifest, self.info
        head_configs = task_head_configs(cfg.head_config, self.names, common.registry())
        torch.manual_seed(cfg.seed)
        for part in self.parts:
            task_cfg = SimpleNamespace(**{**vars(cfg), "data": self.roots.get(part.name, cfg.data)})
            part.data = common.task_data(part.plugin, task_cfg, manifest.policy, self.codec)
            part.head, part.config, part.source, fresh = initial_head(
                part.plugin, self.bundle, manifest, part.teacher, cfg.init, self.trunk,
                {**part.data.config, **head_configs.get(part.name, {})})
            if fresh:
                self.note(f"note: {part.name}: {common.describe_keys(fresh)} re-initialised (the data's config "
                          "differs from the source head's)")
            part.val_loader = common.eval_loader(part.plugin, part.data.val_set, cfg)
        if self.trunk is None:  # no trunk yet: the first task's layer2..4 start it
            self.trunk = SharedTrunk.from_head(self.parts[0].head, manifest.backbone)
        for part in self.parts:
            attach_trunk(part.head, self.trunk)
        if self.others:
            self.note(f"note: the decoder stays as it is: the {', '.join(self.others)} head(s) consume it too")
        objective = MultitaskObjective(self.parts, self.codec, self.trunk, common.options_of(cfg),
                                       self.train_decoder, seed=cfg.seed)
        params = [p for p in objective.parameters() if p.requires_grad]  # heads, the trunk once, the decoder
        default_rate = manifest.default_rate

        def validate() -> dict[str, float]:
            out: dict[str, float] = {}
            for part in self.parts:
                head, loader, val_set = objective.heads[part.name], part.val_loader, part.data.val_set
                metrics = every_rate(objective.codec, default_rate, lambda features, p=part.plugin, h=head, v=loader,
                                     d=val_set: p.evaluate(h, features, v, dataset=d), part.plugin.metric_name)
                out.update({f"{part.name}/{k}": v for k, v in metrics.items()})
            chosen = [out[f"{p.name}/{selection_metric(p.plugin.metric_name, self.codec.rates)}"] for p in self.parts]
            out[SELECTION] = sum(chosen) / len(chosen)
            return out

        first = self.parts[0].data
        data = common.TaskData(first.policy, TaskTuples([p.data.train_set for p in self.parts]),
                               ConcatDataset([p.data.val_set for p in self.parts]), Path(cfg.data), {})
        provenance = {"procedure": "multitask", "tasks": self.names, "shared_trunk": True,
                      "train_decoder": self.train_decoder,
                      "task_weights": {p.name: p.weight for p in self.parts},
                      "task_data": {p.name: str(p.data.root) for p in self.parts}}
        return Plan(f"finetune {'+'.join(self.names)}", "finetune (stage 2, several tasks on one trunk; encoder and "
                    "prior frozen)", objective, {"main": params}, data, CollateTasks(self.parts), validate,
                    best_metric=SELECTION, provenance=provenance)

    def write(self, plan, result, metrics, provenance) -> str:
        objective, device = plan.objective, self.info.device
        chosen, chosen_epoch = best_epoch(objective, result, metrics, plan.best_metric)
        objective.to(device).eval()
        heads, head_metrics, head_provenance, shown = {}, {}, {}, []
        for part in self.parts:
            name, plugin = part.name, part.plugin
            own = {k[len(name) + 1:]: v for k, v in chosen.items() if k.startswith(f"{name}/")}
            last = {f"last_{k[len(name) + 1:]}": v for k, v in metrics.items() if k.startswith(f"{name}/")}
            rate = per_rate(common.measure_rate(objective.codec, plan.data.policy, plugin, part.data.val_set, device,
                                                estimate=False), self.manifest.default_rate)
            teacher = {}
            if part.teacher is not None:  # the uncompressed reference on the same val split
                teacher = evaluate(plugin, part.teacher.stem.to(device), part.teacher.head.to(device),
                                   part.val_loader, part.data.val_set)
            head_metrics[name] = {**own, **last, "epoch": float(chosen_epoch), **rate,
                                  **{f"teacher_{k}": v for k, v in teacher.items()}}
            head_provenance[name] = {**provenance, "init": part.source, "selected_epoch": chosen_epoch,
                                     "teacher": str(part.teacher.path) if part.teacher is not None else None,
                                     "distillation": name in objective.teacher_heads}
            heads[name] = (objective.heads[name], part.config)
            shown.append(f"{name} " + ", ".join(f"{k} {v:.2f}" for k, v in own.items() if not is_per_rate(k)))
        objective.to("cpu")
        new = update_heads(self.bundle, heads, head_metrics=head_metrics, head_provenance=head_provenance,
                           decoder=objective.codec.decoder if self.train_decoder else None,
                           trunk=self.trunk.tail, shared_tasks=set(self.names))
        if new.fingerprint != self.manifest.fingerprint:  # update_heads never touches encoder/prior; be sure
            raise BundleError(f"{self.bundle}: fingerprint changed during finetune; the bundle is inconsistent")
        return (f"updated {self.bundle}: {len(self.parts)} heads on one trunk from epoch {chosen_epoch}: "
                f"{'; '.join(shown)}; fingerprint unchanged")


def task_head_configs(values: Any, names: Sequence[str], plugins) -> dict[str, dict[str, Any]]:
    """``--head-config TASK.KEY=VALUE`` pairs of a multi-task run, by task."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in options_dict(values).items():
        task, dot, field = str(key).partition(".")
        try:
            name = plugins.get(task).name if dot else None
        except PluginError:
            name = None
        if name not in names:
            raise SplitserveError(f"--head-config {key}: with --tasks, name the task: TASK.KEY=VALUE (one of "
                                  f"{', '.join(names)})")
        out.setdefault(name, {})[field] = value
    return out


def run_multitask(cfg: SimpleNamespace) -> int:
    return MultitaskStage(cfg).run()
