"""``platform distill``: Entropic Student stage 1 — train encoder, prior and decoder against a teacher."""

from __future__ import annotations

from ._training import Path, codec_options, opt, rate_options, teacher_options, training_command

OPTIONS, register = training_command(
    "distill", "Entropic Student stage 1: distil a codec from a teacher; writes a bundle.",
    "Train encoder + prior + decoder so the decoded feature and the teacher's frozen layer2..4 outputs match "
    "the teacher's (MSE) at rate weight --beta; write a bundle that serves the teacher's head. With several "
    "teachers the loss is their --teacher-weight-ed sum and the bundle carries every teacher's head. With "
    "--betas, one codec codes at every rate (a gain and a prior per rate, or one shared prior with --prior "
    "shared), one rate per batch.",
    "splitserve.training.distill:run_distill",
    [
        *codec_options("entropic_student"),
        *teacher_options("gives the data, preprocessing and metric"),
        opt("--data", type=Path, required=True, metavar="DIR", help="dataset root (images only are used)"),
        *rate_options("beta", "loss = distillation squared errors + beta * bits per image"),
        opt("--out", type=Path, required=True, metavar="DIR", help="bundle directory to write"),
        opt("--task-data-format", default="auto", metavar="TASK",
            help="which task's data loader reads --data (auto: the teacher's task)"),
    ],
    epochs=10, batch_size=64, optimizer="adam", lr=1e-3, scheduler="multistep", milestones=[5, 8], gamma=0.1,
)
