"""`platform --help` and `platform COMMAND --help` import neither torch nor compressai (together
8–9 s here): printing help must not load a model stack. Each in a fresh interpreter, as users run it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "compressai", "torchvision", "onnxruntime", "executorch")

PROBE = """
import json, sys
from splitserve.cli import main
code = "returned instead of exiting"
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "loaded": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and sub-command of the real parser (new ones included)."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [(*prefix, name), *_commands(sub, (*prefix, name))]
    return found


def commands() -> list[tuple[str, ...]]:
    from splitserve.cli import build_parser

    return [(), *_commands(build_parser())]


def probe(command: tuple[str, ...]) -> list[str]:
    """``platform COMMAND --help`` in a fresh interpreter: checks the help, returns the heavy modules it loaded."""
    proc = subprocess.run([sys.executable, "-c", PROBE, *command, "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    *help_text, last = proc.stdout.strip().splitlines()
    result = json.loads(last)
    assert result["code"] == 0, (command, result)
    assert "\n".join(help_text).startswith("usage: platform" + "".join(f" {c}" for c in command))
    return result["loaded"]


# Until cli/_training.py stops building `--encoder` choices from the codec registry at import time
# (importing it loads torch + compressai, and argparse lists choices to print help), every help
# imports them: building the parser imports distill.py and train.py. The fix (a `type=` check in
# place of `choices=`) is in the issue 22 item 4 report; strict, so this marker must go with it.
def test_help_imports_no_model_stack():
    """Every command and sub-command; the top level first: it builds every command's parser, so
    when it loads the stack, so does every command (no need to wait for each to say so)."""
    loaded = {}
    for command in commands():
        heavy = probe(command)
        if heavy:
            loaded[" ".join(command) or "platform"] = heavy
            if not command:
                break
    assert loaded == {}
