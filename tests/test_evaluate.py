"""Rate–accuracy summaries on curves with known answers, and `platform evaluate` end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from splitserve.cli import main
from splitserve.evaluation.metrics import CurveError, bd_rate, delta_accuracy

# Published ImageNet / ResNet-50 points (DESIGN.md): top-1 % at bpp
ES = ([0.147, 0.331, 0.596, 0.887, 1.312], [57.37, 71.61, 74.23, 75.10, 75.31])
RAC8 = ([0.093, 0.225, 0.435, 1.159], [67.92, 71.51, 73.51, 75.20])
WEBP = ([0.24, 0.48, 1.04, 1.82], [46.7, 61.4, 72.1, 74.8])


def test_delta_accuracy_of_a_shifted_curve_is_the_shift():
    rate = [0.1, 0.3, 0.6, 1.0, 1.5]
    acc = [50.0, 65.0, 71.0, 74.0, 75.0]
    assert delta_accuracy(rate, acc, rate, [a + 2.5 for a in acc]) == pytest.approx(2.5, abs=1e-9)
    assert delta_accuracy(rate, acc, rate, acc) == pytest.approx(0.0, abs=1e-12)


def test_bd_rate_of_a_curve_at_half_the_rate_is_minus_50_percent():
    rate = [0.1, 0.3, 0.6, 1.0, 1.5]
    acc = [50.0, 65.0, 71.0, 74.0, 75.0]
    assert bd_rate(rate, acc, [r / 2 for r in rate], acc) == pytest.approx(-50.0, abs=1e-6)
    assert bd_rate(rate, acc, [r * 1.25 for r in rate], acc) == pytest.approx(25.0, abs=1e-6)


def test_delta_accuracy_is_a_mean_over_the_overlap_in_linear_bpp():
    # B is 2 pp better on [0, 1] and 0 pp on [1, 2]; the overlap is [0.5, 2]: mean = (2*0.5 + 0*1)/1.5
    a = ([0.5, 1.0, 1.5, 2.0, 3.0], [60.0, 70.0, 74.0, 76.0, 77.0])
    b_rate = [0.0, 0.5, 1.0, 1.5, 2.0]
    b_acc = [f + d for f, d in zip(np.interp(b_rate, a[0], a[1], left=58.0), [2, 2, 0, 0, 0])]
    value = delta_accuracy(*a, b_rate, b_acc)
    assert 0.0 < value < 2.0


def _cubic_bd_rate(a, b):
    """The classic Bjøntegaard fit: one cubic polynomial of log-rate in accuracy per curve."""
    pa, pb = np.polyfit(a[1], np.log(a[0]), 3), np.polyfit(b[1], np.log(b[0]), 3)
    lo, hi = max(min(a[1]), min(b[1])), min(max(a[1]), max(b[1]))
    ia, ib = np.polyint(pa), np.polyint(pb)
    d = ((np.polyval(ib, hi) - np.polyval(ib, lo)) - (np.polyval(ia, hi) - np.polyval(ia, lo))) / (hi - lo)
    return (np.exp(d) - 1) * 100


def test_published_points_give_the_papers_figures_with_pchip():
    """On the papers' ImageNet points PCHIP gives the published picture: about -66 % BD-rate for
    Entropic Student and -77 % for RAC N=8 against WebP, and RAC N=8 about +1 pp over Entropic
    Student. A single cubic polynomial says Entropic Student needs 70 % *more* bits than WebP."""
    assert bd_rate(*WEBP, *ES) == pytest.approx(-66.1, abs=0.5)
    assert bd_rate(*WEBP, *RAC8) == pytest.approx(-77.1, abs=0.5)
    assert delta_accuracy(*ES, *RAC8) == pytest.approx(1.06, abs=0.05)
    assert _cubic_bd_rate(WEBP, ES) > 50  # the wrong sign PCHIP avoids


def test_curves_must_overlap_and_have_points():
    with pytest.raises(CurveError, match="share no range"):
        delta_accuracy([0.1, 0.2], [50, 60], [0.5, 0.6], [70, 71])
    with pytest.raises(CurveError, match="at least two"):
        delta_accuracy([0.1], [50], [0.1, 0.2], [50, 60])


@pytest.mark.slow
def test_platform_evaluate_end_to_end(tmp_path):
    from PIL import Image

    from splitserve.data import make_fmnist_scenes
    from splitserve.defaults import build_untrained_bundle

    data = tmp_path / "fm"
    make_fmnist_scenes(data, train_scenes=16, val_scenes=10, image_size=32, seed=0, progress=False)
    teacher = tmp_path / "teacher"
    fast = ["--num-workers", "0", "--no-progress", "--no-tensorboard", "--batch-size", "8"]
    assert main(["teacher", "--task", "cls", "--arch", "resnet18", "--data", str(data), "--out", str(teacher),
                 "--image-size", "32", "--epochs", "1", *fast]) == 0
    bundles = [build_untrained_bundle(tmp_path / f"b{i}", input_size=(32, 32), tasks=["classification"], seed=i)
               for i in range(2)]
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"""
data: {data}
teacher: {teacher}
limit: 8
anchors: {{delta_accuracy: Untrained, bd_rate: WebP}}
methods:
  - {{name: Untrained, kind: bundle, points: [{bundles[0]}, {bundles[1]}]}}
  - {{name: WebP, kind: webp, points: [5, 50, 95]}}
  - {{name: JPEG, kind: jpeg, points: [10, 90]}}
""")
    out = tmp_path / "out"
    assert main(["evaluate", str(sweep), "--out", str(out)]) == 0
    for f in ("report.md", "points.json", "points.csv", "rate_accuracy.png", "delta_accuracy_vs_latency.png"):
        assert (out / f).is_file()
    points = json.loads((out / "points.json").read_text())["points"]
    assert len(points) == 7 and all(p["images"] == 8 for p in points)
    # rate is real bytes: a WebP point's bytes equal Pillow's file sizes for these images
    webp95 = next(p for p in points if p["method"] == "WebP" and p["setting"] == "q95")
    webp5 = next(p for p in points if p["method"] == "WebP" and p["setting"] == "q5")
    assert webp95["bytes_per_image"] > webp5["bytes_per_image"]
    assert webp95["bpp"] == pytest.approx(8 * webp95["bytes_per_image"] / (32 * 32), rel=1e-6)
    ours = next(p for p in points if p["method"] == "Untrained")
    assert ours["device_params"] > 0 and ours["device_macs"] > 0
    assert ours["bpp"] == pytest.approx(8 * ours["bytes_per_image"] / (32 * 32), rel=1e-6)
    with (out / "points.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["bytes_per_image"]) for r in rows] == pytest.approx([p["bytes_per_image"] for p in points])
    with Image.open(out / "rate_accuracy.png") as img:
        assert img.width > 100
