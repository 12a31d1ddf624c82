"""Tests that fail when a refactor silently breaks what users rely on: answers going to the right
images, one entropy decode per batch, knowledge distillation as published, head files verified."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F

from splitserve.bundle import BundleError, load_head, read_manifest
from splitserve.edge import EdgeEncoder
from splitserve.gateway.process import GatewayProcess
from splitserve.gateway.runtime import Runtime
from splitserve.plugins import PluginRegistry, TaskBatch

from .conftest import texture
from .helpers import informative_bundle

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "brick", "grass")


# -- knowledge distillation, by hand -----------------------------------------------------------

def test_kd_loss_is_hintons_with_t_squared():
    """(1-a)·CE + a·T²·KL(softmax(t/T) ‖ softmax(s/T)), computed by hand for a tiny batch."""
    plugin = PluginRegistry.discover().get("cls")

    class Logits(torch.nn.Module):  # a "head" that returns fixed logits
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, h):
            return self.logits

    student = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    teacher = torch.tensor([[1.0, 1.5, -0.5], [-1.0, 0.3, 2.0]])
    targets = torch.tensor([0, 2])
    t, a = 2.5, 0.7
    losses = plugin.loss(Logits(student), torch.zeros(2, 64, 4, 4), TaskBatch(torch.zeros(2, 3, 16, 16), targets),
                         teacher_output=teacher, options={"temperature": t, "kd_alpha": a})
    p_t = (teacher / t).softmax(1)
    log_p_s = (student / t).log_softmax(1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(1).mean()  # KL(teacher ‖ student), batch mean
    ce = F.cross_entropy(student, targets)
    assert losses["kd"].item() == pytest.approx(a * t * t * kl.item(), rel=1e-5)
    assert losses["ce"].item() == pytest.approx((1 - a) * ce.item(), rel=1e-6)
    # direction: KL(student ‖ teacher) is a different number here
    reverse = ((student / t).softmax(1) * (log_p_s - (teacher / t).log_softmax(1))).sum(1).mean()
    assert not math.isclose(reverse.item(), kl.item(), rel_tol=1e-3)
    # without a teacher: plain cross-entropy
    assert plugin.loss(Logits(student), None, TaskBatch(None, targets), teacher_output=None)["ce"].item() == \
        pytest.approx(ce.item(), rel=1e-6)


# -- head files are verified like the codec's ----------------------------------------------------

def test_tampered_or_escaping_head_file_is_refused(bundle_dir, tmp_path):
    registry = PluginRegistry.discover()
    plugin = registry.get("cls")
    for mutate, match in (("bytes", "do not match the manifest"), ("path", "escapes the bundle directory")):
        b = tmp_path / mutate
        shutil.copytree(bundle_dir, b)
        manifest = json.loads((b / "manifest.json").read_text())
        entry = manifest["tasks"]["classification"]["file"]
        if mutate == "bytes":
            data = bytearray((b / entry["path"]).read_bytes())
            data[-10] ^= 0xFF
            (b / entry["path"]).write_bytes(bytes(data))
        else:
            outside = tmp_path / "outside.safetensors"
            shutil.copy(b / entry["path"], outside)
            entry["path"] = "../outside.safetensors"
            (b / "manifest.json").write_text(json.dumps(manifest))
        m = read_manifest(b)
        config = plugin.resolve_config(m.backbone, m.tasks["classification"].config)
        with pytest.raises(BundleError, match=match):
            load_head(b, "classification", plugin.build_head(m.backbone, config), m)
        with pytest.raises(BundleError, match=match):
            Runtime(b, registry, tasks=["classification"])


# -- the gateway answers each image, once decoded per batch ------------------------------------------

@pytest.fixture(scope="module")
def answering_bundle(tmp_path_factory) -> Path:
    """An untrained bundle whose latents depend on the image (so answers differ per image)."""
    return informative_bundle(tmp_path_factory.mktemp("guards") / "bundle", input_size=(64, 64),
                              tasks=["classification", "segmentation"])


def _local_answers(bundle: Path, images) -> list[dict]:
    """What the gateway must answer for each image alone: edge encode → decode → heads, in process."""
    from splitserve.gateway.runtime import Job

    runtime = Runtime(bundle, PluginRegistry.discover())
    edge = EdgeEncoder.from_bundle(bundle)
    out = []
    for img in images:
        payload, metas = runtime.parse_payload(edge.encode([img]).data)
        answer = runtime.run([Job(plugins=list(runtime.plugins), payload=payload, metas=metas)])[0][0]
        out.append({k: v.model_dump(mode="json") for k, v in answer.items()})
    return out


def _stage_count(url: str, stage: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name == "splitserve_stage_seconds_count" and s.labels.get("stage") == stage:
                return s.value
    return 0.0


def _assert_same_answer(got: dict, want: dict) -> None:
    """Equal up to float noise: a batch of 8 and a batch of 1 round differently in the last bits."""
    g, w = got["classification"]["top"], want["classification"]["top"]
    assert [c["index"] for c in g] == [c["index"] for c in w]
    assert [c["probability"] for c in g] == pytest.approx([c["probability"] for c in w], rel=1e-4, abs=1e-6)
    gs, ws = got["segmentation"], want["segmentation"]
    assert (gs["width"], gs["height"]) == (ws["width"], ws["height"])
    shares = {c["index"]: c["fraction"] for c in ws["classes"]}
    for c in gs["classes"]:
        assert c["fraction"] == pytest.approx(shares.get(c["index"], 0.0), abs=2e-3)


def test_gateway_answers_each_image_with_its_own_answer(answering_bundle):
    images = [texture(n, (80, 60)) for n in PHOTOS]
    expected = _local_answers(answering_bundle, images)
    assert len({json.dumps(e["classification"], sort_keys=True) for e in expected}) > 1, "answers must differ per image"
    edge = EdgeEncoder.from_bundle(answering_bundle)
    headers = {"Content-Type": "application/x-splitserve"}
    multi = [edge.encode(images[:3]).data, edge.encode(images[3:]).data]  # multi-image payloads
    singles = [edge.encode([img]).data for img in images]

    async def fire(url):
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            reqs = [c.post("/infer", content=body, headers=headers) for body in multi + singles]
            return await asyncio.gather(*reqs)

    with GatewayProcess("--bundle", str(answering_bundle), "--max-wait-ms", "300", "--max-batch", "64") as server:
        before_decode = _stage_count(server.url, "feature_decode")
        before_entropy = _stage_count(server.url, "entropy_decode")
        responses = asyncio.run(fire(server.url))
        batches = _stage_count(server.url, "feature_decode") - before_decode
        entropy = _stage_count(server.url, "entropy_decode") - before_entropy
    assert all(r.status_code == 200 for r in responses)
    got = [res["tasks"] for r in responses for res in r.json()["results"]]
    want = expected[:3] + expected[3:] + expected  # the two multi-image payloads, then the singles
    for g, w in zip(got, want, strict=True):
        _assert_same_answer(g, w)
    # 8 requests arrived within one batching window: far fewer batches than requests, and the
    # entropy decode ran once per batch, not once per request
    assert batches < len(responses) and entropy == batches


DDP_SCRIPT = """
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
from torch.utils.data import TensorDataset
from splitserve.training import distributed as dist_utils
from splitserve.training.engine import Engine, EngineConfig
from splitserve.training.objective import Objective

class Regression(Objective):
    aux_terms = ()
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(6, 3)
    def forward(self, batch):
        x, y = batch
        return {"mse": torch.nn.functional.mse_loss(self.layer(x), y)}, {}

out, batch = Path(sys.argv[1]), int(sys.argv[2])
g = torch.Generator().manual_seed(1)
data = TensorDataset(torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g))
info = dist_utils.setup("cpu")
obj = Regression()
engine = Engine(EngineConfig(workdir=out / "work", epochs=2, batch_size=batch, num_workers=0, seed=0, progress=False,
                             tensorboard=False, checkpoint_every=0), info, "ddp-test")
opt = torch.optim.SGD(obj.parameters(), lr=0.2)
engine.fit(obj, {"main": opt}, [], data, lambda items: tuple(torch.stack(t) for t in zip(*items)))
save_file({k: v.contiguous() for k, v in obj.state_dict().items()}, str(out / f"rank{info.rank}.safetensors"))
dist_utils.teardown(info)
"""


def test_two_process_training_syncs_gradients(tmp_path):
    """torchrun with 2 CPU processes at batch 4 ends with identical weights on both ranks, equal
    (to float rounding) to one process at batch 8: the gradients really are all-reduced."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--no-python", sys.executable, "-c", DDP_SCRIPT, str(two), "4"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-c", DDP_SCRIPT, str(one), "8"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1, single = (load_file(str(p)) for p in (two / "rank0.safetensors", two / "rank1.safetensors",
                                                   one / "rank0.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], single[k], rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    assert not torch.allclose(torch.nn.Linear(6, 3).weight, r0["layer.weight"])  # it did train
