"""``platform evaluate``: every point of a rate–accuracy sweep, measured through the served path.

Rate comes from real bytes — the payload with its header, or the image file — in bits per pixel of
the model input (and bytes per image). Accuracy goes through what is served: payload bytes →
gateway :class:`~splitserve.gateway.runtime.Runtime` for our bundles; encode → decode → the
uncompressed teacher for input codecs (JPEG, WebP via Pillow). Classification top-1 today.

The sweep file (YAML)::

    data: runs/default/fm64          # an ImageFolder root, or an fmnist-scenes tree
    split: val
    limit: 500                       # evenly spaced subset (optional)
    teacher: runs/default/teacher-cls
    threads: 1                       # for the latency measurements
    anchors: {delta_accuracy: Entropic Student, bd_rate: WebP}
    links_kbit_s: {LoRa: 37.5, LTE-M: 1000, Wi-Fi: 50000}
    methods:
      - {name: Entropic Student, kind: bundle, points: [runs/es-b0.32, runs/es-b1.28]}
      - {name: WebP, kind: webp, points: [5, 20, 40, 80]}
      - {name: JPEG, kind: jpeg, points: [10, 30, 50, 90]}
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image
from tqdm import tqdm

from ..errors import SplitserveError
from ..bench.timing import median_ms
from .metrics import CurveError, bd_rate, delta_accuracy

KINDS = ("bundle", "jpeg", "webp")
DEFAULT_LINKS = {"LoRa": 37.5, "LTE-M": 1000.0, "Wi-Fi": 50000.0}


class SweepError(SplitserveError):
    """The sweep file is missing, malformed, or names something that does not exist."""


@dataclass
class Method:
    name: str
    kind: str
    points: list


@dataclass
class Sweep:
    data: Path
    teacher: Path
    methods: list[Method]
    split: str = "val"
    limit: int | None = None
    threads: int = 1
    anchors: dict[str, str] = field(default_factory=dict)
    links_kbit_s: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LINKS))


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SweepError(f"{path}: no such sweep file") from None
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep is a mapping (data, teacher, methods, …)")
    unknown = set(raw) - {"data", "teacher", "methods", "split", "limit", "threads", "anchors", "links_kbit_s"}
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("data", "teacher", "methods"):
        if key not in raw:
            raise SweepError(f"{path}: missing '{key}'")
    methods = []
    for i, m in enumerate(raw["methods"] or []):
        if not isinstance(m, dict) or {"name", "kind", "points"} - set(m):
            raise SweepError(f"{path}: methods[{i}] needs name, kind and points")
        if m["kind"] not in KINDS:
            raise SweepError(f"{path}: methods[{i}] kind {m['kind']!r} is not one of {', '.join(KINDS)}")
        if not m["points"]:
            raise SweepError(f"{path}: methods[{i}] has no points")
        methods.append(Method(str(m["name"]), m["kind"], list(m["points"])))
    base = path.parent
    sweep = Sweep(data=_rel(base, raw["data"]), teacher=_rel(base, raw["teacher"]), methods=methods,
                  split=str(raw.get("split", "val")), limit=raw.get("limit"), threads=int(raw.get("threads", 1)),
                  anchors=dict(raw.get("anchors") or {}), links_kbit_s=dict(raw.get("links_kbit_s") or DEFAULT_LINKS))
    for m in sweep.methods:
        if m.kind == "bundle":
            m.points = [_rel(base, p) for p in m.points]
    return sweep


def _rel(base: Path, p: str | Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() or p.exists() else base / p


@dataclass
class Point:
    method: str
    kind: str
    setting: str
    images: int
    bytes_per_image: float
    bpp: float
    top1: float
    encode_ms: float
    server_ms: float
    device_params: int | None = None
    device_macs: int | None = None


def _images(sweep: Sweep) -> list[tuple[Path, int]]:
    root = sweep.data / "imagefolder" if (sweep.data / "imagefolder").is_dir() else sweep.data
    split = root / sweep.split
    if not split.is_dir():
        raise SweepError(f"{split}: no such directory (an ImageFolder split: {split}/<class>/<image>)")
    classes = sorted(p.name for p in split.iterdir() if p.is_dir())
    items = [(f, k) for k, c in enumerate(classes) for f in sorted((split / c).iterdir()) if f.is_file()]
    if sweep.limit and sweep.limit < len(items):
        step = len(items) / sweep.limit
        items = [items[int(i * step)] for i in range(sweep.limit)]
    if not items:
        raise SweepError(f"{split}: no images")
    return items


def device_macs(module: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply–accumulates of one forward (convolutions and linear layers), counted with hooks."""
    total = 0

    def hook(m, inputs, out):
        nonlocal total
        if isinstance(m, torch.nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, torch.nn.ConvTranspose2d):
            total += inputs[0].numel() * (m.out_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, torch.nn.Linear):
            total += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear))]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return total


def _bundle_point(name: str, bundle: Path, items, threads: int) -> Point:
    from ..edge import EdgeEncoder
    from ..gateway.runtime import Job, Runtime
    from ..plugins import PluginRegistry
    from ..preprocess import load_image

    edge = EdgeEncoder.from_bundle(bundle)
    runtime = Runtime(bundle, PluginRegistry.discover(), tasks=["classification"])
    plugin = runtime.plugins[0]
    total_bytes = bits = correct = 0.0
    for path, label in tqdm(items, desc=f"{name} {bundle.name}", unit="img", leave=False):
        encoded = edge.encode([load_image(path)])
        payload, metas = runtime.parse_payload(encoded.data)
        answer = runtime.run([Job(plugins=[plugin], payload=payload, metas=metas)])[0][0]["classification"]
        correct += answer.top[0].index == label
        total_bytes += len(encoded.data)
        bits += encoded.bpp[0]
    torch.set_num_threads(threads)
    x, _ = edge.preprocess([load_image(items[0][0])])
    enc = median_ms(lambda: edge.encode_tensor(x, [(1, 1)]))
    payload, metas = runtime.parse_payload(edge.encode_tensor(x, [(1, 1)]).data)
    server = median_ms(lambda: runtime.run([Job(plugins=[plugin], payload=payload, metas=metas)]))
    counts = edge.codec.parameter_counts()
    n = len(items)
    return Point(name, "bundle", bundle.name, n, total_bytes / n, bits / n, 100 * correct / n, enc, server,
                 counts["encoder"] + counts["prior"], device_macs(edge.codec.encoder, x))


def _codec_point(name: str, kind: str, quality: int, items, teacher, threads: int) -> Point:
    from ..preprocess import load_image
    from splitserve_edge.payload import bits_per_pixel
    from splitserve_edge.preprocessing import normalize
    import numpy as np

    fmt = "JPEG" if kind == "jpeg" else "WEBP"
    policy = teacher.preprocessing
    total_bytes = bits = correct = 0.0

    def encode(img: Image.Image) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt, quality=int(quality))
        return buf.getvalue()

    for path, label in tqdm(items, desc=f"{name} q{quality}", unit="img", leave=False):
        geo = policy.geometry(load_image(path))
        data = encode(geo)
        decoded = Image.open(io.BytesIO(data)).convert("RGB")
        x = torch.from_numpy(normalize(np.asarray(decoded, dtype=np.uint8)))[None]
        with torch.no_grad():
            logits = teacher.head(teacher.stem(x))
        correct += int(logits.argmax(1)) == label
        total_bytes += len(data)
        bits += bits_per_pixel(8 * len(data), 1, (geo.height, geo.width))
    torch.set_num_threads(threads)
    geo = policy.geometry(load_image(items[0][0]))
    enc = median_ms(lambda: encode(geo))
    x = torch.from_numpy(policy.apply(geo))[None]
    with torch.no_grad():
        server = median_ms(lambda: teacher.head(teacher.stem(x)))
    n = len(items)
    return Point(name, kind, f"q{quality}", n, total_bytes / n, bits / n, 100 * correct / n, enc, server)


def evaluate(sweep: Sweep, out: Path) -> dict[str, Any]:
    from ..plugins import PluginRegistry
    from ..training.teacher import load_teacher

    started = time.perf_counter()
    items = _images(sweep)
    teacher = load_teacher(sweep.teacher, PluginRegistry.discover())
    teacher.stem.eval(), teacher.head.eval()
    points: list[Point] = []
    timings: dict[str, float] = {}
    for m in sweep.methods:
        t = time.perf_counter()
        for setting in m.points:
            if m.kind == "bundle":
                if not (Path(setting) / "manifest.json").is_file():
                    raise SweepError(f"{m.name}: {setting} is not a bundle directory")
                points.append(_bundle_point(m.name, Path(setting), items, sweep.threads))
            else:
                points.append(_codec_point(m.name, m.kind, int(setting), items, teacher, sweep.threads))
        timings[m.name] = time.perf_counter() - t
    summary = summarize(points, sweep)
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(p) for p in points]
    (out / "points.json").write_text(json.dumps({"points": rows, "summary": summary, "seconds": timings}, indent=2))
    with (out / "points.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    from .report import write_report

    write_report(out, points, summary, sweep, timings, time.perf_counter() - started)
    return summary


def summarize(points: list[Point], sweep: Sweep) -> dict[str, Any]:
    curves: dict[str, list[Point]] = {}
    for p in points:
        curves.setdefault(p.method, []).append(p)
    out: dict[str, Any] = {"delta_accuracy": {}, "bd_rate": {}, "links": {}}
    for key, fn, anchor in (("delta_accuracy", delta_accuracy, sweep.anchors.get("delta_accuracy")),
                            ("bd_rate", bd_rate, sweep.anchors.get("bd_rate"))):
        if anchor not in curves:
            continue
        a = curves[anchor]
        for name, c in curves.items():
            try:
                out[key][name] = fn([p.bpp for p in a], [p.top1 for p in a], [p.bpp for p in c], [p.top1 for p in c])
            except CurveError as e:
                out[key][name] = f"n/a ({e})"
    for link, kbit in sweep.links_kbit_s.items():
        out["links"][link] = {f"{p.method} {p.setting}": p.encode_ms + p.bytes_per_image * 8 / kbit + p.server_ms
                              for p in points}
    return out
