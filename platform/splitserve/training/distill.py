"""``platform distill``: Entropic Student stage 1 (Matsubara et al., WACV 2022).

The student replaces the teacher's stem (conv1 … layer1) with encoder → entropy bottleneck →
decoder; the teacher's layer2..4 are reused, frozen. The loss is the reference configuration's (the
paper's Eq. 2 without its ½ on the distortion term, as the reference code), per image and averaged
over the batch::

    Σ_{k=1..4} ‖h̃_k − h_k‖²  +  β · bits(z̃)

with ‖·‖² the *summed* squared error over channels and positions of stage k (k = 1: the decoded
feature against the teacher's layer1; k = 2..4: the frozen tail on both), h̃ decoded from the noisy
latent (z + U(-½, ½)), and bits = −log₂ p(z̃) under the factorized prior. With this scaling the
published β grid (0.01 … 5.12) means what it says. The prior's quantile (aux) loss runs on its
own optimizer every step. The bundle written at the end carries the teacher's head for its task,
so it serves immediately; ``platform finetune`` then adapts heads.

Several teachers (one per task, sharing one backbone) make one encoder for every task: the
distortion is their weighted sum, each teacher measured through its own stem and frozen tail,
``Σ_t w_t · Σ_k ‖h̃_k^t − h_k^t‖²``. One teacher of weight 1 is the single-teacher loss exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SplitserveError
from ..models import FeatureCodec
from ..plugins import TaskBatch
from . import common
from .objective import Objective, freeze
from .optim import split_codec_params
from .sampling import move_to
from .stage import Plan
from .student import StudentStage

TAIL_STAGES = ("layer2", "layer3", "layer4")


def squared_error(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """‖s − t‖² per image (summed over channels and positions), averaged over the batch."""
    return F.mse_loss(student.float(), teacher.float(), reduction="sum") / student.shape[0]


class DistillObjective(Objective):
    frozen = ("teacher_stems", "tails")

    def __init__(self, codec: FeatureCodec, teachers: Sequence[tuple[nn.Module, nn.Module]],
                 weights: Sequence[float], beta: float, names: Sequence[str] = ()):
        """``teachers``: (stem, tail) per teacher, the first the bundle's; ``weights`` and ``names``
        (their log keys, ``distill_NAME``, logged when there are several): one each."""
        super().__init__()
        self.codec = codec
        self.teacher_stems = nn.ModuleList(freeze(stem) for stem, _ in teachers)
        self.tails = nn.ModuleList(freeze(tail) for _, tail in teachers)
        self.weights = [float(w) for w in weights]
        self.beta = float(beta)
        self.names = list(names) or [str(i) for i in range(len(self.weights))]

    def terms(self, images: torch.Tensor) -> tuple[dict, dict]:
        out = self.codec(images)
        h_s = out.features
        per_teacher = []
        for stem, tail in zip(self.teacher_stems, self.tails):
            with torch.no_grad():
                h_t = stem(images)
                t_feats = tail(h_t)
            s_feats = tail(h_s)
            per_teacher.append(squared_error(h_s, h_t) + sum(squared_error(s_feats[k], t_feats[k]) for k in TAIL_STAGES))
            if len(per_teacher) == 1:  # the bundle's teacher
                mse_h = F.mse_loss(h_s.float(), h_t.float()).detach()
        distortion = sum(w * d for w, d in zip(self.weights, per_teacher))
        logs = {"bpp": out.bpp(images.shape[-2:]).detach(), "mse_h": mse_h}
        if len(per_teacher) > 1:
            logs.update({f"distill_{n}": d.detach() for n, d in zip(self.names, per_teacher)})
        return {"distill": distortion, "rate": self.beta * out.bits_per_image()}, logs

    def forward(self, batch: TaskBatch):
        losses, logs = self.terms(batch.images)
        losses["prior_aux"] = self.codec.aux_loss()
        return losses, logs


@torch.no_grad()
def validate_distill(objective: DistillObjective, loader, device, plugin=None, head=None, dataset=None) -> dict[str, float]:
    """Eval-mode (rounded latent) distillation loss, real coded rates, and — when the teacher's head
    fits the data — the task metric of student features through the frozen teacher head."""
    objective.eval()
    total = {"distill_loss": 0.0, "mse_h": 0.0, "bpp_estimate": 0.0}
    n = 0
    try:
        for batch in loader:
            images = move_to(batch.images, device)
            losses, logs = objective.terms(images)  # eval mode: rounded latent, its likelihoods
            b = images.shape[0]
            total["distill_loss"] += float(losses["distill"]) * b
            total["mse_h"] += float(logs["mse_h"]) * b
            total["bpp_estimate"] += float(logs["bpp"]) * b
            for key in (k for k in logs if k.startswith("distill_")):  # each teacher's term, when several
                total[key] = total.get(key, 0.0) + float(logs[key]) * b
            n += b
        metrics = {k: v / max(n, 1) for k, v in total.items()}
        metrics.update(common.measure_rate(objective.codec, loader, device, estimate=False))
        h, w = images.shape[-2:]
        metrics["loss"] = metrics["distill_loss"] + objective.beta * metrics["bpp_estimate"] * h * w
        if plugin is not None and head is not None:
            codec = objective.codec
            task = plugin.evaluate(head, common.coded_features(codec), loader, dataset=dataset)
            metrics.update({k: float(v) for k, v in task.items()})
    finally:
        objective.train()
    return metrics


class DistillStage(StudentStage):
    command = "distill"

    def plan(self) -> Plan:
        cfg, info, teacher, plugin = self.cfg, self.info, self.teacher, self.plugin
        data_plugin = plugin if cfg.task_data_format in (None, "", "auto") else common.training_plugin(
            self.plugins, cfg.task_data_format, "distill")
        if cfg.beta < 0:
            raise SplitserveError(f"--beta must be >= 0, got {cfg.beta}")
        codec, data = self.new_codec(data_plugin)
        teachers = self.teachers
        objective = DistillObjective(codec, [(t.stem, t.head.tail) for t in teachers], self.weights, cfg.beta,
                                     names=[t.task for t in teachers])
        main, aux = split_codec_params(objective.codec)
        val_loader = common.eval_loader(data_plugin, data.val_set, cfg)
        head = teacher.head.to(info.device) if data_plugin is plugin else None  # the task metric needs its data

        def validate() -> dict[str, float]:
            return validate_distill(objective, val_loader, info.device, plugin, head, data.val_set)

        return Plan("distill", "distill (Entropic Student stage 1)", objective, {"main": main, "aux": aux}, data,
                    data_plugin.collate, validate,
                    provenance={"teacher": str(teacher.path), "teacher_task": teacher.task, "beta": cfg.beta,
                                "teachers": [{"task": t.task, "path": str(t.path), "weight": w}
                                             for t, w in zip(teachers, self.weights)]})

    def write(self, plan, result, metrics, provenance) -> str:
        self.save(plan, self.teacher.head, self.teacher.config, metrics, provenance, head_keys=(),
                  bundle_keys=("bpp", "payload_bpp", "bpp_estimate", "distill_loss", "mse_h",
                               *(f"distill_{t.task}" for t in self.teachers)),  # per teacher: when several
                  other_teachers=self.teachers[1:])
        metric = self.plugin.metric_name
        task_part = f", {self.plugin.name} {metric} {metrics[metric]:.2f}" if metric in metrics else ""
        return (f"wrote bundle {self.cfg.out}: bpp {metrics['bpp']:.4f} (coded bytes), payload "
                f"{metrics['payload_bpp']:.4f}, distill loss {metrics['distill_loss']:.4f}{task_part}")


def run_distill(cfg) -> int:
    return DistillStage(cfg).run()
