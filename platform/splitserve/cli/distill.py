"""``platform distill``: Entropic Student stage 1 — train encoder, prior and decoder against a teacher."""

from __future__ import annotations

from ..training.options import parse_key_value, training_options
from ._training import Path, codec_options, opt, training_command

OPTIONS = [
    *codec_options("entropic_student"),
    opt("--teacher", action="extend", nargs="+", required=True, metavar="DIR",
        help="teacher directory (`platform teacher`); repeat as TASK=DIR, one per task on one backbone, to distil "
             "every teacher's features into the one encoder (the first one's data, preprocessing and metric are used)"),
    opt("--teacher-weight", dest="teacher_weight", action="extend", type=parse_key_value, nargs="+", default=None,
        metavar="TASK=W", help="weight of a teacher's distillation loss (default: 1 each)"),
    opt("--data", type=Path, required=True, metavar="DIR", help="dataset root (images only are used)"),
    opt("--beta", type=float, required=True, metavar="B", help="rate weight: loss = distillation MSEs + B * bpp"),
    opt("--out", type=Path, required=True, metavar="DIR", help="bundle directory to write"),
    opt("--task-data-format", default="auto", metavar="TASK",
        help="which task's data loader reads --data (auto: the teacher's task)"),
    opt("--aux-lr", type=float, default=1e-3, help="learning rate of the prior's quantile (aux) optimizer"),
    *training_options(epochs=10, batch_size=64, optimizer="adam", lr=1e-3, scheduler="multistep", milestones=[5, 8],
                      gamma=0.1),
]


register = training_command(
    "distill", "Entropic Student stage 1: distil a codec from a teacher; writes a bundle.",
    "Train encoder + prior + decoder so the decoded feature and the teacher's frozen layer2..4 outputs match "
    "the teacher's (MSE) at rate weight --beta; write a bundle that serves the teacher's head. With several "
    "teachers the loss is their --teacher-weight-ed sum and the bundle carries every teacher's head.",
    OPTIONS, "splitserve.training.distill:run_distill",
)
