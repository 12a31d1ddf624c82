"""``platform train``: single-stage training of Duan & Zhu ("Efficient Feature Compression for
Edge-Cloud Systems") for the teacher's task (classification in the paper).

    loss = λ · bpp + Σ_{k=1..4} MSE(h̃_k, h_k) + 0.5 · (KL(teacher ‖ student logits) + CE)

with bpp over the pixels of the model input and MSE the mean squared error of stage k: the decoded
feature against the teacher's layer1 (k = 1) and the student's layer2..4 against the teacher's
(the reference code's ``transfer_loss``).

``--joint`` trains the codec and the classifier (ResNet layer2..4 + fc, initialised from the
teacher); ``--cls-fixed`` keeps the teacher's classifier frozen and trains only the codec. The
prior's quantile (aux) loss is optimised every step on its own optimizer, as in CompressAI.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SplitserveError
from ..models import FeatureCodec
from ..plugins import TaskBatch, TaskPlugin
from . import common
from .distill import TAIL_STAGES
from .objective import Objective, freeze
from .optim import decayed_weights, split_codec_params
from .stage import Plan
from .student import StudentStage


class JointObjective(Objective):
    def __init__(self, plugin: TaskPlugin, codec: FeatureCodec, head: nn.Module, teacher_stem: nn.Module,
                 teacher_head: nn.Module, lmbda: float, options: dict, head_fixed: bool):
        super().__init__()
        self.plugin = plugin
        self.codec = codec
        self.head = freeze(head) if head_fixed else head
        self.teacher_stem = freeze(teacher_stem)
        self.teacher_head = freeze(teacher_head)
        self.lmbda = float(lmbda)
        self.options = {"kd_alpha": 0.5, **options}
        self.frozen = ("teacher_stem", "teacher_head") + (("head",) if head_fixed else ())

    def forward(self, batch: TaskBatch):
        images = batch.images
        with torch.no_grad(), capture_output(self.teacher_head.tail) as t_feats:
            h_t = self.teacher_stem(images)
            t_logits = self.plugin.head_output(self.teacher_head, h_t, batch)
        out = self.codec(images)
        h_s = out.features
        bpp = out.bpp(images.shape[-2:])
        with capture_output(self.head.tail) as s_feats:  # the tail runs once, inside the task loss
            task = self.plugin.loss(self.head, h_s, batch, teacher_output=t_logits, options=self.options)
        if not s_feats or not t_feats:
            raise SplitserveError(f"task {self.plugin.name!r}: its loss/head_output did not run the head's tail, "
                                  "so the layer2..4 feature loss cannot be computed")
        mse = {"layer1": F.mse_loss(h_s.float(), h_t.float())}
        mse.update({k: F.mse_loss(s_feats[0][k].float(), t_feats[0][k].float()) for k in TAIL_STAGES})
        losses = {
            "rate": self.lmbda * bpp,
            "feature_mse": sum(mse.values()),
            **task,
            "prior_aux": self.codec.aux_loss(),
        }
        return losses, {"bpp": bpp.detach(), **{f"mse_{k}": v.detach() for k, v in mse.items()}}


@contextmanager
def capture_output(module: nn.Module):
    """Record ``module``'s outputs while the block runs (to read intermediate features without
    running the layers a second time)."""
    outputs: list = []
    handle = module.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    try:
        yield outputs
    finally:
        handle.remove()


class TrainStage(StudentStage):
    command = "train"

    def __init__(self, cfg):
        if cfg.mode not in ("joint", "cls-fixed"):
            raise SplitserveError("choose --joint (train codec and classifier) or --cls-fixed (classifier frozen)")
        if cfg.lmbda < 0:
            raise SplitserveError(f"--lmbda must be >= 0, got {cfg.lmbda}")
        super().__init__(cfg)

    def plan(self) -> Plan:
        cfg, info, teacher, plugin = self.cfg, self.info, self.teacher, self.plugin
        codec, data = self.new_codec(plugin)
        self.config = plugin.resolve_config(teacher.arch, teacher.config)
        differ = [k for k, v in data.config.items() if self.config.get(k) != v]
        if differ:
            k = differ[0]
            raise SplitserveError(f"the teacher's {k} is {self.config.get(k)!r}, the data's {data.config[k]!r}; "
                                  "train a teacher on this data first")
        head = plugin.build_head(teacher.arch, self.config)
        head.load_state_dict(teacher.head.state_dict())
        head_fixed = cfg.mode == "cls-fixed"
        objective = JointObjective(plugin, codec, head, teacher.stem, teacher.head, cfg.lmbda,
                                   common.options_of(cfg), head_fixed)
        codec_params, aux = split_codec_params(objective.codec)
        # --weight-decay on the head's conv/linear weights only (layer2..4 + fc), as the reference;
        # the codec, biases and norm scales are not decayed
        main: list = [{"params": codec_params, "weight_decay": 0.0}]
        if not head_fixed:
            weights, rest = decayed_weights(objective.head)
            main += [{"params": weights}, {"params": rest, "weight_decay": 0.0}]
        val_loader = common.eval_loader(plugin, data.val_set, cfg)

        @torch.no_grad()
        def validate() -> dict[str, float]:
            objective.eval()
            try:
                metrics = plugin.evaluate(objective.head, common.coded_features(objective.codec), val_loader,
                                          dataset=data.val_set)
                metrics = {k: float(v) for k, v in metrics.items()}
                metrics.update(common.measure_rate(objective.codec, val_loader, info.device))
            finally:
                objective.train()
            return metrics

        return Plan(f"train {cfg.mode}", f"train (Duan & Zhu single stage, {cfg.mode})", objective,
                    {"main": main, "aux": aux}, data, plugin.collate, validate,
                    provenance={"teacher": str(teacher.path), "lmbda": cfg.lmbda})

    def write(self, plan, result, metrics, provenance) -> str:
        self.save(plan, plan.objective.head, self.config, metrics, provenance, head_keys=("top5",),
                  bundle_keys=("bpp", "payload_bpp", "bpp_estimate"))
        metric = self.plugin.metric_name
        return (f"wrote bundle {self.cfg.out}: {metric} {metrics.get(metric, float('nan')):.2f} at bpp "
                f"{metrics['bpp']:.4f} (coded bytes)")


def run_train(cfg) -> int:
    return TrainStage(cfg).run()
