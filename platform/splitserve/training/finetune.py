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
from ..models.backbone import ResNetTail, SharedTrunk, attach_trunk, build_resnet, tail_path
from ..plugins import TaskBatch, TaskPlugin
from . import common
from . import stage
from .engine import Engine
from .objective import Objective, freeze
from .optim import build_optimizer, build_scheduler, steps_per_epoch
from .teacher import Teacher, evaluate, load_teacher


class FinetuneObjective(Objective):
    aux_terms = ()

    def __init__(self, plugin: TaskPlugin, codec: FeatureCodec, head: nn.Module, teacher: Teacher | None,
                 options: dict[str, Any], train_decoder: bool, frozen_trunk: str | None = None):
        super().__init__()
        self.plugin = plugin
        self.codec = codec
        freeze(codec.encoder)
        freeze(codec.entropy_bottleneck)
        if not train_decoder:
            freeze(codec.decoder)
        self.train_decoder = train_decoder
        self.head = head
        self.teacher_stem = freeze(teacher.stem) if teacher is not None else None
        self.teacher_head = freeze(teacher.head) if teacher is not None else None
        self.options = options
        self.frozen = ("codec.encoder", "codec.entropy_bottleneck", "teacher_stem", "teacher_head") + (
            () if train_decoder else ("codec.decoder",)) + ((f"head.{frozen_trunk}",) if frozen_trunk else ())

    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y_hat = self.codec.quantize(images)
        if self.train_decoder:
            return self.codec.decode(y_hat)
        with torch.no_grad():
            return self.codec.decode(y_hat)

    def forward(self, batch: TaskBatch):
        h = self.features(batch.images)
        teacher_output = None
        if self.teacher_head is not None:
            with torch.no_grad():
                teacher_output = self.plugin.head_output(self.teacher_head, self.teacher_stem(batch.images), batch)
        return self.plugin.loss(self.head, h, batch, teacher_output=teacher_output, options=self.options), {}

    def export_state(self):
        skip = tuple(f"{n}." for n in self.frozen_modules())
        state = {f"head.{k}": v for k, v in self.head.state_dict().items() if not f"head.{k}".startswith(skip)}
        if self.train_decoder:
            state.update({f"codec.decoder.{k}": v for k, v in self.codec.decoder.state_dict().items()})
        return state


def _init_head(plugin: TaskPlugin, manifest, bundle: Path, teacher: Teacher | None, data_config: dict,
               init: str | None, trunk: SharedTrunk | None) -> tuple[nn.Module, dict, str, list[str]]:
    """The head to fine-tune: the bundle's (same task), else the teacher's (same task), else a
    fresh one (its layer2..4 from any teacher); ``init`` "scratch" or "teacher" skips to those.
    Returns (head, config, source, re-initialised keys)."""
    backbone = manifest.backbone
    from_scratch = init == "scratch"
    if init == "teacher" and (teacher is None or teacher.task != plugin.name):
        raise BundleError(f"--from-teacher needs --teacher DIR of a {plugin.name} teacher "
                          f"(`platform teacher --task {plugin.name}`)")
    if plugin.name in manifest.tasks and init is None:
        src_cfg = plugin.resolve_config(backbone, manifest.tasks[plugin.name].config)
        src = load_head(bundle, plugin.name, plugin.build_head(backbone, src_cfg), manifest, trunk=trunk)
        source = f"bundle head ({bundle})"
    elif teacher is not None and teacher.task == plugin.name and not from_scratch:
        src_cfg, src = plugin.resolve_config(backbone, teacher.config), teacher.head
        source = f"teacher head ({teacher.path})"
    else:
        src_cfg, src = {}, None
        source = "fresh head"
        if teacher is not None:
            source += f", layer2..4 from teacher {teacher.path}"
        elif not from_scratch:
            have = ", ".join(manifest.tasks) or "none"
            raise BundleError(
                f"{bundle}: bundle has no {plugin.name!r} head (it has: {have}) and no --teacher was given; "
                f"pass --teacher DIR (a `platform teacher --task {plugin.name}` directory) or --from-scratch"
            )
    config = plugin.resolve_config(backbone, {**src_cfg, **data_config})
    head = plugin.build_head(backbone, config)
    fresh: list[str] = []
    if src is not None:
        fresh = common.load_matching(head, src.state_dict())
        if isinstance(src.get_submodule(tail_path(src)), SharedTrunk):  # a shared-trunk head: its layer2..4
            common.load_matching(head.tail, trunk.tail.state_dict())
    elif teacher is not None:
        tail_state = {f"tail.{k}": v for k, v in teacher.head.tail.state_dict().items()}
        common.load_matching(head, {k: v for k, v in tail_state.items() if k in head.state_dict()})
        missing = [k for k in tail_state if k not in head.state_dict()]
        if missing:  # e.g. a head that stores its tail under another name: match by the tail module
            common.load_matching(head.tail, teacher.head.tail.state_dict())
    return head, config, source, fresh


def run_finetune(cfg: SimpleNamespace) -> int:
    plugins = common.registry()
    plugin = common.training_plugin(plugins, cfg.task, "finetune")
    bundle = resolve_bundle(cfg.bundle)  # like serve/encode: --bundle, $SPLITSERVE_BUNDLE, the default
    if cfg.bundle is None:
        print(f"finetune: no --bundle given; updating {bundle}")
    manifest = read_manifest(bundle)
    codec = load_codec(bundle, manifest=manifest)
    fingerprint = manifest.fingerprint
    teacher = load_teacher(cfg.teacher, plugins) if cfg.teacher else None
    if teacher is not None and teacher.arch != manifest.backbone:
        raise SplitserveError(f"teacher {teacher.path} is a {teacher.arch}, the bundle's backbone is {manifest.backbone}")
    spec = plugin.feature_spec(manifest.backbone)
    if (spec.channels, spec.stride) != (codec.feature_channels, codec.stride):
        raise SplitserveError(f"task {plugin.name!r} consumes {spec.describe()}, the bundle's codec produces "
                              f"{codec.feature_channels} channels at stride {codec.stride}")
    shared = bool(cfg.shared_trunk)
    train_decoder = not (cfg.freeze_decoder or shared)  # a shared trunk's other heads need the decoder as it is
    bundle_trunk = load_trunk(bundle, manifest)
    with stage.session(cfg) as info:
        policy = common.preprocessing(cfg, manifest.policy, codec.input_multiple)
        codec.check_input_size(*policy.nominal_size)
        if policy != manifest.policy and info.is_main:
            print(f"warning: training with preprocessing '{policy.describe()}' but the bundle declares "
                  f"'{manifest.policy.describe()}', which the edge applies; the head will see other features "
                  "in serving", flush=True)
        train_set, val_set, data_root = common.build_datasets(plugin, cfg.data, policy, cfg)
        data_config = plugin.dataset_config(common.base_dataset(train_set))
        torch.manual_seed(cfg.seed)
        head, config, source, fresh = _init_head(plugin, manifest, bundle, teacher,
                                                 {**data_config, **dict(cfg.head_config or {})}, cfg.init,
                                                 bundle_trunk)
        new_trunk = None
        if shared:  # train only the task's own part on the bundle's frozen layer2..4
            if bundle_trunk is None:  # the first shared head: its (source's) layer2..4 become the trunk
                new_trunk = ResNetTail.from_resnet(build_resnet(manifest.backbone))
                common.load_matching(new_trunk, head.tail.state_dict())
                bundle_trunk = SharedTrunk(new_trunk)
            attach_trunk(head, bundle_trunk)
            freeze(bundle_trunk)
            freeze(head.tail)
        if fresh and info.is_main:
            print(f"note: {common.describe_keys(fresh)} re-initialised (the data's config differs from the "
                  f"source head's)", flush=True)
        others = [t for t in manifest.tasks if t != plugin.name]
        if train_decoder and others and info.is_main:
            print(f"note: stage 2 trains the decoder, which the other heads ({', '.join(others)}) consume too; "
                  "re-fine-tune or re-evaluate them, or pass --freeze-decoder", flush=True)
        same_task = teacher if teacher is not None and teacher.task == plugin.name else None
        kd_teacher = same_task if same_task is not None and plugin.distills else None
        if teacher is not None and kd_teacher is None and info.is_main:
            what = (f"the {plugin.name} plugin's loss has no distillation term: the teacher starts the head"
                    if same_task is not None else
                    f"the teacher is a {teacher.task} model: used to initialise layer2..4 only")
            print(f"note: {what}, no distillation loss", flush=True)

        workdir = Path(cfg.workdir) if cfg.workdir else common.bundle_workdir(bundle, f"finetune-{plugin.name}")
        engine = Engine(common.engine_config(cfg, workdir, common.signature(cfg)), info, f"finetune {plugin.name}")
        objective = FinetuneObjective(plugin, codec, head, kd_teacher, common.options_of(cfg), train_decoder,
                                      frozen_trunk=tail_path(head) if shared else None)
        params = [p for p in head.parameters() if p.requires_grad]
        params += list(codec.decoder.parameters()) if train_decoder else []
        optimizer = build_optimizer(params, cfg)
        schedulers = build_scheduler(optimizer, cfg, steps_per_epoch(len(train_set), cfg.batch_size, info.world_size))
        val_loader = common.eval_loader(plugin, val_set, cfg)
        features = common.coded_features(objective.codec)

        def validate(epoch: int) -> dict[str, float]:
            return {k: float(v) for k, v in plugin.evaluate(objective.head, features, val_loader, dataset=val_set).items()}

        teacher_metrics: dict[str, float] = {}
        if same_task is not None and info.is_main:  # the uncompressed reference, next to the head's metrics
            same_task.stem.to(info.device)
            same_task.head.to(info.device)
            teacher_metrics = evaluate(plugin, same_task.stem, same_task.head, val_loader, val_set)
        result = engine.fit(objective, {"main": optimizer}, schedulers, train_set, plugin.collate, validate,
                            best_metric=plugin.metric_name)
        if (code := stage.early_exit(result, info)) is not None:
            return code
        metric = plugin.metric_name
        last = result.last_metrics if result.history and result.history[-1]["global_step"] == result.global_step else {}
        if not last:
            objective.to(info.device)
            last = validate(result.epoch)
        best = result.best
        if best is not None and best.get("state") and best["value"] > last.get(metric, float("-inf")):
            objective.load_state_dict(best["state"], strict=False)
            chosen, chosen_epoch = dict(best["metrics"]), best["epoch"]
        else:
            chosen, chosen_epoch = dict(last), result.epoch
        objective.to(info.device).eval()
        rate = common.measure_rate(objective.codec, val_loader, info.device, estimate=False)
        objective.to("cpu")
        head_metrics = {**chosen, **{f"last_{k}": v for k, v in last.items()}, "epoch": float(chosen_epoch),
                        "bpp": rate["bpp"], "payload_bpp": rate["payload_bpp"]}
        head_metrics.update({f"teacher_{k}": v for k, v in teacher_metrics.items()})
        provenance = stage.provenance(
            "finetune (stage 2; encoder and prior frozen)", cfg, result, data_root=data_root, train_set=train_set,
            val_set=val_set, init=source, teacher=str(teacher.path) if teacher is not None else None,
            distillation=kd_teacher is not None, selected_epoch=chosen_epoch, train_decoder=train_decoder,
            shared_trunk=shared)
        new = update_heads(bundle, {plugin.name: (objective.head, config)}, head_metrics={plugin.name: head_metrics},
                           head_provenance={plugin.name: provenance},
                           decoder=objective.codec.decoder if train_decoder else None,
                           trunk=new_trunk, shared_tasks={plugin.name} if shared else ())
        if new.fingerprint != fingerprint:  # update_heads never touches encoder/prior; be sure
            raise BundleError(f"{bundle}: fingerprint changed during finetune; the bundle is inconsistent")
        shown = ", ".join(f"{k} {v:.2f}" for k, v in chosen.items())
        teacher_part = f" (teacher {metric} {teacher_metrics[metric]:.2f})" if metric in teacher_metrics else ""
        print(f"updated {bundle}: {plugin.name} head from epoch {chosen_epoch}: {shown}{teacher_part}; "
              f"bpp {rate['bpp']:.4f}; fingerprint unchanged")
        engine.outputs_written(result)
        return 0
