"""``platform train``: Duan & Zhu single-stage training (codec + classifier)."""

from __future__ import annotations

from ..training.options import training_options
from ._training import Path, codec_options, opt, training_command

OPTIONS = [
    opt("--mode", default=None, choices=("joint", "cls-fixed"), group="mode", help="same as --joint / --cls-fixed"),
    opt("--joint", dest="mode", action="store_const", const="joint", group="mode",
        help="train codec and classifier (layer2..4 + fc) together"),
    opt("--cls-fixed", dest="mode", action="store_const", const="cls-fixed", group="mode",
        help="keep the teacher's classifier frozen; train the codec only"),
    *codec_options("rac"),
    opt("--teacher", type=Path, required=True, metavar="DIR", help="classification teacher directory"),
    opt("--data", type=Path, required=True, metavar="DIR", help="ImageFolder root (train/, val/) or fmnist-scenes dir"),
    opt("--lmbda", type=float, required=True, metavar="L", help="rate weight: loss = L * bpp + MSE + 0.5 (KL + CE)"),
    opt("--out", type=Path, required=True, metavar="DIR", help="bundle directory to write"),
    opt("--temperature", type=float, default=1.0, help="distillation temperature"),
    opt("--aux-lr", type=float, default=1e-3, help="learning rate of the prior's quantile (aux) optimizer"),
    *training_options(epochs=20, batch_size=384, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4,
                      scheduler="cosine", min_lr_ratio=0.01),
]


register = training_command(
    "train", "Single-stage codec + classifier training (Duan & Zhu): --joint or --cls-fixed.",
    "Train a codec and a classifier in one stage: loss = lmbda*bpp + MSE(features) + 0.5*(KL + CE). "
    "--joint trains the classifier too, --cls-fixed keeps the teacher's.",
    OPTIONS, "splitserve.training.joint:run_train",
)
