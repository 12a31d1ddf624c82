"""`platform evaluate`: summaries on curves with known answers, rate accounting, complexity counting,
the link model, the sweep schema, CompressAI image codecs, and the whole study end to end on a tiny
fmnist-scenes set (all three tasks, every kind of method)."""

from __future__ import annotations

import csv
import io
import json
import math
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from splitserve.cli import main
from splitserve.evaluation.metrics import CurveError, bd_rate, delta_accuracy, pareto_front

from .test_report_rows import check_report_against_points

# Published ImageNet / ResNet-50 points (DESIGN.md §1, §4): top-1 % at bpp
ES = ([0.147, 0.331, 0.596, 0.887, 1.312], [57.37, 71.61, 74.23, 75.10, 75.31])
RAC8 = ([0.093, 0.225, 0.435, 1.159], [67.92, 71.51, 73.51, 75.20])
WEBP = ([0.24, 0.48, 1.04, 1.82], [46.7, 61.4, 72.1, 74.8])
CURVE = ([0.1, 0.3, 0.6, 1.0, 1.5], [50.0, 65.0, 71.0, 74.0, 75.0])


# -- summaries -----------------------------------------------------------------------------------
def test_delta_accuracy_of_a_shifted_curve_is_the_shift():
    rate, acc = CURVE
    assert delta_accuracy(rate, acc, rate, [a + 2.5 for a in acc]) == pytest.approx(2.5, abs=1e-12)
    assert delta_accuracy(rate, acc, rate, [a - 1.0 for a in acc]) == pytest.approx(-1.0, abs=1e-12)
    assert delta_accuracy(rate, acc, rate, acc) == pytest.approx(0.0, abs=1e-12)


def test_delta_accuracy_averages_over_the_shared_range_in_linear_bpp():
    # A: acc = 10 r on [0, 4]; B: acc = 20 r on [1, 2] (PCHIP reproduces straight lines exactly).
    # Shared range [1, 2]: mean of 10 r over it = 15. Over log bpp it would be 10/ln2 · (2 − 1)·… ≠ 15.
    a = ([0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 10.0, 20.0, 30.0, 40.0])
    b = ([1.0, 1.5, 2.0], [20.0, 30.0, 40.0])
    assert delta_accuracy(*a, *b) == pytest.approx(15.0, abs=1e-12)
    assert delta_accuracy(*b, *a) == pytest.approx(-15.0, abs=1e-12)


def test_bd_rate_of_a_curve_at_half_the_rate_is_minus_50_percent():
    rate, acc = CURVE
    assert bd_rate(rate, acc, [r / 2 for r in rate], acc) == pytest.approx(-50.0, abs=1e-9)
    assert bd_rate(rate, acc, [r * 1.25 for r in rate], acc) == pytest.approx(25.0, abs=1e-9)
    assert bd_rate(rate, acc, rate, acc) == pytest.approx(0.0, abs=1e-12)


def test_bd_rate_reads_rate_off_the_pareto_front():
    rate, acc = CURVE
    # a dominated point (more bits, less accuracy) and a saturated repeat change nothing
    noisy = ([*rate, 2.0, 3.0], [*acc, 74.5, 75.0])
    assert bd_rate(rate, acc, *noisy) == pytest.approx(0.0, abs=1e-12)
    r, a = pareto_front(*noisy)
    assert list(r) == rate and list(a) == acc


def _cubic_bd_rate(a, b):
    """The classic Bjøntegaard fit: one cubic polynomial of log-rate in accuracy per curve."""
    pa, pb = np.polyfit(a[1], np.log(a[0]), 3), np.polyfit(b[1], np.log(b[0]), 3)
    lo, hi = max(min(a[1]), min(b[1])), min(max(a[1]), max(b[1]))
    ia, ib = np.polyint(pa), np.polyint(pb)
    d = ((np.polyval(ib, hi) - np.polyval(ib, lo)) - (np.polyval(ia, hi) - np.polyval(ia, lo))) / (hi - lo)
    return (np.exp(d) - 1) * 100


def test_published_points_keep_their_signs_with_pchip():
    """On the papers' ImageNet points PCHIP gives the published picture: RAC N=8 about +1 pp over
    Entropic Student; about −66 % BD-rate for Entropic Student and −77 % for RAC N=8 against WebP.
    A single cubic polynomial says Entropic Student needs 70 % *more* bits than WebP."""
    assert delta_accuracy(*ES, *RAC8) > 0
    assert delta_accuracy(*ES, *RAC8) == pytest.approx(1.06, abs=0.05)
    assert bd_rate(*WEBP, *ES) == pytest.approx(-66.1, abs=0.5)
    assert bd_rate(*WEBP, *RAC8) == pytest.approx(-77.1, abs=0.5)
    assert bd_rate(*ES, *RAC8) < 0
    assert _cubic_bd_rate(WEBP, ES) > 50  # the wrong sign PCHIP avoids


def test_curves_must_overlap_and_have_points():
    with pytest.raises(CurveError, match="no shared range"):
        delta_accuracy([0.1, 0.2], [50, 60], [0.5, 0.6], [70, 71])
    with pytest.raises(CurveError, match="fewer than two"):
        delta_accuracy([0.1], [50], [0.1, 0.2], [50, 60])
    with pytest.raises(CurveError, match="Pareto"):
        bd_rate([0.1, 0.2], [50, 50], [0.1, 0.2], [50, 60])


# -- rate accounting, complexity, link model ---------------------------------------------------
def test_bpp_is_bits_over_model_input_pixels():
    from splitserve.evaluation.methods import rate_of

    assert rate_of([100, 300], [(32, 32), (32, 32)]) == (200.0, pytest.approx(8 * 200 / 1024))
    # per image, over each image's own model input: (800/1024 + 2400/2048) / 2
    assert rate_of([100, 300], [(32, 32), (32, 64)])[1] == pytest.approx((0.78125 + 1.171875) / 2)


@pytest.mark.parametrize("kind,fmt", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_input_codec_rate_is_the_file_size(kind, fmt):
    from splitserve.evaluation.methods import PillowCodec

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    codec = PillowCodec(kind, 30)
    data = codec.encode(img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=30)
    assert data == buf.getvalue()
    assert codec.decode(data).size == img.size


def test_mac_counts_have_known_answers():
    from compressai.layers import GDN1

    from splitserve.evaluation.complexity import count_macs, count_parameters

    conv, lin = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(10, 5)
    convt, gdn = torch.nn.ConvTranspose2d(4, 2, 2, stride=2), GDN1(8)
    assert count_macs([conv], lambda: conv(torch.zeros(1, 3, 16, 16))) == 16 * 16 * 8 * 3 * 9
    assert count_macs([lin], lambda: lin(torch.zeros(2, 10))) == 2 * 5 * 10
    assert count_macs([convt], lambda: convt(torch.zeros(1, 4, 5, 5))) == 25 * 4 * 2 * 4
    assert count_macs([gdn], lambda: gdn(torch.zeros(1, 8, 4, 4))) == 16 * 8 * 8
    assert count_parameters([conv, conv, None]) == 3 * 8 * 9 + 8


def test_link_model():
    from splitserve.evaluation.link import end_to_end_ms, link_tables, winners

    assert end_to_end_ms(2.0, 1000, 10.0, 37.5) == pytest.approx(2.0 + 8000 / 37.5 + 10.0)
    pts = [{"method": "small", "setting": "a", "accuracy": 70.0, "bytes_per_image": 100, "encode_ms": 20.0, "server_ms": 5.0},
           {"method": "big", "setting": "b", "accuracy": 71.0, "bytes_per_image": 2000, "encode_ms": 1.0, "server_ms": 5.0},
           {"method": "bad", "setting": "c", "accuracy": 10.0, "bytes_per_image": 1, "encode_ms": 0.0, "server_ms": 0.0}]
    w = winners(pts, {"slow": 10.0, "fast": 100_000.0}, min_accuracy=69.0)
    assert w["slow"]["winner"] == "small" and w["fast"]["winner"] == "big" and "bad" not in w["slow"]["per_method"]
    assert w["slow"]["per_method"]["small"]["ms"] == pytest.approx(20 + 80 + 5)
    # one table per tolerance below the reference: at 71 − 0.5 only "big" qualifies, at 71 − 2 "small" too
    strict, loose = link_tables(pts, {"slow": 10.0}, reference=71.0, tolerances=[0.5, 2.0])
    assert (strict["min_accuracy"], loose["min_accuracy"]) == (70.5, 69.0)
    assert set(strict["per_link"]["slow"]["per_method"]) == {"big"} and strict["per_link"]["slow"]["winner"] == "big"
    assert loose["per_link"]["slow"] == w["slow"] and loose["per_link"]["slow"]["winner"] == "small"
    assert set(link_tables(pts, {"slow": 10.0}, None, [1.0])[0]["per_link"]["slow"]["per_method"]) == {"small", "big", "bad"}


def test_comparisons_summarize_named_pairs():
    """A sweep's comparisons give Δ-accuracy and BD-rate of one curve against another, as the anchors
    do: B is A + 2.5 points, C is B at half the rate."""
    from splitserve.evaluation.run import Point, summarize
    from splitserve.evaluation.sweep import Sweep

    rate, acc = CURVE
    curves = {"A": (rate, acc), "B": (rate, [a + 2.5 for a in acc]), "C": ([r / 2 for r in rate], [a + 2.5 for a in acc])}
    points = [Point(name, "bundle", f"{name}{i}", "classification", "top1", a, 10, r * 512, r, 64, 64, 1.0, 1.0,
                    None, None, "") for name, (rs, accs) in curves.items() for i, (r, a) in enumerate(zip(rs, accs))]
    sweep = Sweep(data=None, teachers={}, methods=[], anchors={"delta_accuracy": "A", "bd_rate": "A"},
                  comparisons=[("B", "A"), ("C", "B"), ("C", "D")], links_kbit_s={})
    entry = summarize(points, sweep, {})["tasks"]["classification"]
    assert entry["delta_accuracy"]["B"] == pytest.approx(2.5, abs=1e-9)  # the anchor table, for reference
    b, c = entry["comparisons"]  # ("C", "D"): D has no curve on this task, so no row
    assert (b["method"], b["against"], c["method"], c["against"]) == ("B", "A", "C", "B")
    assert b["delta_accuracy"] == pytest.approx(2.5, abs=1e-9)
    assert c["bd_rate"] == pytest.approx(-50.0, abs=1e-9)
    assert c["bd_rate"] != pytest.approx(entry["bd_rate"]["C"])  # against B, not the anchor A


# -- sweep schema ------------------------------------------------------------------------------
def test_sweep_reports_every_bad_field(tmp_path):
    from splitserve.evaluation.sweep import SweepError, load_sweep

    (tmp_path / "data").mkdir()
    sweep = tmp_path / "s.yaml"
    sweep.write_text("""
data: data
teachers: {classification: nowhere}
colour: blue
limit: 0
anchors: {delta_accuracy: Nope}
link_tolerance: [1, -2]
comparisons: [[A, Nope], [A]]
methods:
  - {name: A, kind: bundle, points: [missing-bundle]}
  - {name: B, kind: png, points: [1]}
  - {name: C, kind: webp, points: [101]}
  - {name: C, kind: jpeg, points: []}
  - {name: D, kind: webp, points: [5], tasks: detection}
""")
    with pytest.raises(SweepError) as e:
        load_sweep(sweep)
    msg = str(e.value)
    for expected in ("colour: unknown key", "limit: expected an integer", "teachers.classification:",
                     "methods[0] (A).points[0]:", "kind 'png'", "methods[2] (C).points[0] (quality)",
                     "name used twice", "anchors.delta_accuracy: 'Nope'",
                     "link_tolerance[1]: expected a non-negative number",
                     "methods[4] (D).tasks: expected a non-empty list",
                     "comparisons[0]: 'Nope' not a method", "comparisons[1]: expected [curve, against]"):
        assert expected in msg, expected
    assert len(msg.splitlines()) == 14  # the summary line + one per problem
    assert main(["evaluate", str(sweep), "--out", str(tmp_path / "o")]) == 2
    assert main(["evaluate", str(sweep), "--check"]) == 2  # --check needs no --out
    assert main(["evaluate", str(tmp_path / "absent.yaml"), "--out", str(tmp_path / "o")]) == 2


def test_evaluate_check_validates_without_measuring(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "teacher.json").write_text("{}")  # --check looks at paths, not at what is in them
    sweep = tmp_path / "s.yaml"
    sweep.write_text("data: data\nteachers: {classification: t}\nmethods: [{name: WebP, kind: webp, points: [5, 50]}]\n")
    assert main(["evaluate", str(sweep), "--check"]) == 0
    assert capsys.readouterr().out.strip() == f"{sweep}: ok (1 methods, 2 points)"
    assert not any(tmp_path.glob("*/report.md"))
    assert main(["evaluate", str(sweep)]) == 2  # measuring needs --out
    assert "give --out DIR" in capsys.readouterr().err


def test_method_tasks_resolve_aliases_and_must_be_sweep_tasks():
    from splitserve.evaluation.run import _method_tasks
    from splitserve.evaluation.sweep import Method, SweepError
    from splitserve.plugins import PluginRegistry

    reg, tasks = PluginRegistry.discover(), ["classification", "segmentation"]
    assert _method_tasks(Method("A", "webp", [5]), tasks, reg) == tasks
    assert _method_tasks(Method("A", "webp", [5], ["seg"]), tasks, reg) == ["segmentation"]
    with pytest.raises(SweepError, match=r"\(B\)\.tasks: detection is not a task of this sweep"):
        _method_tasks(Method("B", "webp", [5], ["det"]), tasks, reg)
    with pytest.raises(SweepError, match=r"\(C\)\.tasks: .*colour"):
        _method_tasks(Method("C", "webp", [5], ["colour"]), tasks, reg)


def test_learning_curves_from_metrics_logs(tmp_path):
    """--curves plots runs' metrics.jsonl: top1 to learning_curves.png, another metric to its own file."""
    for name, metric in (("cls", "top1"), ("det", "mAP")):
        rows = [{"kind": "train", "epoch": e, "global_step": 10 * e, "loss": 1.0 / e} for e in (1, 2)]
        rows += [{"kind": "val", "epoch": e, "global_step": 10 * e, metric: 10.0 * e} for e in (1, 2)]
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["evaluate", "--curves", f"teacher={tmp_path / 'cls'}", "--out", str(out)]) == 0
    assert main(["evaluate", "--curves", f"det={tmp_path / 'det'}", "--metric", "mAP", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["learning_curves.png", "learning_curves_mAP.png"]
    assert Image.open(out / "learning_curves_mAP.png").size[0] > 500
    assert main(["evaluate", "--curves", f"x={tmp_path}", "--out", str(out)]) == 2  # no metrics.jsonl there


def test_learning_curves_read_a_joint_runs_metric_under_its_task():
    """A run that trains several heads logs detection/mAP: --metric mAP plots it beside a detection
    run's mAP; a name two tasks share is refused rather than picked at random."""
    from splitserve.errors import SplitserveError
    from splitserve.evaluation.report import val_series

    rows = [{"kind": "train", "epoch": 1, "loss": 2.0},
            {"kind": "val", "epoch": 1, "detection/mAP": 19.3, "classification/top1": 79.9, "a/x": 1, "b/x": 2},
            {"kind": "val", "epoch": 2, "detection/mAP": 20.1, "classification/top1": 80.4, "a/x": 1, "b/x": 2}]
    assert val_series(rows, "mAP") == ([1, 2], [19.3, 20.1])
    assert val_series(rows, "detection/mAP") == ([1, 2], [19.3, 20.1])
    assert val_series([{"kind": "val", "epoch": 3, "mAP": 5.0, "x/mAP": 9.0}], "mAP") == ([3], [5.0])
    assert val_series(rows, "mIoU") == ([], [])
    with pytest.raises(SplitserveError, match="ambiguous.*a/x, b/x"):
        val_series(rows, "x")


_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("points", sorted(_ROOT.glob("docs/benchmarks/**/points.json")),
                         ids=lambda p: str(p.relative_to(_ROOT)))
def test_committed_study_is_its_sweeps_output(points):
    """Every committed report's points.json came from the sweep file it names, as committed: the same
    methods and points, in order, and the same tasks (re-run `platform evaluate` after editing it)."""
    from splitserve.evaluation.sweep import load_sweep

    doc = json.loads(points.read_text())
    sweep = load_sweep(_ROOT / doc["sweep"], check_paths=False)
    assert sorted(doc["reference"]) == sorted(sweep.teachers)
    listed = [(m.name, p.name if isinstance(p, pathlib.Path) else f"q{p}") for m in sweep.methods for p in m.points]
    # a variable-rate bundle is one point per rate, "NAME rK"
    measured = list(dict.fromkeys((p["method"], p["setting"] if p.get("rate") is None else
                                   p["setting"].rsplit(" r", 1)[0]) for p in doc["points"]))
    assert measured == listed
    compared = [(c["method"], c["against"]) for c in doc["summary"]["tasks"]["classification"].get("comparisons", [])]
    assert compared == sweep.comparisons


def test_the_committed_reports_are_found():
    assert "docs/benchmarks/fmnist-scenes/points.json" in [
        str(p.relative_to(_ROOT)) for p in _ROOT.glob("docs/benchmarks/**/points.json")]


# -- CompressAI image codecs -------------------------------------------------------------------
def test_image_codec_container_round_trip():
    from splitserve.evaluation.imagecodec import pack, unpack

    strings = [b"y" * 300, b"z" * 7]
    data = pack(48, 40, strings)
    assert len(data) == 4 + 2 + 307  # H, W; one varint length (300 needs two bytes); the strings
    assert unpack(data, 2) == (48, 40, strings)
    assert len(pack(16, 16, [b"abc"])) == 4 + 3


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from splitserve.data import make_fmnist_scenes

    out = tmp_path_factory.mktemp("data") / "fm"
    make_fmnist_scenes(out, train_scenes=8, val_scenes=10, image_size=64, seed=0, progress=False)
    return out


def test_train_image_codec_resumes_and_codes_real_bytes(scenes, tmp_path):
    from splitserve.evaluation.imagecodec import ImageCodec, to_unit_tensor

    out, work = tmp_path / "codec", tmp_path / "work"
    common = ["train-image-codec", "--arch", "mbt2018-mean", "--data", str(scenes), "--out", str(out), "--channels",
              "8,8", "--lmbda", "0.01", "--batch-size", "4", "--num-workers", "0", "--val-limit", "2", "--workdir",
              str(work), "--no-progress", "--epochs", "2", "--prior-lr", "0.01"]
    assert main([*common, "--max-steps", "1"]) == 0
    assert main([*common, "--max-steps", "3"]) == 2  # a checkpoint exists: resume must be asked for
    assert main([*common, "--max-steps", "3", "--resume"]) == 0
    state = torch.load(work / "checkpoint" / "last.pt", weights_only=True)
    # 16 train images (8 ImageFolder + 8 COCO scenes), 4 per batch: step 3 is batch 3 of the first epoch
    assert (int(state["global_step"]), int(state["epoch"]), int(state["batch"])) == (3, 0, 3)
    # --prior-lr: the z bottleneck's density (5 matrices, 5 biases, 4 factors) on its own Adam, resumed with it
    (group,) = state["optimizers"]["prior"]["param_groups"]
    assert group["lr"] == 0.01 and len(group["params"]) == 14
    prior_state = state["optimizers"]["prior"]["state"]
    assert len(prior_state) == 14 and all(int(s["step"]) == 3 for s in prior_state.values())
    meta = json.loads((out / "codec.json").read_text())
    assert meta["architecture"] == "mbt2018-mean" and meta["provenance"]["steps"] == 3
    assert meta["metrics"]["images"] == 2 and meta["metrics"]["bpp"] > 0
    codec = ImageCodec.load(out)
    img = Image.open(next((scenes / "imagefolder" / "val").rglob("*.png"))).convert("RGB")
    data = codec.encode(img)
    assert codec.decode(data).size == img.size
    # the bits the prior charges for y, plus z and the 5-byte header, are what the bytes cost (± coder slack)
    bits = codec.bit_map(to_unit_tensor(img)).sum()
    assert 8 * len(data) >= bits - 64


def test_train_image_codec_sigterm_saves_checkpoint_and_resumes(scenes, tmp_path):
    """SIGTERM to the process group (timeout, systemd), data-loading worker included: the trainer
    checkpoints, exits 128 + 15 and names --resume; the resumed run continues from that step."""
    import signal

    from .helpers import sigterm_group_during

    out, work = tmp_path / "codec", tmp_path / "work"
    args = ["train-image-codec", "--arch", "bmshj2018-factorized", "--data", str(scenes), "--out", str(out),
            "--channels", "8,8", "--lmbda", "0.01", "--batch-size", "4", "--num-workers", "1", "--val-limit", "2",
            "--workdir", str(work), "--no-progress", "--epochs", "500"]
    code, err = sigterm_group_during(args, work / "metrics.jsonl", 2)  # one record per epoch here
    assert code == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume" in err
    assert not out.exists(), "an interrupted run writes no codec"
    step = int(torch.load(work / "checkpoint" / "last.pt", weights_only=True)["global_step"])
    assert step >= 8
    assert main([*args, "--resume", "--max-steps", str(step + 1)]) == 0
    assert json.loads((out / "codec.json").read_text())["provenance"]["steps"] == step + 1


def test_ground_truth_answers_score_100_and_wrong_ones_less(scenes):
    """Scoring from the plugins' responses, on answers with known scores: the ground truth itself
    (mAP 100, mIoU 100, top-1 100), then a shifted box / a wrong class."""
    from splitserve_tasks.classification.schema import ClassificationResult, ClassScore
    from splitserve_tasks.detection.schema import Detection, DetectionResult
    from splitserve_tasks.segmentation.schema import SegmentationResult, encode_mask

    cls = _items(scenes, "classification")
    right = [ClassificationResult(top=[ClassScore(index=it.target, label="x", probability=1.0)]) for it in cls.items]
    first = cls.items[0].target
    second = [ClassificationResult(top=[ClassScore(index=(first + 1) % 10, label="x", probability=0.6),
                                        ClassScore(index=first, label="x", probability=0.4)])] + right[1:]
    sixth = [ClassificationResult(top=[ClassScore(index=(first + k) % 10, label="x", probability=0.1)
                                       for k in range(1, 6)] + [ClassScore(index=first, label="x", probability=0.05)])]
    assert cls.score(right) == {"top1": 100.0, "top5": 100.0}
    assert cls.score(second) == {"top1": 75.0, "top5": 100.0}  # right in second place
    assert cls.score(sixth + right[1:]) == {"top1": 75.0, "top5": 75.0}  # listed, but sixth

    det = _items(scenes, "detection")
    ds = det.dataset
    answers = []
    for it in det.items:
        anns = ds.coco.imgToAnns[it.target]
        answers.append(DetectionResult(detections=[
            Detection(box=[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]],
                      score=1.0, index=ds.category_id_to_label[a["category_id"]], label="x") for a in anns]))
    assert det.score(answers)["mAP"] == pytest.approx(100.0)
    shifted = [DetectionResult(detections=[d.model_copy(update={"box": [v + 6 for v in d.box]}) for d in a.detections])
               for a in answers]
    assert det.score(shifted)["mAP"] < 100.0

    seg = _items(scenes, "segmentation")
    masks = [seg.dataset.semantic_mask(it.target) for it in seg.items]
    perfect = [SegmentationResult(width=m.shape[1], height=m.shape[0], mask_width=m.shape[1], mask_height=m.shape[0],
                                  scale=[1.0, 1.0], mask=encode_mask(m), classes=[]) for m in masks]
    assert seg.score(perfect, {"num_classes": 11})["mIoU"] == pytest.approx(100.0)
    blank = [p.model_copy(update={"mask": encode_mask(np.zeros_like(m))}) for p, m in zip(perfect, masks)]
    assert seg.score(blank, {"num_classes": 11})["mIoU"] < 100.0
    # a mask at half the resolution, enlarged nearest-neighbour to the truth's size by the scorer
    half = [p.model_copy(update={"mask": encode_mask(m[::2, ::2]), "mask_width": m.shape[1] // 2,
                                 "mask_height": m.shape[0] // 2, "scale": [2.0, 2.0]}) for p, m in zip(perfect, masks)]
    truth = np.concatenate([m.ravel() for m in masks]).astype(np.int64)
    pred = np.concatenate([np.repeat(np.repeat(m[::2, ::2], 2, 0), 2, 1).ravel() for m in masks]).astype(np.int64)
    confusion = np.bincount(truth * 11 + pred, minlength=121).reshape(11, 11)
    union = confusion.sum(0) + confusion.sum(1) - confusion.diagonal()
    want = 100 * np.mean(confusion.diagonal()[union > 0] / union[union > 0])
    assert 0 < want < 100 and seg.score(half, {"num_classes": 11})["mIoU"] == pytest.approx(want)


# -- the whole study ---------------------------------------------------------------------------
def _teacher(task: str, path, size: int):
    from splitserve.defaults import FMNIST_LABELS
    from splitserve.plugins import PluginRegistry
    from splitserve.preprocess import Preprocessing
    from splitserve.training.teacher import Teacher, save_teacher

    plugin = PluginRegistry.discover().get(task)
    torch.manual_seed(0)
    config = plugin.resolve_config("resnet18", plugin.config_for_classes(FMNIST_LABELS))
    stem, head = plugin.build_teacher("resnet18", config)
    save_teacher(path, Teacher(path, task, "resnet18", config, Preprocessing.fixed(size, size), stem.eval(),
                               head.eval(), {}, {}))
    return path


@pytest.fixture(scope="module")
def study(scenes, tmp_path_factory):
    from splitserve.defaults import build_untrained_bundle
    from splitserve.evaluation.imagecodec import train_image_codec
    from splitserve.preprocess import Preprocessing

    root = tmp_path_factory.mktemp("study")
    for task in ("classification", "detection", "segmentation"):
        _teacher(task, root / f"t-{task[:3]}", 64)
    for i in range(2):  # two untrained ES bundles (the second without a detection head) as "rate points"
        tasks = ["classification", "detection", "segmentation"] if i == 0 else ["classification", "segmentation"]
        build_untrained_bundle(root / f"es{i}", input_size=(64, 64), seed=i, tasks=tasks)
    train_image_codec("bmshj2018-factorized", scenes, root / "fp", channels=(8, 8), lmbda=0.01,
                      preprocessing=Preprocessing.fixed(64, 64), max_steps=2, batch_size=4, num_workers=0,
                      val_limit=2, progress=False)
    sweep = root / "sweep.yaml"
    sweep.write_text(f"""
data: {scenes}
teachers: {{classification: t-cla, detection: t-det, segmentation: t-seg}}
limit: 4
repeat: 2
batch_size: 3
anchors: {{delta_accuracy: ES, bd_rate: WebP}}
comparisons: [[JPEG, WebP], [WebP, Factorized prior]]
bitmaps: {{images: 2}}
link_tolerance: [100, 1]
methods:
  - {{name: ES, kind: bundle, points: [es0, es1]}}
  - {{name: WebP, kind: webp, points: [5, 50, 95]}}
  - {{name: JPEG, kind: jpeg, points: [10, 90], tasks: [seg, classification]}}
  - {{name: Factorized prior, kind: compressai, points: [fp]}}
""")
    out = root / "out"
    assert main(["evaluate", str(sweep), "--out", str(out), "--no-progress"]) == 0
    return {"root": root, "out": out, "doc": json.loads((out / "points.json").read_text())}


def _items(scenes, task: str, limit: int = 4):
    from splitserve.evaluation.tasks import load_task_data
    from splitserve.plugins import PluginRegistry
    from splitserve.preprocess import Preprocessing

    return load_task_data(PluginRegistry.discover().get(task), scenes, "val", Preprocessing.fixed(64, 64), limit)


@pytest.mark.slow
def test_study_writes_consistent_outputs(study, scenes):
    out, doc = study["out"], study["doc"]
    for f in ("report.md", "points.json", "points.csv", "bitmaps.png", *(f"rate_accuracy_{t}.png" for t in
              ("classification", "detection", "segmentation")), "delta_accuracy_vs_latency_classification.png"):
        assert (out / f).is_file(), f
    points = doc["points"]
    # ES: 2 points × (3 + 2 tasks); WebP 3, factorized 1 point × 3 tasks; JPEG 2 points × its 2 tasks
    assert len(points) == 5 + 3 * 4 + 2 * 2
    assert sorted({p["task"] for p in points if p["method"] == "JPEG"}) == ["classification", "segmentation"]
    assert any("es1: no head for detection" in n for n in doc["notes"])
    with (out / "points.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["setting"], r["task"]) for r in rows] == [(p["method"], p["setting"], p["task"]) for p in points]
    for r, p in zip(rows, points):
        assert float(r["bytes_per_image"]) == pytest.approx(p["bytes_per_image"])
        assert float(r["accuracy"]) == pytest.approx(p["accuracy"])
        assert p["bpp"] == pytest.approx(8 * p["bytes_per_image"] / (64 * 64))  # fixed 64×64 model input
        assert p["images"] == 4
    assert check_report_against_points(out) == len(points)  # report.md's rows say what points.json says
    report = (out / "report.md").read_text()
    assert f"Machine: `{doc['uname']['node']}`" in report and "| step | seconds |" in report
    assert "PCHIP" in report and "LoRa (37.5 kbit/s)" in report


@pytest.mark.slow
def test_study_times_one_request_for_every_task_of_each_multi_task_bundle(study):
    from splitserve.bundle import bundle_bytes, read_manifest

    root, doc = study["root"], study["doc"]
    requests = doc["summary"]["requests"]
    assert [(r["method"], r["setting"], r["tasks"]) for r in requests] == [
        ("ES", "es0", ["classification", "detection", "segmentation"]), ("ES", "es1", ["classification", "segmentation"])]
    for r in requests:
        path = root / r["setting"]
        listed = ["manifest.json", *(e.path for e in read_manifest(path).files.values()),
                  *(t.file.path for t in read_manifest(path).tasks.values())]
        assert r["bundle_bytes"] == sum((path / f).stat().st_size for f in listed)
        (path / "stray.pt").write_bytes(b"x" * 1000)  # a file beside the bundle is not part of it
        assert bundle_bytes(path) == r["bundle_bytes"]
        (path / "stray.pt").unlink()
        assert set(r["separate_ms"]) == set(r["tasks"]) and r["server_ms"] > 0
        assert r["trunks"] == {t: "own" for t in r["tasks"]}  # untrained bundles: a trunk per head
    report = (study["out"] / "report.md").read_text()
    assert "## One request for every task" in report
    assert f"| ES | es1 | classification own, segmentation own | {requests[1]['server_ms']:.2f} |" in report


@pytest.mark.slow
def test_one_request_times_a_parse_a_decode_and_every_head_per_run(study, scenes):
    """What ``request_ms`` times is what a gateway does for a 3-task request each time: parse the
    bytes, entropy-decode and run the decoder once, then each head (as ``server_ms`` does per task)."""
    from splitserve.evaluation.methods import BundlePoint
    from splitserve.plugins import PluginRegistry
    from splitserve.preprocess import load_image

    tasks = ["classification", "detection", "segmentation"]
    point = BundlePoint(study["root"] / "es0", tasks, PluginRegistry.discover())
    runtime, calls = point.runtime, {"parse": 0, "decoder": 0}
    parse = runtime.parse_payload

    def counted(data):
        calls["parse"] += 1
        return parse(data)

    runtime.parse_payload = counted
    runtime.features.codec.decoder.register_forward_hook(lambda *_: calls.__setitem__("decoder", calls["decoder"] + 1))
    for task in tasks:  # each head's own layer2..4 (untrained bundles: a trunk per head)
        runtime.heads.heads[task].tail.register_forward_hook(lambda *_, t=task: calls.__setitem__(t, calls.get(t, 0) + 1))
    sample = load_image(_items(scenes, "classification").items[0].path)
    assert point.request_ms(sample, threads=1, repeat=3) > 0
    assert calls["parse"] >= 4 and all(calls.get(k) == calls["parse"] for k in ("decoder", *tasks)), calls


@pytest.mark.slow
def test_study_rates_are_real_bytes(study, scenes):
    from splitserve.edge import EdgeEncoder
    from splitserve.evaluation.imagecodec import ImageCodec
    from splitserve.preprocess import load_image

    points = study["doc"]["points"]
    for task in ("classification", "segmentation"):
        items = _items(scenes, task).items
        # our bundle: the mean length of the payloads a device sends, one image each, header included
        edge = EdgeEncoder.from_bundle(study["root"] / "es0")
        sizes = [len(edge.encode([it.path]).data) for it in items]
        es0 = next(p for p in points if p["setting"] == "es0" and p["task"] == task)
        assert es0["bytes_per_image"] == pytest.approx(np.mean(sizes))
        # WebP: the file Pillow writes for the 64×64 model input
        geo = [load_image(it.path).resize((64, 64), Image.BILINEAR) for it in items]
        webp = []
        for g in geo:
            buf = io.BytesIO()
            g.save(buf, format="WEBP", quality=50)
            webp.append(len(buf.getvalue()))
        q50 = next(p for p in points if p["setting"] == "q50" and p["task"] == task)
        assert q50["bytes_per_image"] == pytest.approx(np.mean(webp))
        fp = ImageCodec.load(study["root"] / "fp")
        assert next(p for p in points if p["method"] == "Factorized prior" and p["task"] == task)["bytes_per_image"] \
            == pytest.approx(np.mean([len(fp.encode(g)) for g in geo]))


@pytest.mark.slow
def test_study_scores_like_the_plugins_own_evaluate(study, scenes):
    """The uncompressed reference, scored from the plugins' responses, equals each plugin's own
    `evaluate` on the same images (top-1, COCO mAP, mIoU)."""
    from torch.utils.data import DataLoader, Subset

    from splitserve.evaluation.tasks import evenly
    from splitserve.plugins import PluginRegistry
    from splitserve.training.teacher import load_teacher

    reg = PluginRegistry.discover()
    for task, short in (("classification", "cla"), ("detection", "det"), ("segmentation", "seg")):
        plugin, data = reg.get(task), _items(scenes, task)
        teacher = load_teacher(study["root"] / f"t-{short}", reg)
        subset = Subset(data.dataset, evenly(len(data.dataset), 4))
        loader = DataLoader(subset, batch_size=4, collate_fn=plugin.collate)
        theirs = plugin.evaluate(teacher.head, teacher.stem, loader, dataset=data.dataset)[plugin.metric_name]
        ours = study["doc"]["reference"][task]["accuracy"]
        assert ours == pytest.approx(theirs, abs=1e-6), task


@pytest.mark.slow
def test_study_summaries_complexity_and_maps(study):
    doc = study["doc"]
    s = doc["summary"]
    assert s["tasks"]["classification"]["delta_accuracy"]["ES"] == pytest.approx(0.0, abs=1e-12)
    cx = s["complexity"]
    assert cx["ES"]["params_ratio"] == 1.0 and cx["ES"]["encode_ms_ratio"] == 1.0
    assert cx["ES"]["params"] > 138_672 and cx["ES"]["macs"] > 0  # encoder (138,672, DESIGN.md) + prior
    assert cx["WebP"]["params"] is None and cx["WebP"]["encode_ms_median"] > 0
    assert 0 < cx["Factorized prior"]["params"] < cx["ES"]["params"]
    tables = s["tasks"]["classification"]["links"]  # one per tolerance, smallest first
    ref = doc["reference"]["classification"]["accuracy"]
    assert [t["tolerance"] for t in tables] == [1.0, 100.0]
    assert [t["min_accuracy"] for t in tables] == pytest.approx([ref - 1, ref - 100])
    links = tables[1]["per_link"]
    assert set(links) == {"LoRa", "LTE-M", "Wi-Fi"} and links["LoRa"]["kbit_s"] == 37.5
    assert set(links["LoRa"]["per_method"]) == {"ES", "WebP", "JPEG", "Factorized prior"}  # ≥ ref − 100: all
    report = (study["out"] / "report.md").read_text()
    assert f"≥ {ref - 1:.2f} (the teacher's − 1)" in report and f"≥ {ref - 100:.2f} (the teacher's − 100)" in report
    # comparisons, on the tasks both methods were measured on (JPEG only on classification and
    # segmentation), with a row each in the report; their values: test_comparisons_summarize_named_pairs
    assert [(c["method"], c["against"]) for c in s["tasks"]["detection"]["comparisons"]] == [("WebP", "Factorized prior")]
    assert [(c["method"], c["against"]) for c in s["tasks"]["segmentation"]["comparisons"]] == \
        [("JPEG", "WebP"), ("WebP", "Factorized prior")]
    assert report.count("| JPEG | WebP |") == 2 and report.count("| WebP | Factorized prior |") == 3
    e2e = s["tasks"]["classification"]["end_to_end_ms"]
    p = next(p for p in doc["points"] if p["setting"] == "q5" and p["task"] == "classification")
    assert e2e["WebP q5"]["LoRa"] == pytest.approx(p["encode_ms"] + 8 * p["bytes_per_image"] / 37.5 + p["server_ms"])
    maps = doc["bitmaps"]
    assert {m["method"] for m in maps} == {"ES", "Factorized prior"} and len(maps) == 4
    es_map = next(m for m in maps if m["method"] == "ES")
    assert es_map["map_hw"] == [15, 15]  # the Entropic Student latent of a 64×64 input
    assert all(m["total_bits"] > 0 for m in maps)


@pytest.mark.slow
def test_bundle_bit_map_sums_to_the_coded_bits(study, scenes):
    from splitserve.edge import EdgeEncoder
    from splitserve.evaluation.bitmaps import feature_codec_bits

    edge = EdgeEncoder.from_bundle(study["root"] / "es0")
    path = _items(scenes, "classification").items[0].path
    x, _ = edge.preprocess([path])
    coded = 8 * sum(len(s) for s in edge.encode([path]).payload.strings)
    bits = feature_codec_bits(edge.codec, x).sum()
    assert math.isclose(bits, coded, rel_tol=0.02, abs_tol=64)


@pytest.mark.slow
def test_bundle_measure_writes_what_the_study_measures(study, scenes, tmp_path):
    """`platform bundle measure` scores a bundle on the same served path as `platform evaluate`:
    on the same images its manifest metrics equal the study's points, bytes included."""
    import shutil

    from splitserve.bundle import load_codec, read_manifest

    bundle = tmp_path / "es0"
    shutil.copytree(study["root"] / "es0", bundle)
    before = read_manifest(bundle)
    assert main(["bundle", "measure", str(bundle), "--data", str(scenes), "--limit", "4", "--no-progress"]) == 0
    after = read_manifest(bundle)
    points = {p["task"]: p for p in study["doc"]["points"] if p["setting"] == "es0"}
    assert set(after.tasks) == set(points) == {"classification", "detection", "segmentation"}
    for task, p in points.items():
        m = after.tasks[task].metrics
        assert m[p["metric"]] == pytest.approx(p["accuracy"], abs=1e-9), task
        assert m["bytes"] == pytest.approx(p["bytes_per_image"]) and m["payload_bpp"] == pytest.approx(p["bpp"])
        assert m["images"] == 4
    assert after.metrics == {"payload_bpp": pytest.approx(points["classification"]["bpp"]),
                             "bytes": pytest.approx(points["classification"]["bytes_per_image"])}
    assert "served path" in after.provenance["measured"]
    assert after.files == before.files and after.fingerprint == before.fingerprint  # only the manifest changed
    load_codec(bundle)
    assert main(["bundle", "measure", str(tmp_path / "nowhere"), "--data", str(scenes)]) == 2


def test_plot_styles_stay_distinct_beyond_the_ten_colours():
    """A study with more than ten methods (the committed one has 13) must not draw two curves alike."""
    from splitserve.evaluation.report import style

    looks = [(s["color"], s["marker"], s["ls"]) for s in map(style, range(20))]
    assert len(set(looks)) == 20
    assert looks[0][0] == looks[10][0] and looks[0][1:] != looks[10][1:]


def test_a_method_looks_alike_in_every_plot(tmp_path, monkeypatch):
    """Looks follow the sweep's method order, so a plot lacking a method (detection without the
    RAC N = 4 curve) does not hand its colour to the next one."""
    from types import SimpleNamespace

    from splitserve.evaluation import report

    figures = []
    monkeypatch.setattr(report.plt, "close", figures.append)
    names = ["ES", "RAC N=4", "WebP"]
    looks = report._looks(names)

    def pts(task, methods):
        return [SimpleNamespace(task=task, method=m, bpp=b, accuracy=a, metric="top1")
                for m in methods for b, a in ((0.2, 50.0), (0.4, 60.0))]

    report.plot_rate_accuracy(tmp_path, pts("classification", names), "classification", None, looks)
    report.plot_rate_accuracy(tmp_path, pts("detection", ["ES", "WebP"]), "detection", None, looks)
    drawn = [{line.get_label(): line.get_color() for line in fig.axes[0].get_lines()} for fig in figures]
    assert drawn[0]["WebP"] == drawn[1]["WebP"] == looks["WebP"]["color"] != looks["RAC N=4"]["color"]


def test_split_option_evaluates_the_split_it_names(tmp_path):
    """`--split val_seen` measures the val objects on the train photographs (the in-distribution
    figures the report gives beside the unseen ones): a different number of images, and the split
    named in points.json and report.md."""
    from splitserve.data import make_fmnist_scenes

    scenes = tmp_path / "fm"
    make_fmnist_scenes(scenes, train_scenes=4, val_scenes=6, val_seen_scenes=3, image_size=64, seed=0, progress=False)
    _teacher("classification", tmp_path / "t-cla", 64)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"data: {scenes}\nteachers: {{classification: t-cla}}\ntasks: [classification]\nrepeat: 1\n"
                     "anchors: {bd_rate: WebP}\nmethods:\n  - {name: WebP, kind: webp, points: [50]}\n")
    for split, images in (("val", 6), ("val_seen", 3)):
        out = tmp_path / split
        args = ["evaluate", str(sweep), "--out", str(out), "--no-progress"] + (["--split", split] if split != "val" else [])
        assert main(args) == 0
        doc = json.loads((out / "points.json").read_text())
        assert doc["split"] == split and [p["images"] for p in doc["points"]] == [images]
        assert f"split `{split}`" in (out / "report.md").read_text()
    code = main(["evaluate", str(sweep), "--out", str(tmp_path / "empty"), "--split", " "])
    assert code == 2 and not (tmp_path / "empty").exists()  # an empty split name: one line, nothing measured
