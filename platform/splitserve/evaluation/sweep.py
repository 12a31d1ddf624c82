"""The sweep file: what a rate–accuracy study measures (YAML), loaded and checked in one place.

Every bad field is reported, each on its own line, in one :class:`SweepError`; paths are relative
to the sweep file. The schema (see ``docs/evaluation.md``)::

    data: ../runs/fm64                 # fmnist-scenes tree, ImageFolder root or COCO 2017 tree
    split: val
    limit: 500                         # evenly spaced subset per task (optional)
    teachers:                          # the uncompressed models the input codecs feed
      classification: ../runs/teacher-cls
      detection: ../runs/teacher-det
    tasks: [classification, detection] # optional: default every task with a teacher
    threads: 1                         # torch threads for every latency measurement
    repeat: 20                         # latency = median of this many runs after a warm-up
    batch_size: 16                     # images per runtime/teacher call for the accuracy passes
    anchors: {delta_accuracy: Entropic Student, bd_rate: WebP, complexity: Entropic Student}
    comparisons: [[Factorized prior, JPEG]]  # also: Δ-accuracy and BD-rate of a curve against another
    variable_rate: [[ES VR, Entropic Student]]  # a variable-rate bundle's curve against separately
                                       # trained bundles: Δ-accuracy, BD-rate and training time
    links_kbit_s: {LoRa: 37.5, LTE-M: 1000, Wi-Fi: 50000}
    link_tolerance: [1.0, 5.0]         # accuracy points below the uncompressed teacher still "as good"
                                       # (one number or a list: one link table per tolerance)
    bitmaps: {images: 3, methods: [Entropic Student, Factorized prior]}
    methods:
      - {name: Entropic Student, kind: bundle, points: [../runs/es-b0.32, ../runs/es-b1.28]}
      - {name: WebP, kind: webp, points: [5, 20, 40, 80]}
      - {name: JPEG, kind: jpeg, points: [10, 30, 50, 90]}
      - {name: Factorized prior, kind: compressai, points: [../runs/bmshj-q1, ../runs/bmshj-q3]}
      - {name: ES own trunk, kind: bundle, points: [../runs/es-own], tasks: [detection]}  # only there
      - {name: ES VR, kind: bundle, points: [../runs/es-vr]}  # variable-rate: one point per rate

A variable-rate bundle (its codec has ``rates`` > 1) is measured at every rate, one point each: it
is one curve, so it is the only point of its method.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import SplitserveError

KINDS = ("bundle", "jpeg", "webp", "compressai")
"""bundle: our feature codecs (payload → gateway runtime); jpeg/webp: Pillow input codecs at a
quality; compressai: a learned image codec trained by ``platform train-image-codec``."""

DEFAULT_LINKS = {"LoRa": 37.5, "LTE-M": 1000.0, "Wi-Fi": 50000.0}
"""kbit/s. LoRa: the Entropic Student paper's setting (37.5 kbit/s). LTE-M: the class of link
(LTE Cat-M1 peaks near 1 Mbit/s; 1 Mbit/s here). Wi-Fi: a modest 50 Mbit/s 802.11n link."""

_KEYS = {"data", "split", "limit", "teacher", "teachers", "tasks", "threads", "repeat", "batch_size", "anchors",
         "comparisons", "variable_rate", "links_kbit_s", "link_tolerance", "bitmaps", "methods"}
_ANCHORS = ("delta_accuracy", "bd_rate", "complexity")


class SweepError(SplitserveError):
    """The sweep file is missing, malformed, or names something that does not exist."""


@dataclass
class Method:
    name: str
    kind: str
    points: list  # bundle / compressai: directories; jpeg / webp: qualities
    tasks: list[str] | None = None  # measured on these of the sweep's tasks only (None: all)


@dataclass
class Sweep:
    data: Path
    teachers: dict[str, Path]
    methods: list[Method]
    tasks: list[str] = field(default_factory=list)
    split: str = "val"
    limit: int | None = None
    threads: int = 1
    repeat: int = 20
    batch_size: int = 16
    anchors: dict[str, str] = field(default_factory=dict)
    comparisons: list[tuple[str, str]] = field(default_factory=list)  # (curve, against): beyond the anchors
    variable_rate: list[tuple[str, str]] = field(default_factory=list)  # (variable-rate method, single-rate one)
    links_kbit_s: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LINKS))
    link_tolerance: list[float] = field(default_factory=lambda: [1.0])
    bitmap_images: int = 3
    bitmap_methods: list[str] | None = None  # None: every bundle and compressai method
    path: Path | None = None

    def method(self, name: str) -> Method | None:
        return next((m for m in self.methods if m.name == name), None)


def _int(errors: list[str], where: str, value: Any, lo: int, hi: int | None = None) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        errors.append(f"{where}: expected an integer {rng}, got {value!r}")
        return None
    return value


def _number(errors: list[str], where: str, value: Any, positive: bool = True) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (value <= 0 if positive else value < 0):
        errors.append(f"{where}: expected a {'positive' if positive else 'non-negative'} number, got {value!r}")
        return None
    return float(value)


def _path(errors: list[str], base: Path, where: str, value: Any, marker: str | None, what: str) -> Path | None:
    if not isinstance(value, (str, Path)) or not str(value):
        errors.append(f"{where}: expected a path, got {value!r}")
        return None
    p = Path(value).expanduser()
    p = p if p.is_absolute() else base / p
    if marker is None and not p.is_dir():
        errors.append(f"{where}: {p} is not a directory")
    elif marker is not None and not (p / marker).is_file():
        errors.append(f"{where}: {p} is not {what} (no {marker})")
    return p


def load_sweep(path: str | Path, *, check_paths: bool = True) -> Sweep:
    """Read and validate a sweep file (every problem at once, one line each)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SweepError(f"{path}: no such sweep file") from None
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep is a mapping (data, teachers, methods, …)")
    return parse_sweep(raw, path.parent, name=str(path), check_paths=check_paths, path=path)


def parse_sweep(raw: dict, base: Path, *, name: str = "sweep", check_paths: bool = True,
                path: Path | None = None) -> Sweep:
    errors: list[str] = []
    base = Path(base)
    chk = (lambda *a: _path(errors, base, *a)) if check_paths else (lambda where, v, *_: base / v)

    for key in sorted(set(raw) - _KEYS):
        errors.append(f"{key}: unknown key (known: {', '.join(sorted(_KEYS))})")
    for key in ("data", "methods"):
        if key not in raw:
            errors.append(f"{key}: missing")
    data = chk("data", raw["data"], None, "") if "data" in raw else None

    # teachers
    teachers: dict[str, Path] = {}
    if "teacher" in raw and "teachers" in raw:
        errors.append("teacher: give 'teacher' (one path) or 'teachers' (task: path), not both")
    elif "teachers" in raw:
        if not isinstance(raw["teachers"], dict) or not raw["teachers"]:
            errors.append("teachers: expected a mapping of task name to teacher directory")
        else:
            for task, p in raw["teachers"].items():
                t = chk(f"teachers.{task}", p, "teacher.json", "a teacher directory")
                if t is not None:
                    teachers[str(task)] = t
    elif "teacher" in raw:
        t = chk("teacher", raw["teacher"], "teacher.json", "a teacher directory")
        if t is not None:
            teachers["*"] = t  # its task is read from teacher.json when the study runs
    else:
        errors.append("teachers: missing (the uncompressed models that input codecs feed)")

    tasks = raw.get("tasks") or []
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        errors.append(f"tasks: expected a list of task names, got {tasks!r}")
        tasks = []

    split = raw.get("split", "val")
    if not isinstance(split, str) or not split:
        errors.append(f"split: expected a split name such as val, got {split!r}")
    limit = raw.get("limit")
    if limit is not None:
        limit = _int(errors, "limit", limit, 1)
    threads = _int(errors, "threads", raw.get("threads", 1), 1, 256) or 1
    repeat = _int(errors, "repeat", raw.get("repeat", 20), 1, 10_000) or 20
    batch_size = _int(errors, "batch_size", raw.get("batch_size", 16), 1, 4096) or 16
    raw_tol = raw.get("link_tolerance", 1.0)
    raw_tol = raw_tol if isinstance(raw_tol, list) and raw_tol else [raw_tol]
    tolerance = sorted({t for i, v in enumerate(raw_tol)
                        if (t := _number(errors, f"link_tolerance[{i}]", v, positive=False)) is not None})

    links = raw.get("links_kbit_s", DEFAULT_LINKS)
    if not isinstance(links, dict) or not links:
        errors.append(f"links_kbit_s: expected a mapping of link name to kbit/s, got {links!r}")
        links = {}
    links = {str(k): _number(errors, f"links_kbit_s.{k}", v) for k, v in links.items()}

    # methods
    methods: list[Method] = []
    raw_methods = raw.get("methods")
    if "methods" in raw and (not isinstance(raw_methods, list) or not raw_methods):
        errors.append("methods: expected a non-empty list of {name, kind, points}")
        raw_methods = []
    for i, m in enumerate(raw_methods or []):
        where = f"methods[{i}]"
        if not isinstance(m, dict):
            errors.append(f"{where}: expected a mapping {{name, kind, points}}, got {m!r}")
            continue
        extra = sorted(set(m) - {"name", "kind", "points", "tasks"})
        if extra:
            errors.append(f"{where}: unknown key(s) {', '.join(extra)}")
        missing = [k for k in ("name", "kind", "points") if k not in m]
        if missing:
            errors.append(f"{where}: missing {', '.join(missing)}")
            continue
        mname, kind, points = str(m["name"]), m["kind"], m["points"]
        where = f"methods[{i}] ({mname})"
        if any(x.name == mname for x in methods):
            errors.append(f"{where}: name used twice")
        if kind not in KINDS:
            errors.append(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
            continue
        if not isinstance(points, list) or not points:
            errors.append(f"{where}: points must be a non-empty list")
            continue
        parsed = []
        for j, p in enumerate(points):
            pw = f"{where}.points[{j}]"
            if kind == "bundle":
                parsed.append(chk(pw, p, "manifest.json", "a bundle directory"))
            elif kind == "compressai":
                parsed.append(chk(pw, p, "codec.json", "an image-codec directory (platform train-image-codec)"))
            else:
                parsed.append(_int(errors, pw + " (quality)", p, 0 if kind == "webp" else 1, 100))
        if len(set(map(str, parsed))) != len(parsed):
            errors.append(f"{where}: a point is listed twice")
        mtasks = m.get("tasks")
        if mtasks is not None and (not isinstance(mtasks, list) or not mtasks
                                   or not all(isinstance(t, str) for t in mtasks)):
            errors.append(f"{where}.tasks: expected a non-empty list of task names, got {mtasks!r}")
            mtasks = None
        methods.append(Method(mname, kind, parsed, mtasks))

    names = {m.name for m in methods}
    anchors = raw.get("anchors") or {}
    if not isinstance(anchors, dict):
        errors.append(f"anchors: expected a mapping, got {anchors!r}")
        anchors = {}
    for key, value in anchors.items():
        if key not in _ANCHORS:
            errors.append(f"anchors.{key}: unknown (known: {', '.join(_ANCHORS)})")
        elif value not in names:
            errors.append(f"anchors.{key}: {value!r} is not a method of this sweep ({', '.join(sorted(names))})")
    anchors = {k: str(v) for k, v in anchors.items()}
    if "complexity" not in anchors and "delta_accuracy" in anchors:
        anchors["complexity"] = anchors["delta_accuracy"]

    comparisons = list(_pairs(errors, raw, "comparisons", names).values())
    vr_pairs = _pairs(errors, raw, "variable_rate", names)
    by_name = {m.name: m for m in methods}
    for i, (name, against) in vr_pairs.items():
        if by_name[name].kind != "bundle" or by_name[against].kind != "bundle":
            errors.append(f"variable_rate[{i}]: {name!r} and {against!r} must both be bundle methods")
        elif check_paths and not any(p is not None and _rates(p) > 1 for p in by_name[name].points):
            errors.append(f"variable_rate[{i}]: {name!r} has no variable-rate bundle")
    for m in methods if check_paths else ():
        vr = [p for p in m.points if m.kind == "bundle" and p is not None and _rates(p) > 1]
        if vr and len(m.points) > 1:
            errors.append(f"methods ({m.name}): {vr[0].name} is variable-rate (one curve by itself); "
                          "give it a method of its own")
    variable_rate = list(vr_pairs.values())

    bitmaps = raw.get("bitmaps") or {}
    bitmap_images, bitmap_methods = 3, None
    if not isinstance(bitmaps, dict) or set(bitmaps) - {"images", "methods"}:
        errors.append(f"bitmaps: expected {{images: N, methods: [names]}}, got {bitmaps!r}")
    else:
        bitmap_images = _int(errors, "bitmaps.images", bitmaps.get("images", 3), 0, 64) or 0
        if "methods" in bitmaps:
            bm = bitmaps["methods"]
            if not isinstance(bm, list):
                errors.append(f"bitmaps.methods: expected a list of method names, got {bm!r}")
            else:
                for n in bm:
                    mm = next((x for x in methods if x.name == n), None)
                    if mm is None:
                        errors.append(f"bitmaps.methods: {n!r} is not a method of this sweep")
                    elif mm.kind not in ("bundle", "compressai"):
                        errors.append(f"bitmaps.methods: {n!r} is a {mm.kind} method (maps need a learned prior)")
                bitmap_methods = [str(n) for n in bm]

    if errors:
        raise SweepError(f"{name}: {len(errors)} problem(s)\n  " + "\n  ".join(errors))
    return Sweep(data=data, teachers=teachers, methods=methods, tasks=list(tasks), split=split, limit=limit,
                 threads=threads, repeat=repeat, batch_size=batch_size, anchors=anchors, comparisons=comparisons,
                 variable_rate=variable_rate,
                 links_kbit_s=links, link_tolerance=tolerance, bitmap_images=bitmap_images, bitmap_methods=bitmap_methods, path=path)


def _pairs(errors: list[str], raw: dict, key: str, names: set[str]) -> dict[int, tuple[str, str]]:
    """``key``: a list of [curve, against] pairs of method names (the valid ones, by their place)."""
    pairs: dict[int, tuple[str, str]] = {}
    items = raw.get(key) or []
    if not isinstance(items, list):
        errors.append(f"{key}: expected a list of [curve, against] pairs, got {items!r}")
        items = []
    for i, pair in enumerate(items):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(n, str) for n in pair)):
            errors.append(f"{key}[{i}]: expected [curve, against] (two method names), got {pair!r}")
        elif unknown := [n for n in pair if n not in names]:
            errors.append(f"{key}[{i}]: {', '.join(map(repr, unknown))} not a method of this sweep")
        else:
            pairs[i] = (pair[0], pair[1])
    return pairs


def _rates(bundle: Path) -> int:
    """How many rates a bundle's codec has, from its manifest (1 when it cannot tell: loading the
    bundle reports what is wrong with it)."""
    try:
        rates = json.loads((bundle / "manifest.json").read_text())["codec"]["config"].get("rates", 1)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 1
    return rates if isinstance(rates, int) else 1
