"""``platform tasks``: the installed task plugins (entry-point group ``splitserve.tasks``)."""

from __future__ import annotations

from . import add_command


def register(sub) -> None:
    add_command(sub, "tasks", run, "List installed task plugins, their aliases and metrics.")


def run(args) -> int:
    from importlib.metadata import entry_points

    from ..plugins import ENTRY_POINT_GROUP, PluginRegistry, TrainingHooks

    registry = PluginRegistry.discover()
    sources = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    print(f"{'task':<16}{'aliases':<12}{'metric':<10}source")
    for plugin in registry:  # a serve-only plugin has no training hooks, hence no metric: "-"
        metric = plugin.metric_name if isinstance(plugin, TrainingHooks) else "-"
        print(f"{plugin.name:<16}{','.join(plugin.aliases) or '-':<12}{metric:<10}{sources.get(plugin.name, '?')}")
    return 0
