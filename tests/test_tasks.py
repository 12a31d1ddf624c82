"""Built-in task plugins: discovery, heads, predict geometry, teachers, losses, metrics."""

from __future__ import annotations

import base64
import contextlib
import io
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from pycocotools.coco import COCO
from torch import nn
from torch.utils.data import DataLoader

from splitserve.errors import PluginError, SplitserveError
from splitserve.models.backbone import FEATURE_CHANNELS, TAIL_CHANNELS
from splitserve.plugins import ImageMeta, PluginRegistry
from splitserve_tasks.detection import FeatureRetinaNet, scale_boxes
from splitserve_tasks.segmentation import confusion_metrics

ARCH = "resnet18"
INPUT = (64, 64)
ORIGINALS = [(480, 640), (300, 200)]  # (height, width), neither the input's size nor aspect
SMALL = {"classification": {"num_classes": 5}, "detection": {"num_classes": 3}, "segmentation": {"num_classes": 4}}


@pytest.fixture(scope="module")
def registry() -> PluginRegistry:
    return PluginRegistry.discover()


@pytest.fixture(scope="module")
def heads(registry):
    """One small resnet18 head per plugin, built once (construction dominates the runtime)."""
    torch.manual_seed(0)
    return {name: registry.get(name).build_head(ARCH, _cfg(registry.get(name))).eval() for name in SMALL}


def _cfg(plugin, extra=None) -> dict:
    """The resolved config of this module's small heads (plus ``extra``), as the runtime resolves it."""
    return plugin.resolve_config(ARCH, {**SMALL.get(plugin.name, {}), **(extra or {})})


def _h(batch: int = 2, arch: str = ARCH, size=INPUT) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, FEATURE_CHANNELS[arch], size[0] // 4, size[1] // 4, generator=g)


def _metas() -> list[ImageMeta]:
    return [ImageMeta(original_size=o, input_size=INPUT) for o in ORIGINALS]


def _validated(plugin, results):
    assert len(results) == len(ORIGINALS)
    return [plugin.response_model.model_validate(r.model_dump()) for r in results]


# -- discovery ------------------------------------------------------------------------------


def test_entry_points_discover_builtin_plugins(registry):
    assert {"classification", "detection", "segmentation"} <= set(registry.names())
    assert registry.get("cls").name == "classification"
    assert registry.get(" DET ").name == "detection"
    assert registry.get("seg").name == "segmentation"
    assert [p.name for p in registry.resolve("cls,seg,classification")] == ["classification", "segmentation"]
    with pytest.raises(PluginError, match="unknown task 'pose'.*classification \\(cls\\).*detection \\(det\\)"):
        registry.get("pose")


def test_response_models_are_documented(registry):
    for plugin in registry:
        if plugin.name not in SMALL:
            continue
        schema = plugin.response_model.model_json_schema()
        props = [p for d in [schema, *schema.get("$defs", {}).values()] for p in d["properties"].values()]
        assert props and all(p.get("description") for p in props), plugin.name


# -- heads and predict ----------------------------------------------------------------------


def test_tail_outputs_have_tail_channels(heads):
    h = _h()
    for name, head in heads.items():
        out = head.tail(h)
        assert list(out) == ["layer2", "layer3", "layer4"], name
        for (key, t), c, stride in zip(out.items(), TAIL_CHANNELS[ARCH], (8, 16, 32)):
            assert t.shape == (2, c, INPUT[0] // stride, INPUT[1] // stride), (name, key)


def test_classification_predict(registry, heads):
    plugin, head = registry.get("cls"), heads["classification"]
    results = _validated(plugin, plugin.predict(head, _h(), _metas(), _cfg(plugin, {"top_k": 3})))
    logits = head(_h())
    for r, row in zip(results, logits.softmax(1)):
        assert [c.index for c in r.top] == row.topk(3).indices.tolist()
        assert [c.label for c in r.top] == [str(c.index) for c in r.top]
        assert r.top[0].probability == pytest.approx(row.max().item(), abs=1e-6)
    capped = plugin.predict(head, _h(), _metas(), _cfg(plugin, {"top_k": 50}))  # more than num_classes
    assert all(len(r.top) == 5 for r in capped)
    assert sum(c.probability for c in capped[0].top) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(PluginError, match="top_k"):
        plugin.predict(head, _h(), _metas(), _cfg(plugin, {"top_k": 0}))


def test_default_configs_mirror_torchvision_datasets(registry):
    cls, det, seg = (registry.get(n) for n in ("cls", "det", "seg"))
    assert cls.resolve_config(ARCH, {})["labels"][0] == "tench" and len(cls.resolve_config(ARCH, {})["labels"]) == 1000
    assert det.resolve_config(ARCH, {})["labels"][1] == "person" and det.resolve_config(ARCH, {})["num_classes"] == 91
    assert seg.resolve_config(ARCH, {})["labels"][15] == "person" and seg.resolve_config(ARCH, {})["num_classes"] == 21
    assert cls.resolve_config(ARCH, {"num_classes": 3})["labels"] == ["0", "1", "2"]
    assert det.resolve_config(ARCH, {"labels": ["a", "b"]})["num_classes"] == 2
    with pytest.raises(PluginError, match="3 labels given for num_classes=2"):
        seg.resolve_config(ARCH, {"num_classes": 2, "labels": ["a", "b", "c"]})


def test_partial_stored_config_resolves_once(registry):
    """A manifest holding only num_classes serves: the config is resolved once, not merged twice."""
    cls = registry.get("cls")
    cfg = cls.resolve_config(ARCH, {"num_classes": 10})
    assert cfg["num_classes"] == 10 and cfg["labels"] == [str(i) for i in range(10)] and cfg["top_k"] == 5
    assert cls.resolve_config(ARCH, cfg) == cfg  # resolving is idempotent
    head = cls.build_head(ARCH, cfg)
    assert head.num_classes == 10


def test_detection_predict_boxes_in_original_pixels(registry, heads):
    plugin, head = registry.get("det"), heads["detection"]
    # an untrained head scores everything near the 0.01 prior: threshold 0 keeps boxes to check
    results = _validated(plugin, plugin.predict(head, _h(), _metas(), _cfg(plugin, {"score_threshold": 0.0, "max_detections": 7})))
    for r, (oh, ow) in zip(results, ORIGINALS):
        assert len(r.detections) == 7
        scores = [d.score for d in r.detections]
        assert scores == sorted(scores, reverse=True)
        for d in r.detections:
            x1, y1, x2, y2 = d.box
            assert 0 <= x1 <= x2 <= ow and 0 <= y1 <= y2 <= oh
            assert d.label == str(d.index) and 0 <= d.index < 3
    # the values: the head's boxes in model-input pixels, x scaled by ow/iw and y by oh/ih (clamped)
    with torch.no_grad():
        raw = head(_h(), [INPUT] * 2, score_thresh=0.0, nms_thresh=0.5, detections_per_img=7)
    for r, det, (oh, ow) in zip(results, raw, ORIGINALS):
        sx, sy = ow / INPUT[1], oh / INPUT[0]
        want = (det["boxes"] * torch.tensor([sx, sy, sx, sy])).clamp(min=0)
        want[:, 0::2], want[:, 1::2] = want[:, 0::2].clamp(max=ow), want[:, 1::2].clamp(max=oh)
        assert torch.allclose(torch.tensor([d.box for d in r.detections]), want, atol=1e-3)
    # the serving default (0.3) keeps none of the prior-level scores
    assert all(r.detections == [] for r in plugin.predict(head, _h(), _metas(), _cfg(plugin, {})))
    with pytest.raises(PluginError, match="score_threshold"):
        plugin.predict(head, _h(), _metas(), _cfg(plugin, {"score_threshold": 2}))


def _iou(a, b) -> float:
    ix, iy = max(0.0, min(a[2], b[2]) - max(a[0], b[0])), max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return ix * iy / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy)


@pytest.mark.slow
def test_detection_boxes_land_on_the_object_in_original_pixels():
    """The shipped (trained) bundle through the gateway runtime, on sample photos enlarged to 640×480:
    the object's box comes back where the object is in the 640×480 image, not in the 64-pixel corner
    the model saw."""
    import json
    from pathlib import Path

    from splitserve.defaults import PACKAGED_BUNDLE
    from splitserve.edge import EdgeEncoder
    from splitserve.gateway.runtime import Job, Runtime

    samples = Path(__file__).resolve().parents[1] / "examples" / "images"
    truth = json.loads((samples / "truth.json").read_text())
    runtime = Runtime(PACKAGED_BUNDLE, PluginRegistry.discover(), tasks=["det"])
    edge = EdgeEncoder.from_bundle(PACKAGED_BUNDLE)
    for name in ("trouser.jpg", "bag.jpg", "coat.jpg"):
        photo = Image.open(samples / name).convert("RGB")
        payload, metas = runtime.parse_payload(edge.encode([photo.resize((640, 480), Image.BILINEAR)]).data)
        assert metas[0].original_size == (480, 640) and metas[0].input_size == (64, 64)
        [[answer]] = runtime.run([Job(plugins=list(runtime.plugins), payload=payload, metas=metas)])
        [obj] = truth[name]["objects"]
        x1, y1, x2, y2 = obj["box"]  # in the 64×64 sample's pixels
        want = [x1 * 10, y1 * 7.5, x2 * 10, y2 * 7.5]
        best = max(_iou(d.box, want) for d in answer["detection"].detections if d.label == obj["class"])
        assert best >= 0.75, (name, best)


def test_scale_boxes_maps_x_and_y_separately():
    boxes = torch.tensor([[16.0, 16.0, 32.0, 48.0], [-3.0, 60.0, 70.0, 64.0]])
    out = scale_boxes(boxes, (64, 64), (480, 640))
    assert torch.allclose(out[0], torch.tensor([160.0, 120.0, 320.0, 360.0]))
    assert torch.allclose(out[1], torch.tensor([0.0, 450.0, 640.0, 480.0]))  # clamped


@pytest.mark.slow  # a ResNet-50 task model
def test_resnet50_detection_head_builds_fpn_p3_to_p7():
    head = FeatureRetinaNet("resnet50", 91, [str(i) for i in range(91)]).eval()
    h = _h(1, "resnet50", (128, 128))
    with torch.no_grad():
        feats = head.retinanet.backbone(h)
        dets = head(h)
    assert [tuple(f.shape) for f in feats.values()] == [(1, 256, s, s) for s in (16, 8, 4, 2, 1)]
    assert head.retinanet.head.classification_head.num_anchors == 9
    assert head.retinanet.head.classification_head.cls_logits.out_channels == 9 * 91
    assert isinstance(head.tail.layer2[0].bn1, torchvision.ops.misc.FrozenBatchNorm2d)
    assert len(dets) == 1 and set(dets[0]) == {"boxes", "scores", "labels"}
    assert not any(k.startswith("tail.") for k in head.state_dict())  # tail stored once


def test_detection_anchor_sizes_are_config(registry):
    """Default anchors are torchvision's (32..512, for ~800 px images); anchor_sizes sets the smallest
    anchor of each level for small inputs; a bad value is one PluginError."""
    plugin = registry.get("det")
    labels = {"num_classes": 2, "labels": ["a", "b"]}
    default = plugin.build_head("resnet18", plugin.resolve_config("resnet18", labels))
    small = plugin.build_head("resnet18", plugin.resolve_config("resnet18", {**labels, "anchor_sizes": [8, 16, 32, 64, 128]}))
    tv = torchvision.models.detection.retinanet._default_anchorgen()
    assert default.retinanet.anchor_generator.sizes == tv.sizes
    assert small.retinanet.anchor_generator.sizes[0] == (8, 10, 12)
    h = _h(1, "resnet18", (64, 64))
    with torch.no_grad():
        feats = list(small.retinanet.backbone(h).values())
        from torchvision.models.detection.image_list import ImageList

        anchors = small.retinanet.anchor_generator(ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)]), feats)[0]
    widths = anchors[:, 2] - anchors[:, 0]
    assert float(widths.min()) < 8 and float(widths.max()) < 300  # P3's 0.5-ratio 8 px box … P7's 2:1 161 px
    for bad in ([8, 16, 32], [8, 16, 32, 64, "x"], [0, 16, 32, 64, 128]):
        with pytest.raises(PluginError, match="anchor_sizes"):
            plugin.resolve_config("resnet18", {**labels, "anchor_sizes": bad})


def _decode(mask_b64: str) -> np.ndarray:
    img = Image.open(io.BytesIO(base64.b64decode(mask_b64)))
    assert img.mode == "P"
    return np.array(img)


def test_segmentation_predict_png_at_model_resolution(registry, heads):
    """The mask is the argmax of the logits upsampled to the model input, whatever original size is
    declared; the answer carries the original size and the scale to it."""
    plugin, head = registry.get("seg"), heads["segmentation"]
    results = _validated(plugin, plugin.predict(head, _h(), _metas(), _cfg(plugin, {})))
    logits = F.interpolate(head.logits(_h()), size=INPUT, mode="bilinear", align_corners=False)
    for r, row, (oh, ow) in zip(results, logits, ORIGINALS):
        mask = _decode(r.mask)
        assert (r.width, r.height, r.encoding) == (ow, oh, "png")
        assert (r.mask_height, r.mask_width) == mask.shape == INPUT
        assert r.scale == [ow / INPUT[1], oh / INPUT[0]]
        assert np.array_equal(mask, row.argmax(0).numpy())
        assert sum(c.fraction for c in r.classes) == pytest.approx(1.0)
        counts = np.bincount(mask.ravel(), minlength=4)
        assert [c.index for c in r.classes] == np.flatnonzero(counts).tolist()
        for c in r.classes:
            assert c.fraction == pytest.approx(counts[c.index] / mask.size)


@pytest.mark.slow  # a ResNet-50 task model
def test_segmentation_resnet50_is_dilated_deeplabv3():
    from splitserve_tasks.segmentation import DeepLabV3Head

    head = DeepLabV3Head("resnet50", 21, [str(i) for i in range(21)]).eval()
    with torch.no_grad():
        tail = head.tail(_h(1, "resnet50"))
        out = head(_h(1, "resnet50"))
    assert [tuple(t.shape) for t in tail.values()] == [(1, c, 8, 8) for c in TAIL_CHANNELS["resnet50"]]
    assert out["out"].shape == out["aux"].shape == (1, 21, *INPUT)


def test_segmentation_resnet18_dilates_by_torchvisions_rule():
    """output_stride 8 on a BasicBlock ResNet: per block, the same strides and dilations as
    torchvision gives a Bottleneck ResNet, the undilated weights fit, and the maps are denser."""
    from splitserve_tasks.segmentation import DeepLabV3Head

    ref = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])
    head = DeepLabV3Head("resnet18", 4, list("abcd"), aspp_channels=16, output_stride=8).eval()
    for name in ("layer2", "layer3", "layer4"):
        for i, block in enumerate(head.tail.get_submodule(name)):
            want = getattr(ref, name)[i].conv2  # the Bottleneck's 3×3 convolution carries stride and dilation
            assert (block.conv1.stride, block.conv1.dilation) == (want.stride, want.dilation), (name, i)
            assert block.conv2.stride == (1, 1) and block.conv2.dilation == block.conv1.dilation
            assert block.conv1.padding == block.conv1.dilation and block.conv2.padding == block.conv2.dilation
            if block.downsample is not None:
                assert block.downsample[0].stride == getattr(ref, name)[i].downsample[0].stride
    plain = DeepLabV3Head("resnet18", 4, list("abcd"), aspp_channels=16).eval()  # stored heads: stride 32
    head.load_state_dict(plain.state_dict())  # same parameters, other geometry
    x = _h(1)
    with torch.no_grad():
        # a stride-2 convolution is its stride-1 twin sampled at every other position
        inner = plain.tail.layer2(x)
        dense, strided = head.tail.layer3[0].conv1(inner), plain.tail.layer3[0].conv1(inner)
        assert torch.allclose(dense[..., ::2, ::2], strided, atol=1e-5)
        shapes = {s: [tuple(t.shape[-2:]) for t in DeepLabV3Head("resnet18", 4, list("abcd"), 16, s).tail(x).values()]
                  for s in (8, 16, 32)}
        assert shapes == {8: [(8, 8)] * 3, 16: [(8, 8), (4, 4), (4, 4)], 32: [(8, 8), (4, 4), (2, 2)]}
        assert head(x)["out"].shape == (1, 4, *INPUT)
        assert not torch.allclose(head.logits(x), F.interpolate(plain.logits(x), size=(8, 8)))


def test_segmentation_config_geometry(registry):
    plugin = registry.get("segmentation")
    assert plugin.resolve_config("resnet18", {})["output_stride"] == 32  # heads stored without it keep their geometry
    assert plugin.resolve_config("resnet50", {})["output_stride"] == 8
    cfg = plugin.resolve_config("resnet18", {"output_stride": 8, "atrous_rates": [1, 2, 3]})
    aspp = plugin.build_head("resnet18", cfg).classifier[0]
    assert [m[0].dilation for m in aspp.convs[1:4]] == [(1, 1), (2, 2), (3, 3)]
    for bad, msg in (({"output_stride": 12}, "output_stride must be one of"),
                     ({"output_stride": True}, "output_stride must be one of"),
                     ({"atrous_rates": [1, 2]}, "atrous_rates must be three integers"),
                     ({"atrous_rates": "6"}, "atrous_rates must be three integers")):
        with pytest.raises(PluginError, match=msg):
            plugin.resolve_config("resnet18", bad)


# -- teachers -------------------------------------------------------------------------------


def test_teachers_stem_to_head(registry):
    images = torch.randn(2, 3, *INPUT)
    for name, cfg in SMALL.items():
        plugin = registry.get(name)
        stem, head = plugin.build_teacher(ARCH, _cfg(plugin))
        stem.eval(), head.eval()
        with torch.no_grad():
            h = stem(images)
            assert h.shape == (2, FEATURE_CHANNELS[ARCH], INPUT[0] // 4, INPUT[1] // 4)
            _validated(plugin, plugin.predict(head, h, _metas(), _cfg(plugin, {})))


def _fake_download(monkeypatch, enum, state_dict):
    monkeypatch.setattr(enum, "get_state_dict", lambda self, *a, **k: state_dict)


def test_classification_teacher_keeps_or_replaces_fc(registry, monkeypatch):
    reference = torchvision.models.resnet18().eval()
    _fake_download(monkeypatch, torchvision.models.ResNet18_Weights, reference.state_dict())
    plugin, x = registry.get("cls"), torch.randn(1, 3, *INPUT)
    stem, head = plugin.build_teacher(ARCH, {}, weights="DEFAULT")
    with torch.no_grad():
        assert torch.allclose(head.eval()(stem.eval()(x)), reference(x), atol=1e-5)
    stem, head = plugin.build_teacher(ARCH, {"num_classes": 10}, weights="IMAGENET1K_V1")
    assert head.fc.out_features == 10
    assert torch.equal(head.tail.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


@pytest.mark.slow  # a ResNet-50 task model
def test_detection_teacher_matches_torchvision_retinanet(registry, monkeypatch):
    from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights, retinanet_resnet50_fpn

    torch.manual_seed(0)
    reference = retinanet_resnet50_fpn(weights=None, weights_backbone=None).eval()
    for m in reference.modules():  # the COCO_V1 weights were trained with eps=0 (torchvision notes it)
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 0.0
    _fake_download(monkeypatch, RetinaNet_ResNet50_FPN_Weights, reference.state_dict())
    plugin = registry.get("det")
    stem, head = plugin.build_teacher("resnet50", {}, weights="DEFAULT")
    x = torch.randn(1, 3, *INPUT)
    with torch.no_grad():
        ref_feats = list(reference.backbone(x).values())
        feats = list(head.eval().retinanet.backbone(stem.eval()(x)).values())
        for a, b in zip(ref_feats, feats):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
        ref_out, out = reference.head(ref_feats), head.retinanet.head(feats)
        assert torch.allclose(ref_out["cls_logits"], out["cls_logits"], atol=1e-4)
        assert torch.allclose(ref_out["bbox_regression"], out["bbox_regression"], atol=1e-4)

    # a different label set takes the pretrained classifier rows by name ("person" is COCO 1)
    _, head2 = plugin.build_teacher("resnet50", {"labels": ["person", "unicorn"]}, weights="COCO_V1")
    src = reference.head.classification_head.cls_logits.weight.view(9, 91, 256, 3, 3)
    dst = head2.retinanet.head.classification_head.cls_logits.weight.view(9, 2, 256, 3, 3)
    assert torch.equal(dst[:, 0], src[:, 1]) and not torch.equal(dst[:, 1], src[:, 0])

    def offline(self, *a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(RetinaNet_ResNet50_FPN_Weights, "get_state_dict", offline)
    with pytest.raises(SplitserveError, match="could not download .*COCO_V1 \\(URLError\\)") as e:
        plugin.build_teacher("resnet50", {}, weights="DEFAULT")
    assert "\n" not in str(e.value)
    with pytest.raises(SplitserveError, match="unknown weights 'COCO' .*COCO_V1.*IMAGENET1K_V1"):
        plugin.build_teacher("resnet50", {}, weights="COCO")


@pytest.mark.slow  # a ResNet-50 task model
def test_segmentation_teacher_matches_torchvision_deeplabv3(registry, monkeypatch):
    from torchvision.models.segmentation import DeepLabV3_ResNet50_Weights, deeplabv3_resnet50

    torch.manual_seed(0)
    reference = deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=True).eval()
    _fake_download(monkeypatch, DeepLabV3_ResNet50_Weights, reference.state_dict())
    stem, head = registry.get("seg").build_teacher("resnet50", {}, weights="DEFAULT")
    x = torch.randn(1, 3, *INPUT)
    with torch.no_grad():
        ref, out = reference(x), head.eval()(stem.eval()(x), INPUT)
    assert torch.allclose(ref["out"], out["out"], atol=1e-4)
    assert torch.allclose(ref["aux"], out["aux"], atol=1e-4)


# -- losses ---------------------------------------------------------------------------------


def _overfit(plugin, head, h, batch, steps=6, lr=0.01, **kw):
    """Loss on one fixed batch over a few SGD steps."""
    head.train()
    opt = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    history = []
    for _ in range(steps):
        terms = plugin.loss(head, h, batch, **kw)
        total = sum(terms.values())
        assert torch.isfinite(total), terms
        history.append(total.item())
        opt.zero_grad()
        total.backward()
        opt.step()
    head.eval()
    return terms, history


def test_classification_loss_overfits_and_distils(registry):
    plugin = registry.get("cls")
    torch.manual_seed(0)
    head = plugin.build_head(ARCH, plugin.resolve_config(ARCH, {"num_classes": 5}))
    items = [(torch.randn(3, *INPUT), i % 5) for i in range(4)]
    batch = plugin.collate(items)
    assert batch.targets.tolist() == [0, 1, 2, 3] and batch.metas[0].input_size == INPUT
    h = _h(4)
    terms, history = _overfit(plugin, head, h, batch)
    assert set(terms) == {"ce"} and history[-1] < 0.5 * history[0]

    with torch.no_grad():
        same = plugin.head_output(head, h, batch)
        kd = plugin.loss(head, h, batch, teacher_output=same, options={"temperature": 2.0})
        ce = plugin.loss(head, h, batch)["ce"]
    assert set(kd) == {"ce", "kd"}
    assert kd["kd"].item() == pytest.approx(0.0, abs=1e-6)  # student == teacher
    assert kd["ce"].item() == pytest.approx(0.5 * ce.item(), rel=1e-5)
    other = plugin.loss(head, h, batch, teacher_output=torch.randn(4, 5), options={"kd_alpha": 1.0})
    assert other["kd"].item() > 0 and other["ce"].item() == 0.0


def test_detection_loss_overfits(registry):
    plugin = registry.get("det")
    torch.manual_seed(0)
    # the shipped bundle's FPN width (64): a 16th of the default's convolution work, the same loss path
    head = plugin.build_head(ARCH, plugin.resolve_config(ARCH, {"num_classes": 3, "fpn_channels": 64}))
    targets = [
        {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0], [30.0, 10.0, 60.0, 50.0], [5.0, 5.0, 5.0, 9.0]]),
         "labels": torch.tensor([0, 2, 1]), "image_id": 1, "orig_size": (480, 640)},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_id": 2, "orig_size": (300, 200)},
    ]
    batch = plugin.collate([(torch.randn(3, *INPUT), t) for t in targets])
    assert [m.original_size for m in batch.metas] == ORIGINALS and batch.metas[0].input_size == INPUT
    assert batch.targets[0]["labels"].tolist() == [0, 2]  # the zero-width box is dropped
    terms, history = _overfit(plugin, head, _h(), batch, steps=10, lr=0.1)
    assert set(terms) == {"classification", "bbox_regression"}
    assert min(history[-3:]) < 0.9 * history[0]  # focal loss leaves its 0.01 prior slowly


def test_segmentation_loss_overfits(registry):
    plugin = registry.get("seg")
    torch.manual_seed(0)
    head = plugin.build_head(ARCH, plugin.resolve_config(ARCH, {"num_classes": 4}))
    masks = torch.zeros(2, *INPUT, dtype=torch.long)
    masks[:, :32] = 1
    masks[0, :, 40:] = 3
    masks[:, :4] = 255  # ignored border
    batch = plugin.collate([(torch.randn(3, *INPUT), m) for m in masks])
    terms, history = _overfit(plugin, head, _h(), batch)
    assert set(terms) == {"ce", "aux"}
    assert history[-1] < 0.7 * history[0]


# -- evaluate -------------------------------------------------------------------------------


class _Oracle(nn.Module):
    """Classification 'head' reading the answer from the feature: logits rank class
    ``h[:, 0, 0, 0]`` at position ``h[:, 1, 0, 0]``."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, h):
        label, rank = h[:, 0, 0, 0].long(), h[:, 1, 0, 0].long()
        order = torch.stack([(torch.arange(self.k) + label[i] + self.k - rank[i]) % self.k for i in range(len(h))])
        logits = torch.empty(len(h), self.k)
        logits.scatter_(1, order, torch.arange(self.k, 0, -1, dtype=torch.float).expand(len(h), -1))
        return logits


def test_classification_evaluate(registry):
    plugin = registry.get("cls")
    labels = list(range(10))
    ranks = [0, 0, 0, 0, 0, 2, 2, 4, 6, 9]  # 5 right, 3 more in the top 5
    items = []
    for label, rank in zip(labels, ranks):
        img = torch.zeros(3, 4, 4)
        img[0], img[1] = label, rank
        items.append((img, label))
    loader = DataLoader(items, batch_size=4, collate_fn=plugin.collate)
    metrics = plugin.evaluate(_Oracle(10), lambda x: x, loader)
    assert metrics == {"top1": 50.0, "top5": 80.0}
    perfect = [(img.index_fill(0, torch.tensor([1]), 0.0), y) for img, y in items]
    assert plugin.evaluate(_Oracle(10), lambda x: x, DataLoader(perfect, 5, collate_fn=plugin.collate))["top1"] == 100.0


def test_segmentation_evaluate_and_confusion_metrics(registry):
    plugin = registry.get("seg")

    class Oracle(nn.Module):
        num_classes = 3

        def logits(self, h):  # the mask itself, one-hot
            return F.one_hot(h[:, 0].long().clamp(0, 2), 3).permute(0, 3, 1, 2).float()

    masks = torch.randint(0, 3, (4, 16, 16))
    masks[:, 0] = 255
    items = [(m.float().expand(3, -1, -1), m) for m in masks]
    metrics = plugin.evaluate(Oracle(), lambda x: x, DataLoader(items, 2, collate_fn=plugin.collate))
    assert metrics == {"mIoU": 100.0, "pixel_acc": 100.0}
    # truth rows, prediction columns: IoU = 3/(3+1+2), 5/(5+2+1), class 2 never occurs
    m = confusion_metrics(torch.tensor([[3, 1, 0], [2, 5, 0], [0, 0, 0]]))
    assert m["mIoU"] == pytest.approx(100 * (3 / 6 + 5 / 8) / 2)
    assert m["pixel_acc"] == pytest.approx(100 * 8 / 11)


def _tiny_coco() -> COCO:
    """A real pycocotools COCO index, in memory: two images, non-contiguous category ids."""
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 7, "height": 480, "width": 640}, {"id": 9, "height": 300, "width": 200}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [100.0, 50.0, 200.0, 150.0], "area": 30000.0, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [320.0, 240.0, 160.0, 200.0], "area": 32000.0, "iscrowd": 0},
            {"id": 3, "image_id": 9, "category_id": 3, "bbox": [20.0, 30.0, 100.0, 150.0], "area": 15000.0, "iscrowd": 0},
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class _DetDataset:
    def __init__(self):
        self.coco = _tiny_coco()
        self.categories = self.coco.dataset["categories"]
        self.label_to_category_id = [1, 3]
        self.items = []
        for img in self.coco.dataset["images"]:
            anns = self.coco.imgToAnns[img["id"]]
            sx, sy = INPUT[1] / img["width"], INPUT[0] / img["height"]
            boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                                  for a in anns]) * torch.tensor([sx, sy, sx, sy])
            labels = torch.tensor([self.label_to_category_id.index(a["category_id"]) for a in anns])
            target = {"boxes": boxes, "labels": labels, "image_id": img["id"], "orig_size": (img["height"], img["width"])}
            self.items.append((torch.zeros(3, *INPUT), target))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class _DetOracle(nn.Module):
    """Detection 'head' answering each batch with its ground truth (labels optionally swapped)."""

    def __init__(self, batches, swap=False):
        super().__init__()
        self.answers = [[{"boxes": t["boxes"], "scores": torch.full((len(t["boxes"]),), 0.9),
                          "labels": 1 - t["labels"] if swap else t["labels"]} for t in b.targets] for b in batches]
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, h, input_sizes, targets=None, **thresholds):
        assert thresholds == {"score_thresh": 0.05, "detections_per_img": 100}
        return self.answers.pop(0)


def test_detection_evaluate_coco_map(registry):
    plugin = registry.get("det")
    dataset = _DetDataset()
    assert plugin.dataset_config(dataset) == {"num_classes": 2, "labels": ["cat", "dog"], "category_ids": [1, 3]}
    loader = DataLoader(dataset, batch_size=1, collate_fn=plugin.collate)
    batches = list(loader)

    perfect = plugin.evaluate(_DetOracle(batches), lambda x: x, loader)  # COCO gt via loader.dataset
    assert perfect["mAP"] == pytest.approx(100.0, abs=0.1) and perfect["AP50"] == pytest.approx(100.0, abs=0.1)
    swapped = plugin.evaluate(_DetOracle(batches, swap=True), lambda x: x, batches, dataset=dataset)
    assert swapped["mAP"] == 0.0
    with pytest.raises(PluginError, match="COCO ground truth"):
        plugin.evaluate(_DetOracle(batches), lambda x: x, batches)
    # the real head: untrained scores sit below the 0.05 COCO threshold, so nothing is found
    head = plugin.build_head(ARCH, plugin.resolve_config(ARCH, plugin.dataset_config(dataset)))
    real = plugin.evaluate(head, lambda x: _h(1), loader)
    assert real == {"mAP": 0.0, "AP50": 0.0} and head.training  # mode restored
    with pytest.raises(PluginError, match="the head has 3 classes, the dataset 2"):
        plugin.evaluate(plugin.build_head(ARCH, plugin.resolve_config(ARCH, {"num_classes": 3})), lambda x: _h(1), loader)
