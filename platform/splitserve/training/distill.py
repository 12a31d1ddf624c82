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

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models import CodecOutput, FeatureCodec
from ..plugins import TaskBatch
from . import common
from .objective import Objective, freeze
from .optim import split_codec_params, with_prior_optimizer
from .rates import PerStepRate, per_rate, rate_logs
from .sampling import move_to
from .stage import Plan
from .student import StudentStage

TAIL_STAGES = ("layer2", "layer3", "layer4")


def squared_error(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """‖s − t‖² per image (summed over channels and positions), averaged over the batch."""
    return F.mse_loss(student.float(), teacher.float(), reduction="sum") / student.shape[0]


def feature_distance(stem: nn.Module, tail: nn.Module, images: torch.Tensor, h_s: torch.Tensor,
                     error: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``error(h̃, h) + Σ_{k=2..4} error(tail(h̃)_k, tail(h)_k)``: how far the decoded feature ``h_s``
    is from one frozen teacher's (its ``stem`` on ``images``), also through the teacher's frozen
    layer2..4. Returns (that distance, the teacher's h)."""
    with torch.no_grad():
        h_t = stem(images)
        t_feats = tail(h_t)
    s_feats = tail(h_s)
    return error(h_s, h_t) + sum(error(s_feats[k], t_feats[k]) for k in TAIL_STAGES), h_t


class DistillObjective(PerStepRate, Objective):
    frozen = ("teacher_stems", "tails")

    def __init__(self, codec: FeatureCodec, teachers: Sequence[tuple[nn.Module, nn.Module]],
                 weights: Sequence[float], beta: float | Sequence[float], names: Sequence[str] = (), seed: int = 0):
        """``teachers``: (stem, tail) per teacher, the first the bundle's; ``weights`` and ``names``
        (their log keys, ``distill_NAME``, logged when there are several): one each. ``beta``: the
        rate weight, or one per rate of a variable-rate codec (rate 0 first), each step at the rate
        drawn for it (:class:`~splitserve.training.rates.PerStepRate` with ``seed``)."""
        super().__init__()
        self.codec = codec
        self.teacher_stems = nn.ModuleList(freeze(stem) for stem, _ in teachers)
        self.tails = nn.ModuleList(freeze(tail) for _, tail in teachers)
        self.weights = [float(w) for w in weights]
        self.betas = self.draw_rates(codec.rates, seed, beta)
        self.names = list(names) or [str(i) for i in range(len(self.weights))]

    def terms(self, images: torch.Tensor, rate: int | None = None) -> tuple[dict, dict]:
        rate = self.rate if rate is None else rate
        out = self.codec(images, rate)
        h_s = out.features
        per_teacher = []
        for stem, tail in zip(self.teacher_stems, self.tails):
            distance, h_t = feature_distance(stem, tail, images, h_s, squared_error)
            per_teacher.append(distance)
            if len(per_teacher) == 1:  # the bundle's teacher
                mse_h = F.mse_loss(h_s.float(), h_t.float()).detach()
        distortion = sum(w * d for w, d in zip(self.weights, per_teacher))
        bpp = out.bpp(images.shape[-2:]).detach()
        term = self.betas[rate] * out.bits_per_image()
        logs = {"bpp": bpp, "mse_h": mse_h, **rate_logs(rate, self.codec.rates, term, bpp)}
        if len(per_teacher) > 1:
            logs.update({f"distill_{n}": d.detach() for n, d in zip(self.names, per_teacher)})
        fit = self.prior_fit(out, rate, self.betas, CodecOutput.bits_per_image)
        return {"distill": distortion, "rate": term, **fit}, logs

    def forward(self, batch: TaskBatch):
        losses, logs = self.terms(batch.images)
        losses["prior_aux"] = self.codec.aux_loss()
        return losses, logs


@torch.no_grad()
def validate_distill(objective: DistillObjective, loader, device, data: common.TaskData, data_plugin,
                     plugin=None, head=None, default_rate: int = 0) -> dict[str, float]:
    """Eval-mode (rounded latent) distillation loss, real coded rates (as ``platform evaluate``
    measures them), and — when the teacher's head fits the data — the task metric of student
    features through the frozen teacher head; at every rate (:func:`~splitserve.training.rates.per_rate`)."""
    objective.eval()
    codec = objective.codec
    try:
        rates = common.measure_rate(codec, data.policy, data_plugin, data.val_set, device, estimate=False)
        per = []
        for rate, measured in enumerate(rates):
            total = {"distill_loss": 0.0, "mse_h": 0.0, "bpp_estimate": 0.0}
            n = 0
            for batch in loader:
                images = move_to(batch.images, device)
                losses, logs = objective.terms(images, rate)  # eval mode: rounded latent, its likelihoods
                b = images.shape[0]
                total["distill_loss"] += float(losses["distill"]) * b
                total["mse_h"] += float(logs["mse_h"]) * b
                total["bpp_estimate"] += float(logs["bpp"]) * b
                for key in (k for k in logs if k.startswith("distill_")):  # each teacher's term, when several
                    total[key] = total.get(key, 0.0) + float(logs[key]) * b
                n += b
            metrics = {k: v / max(n, 1) for k, v in total.items()}
            metrics.update(measured)
            h, w = images.shape[-2:]
            metrics["loss"] = metrics["distill_loss"] + objective.betas[rate] * metrics["bpp_estimate"] * h * w
            if plugin is not None and head is not None:
                task = plugin.evaluate(head, common.coded_features(codec, rate), loader, dataset=data.val_set)
                metrics.update({k: float(v) for k, v in task.items()})
            per.append(metrics)
    finally:
        objective.train()
    return per_rate(per, default_rate)


class DistillStage(StudentStage):
    command = "distill"
    rate_flag = "beta"

    def plan(self) -> Plan:
        cfg, info, teacher, plugin = self.cfg, self.info, self.teacher, self.plugin
        data_plugin = plugin if cfg.task_data_format in (None, "", "auto") else common.training_plugin(
            self.plugins, cfg.task_data_format, "distill")
        codec, data = self.new_codec(data_plugin)
        teachers = self.teachers
        objective = DistillObjective(codec, [(t.stem, t.head.tail) for t in teachers], self.weights,
                                     self.rate_weights, names=[t.task for t in teachers], seed=cfg.seed)
        main, aux = split_codec_params(objective.codec)
        params = with_prior_optimizer({"main": main, "aux": aux}, objective.codec, cfg.prior_lr)
        val_loader = common.eval_loader(data_plugin, data.val_set, cfg)
        head = teacher.head.to(info.device) if data_plugin is plugin else None  # the task metric needs its data

        def validate() -> dict[str, float]:
            return validate_distill(objective, val_loader, info.device, data, data_plugin, plugin, head,
                                    self.default_rate)

        return Plan("distill", "distill (Entropic Student stage 1)", objective, params, data,
                    data_plugin.collate, validate, finish=self.refit(objective.codec, data, data_plugin.collate),
                    provenance={"teacher": str(teacher.path), "teacher_task": teacher.task, **self.rate_provenance(),
                                "teachers": [{"task": t.task, "path": str(t.path), "weight": w}
                                             for t, w in zip(teachers, self.weights)]})

    def write(self, plan, result, metrics, provenance) -> str:
        self.save(plan, self.teacher.head, self.teacher.config, metrics, provenance, head_keys=(),
                  bundle_keys=("bpp", "payload_bpp", "bytes", "bpp_estimate", "distill_loss", "mse_h",
                               *(f"distill_{t.task}" for t in self.teachers)),  # per teacher: when several
                  other_teachers=self.teachers[1:])
        return self.summary(metrics, f", distill loss {metrics['distill_loss']:.4f}")


def run_distill(cfg) -> int:
    return DistillStage(cfg).run()
