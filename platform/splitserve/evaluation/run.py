"""``platform evaluate``: every point of a rate–accuracy sweep, measured through the served path,
then the summaries and the report (see :mod:`.sweep` for the sweep file, ``docs/evaluation.md``).

Steps, each timed and shown with a progress bar: load the teachers and the data; the uncompressed
reference of each task; every point of every method on every task it applies to (accuracy from
real bytes, then device-side complexity and server time at batch 1 and the sweep's thread count);
summaries (Δ-accuracy, BD-rate, complexity ratios, link model); bit-allocation maps; the report.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import SplitserveError
from .link import end_to_end_ms, link_tables
from .metrics import CurveError, bd_rate, delta_accuracy
from .sweep import Sweep, SweepError, load_sweep  # noqa: F401 — re-exported for callers

__all__ = ["Point", "Study", "evaluate", "load_sweep", "summarize"]


@dataclass
class Point:
    """One method at one setting on one task."""

    method: str
    kind: str
    setting: str
    task: str
    metric: str
    accuracy: float
    images: int
    bytes_per_image: float
    bpp: float
    input_h: int
    input_w: int
    encode_ms: float
    server_ms: float
    device_params: int | None
    device_macs: int | None
    source: str
    rate: int | None = None  # a variable-rate bundle's rate index (None: a single-rate method)


@dataclass
class Study:
    points: list[Point]
    reference: dict[str, dict[str, Any]]  # task → {metric, accuracy, images, teacher}
    summary: dict[str, Any]
    timings: dict[str, float]
    notes: list[str]
    bitmaps: list[dict[str, Any]]
    machine: str
    uname: dict[str, str]
    seconds: float


class _Timer:
    def __init__(self):
        self.timings: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Step:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.timings[name] = timer.timings.get(name, 0.0) + time.perf_counter() - self.t

        return _Step()


def _teachers(sweep: Sweep, registry) -> dict[str, Any]:
    from ..training.teacher import load_teacher

    out = {}
    for key, path in sweep.teachers.items():
        teacher = load_teacher(path, registry)
        if key != "*" and registry.get(key).name != teacher.task:
            raise SweepError(f"teachers.{key}: {path} is a {teacher.task} teacher")
        out[teacher.task] = teacher
    return out


def evaluate(sweep: Sweep, out: Path, *, progress: bool = True) -> Study:
    """Measure the sweep, write ``out``/points.json, points.csv, the plots and report.md."""
    import platform as _platform

    from ..bench.report import machine
    from ..plugins import PluginRegistry
    from ..preprocess import load_image
    from .methods import BundlePoint, TeacherPath, input_codec
    from .tasks import load_task_data

    started = time.perf_counter()
    step = _Timer()
    notes: list[str] = []
    registry = PluginRegistry.discover()
    with step("load teachers and data"):
        teachers = _teachers(sweep, registry)
        try:
            tasks = [p.name for p in registry.resolve(sweep.tasks)] if sweep.tasks else list(teachers)
        except SplitserveError as e:
            raise SweepError(f"tasks: {e}") from None
        missing = [t for t in tasks if t not in teachers]
        if missing:
            raise SweepError(f"teachers: no teacher for {', '.join(missing)} (every task needs its uncompressed model)")
        data = {t: load_task_data(registry.get(t), sweep.data, sweep.split, teachers[t].preprocessing, sweep.limit)
                for t in tasks}
        paths = {t: TeacherPath(teachers[t], registry.get(t)) for t in tasks}
        samples = {t: load_image(data[t].items[0].path) for t in tasks}
        device_sample = samples[tasks[0]]  # one image for every device-side latency

    reference: dict[str, dict[str, Any]] = {}
    with step("uncompressed teachers"):
        for t in tasks:
            m = paths[t].run(data[t], None, sweep.batch_size, progress, f"teacher {t}")
            acc = data[t].score(m.answers, paths[t].config)[data[t].metric]
            reference[t] = {"metric": data[t].metric, "label": data[t].label, "accuracy": acc, "images": len(data[t].items),
                            "teacher": str(teachers[t].path), "input_hw": list(m.input_hw)}

    points: list[Point] = []
    kw = {"threads": sweep.threads, "repeat": sweep.repeat}
    total = sum(len(m.points) for m in sweep.methods)
    bar = tqdm(total=total, desc="methods", unit="point", disable=not progress)
    bundle_points: dict[str, list] = {}
    codec_points: dict[str, list] = {}
    training: dict[str, list[dict[str, Any]]] = {}  # bundle method → each bundle's training seconds
    requests: list[dict[str, Any]] = []  # one request for every task of a multi-task bundle
    for method in sweep.methods:
        mtasks = _method_tasks(method, tasks, registry)
        with step(method.name):
            for setting in method.points:
                bar.set_postfix_str(f"{method.name} {setting if not isinstance(setting, Path) else setting.name}")
                if method.kind == "bundle":
                    bundle = BundlePoint(setting, mtasks, registry)
                    training.setdefault(method.name, []).append(training_record(bundle.manifest, bundle.path.name,
                                                                                bundle.tasks))
                    lacking = [t for t in mtasks if t not in bundle.tasks]
                    if lacking:
                        notes.append(f"{method.name} {bundle.path.name}: no head for {', '.join(lacking)} "
                                     "(not measured there)")
                    for bp in bundle.per_rate():  # a variable-rate bundle: one point per rate, one curve
                        bundle_points.setdefault(method.name, []).append(bp)
                        dev = bp.device(device_sample, **kw)
                        for t in bp.tasks:
                            m = bp.run(data[t], sweep.batch_size, progress, f"{method.name} {bp.setting} {t}")
                            acc = data[t].score(m.answers, bp.config(t))[data[t].metric]
                            server = bp.server_ms(t, samples[t], **kw)
                            points.append(_point(method, bp.setting, t, data[t], m, acc, dev, server, bp.path,
                                                 bp.rate))
                    if all(r["source"] != str(bundle.path) for r in requests):  # once per bundle
                        requests.extend(_request(method.name, bundle, device_sample, registry, kw))
                else:
                    codec = input_codec(method.kind, setting)
                    if method.kind == "compressai":
                        codec_points.setdefault(method.name, []).append(codec)
                    dev = codec.device(paths[tasks[0]].policy.geometry(device_sample), **kw)
                    for t in mtasks:
                        m = paths[t].run(data[t], codec, sweep.batch_size, progress, f"{method.name} {codec.setting} {t}")
                        acc = data[t].score(m.answers, paths[t].config)[data[t].metric]
                        server = paths[t].server_ms(codec, samples[t], **kw)
                        src = str(setting) if method.kind == "compressai" else f"Pillow {codec.format}"
                        points.append(_point(method, codec.setting, t, data[t], m, acc, dev, server, src))
                bar.update(1)
    bar.close()

    with step("summaries"):
        summary = summarize(points, sweep, reference, training)
        summary["requests"] = requests

    bitmaps: list[dict[str, Any]] = []
    if sweep.bitmap_images:
        with step("bit-allocation maps"):
            bitmaps = _bitmaps(sweep, out, bundle_points, codec_points, data[tasks[0]], paths[tasks[0]].policy)

    study = Study(points, reference, summary, step.timings, notes, bitmaps, machine(),
                  dict(_platform.uname()._asdict()), 0.0)
    with step("report"):
        from .report import write_outputs

        study.seconds = time.perf_counter() - started
        write_outputs(out, study, sweep)
    study.timings = step.timings
    study.seconds = time.perf_counter() - started
    from .report import write_json

    write_json(out, study, sweep)  # again, with the report step's own time
    return study


def _method_tasks(method, tasks: list[str], registry) -> list[str]:
    """The sweep's tasks this method is measured on (its ``tasks``, by name or alias; default all)."""
    if method.tasks is None:
        return tasks
    try:
        wanted = [p.name for p in registry.resolve(method.tasks)]
    except SplitserveError as e:
        raise SweepError(f"methods ({method.name}).tasks: {e}") from None
    if set(wanted) - set(tasks):
        raise SweepError(f"methods ({method.name}).tasks: {', '.join(sorted(set(wanted) - set(tasks)))} "
                         f"is not a task of this sweep ({', '.join(tasks)})")
    return [t for t in tasks if t in wanted]


def _request(method: str, bundle, sample, registry, kw: dict[str, int]) -> list[dict[str, Any]]:
    """A multi-task bundle (all its heads, also those the sweep does not score on it) answering one
    image on every task in one request, at its default rate, against one request per task: the
    server's time and the bundle's size, which is where sharing one trunk or giving each head its
    own shows (issue 21 §3)."""
    from ..bundle import bundle_bytes
    from .methods import BundlePoint

    tasks = list(bundle.manifest.tasks)
    if len(tasks) < 2:
        return []
    full = bundle if bundle.tasks == tasks else BundlePoint(bundle.path, tasks, registry)
    return [{"method": method, "setting": full.setting, "source": str(full.path), "tasks": tasks,
             "trunks": {t: e.trunk for t, e in full.manifest.tasks.items()},
             "server_ms": full.request_ms(sample, **kw),
             "separate_ms": {t: full.server_ms(t, sample, **kw) for t in tasks},  # one request per task
             "bundle_bytes": bundle_bytes(full.path, full.manifest)}]


def _point(method, setting: str, task: str, data, m, acc: float, dev: dict, server: float, source,
           rate: int | None = None) -> Point:
    h, w = m.input_hw
    return Point(method=method.name, kind=method.kind, setting=setting, task=task, metric=data.metric,
                 accuracy=float(acc), images=len(m.answers), bytes_per_image=m.bytes_per_image, bpp=m.mean_bpp,
                 input_h=int(h), input_w=int(w), encode_ms=float(dev["encode_ms"]), server_ms=float(server),
                 device_params=dev["device_params"], device_macs=dev["device_macs"], source=str(source), rate=rate)


def _bitmaps(sweep: Sweep, out: Path, bundle_points, codec_points, data, policy) -> list[dict[str, Any]]:
    from ..preprocess import load_image
    from .bitmaps import bundle_map, image_codec_map, plot_bitmaps

    names = sweep.bitmap_methods
    if names is None:
        names = [m.name for m in sweep.methods if m.kind == "bundle" or
                 (m.kind == "compressai" and m.name in codec_points)]
    chosen = []
    for name in names:  # the middle rate point of each method
        if name in bundle_points:
            pts = bundle_points[name]
            chosen.append(("bundle", name, pts[len(pts) // 2]))
        elif name in codec_points:
            pts = codec_points[name]
            chosen.append(("compressai", name, pts[len(pts) // 2]))
    if not chosen:
        return []
    rows, records = [], []
    for item in data.items[: sweep.bitmap_images]:
        img = load_image(item.path)
        row = []
        for kind, name, pt in chosen:
            bm = bundle_map(pt, name, img) if kind == "bundle" else image_codec_map(pt, name, img, policy)
            row.append(bm)
            records.append({"method": name, "setting": bm.setting, "image": str(item.path),
                            "map_hw": list(bm.bits.shape), "total_bits": bm.total_bits})
        rows.append(row)
    plot_bitmaps(rows, out / "bitmaps.png")
    return records


def _curve(points: list[Point]) -> tuple[list[float], list[float]]:
    return [p.bpp for p in points], [p.accuracy for p in points]


_SUMMARIES = (("delta_accuracy", delta_accuracy), ("bd_rate", bd_rate))
"""What every curve gets against an anchor, and every sweep comparison."""


def _against(fn, anchor: list[Point], curve: list[Point]) -> float | str:
    """``fn`` (Δ-accuracy or BD-rate) of ``curve`` against ``anchor``, or why it has no value."""
    try:
        return fn(*_curve(anchor), *_curve(curve))
    except CurveError as e:
        return f"n/a ({e})"


TRAIN_SECONDS = "train_seconds"
"""The provenance key a training run records its wall time under (seconds in the engine's fit,
summed over resumes)."""


def training_record(manifest, name: str, tasks: Sequence[str]) -> dict[str, Any]:
    """A bundle's training wall time, from its manifest: the run that wrote its codec
    (``provenance.train_seconds``) and each fine-tuning run that wrote one of ``tasks``' heads. A
    head the codec's own run wrote (its provenance names no stage) adds nothing."""
    heads = {t: manifest.tasks[t].provenance.get(TRAIN_SECONDS) for t in tasks
             if manifest.tasks[t].provenance.get("stage")}
    return {"bundle": name, "codec_seconds": manifest.provenance.get(TRAIN_SECONDS), "head_seconds": heads}


def _seconds(record: dict[str, Any], counted: str) -> float | None:
    values = [record["codec_seconds"], *(record["head_seconds"].values() if counted == "codec and heads" else ())]
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return float(sum(values)) if ok else None


def training_comparison(one: Sequence[dict[str, Any]], separate: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Training time of the variable-rate run(s) ``one`` against the separately trained bundles
    ``separate`` (records of :func:`training_record`): for the codec's run alone and with the
    heads' fine-tuning runs, the seconds, their ratio to the separate runs' sum and to their mean
    (one single-rate run) — or why there is none."""
    out: dict[str, Any] = {}
    for counted in ("codec", "codec and heads"):
        lacking = [r["bundle"] for r in [*one, *separate] if _seconds(r, counted) is None]
        runs = [_seconds(r, counted) for r in separate]
        if lacking or not one or not runs or sum(runs) <= 0:
            out[counted] = f"n/a (no {TRAIN_SECONDS} in the provenance of {', '.join(lacking) or 'any bundle'})"
            continue
        total = sum(_seconds(r, counted) for r in one)
        out[counted] = {"one_run_s": total, "separate_s": runs, "separate_sum_s": sum(runs),
                        "ratio_to_sum": total / sum(runs), "ratio_to_one": total / statistics.mean(runs)}
    return out


def summarize(points: list[Point], sweep: Sweep, reference: dict[str, dict[str, Any]],
              training: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Per task: Δ-accuracy and BD-rate of every curve against the anchors and of the sweep's
    comparisons, the link model; per method: device-side complexity and its ratio to the
    complexity anchor; per ``variable_rate`` pair: Δ-accuracy and BD-rate of the variable-rate
    curve against the separately trained bundles' on every task, and the training time
    (``training``: method → its bundles' :func:`training_record`)."""
    by_task: dict[str, dict[str, list[Point]]] = {}
    for p in points:
        by_task.setdefault(p.task, {}).setdefault(p.method, []).append(p)
    out: dict[str, Any] = {"anchors": dict(sweep.anchors), "tasks": {}, "complexity": {}}
    for task, curves in by_task.items():
        entry: dict[str, Any] = {"delta_accuracy": {}, "bd_rate": {}}
        for key, fn in _SUMMARIES:
            anchor = sweep.anchors.get(key)
            if anchor not in curves:
                continue
            for name, c in curves.items():
                entry[key][name] = _against(fn, curves[anchor], c)
        entry["comparisons"] = [{"method": name, "against": against,
                                 **{key: _against(fn, curves[against], curves[name]) for key, fn in _SUMMARIES}}
                                for name, against in sweep.comparisons if name in curves and against in curves]
        ref = reference.get(task, {}).get("accuracy")
        rows = [asdict(p) for p in points if p.task == task]
        entry["links"] = link_tables(rows, sweep.links_kbit_s, ref, sweep.link_tolerance)
        entry["end_to_end_ms"] = {f"{p.method} {p.setting}": {link: end_to_end_ms(p.encode_ms, p.bytes_per_image,
                                                                                   p.server_ms, kbit)
                                                              for link, kbit in sweep.links_kbit_s.items()}
                                  for p in points if p.task == task}
        out["tasks"][task] = entry

    per_method: dict[str, dict[str, Any]] = {}
    for p in points:
        per_method.setdefault(p.method, {"kind": p.kind, "encode_ms": {}, "params": p.device_params,
                                         "macs": p.device_macs, "input_hw": [p.input_h, p.input_w]})
        per_method[p.method]["encode_ms"][p.setting] = p.encode_ms
    for c in per_method.values():
        c["encode_ms_median"] = statistics.median(c["encode_ms"].values())
    anchor = per_method.get(sweep.anchors.get("complexity", ""))
    for c in per_method.values():
        if anchor:
            c["encode_ms_ratio"] = c["encode_ms_median"] / anchor["encode_ms_median"]
            c["params_ratio"] = (c["params"] / anchor["params"]) if c["params"] is not None and anchor["params"] else None
            c["macs_ratio"] = (c["macs"] / anchor["macs"]) if c["macs"] is not None and anchor["macs"] else None
    out["complexity"] = per_method
    out["variable_rate"] = [
        {"method": name, "against": against,
         "tasks": {task: {key: _against(fn, curves[against], curves[name]) for key, fn in _SUMMARIES}
                   for task, curves in by_task.items() if name in curves and against in curves},
         "training": training_comparison((training or {}).get(name, []), (training or {}).get(against, []))}
        for name, against in sweep.variable_rate]
    return out
