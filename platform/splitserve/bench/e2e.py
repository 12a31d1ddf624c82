"""End-to-end classification accuracy through the serving path, one payload per image.

Each image goes through exactly what production does: the edge encoder (its own resize),
payload bytes, the gateway's parser, entropy decoder, decoder and head. The teacher sees the same
resized input uncompressed. bpp counts every payload byte, header included.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..edge import EdgeEncoder
from ..errors import DataError
from ..gateway.runtime import Job, Runtime
from ..plugins import PluginRegistry


def run(bundle: Path, data: Path, *, split: str = "val", teacher: Path | None = None, limit: int | None = None) -> str:
    from ..training.common import resolve_data_root

    registry = PluginRegistry.discover()
    data = resolve_data_root(registry.get("classification"), data)  # an fmnist-scenes root works too
    folder = data / split
    if not folder.is_dir():
        raise DataError(f"{folder}: no such directory (expected an ImageFolder tree: {data}/{split}/<class>/<image>)")
    runtime = Runtime(bundle, registry, tasks=["classification"])
    labels = runtime.head_configs["classification"]["labels"]
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if sorted(labels) != classes:
        raise DataError(f"{folder}: class folders {classes} differ from the bundle's labels {labels}")
    items = [(f, labels.index(c)) for c in classes for f in sorted((folder / c).iterdir()) if f.is_file()]
    if limit:
        items = items[::max(1, len(items) // limit)][:limit]
    edge = EdgeEncoder.from_bundle(bundle)
    ref = None
    if teacher is not None:
        from ..training.teacher import load_teacher

        ref = load_teacher(teacher, registry)
        ref.stem.eval(), ref.head.eval()
    bits = pixels = hits = ref_hits = 0
    start = time.perf_counter()
    for path, label in tqdm(items, desc="e2e", unit="img"):
        x, sizes = edge.preprocess([path])  # the teacher sees exactly what the edge encodes
        encoded = edge.encode_tensor(x, sizes)  # one image per payload, as a device sends it
        bits += 8 * encoded.num_bytes
        h, w = encoded.payload.original_sizes[0]
        pixels += h * w
        payload, metas = runtime.parse_payload(encoded.data)
        answer = runtime.run([Job(plugins=list(runtime.plugins), payload=payload, metas=metas)])[0][0]
        hits += answer["classification"].top[0].index == label
        if ref is not None:
            with torch.inference_mode():
                ref_hits += int(ref.head(ref.stem(x)).argmax(1)) == label
    n = len(items)
    lines = [
        "| model | top-1 % | bpp (payload bytes, header included) | bytes / image |",
        "|---|---:|---:|---:|",
    ]
    if ref is not None:
        lines.append(f"| teacher `{teacher.name}` (uncompressed input) | {100 * ref_hits / n:.1f} | — | — |")
    lines.append(f"| bundle `{bundle.name}` via payload → gateway runtime | {100 * hits / n:.1f} | "
                 f"{bits / pixels:.3f} | {bits / 8 / n:.0f} |")
    lines += ["", f"{n} images of `{folder}`, {time.perf_counter() - start:.0f} s."]
    return "\n".join(lines)
