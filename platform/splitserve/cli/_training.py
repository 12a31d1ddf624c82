"""Shared glue of the training commands: declare options, resolve recipe + flags, dispatch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ..training.options import Opt, add_options, command_line, opt, parse_key_value, resolve
from . import add_command

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")


def codec_options(default_family: str) -> list[Opt]:
    """The codec a training command builds: any family in the registry (built-in or installed
    through the ``splitserve.codecs`` entry point) and its builder's arguments."""
    from ..models.registry import RegisteredCodecs

    return [
        opt("--encoder", default=default_family, choices=RegisteredCodecs(), metavar="FAMILY",
            help="codec family from the registry (built in: entropic_student, rac; installed packages add more)"),
        opt("--blocks", type=int, default=None, metavar="N", help="residual blocks of the rac family (0, 4, 8)"),
        opt("--latent-channels", type=int, default=None, metavar="C", help="latent channels (default: the family's)"),
        opt("--codec-option", dest="codec_option", type=parse_key_value, nargs="+", default=None, metavar="KEY=VALUE",
            help="further arguments of the family's builder"),
    ]


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


def register_training_command(sub, name: str, help: str, description: str, options: Sequence[Opt],
                              runner: Callable[[object], int], epilog: str | None = None):
    p = add_command(sub, name, lambda args: _dispatch(args, name, options, runner), help=help, description=description)
    if epilog:
        p.epilog = epilog
    add_options(p, options)
    return p


def _dispatch(args, name: str, options: Sequence[Opt], runner) -> int:
    cfg = resolve(args, options, name)
    cfg.command_line = command_line(cfg, options, name)
    return runner(cfg)


__all__ = ["ARCHS", "Path", "codec_options", "loss_option", "opt", "register_training_command", "task_option"]
