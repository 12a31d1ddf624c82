"""Shared glue of the training commands: declare options, resolve recipe + flags, dispatch."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from pathlib import Path

from ..training.options import Opt, add_options, command_line, opt, parse_key_value, resolve
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


def task_option(required: bool = True) -> Opt:
    return opt("--task", required=required, metavar="TASK",
               help="task plugin name or alias (classification/cls, detection/det, segmentation/seg, …)")


def head_config_option(over: str) -> Opt:
    """``--head-config KEY=VALUE …``: head config keys over ``over`` (finetune: the source head's)."""
    return opt("--head-config", dest="head_config", type=parse_key_value, nargs="+", default=None, metavar="KEY=VALUE",
               help=f"head config for this task, over {over} (e.g. fpn_channels=64 for a narrow RetinaNet, "
                    "output_stride=8 for a dilated DeepLabv3 on ResNet-18)")


def loss_option() -> Opt:
    return opt("--option", dest="option", type=parse_key_value, nargs="+", default=None, metavar="KEY=VALUE",
               help="extra loss options passed to the task plugin (e.g. aux_weight=0.5)")


def training_command(name: str, help: str, description: str, options: Sequence[Opt], runner: str):
    """The ``register(subparsers)`` of a training command. ``runner`` is ``"module:function"``, imported
    only when the command runs (so printing help loads no training code)."""

    def register(sub):
        p = add_command(sub, name, lambda args: _dispatch(args, name, options, runner), help=help,
                        description=description)
        add_options(p, options)
        return p

    return register


def _dispatch(args, name: str, options: Sequence[Opt], runner: str) -> int:
    cfg = resolve(args, options, name)
    cfg.command_line = command_line(cfg, options, name)
    module, function = runner.split(":")
    return getattr(importlib.import_module(module), function)(cfg)


__all__ = ["ARCHS", "Path", "codec_options", "loss_option", "opt", "training_command", "task_option"]
