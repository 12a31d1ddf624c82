"""Scoring is a plugin hook (EvaluationHooks + Scorer): the built-in plugins implement it in their own
packages, the core's evaluation and defaults name no task, and a plugin without it is refused with
one line. (`platform evaluate` on a third-party task: tests/test_plugin_template.py; the built-ins'
scores with known answers: tests/test_evaluate.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from splitserve.defaults import builtin_tasks
from splitserve.errors import PluginError
from splitserve.plugins import EvaluationHooks, PluginRegistry, Scorer, TaskPlugin, TrainingHooks, scorable

CORE = Path(__file__).resolve().parents[1] / "platform" / "splitserve"


def test_builtin_plugins_implement_the_hooks_in_their_own_packages():
    registry = PluginRegistry.discover()
    labels = {"classification": "top-1 (%)", "detection": "box mAP@[.5:.95] (%)", "segmentation": "mIoU (%)"}
    assert builtin_tasks() == sorted(labels)  # this distribution's own entry points
    for name, label in labels.items():
        plugin = registry.get(name)
        assert isinstance(plugin, EvaluationHooks) and isinstance(plugin, TrainingHooks)
        assert plugin.metric_label == label
        assert type(plugin).make_scorer.__module__ == f"splitserve_tasks.{name}.plugin"


@pytest.mark.parametrize("path", sorted([*(CORE / "evaluation").glob("*.py"), CORE / "defaults.py"]), ids=lambda p: p.name)
def test_the_core_names_no_task(path):
    """No string constant in evaluation/ or defaults.py is a built-in task's name or alias, and no
    import reaches into the built-in plugins: a third-party task is evaluated like ours."""
    registry = PluginRegistry.discover()
    names = {k for n in builtin_tasks() for k in (n, *registry.get(n).aliases)}
    tree = ast.parse(path.read_text())
    named = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in names]
    imports = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("splitserve_tasks")]
    imports += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names if a.name.startswith("splitserve_tasks")]
    assert (named, imports) == ([], [])


class Brightness(TaskPlugin):
    """Serve-only: enough to answer requests, nothing to score them with."""

    name = "brightness"
    response_model = None  # never served here

    def build_head(self, backbone, config):
        raise NotImplementedError

    def predict(self, head, features, metas, config):
        raise NotImplementedError


def test_a_plugin_without_the_hooks_is_refused_in_one_line(tmp_path):
    from splitserve.evaluation.tasks import load_task_data
    from splitserve.preprocess import Preprocessing

    with pytest.raises(PluginError) as e:
        load_task_data(Brightness(), tmp_path, "val", Preprocessing.fixed(64, 64), None)
    assert str(e.value) == ("task 'brightness' cannot be scored: `platform evaluate` needs a plugin that also implements "
                            "splitserve.plugins.TrainingHooks and splitserve.plugins.EvaluationHooks")
    plugin = PluginRegistry.discover().get("cls")
    assert scorable(plugin) is plugin


def test_a_scorer_accumulates_over_updates():
    """Scoring in several updates equals scoring at once (studies may feed answers batch by batch)."""
    from splitserve_tasks.classification.schema import ClassificationResult, ClassScore

    plugin = PluginRegistry.discover().get("cls")
    answers = [ClassificationResult(top=[ClassScore(index=i % 3, label="x", probability=0.5),
                                         ClassScore(index=(i + 1) % 3, label="x", probability=0.3)]) for i in range(6)]
    targets = [0, 2, 0, 1, 0, 1]  # first place for image 0; second for 1, 2, 3; not listed for 4, 5
    once, split = plugin.make_scorer(None, {}), plugin.make_scorer(None, {})
    once.update(answers, targets)
    split.update(answers[:4], targets[:4])
    split.update(answers[4:], targets[4:])
    assert isinstance(once, Scorer)
    assert once.result() == split.result() == {"top1": pytest.approx(100 / 6), "top5": pytest.approx(400 / 6)}
