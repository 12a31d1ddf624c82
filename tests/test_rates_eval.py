"""A variable-rate bundle in the rate–accuracy study: one curve from one model (one point per rate,
each what that rate alone measures), `bundle measure` writing every rate's cost, and the study's
comparison with separately trained bundles (BD-rate, Δ-accuracy, training time) read off its rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from splitserve.cli import main

from .test_evaluate import CURVE, _teacher

LIMIT = 3


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from splitserve.data import make_fmnist_scenes

    out = tmp_path_factory.mktemp("data") / "fm"
    make_fmnist_scenes(out, train_scenes=4, val_scenes=6, image_size=64, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def vr_study(scenes, vr_bundle_dir, bundle_dir, other_bundle_dir, tmp_path_factory):
    """A study of the 4-rate bundle beside two single-rate bundles (the "separately trained" curve)."""
    root = tmp_path_factory.mktemp("vrstudy")
    _teacher("classification", root / "t-cla", 64)
    sweep = root / "sweep.yaml"
    sweep.write_text(f"""
data: {scenes}
teachers: {{classification: t-cla}}
limit: {LIMIT}
repeat: 1
batch_size: 2
bitmaps: {{images: 1, methods: [VR]}}
variable_rate: [[VR, SR]]
methods:
  - {{name: VR, kind: bundle, points: [{vr_bundle_dir}]}}
  - {{name: SR, kind: bundle, points: [{bundle_dir}, {other_bundle_dir}]}}
""")
    out = root / "out"
    assert main(["evaluate", str(sweep), "--out", str(out), "--no-progress"]) == 0
    return {"out": out, "doc": json.loads((out / "points.json").read_text())}


def _alone(bundle: Path, scenes: Path, rate: int) -> tuple[float, float]:
    """Rate ``rate`` of ``bundle`` measured by hand: each val image coded alone at that rate by the
    codec, in a v3 payload, answered by the gateway runtime; (mean payload bytes, top-1 %)."""
    from splitserve_edge.payload import Payload, fingerprint_id

    from splitserve.bundle import read_manifest
    from splitserve.edge import EdgeEncoder
    from splitserve.evaluation.tasks import load_task_data, scoring_config
    from splitserve.gateway.runtime import Job, Runtime
    from splitserve.plugins import PluginRegistry

    reg = PluginRegistry.discover()
    plugin = reg.get("classification")
    manifest = read_manifest(bundle)
    edge = EdgeEncoder.from_bundle(bundle)
    runtime = Runtime(bundle, reg, tasks=["classification"])
    config = scoring_config(plugin, runtime.head_configs["classification"])
    runtime.head_configs["classification"] = config
    data = load_task_data(plugin, scenes, "val", manifest.policy, LIMIT)
    sizes, answers = [], []
    for item in data.items:
        x, original = edge.preprocess([item.path])
        strings, hw = edge.codec.compress(x, rate)
        body = Payload(fingerprint_id(edge.fingerprint), (edge.codec.latent_channels, *hw), tuple(original),
                       tuple(strings), rates=(rate,)).to_bytes()
        sizes.append(len(body))
        payload, metas = runtime.parse_payload(body)
        answers.append(runtime.run([Job(plugins=[plugin], payload=payload, metas=metas)])[0][0]["classification"])
    return float(np.mean(sizes)), data.score(answers, config)["top1"]


@pytest.mark.slow
def test_a_variable_rate_bundle_is_one_curve_of_its_rates(vr_study, vr_bundle_dir, scenes):
    """One point per rate, rate 0 first, bytes rising with the index; each point is what that rate
    measures alone (the bytes a device sends, the answers the gateway gives)."""
    points = [p for p in vr_study["doc"]["points"] if p["method"] == "VR"]
    assert [p["rate"] for p in points] == [0, 1, 2, 3]
    assert [p["setting"] for p in points] == [f"{vr_bundle_dir.name} r{k}" for k in range(4)]
    sizes = [p["bytes_per_image"] for p in points]
    assert all(a < b for a, b in zip(sizes, sizes[1:])), sizes
    for p in points:
        nbytes, top1 = _alone(vr_bundle_dir, scenes, p["rate"])
        assert p["bytes_per_image"] == pytest.approx(nbytes, abs=1e-9) and p["accuracy"] == pytest.approx(top1)
        assert p["bpp"] == pytest.approx(8 * nbytes / (64 * 64)) and p["images"] == LIMIT
    single = [p for p in vr_study["doc"]["points"] if p["method"] == "SR"]
    assert [p["rate"] for p in single] == [None, None]  # single-rate bundles: one point each, as before
    assert [b["setting"] for b in vr_study["doc"]["bitmaps"]] == [f"{vr_bundle_dir.name} r2"]  # the middle rate


@pytest.mark.slow
def test_study_compares_the_curve_with_the_separate_bundles(vr_study):
    s = vr_study["doc"]["summary"]["variable_rate"]
    assert [(c["method"], c["against"]) for c in s] == [("VR", "SR")]
    assert set(s[0]["tasks"]) == {"classification"}
    # untrained bundles record no training time: the report says so instead of a number
    assert all(v.startswith("n/a (no train_seconds in the provenance of") for v in s[0]["training"].values())
    report = (vr_study["out"] / "report.md").read_text()
    assert "## Variable rate: one bundle against separately trained ones" in report


@pytest.mark.slow
def test_bundle_measure_writes_every_rate_as_evaluate_measures_it(vr_study, vr_bundle_dir, scenes, tmp_path):
    from splitserve.bundle import load_codec, read_manifest

    from splitserve.bundle import write_manifest

    bundle = tmp_path / vr_bundle_dir.name
    shutil.copytree(vr_bundle_dir, bundle)
    manifest = read_manifest(bundle)
    manifest.default_rate = 2  # not rate 0, so "the default rate" and "rate 0" differ
    write_manifest(bundle, manifest)
    before = read_manifest(bundle)
    assert main(["bundle", "measure", str(bundle), "--data", str(scenes), "--limit", str(LIMIT), "--no-progress"]) == 0
    after = read_manifest(bundle)
    points = {p["rate"]: p for p in vr_study["doc"]["points"] if p["method"] == "VR"}
    assert len(after.rates) == 4
    for k, entry in enumerate(after.rates):
        assert entry.bytes_per_image == pytest.approx(points[k]["bytes_per_image"], abs=1e-9), k
        assert entry.bpp == pytest.approx(points[k]["bpp"], abs=1e-12), k
    assert after.default_rate == 2
    default = points[2]  # the task metrics: the rate a device codes at unless told otherwise
    assert after.tasks["classification"].metrics["top1"] == pytest.approx(default["accuracy"])
    assert after.metrics["bytes"] == pytest.approx(default["bytes_per_image"])
    assert after.metrics["bytes"] != pytest.approx(points[0]["bytes_per_image"])
    assert "at rate 2" in after.provenance["measured"]
    assert after.files == before.files and after.fingerprint == before.fingerprint
    load_codec(bundle)


def test_variable_rate_summary_and_report_rows_from_the_points(tmp_path):
    """Synthetic curves with known answers: on classification the VR curve needs 1.25× the bits at
    every accuracy (BD-rate +25 %), on segmentation it is 0.5 points lower at every rate
    (Δ-accuracy −0.5); training 150 s against 4 × 100 s. The report's rows say the same."""
    from splitserve.evaluation.report import write_outputs
    from splitserve.evaluation.run import Point, Study, summarize
    from splitserve.evaluation.sweep import Method, Sweep

    from .test_report_rows import check_report_against_points

    rate, acc = CURVE[0][:4], CURVE[1][:4]
    points = []
    for task, metric, vr_rate, vr_acc in (("classification", "top1", [r * 1.25 for r in rate], acc),
                                         ("segmentation", "mIoU", rate, [a - 0.5 for a in acc])):
        for k, (r, a) in enumerate(zip(vr_rate, vr_acc)):
            points.append(Point("VR", "bundle", f"vr r{k}", task, metric, a, 10, r * 512, r, 64, 64, 1.0, 2.0, None,
                                None, "vr", rate=k))
        for i, (r, a) in enumerate(zip(rate, acc)):
            points.append(Point("SR", "bundle", f"sr{i}", task, metric, a, 10, r * 512, r, 64, 64, 1.0, 2.0, None,
                                None, f"sr{i}"))
    training = {"VR": [{"bundle": "vr", "codec_seconds": 120.0, "head_seconds": {"segmentation": 30.0}}],
                "SR": [{"bundle": f"sr{i}", "codec_seconds": 90.0, "head_seconds": {"segmentation": 10.0}}
                       for i in range(4)]}
    sweep = Sweep(data=Path("data"), teachers={}, methods=[Method("VR", "bundle", []), Method("SR", "bundle", [])],
                  variable_rate=[("VR", "SR")], links_kbit_s={}, bitmap_images=0)
    reference = {t: {"metric": m, "label": m, "accuracy": 80.0, "images": 10, "teacher": "t", "input_hw": [64, 64]}
                 for t, m in (("classification", "top1"), ("segmentation", "mIoU"))}
    summary = summarize(points, sweep, reference, training)
    (pair,) = summary["variable_rate"]
    assert pair["tasks"]["classification"]["bd_rate"] == pytest.approx(25.0, abs=1e-9)
    assert pair["tasks"]["segmentation"]["delta_accuracy"] == pytest.approx(-0.5, abs=1e-9)
    assert pair["tasks"]["segmentation"]["bd_rate"] > 0
    codec, total = pair["training"]["codec"], pair["training"]["codec and heads"]
    assert (codec["one_run_s"], codec["separate_sum_s"], codec["ratio_to_sum"], codec["ratio_to_one"]) == \
        (120.0, 360.0, pytest.approx(1 / 3), pytest.approx(4 / 3))
    assert (total["one_run_s"], total["separate_sum_s"], total["ratio_to_one"]) == (150.0, 400.0, pytest.approx(1.5))

    study = Study(points, reference, summary, {}, [], [], "m", {}, 1.0)
    write_outputs(tmp_path, study, sweep)
    assert check_report_against_points(tmp_path) == len(points)
    rows = _table(tmp_path / "report.md", "| variable-rate | against | task |")
    assert [(r["task"], float(r["Δ-accuracy (pp)"]), float(r["BD-rate (%)"])) for r in rows] == [
        ("classification", pytest.approx(pair["tasks"]["classification"]["delta_accuracy"], abs=0.005), 25.0),
        ("segmentation", -0.5, pytest.approx(pair["tasks"]["segmentation"]["bd_rate"], abs=0.05))]
    times = _table(tmp_path / "report.md", "| variable-rate | against | counted |")
    assert [(r["counted"], r["one run (s)"], r["separate runs (s)"], r["one ÷ sum"], r["one ÷ one separate run"])
            for r in times] == [("codec", "120", "90 + 90 + 90 + 90 = 360", "0.33", "1.33"),
                                ("codec and heads", "150", "100 + 100 + 100 + 100 = 400", "0.38", "1.50")]


def _table(report: Path, header: str) -> list[dict[str, str]]:
    lines = report.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    names = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(names, (c.strip() for c in line.strip("|").split("|")), strict=True)))
    return rows


def test_training_time_comes_from_each_bundles_provenance(vr_bundle_dir):
    """The codec's run and each fine-tuning run of a measured head (a head the codec's run wrote,
    with no stage of its own, adds nothing); a bundle without the figure makes the comparison n/a."""
    from splitserve.bundle import read_manifest
    from splitserve.evaluation.run import training_comparison, training_record

    manifest = read_manifest(vr_bundle_dir).model_copy(deep=True)
    manifest.provenance["train_seconds"] = 3600.0
    manifest.tasks["detection"].provenance = {"stage": "finetune", "train_seconds": 600.0}
    manifest.tasks["segmentation"].provenance = {"stage": "finetune"}  # not measured: not counted
    record = training_record(manifest, "vr", ["classification", "detection"])
    assert record == {"bundle": "vr", "codec_seconds": 3600.0, "head_seconds": {"detection": 600.0}}
    separate = [{"bundle": "a", "codec_seconds": 1000.0, "head_seconds": {"detection": 500.0}},
                {"bundle": "b", "codec_seconds": 2000.0, "head_seconds": {"detection": None}}]
    result = training_comparison([record], separate)
    assert result["codec"]["ratio_to_sum"] == pytest.approx(3600 / 3000)
    assert result["codec and heads"] == "n/a (no train_seconds in the provenance of b)"
    unmeasured = training_record(manifest, "vr", ["classification", "segmentation"])
    assert training_comparison([unmeasured], separate[:1])["codec and heads"].endswith("of vr)")


def test_sweep_keeps_a_variable_rate_bundle_a_curve_of_its_own(vr_bundle_dir, bundle_dir, tmp_path):
    from splitserve.evaluation.sweep import SweepError, load_sweep

    (tmp_path / "data").mkdir()
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "teacher.json").write_text("{}")
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"""
data: data
teachers: {{classification: t}}
variable_rate: [[SR, Mixed], [VR, WebP], [VR]]
methods:
  - {{name: Mixed, kind: bundle, points: [{vr_bundle_dir}, {bundle_dir}]}}
  - {{name: SR, kind: bundle, points: [{bundle_dir}]}}
  - {{name: VR, kind: bundle, points: [{vr_bundle_dir}]}}
  - {{name: WebP, kind: webp, points: [5]}}
""")
    with pytest.raises(SweepError) as e:
        load_sweep(sweep)
    msg = str(e.value)
    for expected in (f"methods (Mixed): {vr_bundle_dir.name} is variable-rate (one curve by itself)",
                     "variable_rate[0]: 'SR' has no variable-rate bundle",
                     "variable_rate[1]: 'VR' and 'WebP' must both be bundle methods",
                     "variable_rate[2]: expected [curve, against]"):
        assert expected in msg, msg
    assert len(msg.splitlines()) == 5
    sweep.write_text(sweep.read_text().replace("variable_rate: [[SR, Mixed], [VR, WebP], [VR]]",
                                               "variable_rate: [[VR, SR]]")
                     .replace(f"[{vr_bundle_dir}, {bundle_dir}]", f"[{bundle_dir}]"))
    assert load_sweep(sweep).variable_rate == [("VR", "SR")]
