"""Shared glue of the training commands: declare options, resolve recipe + flags, dispatch."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..training.options import (Opt, add_options, comma_floats, command_line, opt, parse_key_value, resolve,
                                training_options)
from . import add_command

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")


def codec_options(default_family: str) -> list[Opt]:
    """The codec a training command builds: any family in the registry (built-in or installed
    through the ``splitserve.codecs`` entry point) and its builder's arguments."""
    return [
        opt("--encoder", default=default_family, type=codec_family, metavar="FAMILY",
            help="codec family from the registry (built in: entropic_student, rac; installed packages add more)"),
        opt("--blocks", type=int, default=None, metavar="N", help="residual blocks of the rac family (0, 4, 8)"),
        opt("--latent-channels", type=int, default=None, metavar="C", help="latent channels (default: the family's)"),
        opt("--codec-option", dest="codec_option", type=parse_key_value, nargs="+", default=None, metavar="KEY=VALUE",
            help="further arguments of the family's builder"),
    ]


def codec_family(name: str) -> str:
    """``--encoder`` (flag or recipe): a family in the registry, checked as a type rather than listed
    as choices, because argparse lists choices to print help and the registry's package loads torch
    and compressai."""
    from ..models.registry import list_codecs

    if name not in list_codecs():
        raise argparse.ArgumentTypeError(f"unknown codec family {name!r}; available: {', '.join(list_codecs())}")
    return name


def teacher_options(first_role: str) -> list[Opt]:
    """``--teacher`` (repeatable as TASK=DIR, one per task on one backbone) and ``--teacher-weight``."""
    return [
        opt("--teacher", action="extend", nargs="+", required=True, metavar="DIR",
            help=f"teacher directory (`platform teacher`); repeat as TASK=DIR, one per task on one backbone, to pull "
                 f"the one decoded feature toward every teacher's (the first one {first_role})"),
        pairs_option("--teacher-weight", "TASK=W", "weight of a teacher's feature loss (default: 1 each)"),
    ]


def pairs_option(flag: str, metavar: str, help: str) -> Opt:
    """A ``KEY=VALUE`` option that may be repeated, its pairs adding up (values read as YAML)."""
    return opt(flag, action="extend", type=parse_key_value, nargs="+", default=None, metavar=metavar, help=help)


def rate_options(name: str, loss: str) -> list[Opt]:
    """``--NAME W`` (one rate) or ``--NAMEs W1,W2,…`` (a variable-rate codec), ``--default-rate``,
    ``--prior`` (a variable-rate codec's rate model) and the entropy model's optimizers (``--aux-lr``,
    ``--prior-lr``); ``loss`` says where the weight enters the loss."""
    return [
        opt(f"--{name}", type=float, default=None, metavar="W", help=f"rate weight: {loss} (one rate)",
            replaces=(f"{name}s",)),
        opt(f"--{name}s", type=comma_floats, default=None, metavar="W1,W2,...", replaces=(name,),
            help=f"a variable-rate codec: one rate per value (at least two), rate 0 the largest {name} (the "
                 f"smallest payload); each batch is coded at one rate drawn from a generator seeded with "
                 f"(--seed, step) and its rate term weighted by that rate's {name}; give --{name} or --{name}s"),
        opt("--default-rate", type=int, default=None, metavar="K",
            help="the rate a device codes at unless told otherwise (default: the highest, the largest payload)"),
        # default None, not "per-rate": a checkpoint's signature from before --prior existed still matches
        opt("--prior", default=None, choices=("per-rate", "shared"),
            help=f"with --{name}s, the rate model: per-rate (the default) gives each rate a factorized prior of its "
                 "own; shared gives the codec one factorized prior over the un-gained latent, which rate k reads "
                 "with the quantisation step 1/gain_k (its coding tables are cut from that one density; the "
                 "payloads, coder and gateway are the same)"),
        opt("--aux-lr", type=float, default=1e-3, help="learning rate of the prior's quantile (aux) optimizer"),
        opt("--refit-steps", type=int, default=300, metavar="N",
            help="after training, fit every prior's density (then its quantiles) to the trained transform's latent "
                 "on 1,024 training images for N Adam steps each (at most 10 passes over them), the transform "
                 "frozen, before the bundle is measured and written (0: keep the priors as trained)"),
        opt("--prior-lr", type=float, default=None, metavar="LR",
            help="train the entropy model (every prior's density; the gains of several rates) with an Adam of its "
                 "own at LR, on the main schedule (default: with the rest, on --optimizer)"),
    ]


def task_option(required: bool = True, replaces: tuple[str, ...] = ()) -> Opt:
    return opt("--task", required=required, metavar="TASK", replaces=replaces,
               help="task plugin name or alias (classification/cls, detection/det, segmentation/seg, …)")


def head_config_option(over: str) -> Opt:
    """``--head-config KEY=VALUE …``: head config keys over ``over`` (finetune: the source head's)."""
    return opt("--head-config", dest="head_config", type=parse_key_value, nargs="+", default=None, metavar="KEY=VALUE",
               help=f"head config for this task, over {over} (e.g. fpn_channels=64 for a narrow RetinaNet, "
                    "output_stride=8 for a dilated DeepLabv3 on ResNet-18)")


def loss_option() -> Opt:
    return opt("--option", dest="option", type=parse_key_value, nargs="+", default=None, metavar="KEY=VALUE",
               help="extra loss options passed to the task plugin (e.g. aux_weight=0.5)")


SGD_COSINE = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "scheduler": "cosine"}
"""SGD at 0.01, momentum 0.9, weight decay 1e-4, cosine schedule: torchvision's classification recipe
(the teacher) and Duan & Zhu's (``train``)."""


def training_command(name: str, help: str, description: str, runner: str, options: Sequence[Opt],
                     **recipe: Any) -> tuple[list[Opt], Callable]:
    """A training command: its ``options`` followed by the options every training command shares,
    with the command's recipe defaults (``recipe``: the paper's epochs, optimizer, schedule, …), and
    the ``register(subparsers)`` that adds it. ``runner`` is ``"module:function"``, imported only when
    the command runs (so printing help loads no training code). Returns (all options, register)."""
    every = [*options, *training_options(**recipe)]

    def register(sub):
        p = add_command(sub, name, lambda args: _dispatch(args, name, every, runner), help=help,
                        description=description)
        add_options(p, every)
        return p

    return every, register


def _dispatch(args, name: str, options: Sequence[Opt], runner: str) -> int:
    cfg = resolve(args, options, name)
    cfg.command_line = command_line(cfg, options, name)
    module, function = runner.split(":")
    return getattr(importlib.import_module(module), function)(cfg)


__all__ = ["ARCHS", "SGD_COSINE", "Path", "codec_options", "loss_option", "opt", "pairs_option", "rate_options", "teacher_options",
           "training_command", "task_option"]
