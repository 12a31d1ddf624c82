"""`platform --help` and `platform COMMAND --help` import neither torch nor compressai (together
8–9 s here): printing help must not load a model stack, and neither may a bad image file or an
unreachable gateway before they are reported; and a reader that leaves the pipe early (`| head`)
gets no traceback. Each in a fresh interpreter, as users run it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Started

HEAVY = ("torch", "compressai", "torchvision", "onnxruntime", "executorch")

PROBE = """
import json, sys
from splitserve.cli import main
try:
    code = main(sys.argv[1:])
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


def start_probe(argv: list[str]) -> Started:
    """``platform ARGV`` in a fresh interpreter, started now (see :func:`read_probe`)."""
    return Started([sys.executable, "-c", PROBE, *argv])


def read_probe(started: Started) -> tuple[dict, str, str]:
    """A probe's exit code and the heavy modules it loaded, its output before that line, and its stderr."""
    proc = started.result(timeout=120)
    assert proc.returncode == 0, proc.stderr
    *out, last = proc.stdout.strip().splitlines()
    return json.loads(last), "\n".join(out), proc.stderr


def run_probe(argv: list[str]) -> tuple[dict, str, str]:
    return read_probe(start_probe(argv))


def help_loads(command: tuple[str, ...], started: Started) -> list[str]:
    """Checks ``platform COMMAND --help``'s exit code and help text; returns the heavy modules it loaded."""
    result, help_text, _ = read_probe(started)
    assert result["code"] == 0, (command, result)
    assert help_text.startswith("usage: platform" + "".join(f" {c}" for c in command))
    return result["loaded"]


def test_help_imports_no_model_stack():
    """Every command and sub-command; the top level first: it builds every command's parser, so
    when it loads the stack, so does every command (no need to wait for each to say so). The rest
    run side by side (each takes a fraction of a second, most of it the interpreter's start)."""
    top, *rest = commands()
    assert help_loads(top, start_probe(["--help"])) == []
    probes = [(command, start_probe([*command, "--help"])) for command in rest]
    try:
        loaded = {" ".join(command): heavy for command, started in probes if (heavy := help_loads(command, started))}
    finally:
        for _, started in probes:
            started.stop()
    assert loaded == {}


SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "images" / "bag.jpg"


@pytest.mark.parametrize("argv, message", [
    (["encode", "missing.jpg", "-o", "out.bin"], "missing.jpg: no such file"),
    (["infer", "missing.jpg", "--url", "http://127.0.0.1:9"], "missing.jpg: no such file"),
    (["infer", str(SAMPLE), "--url", "http://127.0.0.1:9"], "cannot reach"),
], ids=["encode-missing-image", "infer-missing-image", "infer-unreachable-gateway"])
def test_bad_input_is_reported_before_the_model_stack_loads(argv, message, tmp_path, monkeypatch):
    """A user's mistake answers at once: the image is read and the gateway asked before torch loads."""
    monkeypatch.chdir(tmp_path)
    result, _, stderr = run_probe(argv)
    assert result == {"code": 2, "loaded": []}, stderr
    assert len(stderr.strip().splitlines()) == 1 and message in stderr
    assert not (tmp_path / "out.bin").exists()


def test_a_reader_that_leaves_the_pipe_early_gets_no_traceback(bundle_dir):
    """`platform bundle inspect DIR | head -1`: the reader closes the pipe before the output is
    written; the command stops quietly with 128 + SIGPIPE, as Unix tools do, not with a traceback."""
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "splitserve", "bundle", "inspect", str(bundle_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the child (a fresh interpreter that loads torch) has written anything
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE, stderr
    assert stderr == ""
