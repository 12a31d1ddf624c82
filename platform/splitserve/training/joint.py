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

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SplitserveError
from ..models import FeatureCodec
from ..plugins import TaskBatch, TaskPlugin
from . import common
from .distill import TAIL_STAGES, feature_distance
from .objective import Objective, freeze
from .optim import decayed_weights, split_codec_params, with_prior_optimizer
from .rates import PerStepRate, every_rate, rate_logs
from .stage import Plan
from .student import StudentStage


class JointObjective(PerStepRate, Objective):
    def __init__(self, plugin: TaskPlugin, codec: FeatureCodec, head: nn.Module, teacher_stem: nn.Module,
                 teacher_head: nn.Module, lmbda: float | Sequence[float], options: dict, head_fixed: bool,
                 others: Sequence[tuple[nn.Module, nn.Module]] = (), weights: Sequence[float] | None = None,
                 names: Sequence[str] = (), seed: int = 0):
        """``others``: (stem, tail) of further teachers (other tasks), whose features the decoded one
        is also pulled toward; ``weights``: one per teacher, the first (``teacher_*``) included
        (default 1 each); ``names``: the other teachers' log keys. ``lmbda``: the rate weight, or
        one per rate of a variable-rate codec (rate 0 first), each step at the rate drawn for it."""
        super().__init__()
        self.plugin = plugin
        self.codec = codec
        self.head = freeze(head) if head_fixed else head
        self.teacher_stem = freeze(teacher_stem)
        self.teacher_head = freeze(teacher_head)
        self.other_stems = nn.ModuleList(freeze(stem) for stem, _ in others)
        self.other_tails = nn.ModuleList(freeze(tail) for _, tail in others)
        self.weights = [float(w) for w in (weights if weights is not None else [1.0] * (1 + len(others)))]
        self.names = list(names) or [str(i) for i in range(1, len(self.weights))]
        self.lmbdas = self.draw_rates(codec.rates, seed, lmbda)
        self.options = {"kd_alpha": 0.5, **options}
        self.frozen = ("teacher_stem", "teacher_head", "other_stems", "other_tails") + (("head",) if head_fixed else ())

    def forward(self, batch: TaskBatch):
        images, rate = batch.images, self.rate
        with torch.no_grad(), capture_output(self.teacher_head.tail) as t_feats:
            h_t = self.teacher_stem(images)
            t_logits = self.plugin.head_output(self.teacher_head, h_t, batch)
        out = self.codec(images, rate)
        h_s = out.features
        bpp = out.bpp(images.shape[-2:])
        with capture_output(self.head.tail) as s_feats:  # the tail runs once, inside the task loss
            task = self.plugin.loss(self.head, h_s, batch, teacher_output=t_logits, options=self.options)
        if not s_feats or not t_feats:
            raise SplitserveError(f"task {self.plugin.name!r}: its loss/head_output did not run the head's tail, "
                                  "so the layer2..4 feature loss cannot be computed")
        mse = {"layer1": mean_squared_error(h_s, h_t)}
        mse.update({k: mean_squared_error(s_feats[0][k], t_feats[0][k]) for k in TAIL_STAGES})
        feature = self.weights[0] * sum(mse.values())  # x 1.0 (one teacher, the default) is exact
        logs = {"bpp": bpp.detach(), **{f"mse_{k}": v.detach() for k, v in mse.items()}}
        if self.other_stems:  # the same terms toward each further teacher, through its own frozen tail
            for stem, tail, weight, name in zip(self.other_stems, self.other_tails, self.weights[1:], self.names):
                term, _ = feature_distance(stem, tail, images, h_s, mean_squared_error)
                feature = feature + weight * term
                logs[f"feature_mse_{name}"] = term.detach()
        term = self.lmbdas[rate] * bpp
        losses = {
            "rate": term,
            "feature_mse": feature,
            **task,
            **self.prior_fit(out, rate, self.lmbdas, lambda o: o.bpp(images.shape[-2:])),
            "prior_aux": self.codec.aux_loss(),
        }
        return losses, {**logs, **rate_logs(rate, self.codec.rates, term, bpp)}


def mean_squared_error(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The reference code's per-stage MSE (the mean over every value), in float32."""
    return F.mse_loss(student.float(), teacher.float())


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
    rate_flag = "lmbda"

    def __init__(self, cfg):
        if cfg.mode not in ("joint", "cls-fixed"):
            raise SplitserveError("choose --joint (train codec and classifier) or --cls-fixed (classifier frozen)")
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
        others = self.teachers[1:]
        objective = JointObjective(plugin, codec, head, teacher.stem, teacher.head, self.rate_weights,
                                   common.options_of(cfg), head_fixed, others=[(t.stem, t.head.tail) for t in others],
                                   weights=self.weights, names=[t.task for t in others], seed=cfg.seed)
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
            codec = objective.codec
            try:
                measured = common.measure_rate(codec, data.policy, plugin, data.val_set, info.device)
                return every_rate(codec, self.default_rate, lambda features: plugin.evaluate(
                    objective.head, features, val_loader, dataset=data.val_set), measured=measured)
            finally:
                objective.train()

        params = with_prior_optimizer({"main": main, "aux": aux}, objective.codec, cfg.prior_lr)
        return Plan(f"train {cfg.mode}", f"train (Duan & Zhu single stage, {cfg.mode})", objective,
                    params, data, plugin.collate, validate, finish=self.refit(objective.codec, data, plugin.collate),
                    provenance={"teacher": str(teacher.path), **self.rate_provenance(),
                                "teachers": [{"task": t.task, "path": str(t.path), "weight": w}
                                             for t, w in zip(self.teachers, self.weights)]})

    def write(self, plan, result, metrics, provenance) -> str:
        self.save(plan, plan.objective.head, self.config, metrics, provenance, head_keys=("top5",),
                  bundle_keys=("bpp", "payload_bpp", "bytes", "bpp_estimate"), other_teachers=self.teachers[1:])
        return self.summary(metrics)


def run_train(cfg) -> int:
    return TrainStage(cfg).run()
