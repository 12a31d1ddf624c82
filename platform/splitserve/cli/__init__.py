"""The ``platform`` command. Each sub-command lives in its own module exposing
``register(subparsers)``; heavy imports (torch) happen inside the command, so ``--help`` is fast.
Errors the user can fix (:class:`~splitserve.errors.SplitserveError`) print as one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import warnings

from .. import __version__

# Order is the order in `platform --help`.
COMMAND_MODULES = [
    "serve",
    "infer",
    "encode",
    "export",
    "bundle",
    "tasks",
    "data",
    "teacher",
    "distill",
    "finetune",
    "train",
    "evaluate",
    "bench",
    "ray",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="platform",
        description="splitserve: tiny edge encoders, a decode-once gateway, task heads fine-tuned on a shared code.",
    )
    parser.add_argument("--version", action="version", version=f"splitserve {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `platform … | head`: the reader left; stop quietly, as a Unix tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 128 + signal.SIGPIPE


def _main(argv: list[str] | None) -> int:
    # compressai scripts a helper with torch.jit at import time; torch 2.14 warns about it on every run.
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    from ..errors import SplitserveError, Stopped

    try:
        return int(args.func(args) or 0)
    except Stopped as e:  # the run saved a checkpoint and said how to resume
        return 128 + e.signum
    except SplitserveError as e:
        print(f"platform {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"platform {args.command}: interrupted", file=sys.stderr)
        return 130


def add_command(sub, name: str, func, help: str, description: str | None = None, *,
                group: str | None = None) -> argparse.ArgumentParser:
    """Add a sub-command whose handler is ``func(args)``; the first line of help is the summary.
    ``group`` names the command it belongs to (``bench`` for ``platform bench serve``), so its
    errors name it in full."""
    p = sub.add_parser(name, help=help, description=description or help)
    p.set_defaults(func=func, command=f"{group} {name}" if group else name)
    return p
