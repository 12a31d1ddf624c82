"""Training follows the papers: simplified GDN, Eq. 2's loss scaling, RAC's multi-layer feature loss,
the entropy model in fp32 under autocast. Each test compares values against an independent
computation of the published formula, so a silent deviation fails it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from compressai.layers import GDN1

from splitserve.models import build_codec
from splitserve.models.backbone import ResNetTail, build_resnet, resnet_stem


def _gdn_params(layer):
    beta = layer.beta_reparam(layer.beta)
    gamma = layer.gamma_reparam(layer.gamma)
    return beta, gamma


@pytest.mark.parametrize("index", [1, 3])
def test_entropic_student_encoder_uses_simplified_gdn(index):
    """§4.2: x / (β + Σ γ·|x|), not the full GDN x / sqrt(β + Σ γ·x²)."""
    codec = build_codec("entropic_student", feature_channels=64)
    layer = codec.encoder[index]
    assert isinstance(layer, GDN1) and not layer.inverse
    torch.manual_seed(0)
    with torch.no_grad():  # non-trivial γ so the two formulas differ clearly
        layer.gamma.add_(0.3 * torch.rand_like(layer.gamma))
    c = layer.beta.numel()
    x = 3 * torch.randn(2, c, 5, 4)
    beta, gamma = _gdn_params(layer)
    norm = torch.einsum("ij,bjhw->bihw", gamma, x.abs()) + beta.view(1, -1, 1, 1)
    expected = x / norm
    full_gdn = x / torch.sqrt(torch.einsum("ij,bjhw->bihw", gamma, x * x) + beta.view(1, -1, 1, 1))
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, full_gdn, rtol=1e-3, atol=1e-3)


def test_entropic_student_decoder_uses_simplified_inverse_gdn():
    codec = build_codec("entropic_student", feature_channels=64)
    layers = [m for m in codec.decoder if isinstance(m, GDN1)]
    assert len(layers) == 2 and all(m.inverse for m in layers)
    layer = layers[1]
    x = torch.randn(1, layer.beta.numel(), 3, 3)
    beta, gamma = _gdn_params(layer)
    expected = x * (torch.einsum("ij,bjhw->bihw", gamma, x.abs()) + beta.view(1, -1, 1, 1))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def _teacher18():
    torch.manual_seed(1)
    resnet = build_resnet("resnet18")
    return resnet_stem(resnet).eval(), ResNetTail.from_resnet(resnet).eval()


def test_stage1_loss_is_eq2_summed_squared_error_plus_beta_bits_per_image():
    from splitserve.training.distill import DistillObjective

    stem, tail = _teacher18()
    torch.manual_seed(2)
    codec = build_codec("entropic_student", feature_channels=64)
    beta = 0.32
    objective = DistillObjective(codec, [(stem, tail)], [1.0], beta).eval()  # eval: rounded latent, deterministic
    x = torch.randn(3, 3, 32, 48)
    losses, logs = objective.terms(x)

    with torch.no_grad():
        h_t = stem(x)
        t = tail(h_t)
        y = codec.encoder(x)
        y_hat, lik = codec.entropy_bottleneck(y)
        h_s = codec.decoder(y_hat)
        s = tail(h_s)
    b = x.shape[0]
    sse = ((h_s - h_t) ** 2).sum() + sum(((s[k] - t[k]) ** 2).sum() for k in ("layer2", "layer3", "layer4"))
    bits = -torch.log2(lik).sum()
    torch.testing.assert_close(losses["distill"], sse / b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(losses["rate"], beta * bits / b, rtol=1e-4, atol=1e-4)
    # bpp is logged over the model input's pixels
    torch.testing.assert_close(logs["bpp"], bits / (b * 32 * 48), rtol=1e-4, atol=1e-6)


def test_rac_joint_loss_has_layer1_to_4_feature_terms():
    from splitserve.plugins import TaskBatch
    from splitserve.training.joint import JointObjective
    from splitserve_tasks.classification import ClassificationPlugin

    plugin = ClassificationPlugin()
    config = ClassificationPlugin().resolve_config("resnet18", {"num_classes": 10})
    torch.manual_seed(3)
    resnet = build_resnet("resnet18")
    teacher_stem = resnet_stem(resnet).eval()
    teacher_head = plugin.build_head("resnet18", config).eval()
    teacher_head.tail.load_state_dict(ResNetTail.from_resnet(resnet).state_dict())
    head = plugin.build_head("resnet18", config)
    head.load_state_dict(teacher_head.state_dict())
    codec = build_codec("rac", blocks=0, feature_channels=64)
    objective = JointObjective(plugin, codec, head, teacher_stem, teacher_head, lmbda=0.5, options={},
                               head_fixed=False).eval()
    x = torch.randn(2, 3, 32, 32)
    batch = TaskBatch(images=x, targets=torch.tensor([1, 7]))
    losses, logs = objective(batch)
    with torch.no_grad():
        h_t = teacher_stem(x)
        t = teacher_head.tail(h_t)
        h_s = codec(x).features
        s = head.tail(h_s)
    expected = {"layer1": F.mse_loss(h_s, h_t), **{k: F.mse_loss(s[k], t[k]) for k in ("layer2", "layer3", "layer4")}}
    for k, v in expected.items():
        torch.testing.assert_close(logs[f"mse_{k}"], v, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses["feature_mse"], sum(expected.values()), rtol=1e-4, atol=1e-6)
    assert all(float(v) > 0 for v in expected.values())


def test_entropy_model_runs_in_fp32_under_autocast():
    torch.manual_seed(4)
    codec = build_codec("entropic_student", feature_channels=64).eval()
    with torch.no_grad():
        codec.entropy_bottleneck.quantiles.add_(0.37 * torch.randn_like(codec.entropy_bottleneck.quantiles))
    x = torch.randn(1, 3, 32, 32)
    reference_aux = codec.aux_loss()
    reference_lik = codec(x).likelihoods
    with torch.autocast("cpu", dtype=torch.bfloat16):
        aux = codec.aux_loss()
        lik = codec(x).likelihoods
    assert aux.dtype == torch.float32 and lik.dtype == torch.float32
    # bit-identical to the fp32 computation: nothing of the prior ran in bf16
    assert torch.equal(aux, reference_aux)
    # the encoder runs in bf16 (that is what autocast is for); the prior's likelihoods must not lose precision
    assert lik.min() > 0
    torch.testing.assert_close(lik, reference_lik, rtol=0.1, atol=0.05)


def _coco_tree(root, split, images, annotations, categories):
    import json

    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2017").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


def _square(ann_id, image_id, cat, x, y, size, crowd=0):
    poly = [x, y, x + size, y, x + size, y + size, x, y + size]
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": [x, y, size, size],
            "area": float(size * size), "iscrowd": crowd, "segmentation": [poly]}


def test_coco_to_voc_masks_follow_torchvision_references(tmp_path):
    """Overlaps → 255, crowd painted as its class, train keeps COCO-size images with kept area > 1000."""
    from splitserve.data.coco import VOC_CATEGORY_IDS, CocoSegmentation

    person, dog, giraffe = 1, 18, 25  # person and dog are VOC classes; giraffe is not
    cats = [{"id": i, "name": f"c{i}"} for i in sorted(set(VOC_CATEGORY_IDS) | {giraffe})]
    images = [{"id": 1, "file_name": "a.jpg", "height": 60, "width": 60},
              {"id": 2, "file_name": "b.jpg", "height": 60, "width": 60},
              {"id": 3, "file_name": "c.jpg", "height": 60, "width": 60}]
    anns = [_square(1, 1, person, 0, 0, 30), _square(2, 1, dog, 20, 20, 30),  # overlap on [20,30)²
            _square(3, 1, giraffe, 40, 0, 15),                                   # not a VOC class: background
            _square(4, 2, dog, 5, 5, 40, crowd=1),                               # crowd, area 1600
            _square(5, 3, person, 0, 0, 20)]                                     # area 400 ≤ 1000
    root = _coco_tree(tmp_path / "coco", "train", images, anns, cats)
    person_label = VOC_CATEGORY_IDS.index(person) + 1
    dog_label = VOC_CATEGORY_IDS.index(dog) + 1

    val = CocoSegmentation(root, "train", train=False, preprocessing=(32, 32))
    m1 = val.semantic_mask(1)
    assert m1[5, 5] == person_label and m1[45, 45] == dog_label
    assert (m1[21:29, 21:29] == 255).all()          # pixels of two instances are ignored
    assert m1[5, 45] == 0                            # the giraffe is not a VOC class
    m2 = val.semantic_mask(2)
    assert m2[20, 20] == dog_label                   # crowd painted as its class, not 255
    big = [{**im, "height": 480, "width": 640} for im in images]  # COCO-size images: torchvision's rule
    train = CocoSegmentation(_coco_tree(tmp_path / "big", "train", big, anns, cats), "train", train=True,
                             preprocessing=(32, 32))
    assert train.ids == [1, 2]                       # image 3's 400 px of labelled area is too little
    small = CocoSegmentation(root, "train", train=True, preprocessing=(32, 32))
    assert small.ids == [1, 2, 3]                    # but 400 px is 11 % of a 60x60 image (> 1.3 %)
