"""Versioned JSON descriptors (a bundle's manifest.json, a teacher's teacher.json): one reader
so every directory format reports a missing, broken or foreign file the same clear way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import SplitserveError


def read_descriptor(root: str | Path, filename: str, *, format: str, version: int, kind: str,
                    upgrade_hint: str | None = None,
                    error: type[SplitserveError], hint: str = "") -> dict[str, Any]:
    """``root/filename`` as a dict whose ``format`` and ``format_version`` match, else ``error``.

    ``kind`` names the directory in messages ("bundle", "teacher"); ``hint`` is appended to the
    messages for a missing directory or file (e.g. how to make one).
    """
    root = Path(root)
    path = root / filename
    if not root.is_dir():
        raise error(f"{root}: no such {kind} directory{hint}")
    if not path.is_file():
        raise error(f"{root}: not a {kind} directory (no {filename}){hint}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != format:
        raise error(f"{path}: not a splitserve {kind} ({filename} of another format)")
    if raw.get("format_version") != version:
        hint = f"; {upgrade_hint}" if upgrade_hint else ""
        raise error(f"{path}: {kind} format version {raw.get('format_version')!r} is not supported "
                    f"(this splitserve reads version {version}){hint}")
    return raw
