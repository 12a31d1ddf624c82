"""Check a gateway's answers on examples/images against their ground truth (truth.json).

    make serve                        # in one shell
    python examples/check_samples.py  # in another: runs `platform infer --json` on every sample

A sample is right on a task when
- classification: the top-1 class is one of the scene's objects (the only one, for single-object scenes);
- detection: every object has a detection of its class with IoU >= 0.5 and score >= 0.3, and no
  detection scoring >= 0.5 matches nothing;
- segmentation: every object's class covers at least a quarter of its true share of the image, and
  no other class covers more than 2 %.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "images"
TASKS = ("classification", "detection", "segmentation")


def iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def verdicts(truth: dict, tasks: dict) -> dict[str, bool]:
    """Whether one answer (a result's ``tasks`` section) is right on each task, per the rules above."""
    objects = truth["objects"]
    classes = {o["class"] for o in objects}
    top = tasks["classification"]["top"][0]["label"]
    dets = tasks["detection"]["detections"]
    found = all(any(d["label"] == o["class"] and d["score"] >= 0.3 and iou(d["box"], o["box"]) >= 0.5 for d in dets)
                for o in objects)
    spurious = any(d["score"] >= 0.5 and not any(d["label"] == o["class"] and iou(d["box"], o["box"]) >= 0.5
                                                 for o in objects) for d in dets)
    shares = {c["label"]: c["fraction"] for c in tasks["segmentation"]["classes"] if c["index"] != 0}
    covered = all(shares.get(o["class"], 0.0) >= 0.25 * o["fraction"] for o in objects)
    stray = any(f > 0.02 for label, f in shares.items() if label not in classes)
    return {"classification": top in classes, "detection": found and not spurious,
            "segmentation": covered and not stray}


def check(answer: dict, names: list[str], truth: dict) -> list[tuple[str, dict[str, bool]]]:
    return [(name, verdicts(truth[name], result["tasks"])) for name, result in zip(names, answer["results"])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="gateway URL (default %(default)s)")
    ap.add_argument("--platform", default=shutil.which("platform") or "platform", help="the platform CLI to run")
    args = ap.parse_args(argv)
    truth = json.loads((HERE / "truth.json").read_text())
    names = sorted(truth)
    out = subprocess.run([args.platform, "infer", "--json", "--url", args.url, "--tasks", ",".join(TASKS),
                          *(str(HERE / n) for n in names)], capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr.strip() or f"platform infer exited {out.returncode}", file=sys.stderr)
        return 1
    rows = check(json.loads(out.stdout), names, truth)
    for name, v in rows:
        print(f"{name:16s} " + "  ".join(f"{t[:3]} {'ok' if v[t] else 'WRONG'}" for t in TASKS))
    right = sum(all(v.values()) for _, v in rows)
    per_task = ", ".join(f"{t} {sum(v[t] for _, v in rows)}/{len(rows)}" for t in TASKS)
    print(f"{right} of {len(rows)} samples get every task right ({per_task})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
