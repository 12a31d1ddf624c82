"""A serve-only plugin (the four serving members, no TrainingHooks) is listed by `platform tasks` and
served by a real gateway.

The plugin is a real module registered the way an installed distribution registers it: a
``*.dist-info`` directory with ``entry_points.txt`` in the ``splitserve.tasks`` group, on the path of
this process and of its subprocesses (never in the running environment).
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from splitserve.gateway.process import GatewayProcess
from splitserve.plugins import ENTRY_POINT_GROUP, PluginRegistry, TrainingHooks

from .conftest import Started, texture

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("listing")]  # `platform tasks` starts with the module

MODULE = "activity_plugin"
PLUGIN = textwrap.dedent('''
    """A serve-only task: where the feature map responds most, in original-image pixels."""
    import torch
    from pydantic import BaseModel, Field
    from torch import nn

    from splitserve.models.backbone import FEATURE_CHANNELS
    from splitserve.plugins import TaskPlugin


    class ActivityResult(BaseModel):
        """The head's response over the image: its mean and its peak."""

        energy: float = Field(description="Mean of the head's response map.")
        peak: list[float] = Field(description="[x, y] of the strongest response, in original-image pixels.",
                                  min_length=2, max_length=2)


    class ActivityHead(nn.Module):
        def __init__(self, channels: int):
            super().__init__()
            self.score = nn.Conv2d(channels, 1, 1)

        def forward(self, h):
            return self.score(h)[:, 0]


    class ActivityPlugin(TaskPlugin):
        name = "activity"
        response_model = ActivityResult

        def build_head(self, backbone, config):
            return ActivityHead(FEATURE_CHANNELS[backbone])

        @torch.no_grad()
        def predict(self, head, features, metas, config):
            out = []
            for m, meta in zip(head(features).float(), metas):
                (oh, ow), (fh, fw) = meta.original_size, m.shape
                y, x = divmod(int(m.flatten().argmax()), fw)
                out.append(ActivityResult(energy=float(m.mean()), peak=[(x + 0.5) * ow / fw, (y + 0.5) * oh / fh]))
            return out
''')


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The plugin module and its distribution metadata in a throw-away directory on the path."""
    root = tmp_path_factory.mktemp("serve-only-site")
    (root / f"{MODULE}.py").write_text(PLUGIN)
    info = root / "activity_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: activity-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nactivity = {MODULE}:ActivityPlugin\n")
    sys.path.insert(0, str(root))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    try:
        yield root, env
    finally:
        sys.path.remove(str(root))
        sys.modules.pop(MODULE, None)


@pytest.fixture(scope="module")
def bundle(site, tmp_path_factory) -> Path:
    from splitserve.defaults import build_untrained_bundle

    return build_untrained_bundle(tmp_path_factory.mktemp("serve-only") / "b", input_size=(64, 64),
                                  tasks=["activity", "cls"])


@pytest.fixture(scope="module")
def listing(site):
    """`platform tasks` in a fresh process, started first and checked last: it overlaps the gateway's test."""
    _, env = site
    started = Started([sys.executable, "-m", "splitserve", "tasks"], env=env)
    yield started
    started.stop()


def test_discovered_and_serve_only(site):
    plugin = PluginRegistry.discover().get("activity")
    assert type(plugin).__module__ == MODULE and not isinstance(plugin, TrainingHooks)


def test_a_gateway_serves_it(site, bundle):
    """The gateway's answer equals the plugin run in this process on the same payload (runtime:
    parse, entropy decode, decoder, head), with the peak in the original image's pixels."""
    from splitserve.edge import EdgeEncoder
    from splitserve.gateway.runtime import Job, Runtime

    _, env = site
    encoded = EdgeEncoder.from_bundle(bundle).encode([texture("coffee", (120, 90)), texture("brick", (64, 48))])
    with GatewayProcess("--bundle", str(bundle), "--max-wait-ms", "5", env=env) as server:
        r = httpx.post(server.url + "/infer", params={"tasks": "activity,cls"}, content=encoded.data,
                       headers={"Content-Type": "application/x-splitserve"}, timeout=120)
        assert r.status_code == 200, r.text
        listed = {t["name"]: t for t in httpx.get(server.url + "/v1/tasks").json()}
    answer = r.json()
    assert answer["tasks"] == ["activity", "classification"]
    runtime = Runtime(bundle, PluginRegistry.discover())
    payload, metas = runtime.parse_payload(encoded.data)
    [local] = runtime.run([Job(plugins=list(runtime.plugins), payload=payload, metas=metas)])
    plugin = runtime.registry.get("activity")
    for served, mine, (oh, ow) in zip(answer["results"], local, [(90, 120), (48, 64)]):
        got = plugin.response_model.model_validate(served["tasks"]["activity"])
        want = mine["activity"]
        assert got.energy == pytest.approx(want.energy, rel=1e-5, abs=1e-6) and got.peak == want.peak
        assert 0 < got.peak[0] < ow and 0 < got.peak[1] < oh
        assert served["tasks"]["classification"]["top"]
    assert listed["activity"]["response_schema"] == plugin.response_model.model_json_schema()


def test_platform_tasks_lists_it(listing):
    proc = listing.result()
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:]}
    assert rows["activity"] == ["activity", "-", "-", f"{MODULE}:ActivityPlugin"]
    assert rows["classification"][1:3] == ["cls", "top1"]
