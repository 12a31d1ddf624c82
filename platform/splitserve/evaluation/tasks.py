"""A task's evaluation images, ground truth and scoring, all from its plugin.

Every method — our bundles through the gateway runtime, input codecs through the uncompressed
teacher — ends in the same thing: the plugin's own response objects (``predict``), one per image,
in the original image's coordinates. They are scored here, once, by the plugin's
:class:`~splitserve.plugins.Scorer` (:class:`~splitserve.plugins.EvaluationHooks`), so any installed
plugin that implements those hooks can be studied, and the core knows no task by name. Answers are
made with the plugin's ``scoring_config`` (e.g. the COCO protocol's thresholds), not the serving one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SplitserveError
from ..plugins import EvalSample, TaskPlugin, scorable


@dataclass
class TaskData:
    """One task's evaluation images and ground truth."""

    plugin: Any  # TrainingHooks + EvaluationHooks + TaskPlugin
    root: Path
    dataset: Any
    items: list[EvalSample]

    @property
    def task(self) -> str:
        return self.plugin.name

    @property
    def metric(self) -> str:
        return self.plugin.metric_name

    @property
    def label(self) -> str:
        """The metric's name with its unit, for plots and reports."""
        return self.plugin.metric_label or self.plugin.metric_name

    def score(self, answers: Sequence[Any], config: Mapping[str, Any] | None = None) -> dict[str, float]:
        """The metrics of ``answers`` (one per item, in order) made by a head with ``config``."""
        if len(answers) != len(self.items):
            raise SplitserveError(f"{self.task}: {len(answers)} answers for {len(self.items)} images")
        scorer = self.plugin.make_scorer(self.dataset, config or {})
        scorer.update(answers, [it.target for it in self.items])
        return scorer.result()


def scoring_config(plugin: TaskPlugin, config: Mapping[str, Any]) -> dict[str, Any]:
    """The head config ``plugin`` answers with when its answers are scored."""
    return scorable(plugin).scoring_config(config)


def resolve_root(plugin, root: Path) -> Path:
    """An fmnist-scenes tree's part the task reads (``imagefolder/`` or ``coco/``), else ``root``."""
    sub = getattr(plugin, "data_layout", None)
    if sub and (root / "imagefolder").is_dir() and (root / "coco").is_dir() and (root / sub).is_dir():
        return root / sub
    return root


def evenly(n: int, limit: int | None) -> list[int]:
    if not limit or limit >= n:
        return list(range(n))
    step = n / limit
    return [int(i * step) for i in range(limit)]


def load_task_data(plugin: TaskPlugin, root: Path, split: str, preprocessing, limit: int | None) -> TaskData:
    """The images and ground truth of ``plugin``'s task in ``split`` (an evenly spaced subset)."""
    plugin = scorable(plugin)
    data_root = resolve_root(plugin, Path(root))
    dataset = plugin.build_dataset(data_root, split, train=False, preprocessing=preprocessing)
    samples = plugin.eval_samples(dataset)
    items = [samples[i] for i in evenly(len(samples), limit)]
    if not items:
        raise SplitserveError(f"{data_root}: no {split} images for {plugin.name}")
    return TaskData(plugin, data_root, dataset, items)
