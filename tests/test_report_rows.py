"""report.md says what points.json says: every row of each task's points table, read by its column
names, carries that point's bytes, bpp, accuracy and latencies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

POINT_COLUMNS = {"bytes/image": "bytes_per_image", "bpp": "bpp", "encode ms": "encode_ms", "server ms": "server_ms"}


def report_rows(report: str) -> dict[str, list[dict[str, str]]]:
    """Each task section's points table (the one whose header starts ``| method | setting |
    bytes/image``) as {column name: cell} per row, by task."""
    tables: dict[str, list[dict[str, str]]] = {}
    task, header = None, None
    for line in report.splitlines():
        if line.startswith("## "):
            task, header = line[3:].split(" (")[0], None
        elif line.startswith("| method | setting | bytes/image |"):
            header = [c.strip() for c in line.strip("|").split("|")]
            tables[task] = []
        elif header and line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            tables[task].append(dict(zip(header, cells, strict=True)))
        elif header and not line.startswith("|"):
            header = None
    return tables


def check_report_against_points(out: Path) -> int:
    """Every point of ``out``/points.json has its row in ``out``/report.md with equal values (to the
    printed precision); returns the number of rows checked."""
    doc = json.loads((out / "points.json").read_text())
    tables = report_rows((out / "report.md").read_text())
    assert set(tables) == {p["task"] for p in doc["points"]}
    for task, rows in tables.items():
        points = [p for p in doc["points"] if p["task"] == task]
        assert [(r["method"], r["setting"]) for r in rows] == [(p["method"], p["setting"]) for p in points]
        for row, p in zip(rows, points):
            assert float(row[p["metric"]]) == pytest.approx(p["accuracy"], abs=0.0051), (task, row)
            for column, key in POINT_COLUMNS.items():
                digits = len(row[column].partition(".")[2])
                assert float(row[column]) == pytest.approx(p[key], abs=0.51 * 10 ** -digits), (task, column, row)
    return sum(len(rows) for rows in tables.values())


def test_report_rows_match_points_json(tmp_path):
    """Points whose bytes, bpp, accuracy and latencies all differ, so a swapped column shows."""
    from splitserve.evaluation.report import write_outputs
    from splitserve.evaluation.run import Point, Study, summarize
    from splitserve.evaluation.sweep import Method, Sweep

    def point(method, kind, setting, task, metric, acc, nbytes, enc, srv):
        return Point(method, kind, setting, task, metric, acc, 50, nbytes, 8 * nbytes / 4096, 64, 64, enc, srv,
                     None, None, "")

    points = [
        point("ES", "bundle", "es-b0.32", "classification", "top1", 81.25, 354.0, 3.21, 12.5),
        point("ES", "bundle", "es-b0.08", "classification", "top1", 76.5, 150.25, 3.18, 12.25),
        point("WebP", "webp", "q20", "classification", "top1", 52.0, 611.75, 0.41, 2.75),
        point("WebP", "webp", "q80", "classification", "top1", 71.75, 1204.5, 0.52, 2.5),
        point("ES", "bundle", "es-b0.32", "segmentation", "mIoU", 25.91, 352.0, 3.2, 40.75),
        point("WebP", "webp", "q20", "segmentation", "mIoU", 13.37, 598.0, 0.4, 33.25),
    ]
    sweep = Sweep(data=Path("data"), teachers={}, methods=[Method("ES", "bundle", []), Method("WebP", "webp", [])],
                  anchors={"delta_accuracy": "ES", "bd_rate": "WebP"}, links_kbit_s={"LoRa": 37.5}, bitmap_images=0)
    reference = {t: {"metric": m, "label": f"{m} (%)", "accuracy": a, "images": 50, "teacher": "t", "input_hw": [64, 64]}
                 for t, m, a in (("classification", "top1", 84.0), ("segmentation", "mIoU", 30.0))}
    study = Study(points, reference, summarize(points, sweep, reference), {"report": 0.1}, [], [], "2 CPUs",
                  {"node": "n", "system": "Linux", "release": "6", "machine": "x86_64"}, 1.0)
    write_outputs(tmp_path, study, sweep)
    assert check_report_against_points(tmp_path) == len(points)
    report = (tmp_path / "report.md").read_text()
    assert "## classification (top1 (%))" in report and "## segmentation (mIoU (%))" in report
