"""Tests a plugin author keeps next to the plugin: run ``pytest`` in this directory after
``pip install -e .`` (the first test checks the installed entry point)."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from splitserve.errors import PluginError
from splitserve.models.backbone import FEATURE_CHANNELS, build_resnet, resnet_stem
from splitserve.plugins import ENTRY_POINT_GROUP, ImageMeta, PluginRegistry
from splitserve.preprocess import Preprocessing
from splitserve_embedding import EmbeddingPlugin, EmbeddingResult, supervised_contrastive_loss

ARCH = "resnet18"
DIM = 32


@pytest.fixture(scope="module")
def plugin() -> EmbeddingPlugin:
    return EmbeddingPlugin()


@pytest.fixture(scope="module")
def head(plugin):
    torch.manual_seed(0)
    return plugin.build_head(ARCH, {"dim": DIM}).eval()


def features(batch: int = 3, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, FEATURE_CHANNELS[ARCH], size, size, generator=g)


def test_entry_point_is_installed():
    eps = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert eps.get("embedding") == "splitserve_embedding:EmbeddingPlugin", "run `pip install -e .` first"
    registry = PluginRegistry.discover()
    assert isinstance(registry.get("embed"), EmbeddingPlugin)
    assert registry.get("EMBEDDING") is registry.get("embed")


def test_feature_spec_follows_the_backbone(plugin):
    assert plugin.feature_spec("resnet18").channels == 64
    assert plugin.feature_spec("resnet50").channels == 256
    assert plugin.feature_spec("resnet50").stride == 4


def test_predict_is_batched_unit_length_and_valid(plugin, head):
    h = features(3)
    metas = [ImageMeta((480, 640), (64, 64)), ImageMeta((100, 80), (64, 64)), ImageMeta((64, 64), (64, 64))]
    results = plugin.predict(head, h, metas, {"dim": DIM})
    assert len(results) == 3
    for r in results:
        r = EmbeddingResult.model_validate_json(r.model_dump_json())  # survives the JSON round trip
        assert r.dim == DIM and len(r.vector) == DIM
        assert abs(float(np.linalg.norm(r.vector)) - 1.0) < 1e-4
    assert len({r.space for r in results}) == 1
    alone = plugin.predict(head, h[1:2], metas[1:2], {"dim": DIM})[0]  # batching does not change the answer
    assert np.allclose(alone.vector, results[1].vector, atol=1e-5)
    assert not np.allclose(results[0].vector, results[1].vector)


def test_space_changes_with_the_weights(plugin, head):
    other = plugin.build_head(ARCH, {"dim": DIM}).eval()
    before = other.space_id()
    assert before == other.space_id()
    other.load_state_dict(head.state_dict())
    assert other.space_id() == head.space_id() != before


def test_config_is_checked(plugin):
    assert plugin.resolve_config(ARCH, {}) == {"dim": 128}
    for bad in (0, -3, 2.5, True, 10**6):
        with pytest.raises(PluginError, match="dim must be"):
            plugin.resolve_config(ARCH, {"dim": bad})


def test_schema_documents_every_field():
    schema = EmbeddingResult.model_json_schema()
    assert set(schema["required"]) == {"space", "dim", "vector"}
    assert all(p.get("description") for p in schema["properties"].values())
    with pytest.raises(ValueError, match="dim says"):
        EmbeddingResult(space="0" * 16, dim=3, vector=[1.0, 0.0])


def test_supervised_contrastive_loss():
    labels = torch.tensor([0, 0, 1, 1])
    clustered = torch.nn.functional.normalize(torch.tensor([[1.0, 0.01], [1.0, -0.01], [-1.0, 0.01], [-1.0, -0.01]]), dim=1)
    mixed = clustered[[0, 2, 1, 3]]
    assert supervised_contrastive_loss(clustered, labels) < supervised_contrastive_loss(mixed, labels)
    z = torch.randn(3, 8, requires_grad=True)
    zero = supervised_contrastive_loss(torch.nn.functional.normalize(z, dim=1), torch.tensor([0, 1, 2]))
    assert float(zero.detach()) == 0.0
    zero.backward()  # no positives: zero loss, but still differentiable


def test_loss_trains_the_tail_and_distils(plugin):
    torch.manual_seed(0)
    head = plugin.build_head(ARCH, {"dim": DIM}).train()
    batch = plugin.collate([(torch.randn(3, 64, 64), label) for label in (0, 0, 1, 1)])
    assert batch.targets.tolist() == [0, 0, 1, 1] and batch.images.shape == (4, 3, 64, 64)
    h = features(4)
    terms = plugin.loss(head, h, batch)
    assert set(terms) == {"supcon"} and torch.isfinite(terms["supcon"])
    sum(terms.values()).backward()
    assert head.tail.layer2[0].conv1.weight.grad is not None and head.proj.weight.grad is not None
    teacher = plugin.head_output(head, h, batch).detach()
    terms = plugin.loss(head, h, batch, teacher_output=teacher, options={"kd_alpha": 0.25})
    assert set(terms) == {"supcon", "kd"} and float(terms["kd"].detach()) < 1e-8  # same head: nothing to distil
    with pytest.raises(PluginError, match="contrastive_temperature"):
        plugin.loss(head, h, batch, options={"contrastive_temperature": 0})


def test_dataset_and_recall(plugin, tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = np.clip(np.array(colour) + rng.normal(0, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    train = plugin.build_dataset(tmp_path, "train", train=True, preprocessing=Preprocessing.fixed(64, 64))
    val = plugin.build_dataset(tmp_path, "val", train=False, preprocessing=Preprocessing.fixed(64, 64))
    assert len(train) == len(val) == 6
    batch = plugin.collate([train[i] for i in range(len(train))])
    assert batch.images.shape == (6, 3, 64, 64) and sorted(batch.targets.tolist()) == [0, 0, 0, 1, 1, 1]
    torch.manual_seed(0)
    stem = resnet_stem(build_resnet(ARCH)).eval()
    head = plugin.build_head(ARCH, {"dim": DIM})
    loader = DataLoader(val, batch_size=4, collate_fn=plugin.collate)
    metrics = plugin.evaluate(head, stem, loader)
    assert set(metrics) == {"recall@1", "recall@5"}
    assert 0.0 <= metrics["recall@1"] <= metrics["recall@5"] == 100.0  # 5 neighbours of 6 cover both classes
    assert head.training  # evaluate restores the mode
    # served answers scored by the evaluation hooks (`platform evaluate`) give the same recall
    samples = plugin.eval_samples(val)
    assert [(s.path.name, s.target) for s in samples] == [(Path(p).name, y) for p, y in val.samples]
    batch = plugin.collate([val[i] for i in range(len(val))])
    head.eval()
    answers = plugin.predict(head, stem(batch.images), batch.metas, {"dim": DIM})
    scorer = plugin.make_scorer(val, {"dim": DIM})
    scorer.update(answers[:4], [s.target for s in samples[:4]])
    scorer.update(answers[4:], [s.target for s in samples[4:]])
    assert scorer.result() == pytest.approx(metrics, abs=1e-9)
    with pytest.raises(PluginError, match="at least two"):
        plugin.evaluate(head, stem, [plugin.collate([val[0]])])
