"""The study's outputs: points.json, points.csv, matplotlib plots (no display needed), report.md."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from ..errors import SplitserveError  # noqa: E402


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def style(i: int) -> dict[str, Any]:
    """The i-th series' look: ten colours, then the same colours with another marker and a dashed
    line, so that a study with more than ten methods never draws two alike."""
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lap = i // len(colors)
    return {"color": colors[i % len(colors)], "marker": "osD^v"[lap % 5], "ls": ("-", "--", ":", "-.")[lap % 4]}


def write_json(out: Path, study, sweep) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "sweep": str(sweep.path) if sweep.path else None,
        "data": str(sweep.data), "split": sweep.split, "limit": sweep.limit,
        "threads": sweep.threads, "repeat": sweep.repeat, "links_kbit_s": sweep.links_kbit_s,
        "machine": study.machine, "uname": study.uname, "seconds": study.seconds, "timings": study.timings,
        "reference": study.reference, "points": [asdict(p) for p in study.points], "summary": study.summary,
        "bitmaps": study.bitmaps, "notes": study.notes,
    }
    path = out / "points.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def write_csv(out: Path, points) -> Path:
    from .run import Point

    path = out / "points.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Point)])
        w.writeheader()
        for p in points:
            w.writerow(asdict(p))
    return path


def _curves(points, task: str) -> dict[str, list]:
    curves: dict[str, list] = {}
    for p in points:
        if p.task == task:
            curves.setdefault(p.method, []).append(p)
    return {k: sorted(v, key=lambda p: p.bpp) for k, v in curves.items()}


def _looks(names: list[str]) -> dict[str, dict[str, Any]]:
    """One look per method, by its place in the sweep: a method is drawn alike in every plot."""
    return {name: style(i) for i, name in enumerate(names)}


def plot_rate_accuracy(out: Path, points, task: str, reference: dict[str, Any] | None,
                       looks: dict[str, dict[str, Any]] | None = None) -> Path:
    curves = _curves(points, task)
    looks = looks or _looks(list(curves))
    fig, ax = plt.subplots(figsize=(9.0, 4.4))
    for name, c in curves.items():
        ax.plot([p.bpp for p in c], [p.accuracy for p in c], ms=4, label=name, **looks[name])
    if reference:
        ax.axhline(reference["accuracy"], color="k", ls="--", lw=1, label="uncompressed teacher")
    ax.set_xscale("log")
    # plain numbers (0.3, 1, 2) on the log axis; matplotlib's 3×10⁻¹ labels run into each other
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    ax.set_xlabel("bits per pixel of the model input (log scale)")
    metric = next(iter(curves.values()))[0].metric if curves else ""
    ax.set_ylabel((reference or {}).get("label", metric))  # the plugin's metric_label
    ax.set_title(f"{task}: rate–accuracy")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: curves fill the plot
    fig.tight_layout()
    path = out / f"rate_accuracy_{slug(task)}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_delta_vs_latency(out: Path, study, sweep, task: str, looks: dict[str, dict[str, Any]] | None = None) -> Path | None:
    deltas = study.summary["tasks"].get(task, {}).get("delta_accuracy", {})
    cx = study.summary["complexity"]
    xs = {n: cx[n]["encode_ms_median"] for n, v in deltas.items() if isinstance(v, float) and n in cx}
    if not xs:
        return None
    looks = looks or _looks(list(xs))
    fig, ax = plt.subplots(figsize=(9.0, 4.4))
    for name, ms in xs.items():  # a legend, not labels beside the points: methods of like cost crowd together
        look = looks[name]
        ax.scatter([ms], [deltas[name]], s=36, color=look["color"], marker=look["marker"], label=name)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(f"encoder latency incl. entropy coding, ms (batch 1, {sweep.threads} thread(s), log scale)")
    ax.set_ylabel(f"Δ-accuracy vs {sweep.anchors.get('delta_accuracy')} (pp)")
    ax.set_title(f"{task}: Δ-accuracy against encoder latency")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = out / f"delta_accuracy_vs_latency_{slug(task)}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _num(v, fmt: str) -> str:
    return "—" if v is None or isinstance(v, str) else format(v, fmt)


def summary_cell(v: float | str | None, fmt: str, unit: str = "") -> str:
    """A Δ-accuracy or BD-rate as the report and the CLI print it: the number (with ``unit``),
    "—" when there is none, or why it has no value ("n/a (…)")."""
    return v if isinstance(v, str) else "—" if v is None else format(v, fmt) + unit


def _md_report(study, sweep, plots: dict[str, dict[str, str]]) -> str:
    u = study.uname
    L = ["# Rate–accuracy study", "",
         f"Machine: `{u.get('node')}` ({u.get('system')} {u.get('release')}, {u.get('machine')}); {study.machine}.",
         f"Sweep: `{sweep.path}`. Data: `{sweep.data}`, split `{sweep.split}`"
         + (f", an evenly spaced subset of {sweep.limit} images per task" if sweep.limit else "") + ".",
         f"Latency: batch 1, `torch.set_num_threads({sweep.threads})`, median of {sweep.repeat} runs after a warm-up, "
         "every method in this one run on this machine.", "",
         f"Wall time: {study.seconds:.1f} s in all.", "", "| step | seconds |", "|---|---:|"]
    L += [f"| {k} | {v:.1f} |" for k, v in study.timings.items()]
    L += ["", "Rate is measured from real bytes: our payload (header included, one payload per image as a device "
          "sends it) or the encoded image file, in bits per pixel of the model input and bytes per image. "
          "Accuracy goes through the served path: our bundles from payload bytes through the gateway `Runtime`; "
          "input codecs encode the model-input-sized image, decode it, and feed the uncompressed teacher. "
          "Δ-accuracy (mean accuracy gain over the shared rate range, linear bpp) and BD-rate (mean log-rate "
          "difference over the shared accuracy range) interpolate each curve with PCHIP (piecewise cubic, "
          "monotone), not a single cubic polynomial, which swings on saturating accuracy curves "
          "(docs/evaluation.md).", ""]
    anchors = sweep.anchors
    for task, ref in study.reference.items():
        metric = ref["metric"]
        L += [f"## {task} ({ref.get('label', metric)})", "",
              f"Uncompressed teacher: **{ref['accuracy']:.2f}** on {ref['images']} images "
              f"(model input {ref['input_hw'][0]}×{ref['input_hw'][1]}, teacher `{ref['teacher']}`).", ""]
        if "rate" in plots.get(task, {}):
            L += [f"![rate–accuracy, {task}]({plots[task]['rate']})", ""]
        L += [f"| method | setting | bytes/image | bpp | {metric} | encode ms | server ms |",
              "|---|---|---:|---:|---:|---:|---:|"]
        for p in study.points:
            if p.task == task:
                L.append(f"| {p.method} | {p.setting} | {p.bytes_per_image:.1f} | {p.bpp:.4f} | {p.accuracy:.2f} | "
                         f"{p.encode_ms:.2f} | {p.server_ms:.2f} |")
        s = study.summary["tasks"].get(task, {})
        da, br = s.get("delta_accuracy", {}), s.get("bd_rate", {})
        if da or br:
            L += ["", f"| method | Δ-accuracy vs {anchors.get('delta_accuracy', '—')} (pp) | "
                      f"BD-rate vs {anchors.get('bd_rate', '—')} (%) |", "|---|---:|---:|"]
            for name in dict.fromkeys(p.method for p in study.points if p.task == task):
                d, b = da.get(name), br.get(name)
                L.append(f"| {name} | {summary_cell(d, '+.2f')} | {summary_cell(b, '+.1f')} |")
        if s.get("comparisons"):
            L += ["", "| method | against | Δ-accuracy (pp) | BD-rate (%) |", "|---|---|---:|---:|"]
            for c in s["comparisons"]:
                L.append(f"| {c['method']} | {c['against']} | {summary_cell(c['delta_accuracy'], '+.2f')} | "
                         f"{summary_cell(c['bd_rate'], '+.1f')} |")
        if "delta" in plots.get(task, {}):
            L += ["", f"![Δ-accuracy vs encoder latency, {task}]({plots[task]['delta']})"]
        for table in s.get("links", []):
            floor, links = table["min_accuracy"], table["per_link"]
            L += ["", "Link model: end-to-end ms per image = device encode + 8·bytes ÷ link rate + server time; for "
                  "each method its fastest point with " + (f"{metric} ≥ {floor:.2f} (the teacher's − "
                  f"{table['tolerance']:g})" if floor is not None else "any accuracy") + ".", "",
                  "| method | " + " | ".join(f"{k} ({v['kbit_s']:g} kbit/s)" for k, v in links.items()) + " |",
                  "|---|" + "---:|" * len(links)]
            names = list(dict.fromkeys(p.method for p in study.points if p.task == task))
            for name in names:
                cells = []
                for v in links.values():
                    b = v["per_method"].get(name)
                    cells.append(f"{b['ms']:.1f} ({b['setting']})" if b else "— (never reaches it)")
                L.append(f"| {name} | " + " | ".join(cells) + " |")
            L.append("| **wins** | " + " | ".join(f"**{v['winner'] or '—'}**" for v in links.values()) + " |")
        L.append("")
    L += _requests_section(study.summary.get("requests", []))
    L += _variable_rate_section(study.summary.get("variable_rate", []))
    cx = study.summary["complexity"]
    if cx:
        a = anchors.get("complexity")
        L += ["## Device-side complexity", "",
              f"Batch 1, {sweep.threads} thread(s). Parameters and MACs of what the device runs (our encoder + "
              "prior; a learned image codec's analysis transforms + entropy models; none for JPEG/WebP, which "
              "Pillow runs in C). Latency includes entropy coding and, for our bundles, the payload container."
              + (f" Ratios are to {a}." if a else ""), "",
              "| method | model input | device params | device MACs | encode ms (median over points) | params × | MACs × | latency × |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, c in cx.items():
            L.append(f"| {name} | {c['input_hw'][0]}×{c['input_hw'][1]} | {_num(c['params'], ',')} | "
                     f"{_num(c['macs'], ',')} | {c['encode_ms_median']:.2f} | {_num(c.get('params_ratio'), '.2f')} | "
                     f"{_num(c.get('macs_ratio'), '.2f')} | {_num(c.get('encode_ms_ratio'), '.2f')} |")
        L.append("")
    if study.bitmaps:
        L += ["## Bit-allocation maps", "",
              "Bits per latent position under each codec's prior (−log2 of the likelihood of the rounded latent, "
              "summed over channels), overlaid on the model input.", "", "![bit-allocation maps](bitmaps.png)", ""]
    if study.notes:
        L += ["## Notes", ""] + [f"- {n}" for n in study.notes] + [""]
    return "\n".join(L)


def _requests_section(requests: list[dict[str, Any]]) -> list[str]:
    """Every multi-task bundle answering one image on all its tasks: one request against one per task."""
    if not requests:
        return []
    L = ["## One request for every task", "",
         "Server time of one image (batch 1) asking for all of a bundle's tasks in one request (one parse, "
         "entropy decode and decoder pass, then each head on its trunk), against one request per task; "
         "and what the bundle weighs on disk (manifest and the files it lists, as trained: float32).", "",
         "| method | bundle | trunks | one request (ms) | one per task (ms) | bundle MB |",
         "|---|---|---|---:|---|---:|"]
    for r in requests:
        trunks = ", ".join(f"{t} {k}" for t, k in r["trunks"].items())
        separate = " + ".join(f"{v:.2f}" for v in r["separate_ms"].values()) + \
            f" = {sum(r['separate_ms'].values()):.2f}"
        L.append(f"| {r['method']} | {r['setting']} | {trunks} | {r['server_ms']:.2f} | {separate} | "
                 f"{r['bundle_bytes'] / 1e6:.2f} |")
    return L + [""]


def _variable_rate_section(pairs: list[dict[str, Any]]) -> list[str]:
    """The ``variable_rate`` pairs: each task's Δ-accuracy and BD-rate, then the training time."""
    if not pairs:
        return []
    L = ["## Variable rate: one bundle against separately trained ones", "",
         "Every rate of the variable-rate bundle is one point of its curve (one model); the other curve is "
         "the separately trained single-rate bundles'. Δ-accuracy and BD-rate of the first against the second, "
         "computed as above (PCHIP).", "",
         "| variable-rate | against | task | Δ-accuracy (pp) | BD-rate (%) |", "|---|---|---|---:|---:|"]
    for c in pairs:
        for task, v in c["tasks"].items():
            L.append(f"| {c['method']} | {c['against']} | {task} | {summary_cell(v['delta_accuracy'], '+.2f')} | "
                     f"{summary_cell(v['bd_rate'], '+.1f')} |")
    L += ["", "Training wall time, from each bundle's provenance (`train_seconds`): the run that wrote the "
          "codec, alone and with the fine-tuning runs of the heads measured here; the one variable-rate run "
          "against the sum of the separate runs and against their mean (one single-rate run).", "",
          "| variable-rate | against | counted | one run (s) | separate runs (s) | one ÷ sum | one ÷ one separate run |",
          "|---|---|---|---:|---|---:|---:|"]
    for c in pairs:
        for counted, t in c["training"].items():
            if isinstance(t, str):
                L.append(f"| {c['method']} | {c['against']} | {counted} | {t} | | | |")
                continue
            runs = " + ".join(f"{s:.0f}" for s in t["separate_s"]) + f" = {t['separate_sum_s']:.0f}"
            L.append(f"| {c['method']} | {c['against']} | {counted} | {t['one_run_s']:.0f} | {runs} | "
                     f"{t['ratio_to_sum']:.2f} | {t['ratio_to_one']:.2f} |")
    return L + [""]


def write_outputs(out: Path, study, sweep) -> dict[str, dict[str, str]]:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out, study, sweep)
    write_csv(out, study.points)
    plots: dict[str, dict[str, str]] = {}
    looks = _looks([m.name for m in sweep.methods])
    for task in study.reference:
        plots[task] = {}
        if any(p.task == task for p in study.points):
            plots[task]["rate"] = plot_rate_accuracy(out, study.points, task, study.reference[task], looks).name
        d = plot_delta_vs_latency(out, study, sweep, task, looks)
        if d is not None:
            plots[task]["delta"] = d.name
    (out / "report.md").write_text(_md_report(study, sweep, plots))
    return plots


def val_series(records: list[dict], metric: str) -> tuple[list[int], list[float]]:
    """Epochs and values of ``metric`` in a run's validation records. A run that trains several
    heads logs each head's metric under its task's name (``detection/mAP``): there ``metric`` is the
    one key that ends in ``/metric``, so one plot can put single-task and joint runs side by side."""
    val = [r for r in records if r.get("kind") == "val"]
    keys = {k for r in val for k in r}
    if metric not in keys:
        named = sorted(k for k in keys if k.endswith("/" + metric))
        if len(named) > 1:
            raise SplitserveError(f"metric {metric!r} is ambiguous in this run: {', '.join(named)}; name one")
        metric = named[0] if named else metric
    val = [r for r in val if metric in r]
    return [r["epoch"] for r in val], [r[metric] for r in val]


def plot_learning_curves(runs: dict[str, Path], out: Path, metric: str = "top1") -> Path:
    """Validation ``metric`` per epoch (and the training loss) of each run's ``metrics.jsonl``."""
    fig, (ax_val, ax_loss) = plt.subplots(1, 2, figsize=(12, 3.8))
    for i, (label, workdir) in enumerate(runs.items()):
        look = style(i)
        records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
        train = [r for r in records if r.get("kind") == "train" and "loss" in r]
        ax_val.plot(*val_series(records, metric), ms=4, label=label, **look)
        ax_loss.plot([r["global_step"] for r in train], [r["loss"] for r in train], alpha=0.7, color=look["color"],
                     ls=look["ls"])
    ax_val.set_xlabel("epoch")
    ax_val.set_ylabel(f"validation {metric}")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (log scale: objectives differ in scale)")
    ax_loss.set_yscale("log")
    for ax in (ax_val, ax_loss):
        ax.grid(alpha=0.3)
    ax_loss.legend(*ax_val.get_legend_handles_labels(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()  # one legend, outside: inside, a dozen runs hide the curves
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
