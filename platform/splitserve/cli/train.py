"""``platform train``: Duan & Zhu single-stage training (codec + classifier)."""

from __future__ import annotations

from ._training import SGD_COSINE, Path, codec_options, opt, rate_options, teacher_options, training_command

OPTIONS, register = training_command(
    "train", "Single-stage codec + classifier training (Duan & Zhu): --joint or --cls-fixed.",
    "Train a codec and a classifier in one stage: loss = lmbda*bpp + MSE(features) + 0.5*(KL + CE). "
    "--joint trains the classifier too, --cls-fixed keeps the teacher's. Further --teacher TASK=DIR add their "
    "features to the MSE; --lmbdas trains one codec for every rate, one rate per batch (a prior per rate, or "
    "one shared prior with --prior shared).",
    "splitserve.training.joint:run_train",
    [
        opt("--mode", default=None, choices=("joint", "cls-fixed"), group="mode", help="same as --joint / --cls-fixed"),
        opt("--joint", dest="mode", action="store_const", const="joint", group="mode",
            help="train codec and classifier (layer2..4 + fc) together"),
        opt("--cls-fixed", dest="mode", action="store_const", const="cls-fixed", group="mode",
            help="keep the teacher's classifier frozen; train the codec only"),
        *codec_options("rac"),
        *teacher_options("is the classifier's: its head is trained, its data and preprocessing are used"),
        opt("--data", type=Path, required=True, metavar="DIR",
            help="ImageFolder root (train/, val/) or fmnist-scenes dir"),
        *rate_options("lmbda", "loss = lmbda * bpp + MSE + 0.5 (KL + CE)"),
        opt("--out", type=Path, required=True, metavar="DIR", help="bundle directory to write"),
        opt("--temperature", type=float, default=1.0, help="distillation temperature"),
    ],
    **SGD_COSINE, epochs=20, batch_size=384, min_lr_ratio=0.01,
)
