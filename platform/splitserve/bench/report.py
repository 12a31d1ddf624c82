"""Machine description and Markdown sections that benchmarks rewrite in place."""

from __future__ import annotations

import os
import platform as _stdlib_platform
import re
from pathlib import Path


def machine() -> str:
    """One line naming the machine, so absolute numbers are never quoted without it."""
    import torch

    cpu = _stdlib_platform.processor() or _stdlib_platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{os.cpu_count()} CPU cores ({cpu}){gpu}; Python {_stdlib_platform.python_version()}, "
            f"torch {torch.__version__}, threads {torch.get_num_threads()}")


def write_section(path: str | Path, name: str, body: str) -> None:
    """Replace the ``<!-- bench:NAME -->`` … ``<!-- /bench:NAME -->`` block (append if absent)."""
    path = Path(path)
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
