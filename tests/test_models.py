"""Codec families: exact paper parameter counts, shapes, bit-exact entropy coding, fingerprints."""

import pytest
import torch

from splitserve.errors import SplitserveError
from splitserve.models import build_codec, list_codecs


def test_registry_lists_both_families():
    assert list_codecs() == ["entropic_student", "rac"]
    with pytest.raises(SplitserveError, match="available: entropic_student, rac"):
        build_codec("jpeg")
    with pytest.raises(SplitserveError, match="bad config"):
        build_codec("rac", width=3)


def test_entropic_student_parameter_counts_match_paper():
    counts = build_codec("entropic_student").parameter_counts()
    assert counts["encoder"] == 138_672
    assert counts["decoder"] == 1_164_032


@pytest.mark.parametrize("blocks,expected", [(0, 32_960), (4, 623_552), (8, 1_214_144)])
def test_rac_parameter_counts_match_paper(blocks, expected):
    counts = build_codec("rac", blocks=blocks).parameter_counts()
    assert counts["encoder"] == expected
    assert counts["decoder"] == 2_835_712




@pytest.mark.parametrize(
    "family,cfg,latent",
    [("entropic_student", {}, (24, 55, 55)), ("rac", {"blocks": 0}, (64, 28, 28))],
)
def test_shapes_for_224(family, cfg, latent):
    codec = build_codec(family, **cfg).eval()
    x = torch.randn(1, 3, 224, 224)
    y = codec.encoder(x)
    assert tuple(y.shape[1:]) == latent
    assert codec.latent_hw(224, 224) == latent[1:]
    assert codec.input_hw(*latent[1:]) == (224, 224)
    assert tuple(codec.decode(y).shape[1:]) == (256, 56, 56)  # ResNet-50 layer1


@pytest.mark.parametrize("family,cfg", [("entropic_student", {}), ("rac", {"blocks": 4})])
def test_small_backbone_feature(family, cfg):
    codec = build_codec(family, feature_channels=64, **cfg).eval()
    h = codec(torch.randn(2, 3, 96, 128)).features
    assert tuple(h.shape) == (2, 64, 24, 32)  # ResNet-18 layer1 at stride 4


@pytest.mark.parametrize("family,cfg", [("entropic_student", {}), ("rac", {"blocks": 0})])
def test_rans_round_trip_is_bit_exact(family, cfg):
    torch.manual_seed(0)
    codec = build_codec(family, feature_channels=64, **cfg).eval()
    codec.update()
    x = torch.randn(3, 3, 64, 96)
    strings, hw = codec.compress(x)
    assert len(strings) == 3 and all(isinstance(s, bytes) and s for s in strings)
    assert torch.equal(codec.decompress(strings, hw), codec.quantize(x))


def test_training_path_adds_noise_and_reports_bits():
    torch.manual_seed(0)
    codec = build_codec("entropic_student", feature_channels=64)
    x = torch.randn(2, 3, 64, 64)
    codec.train()
    y = codec.encoder(x)
    noisy, _ = codec.entropy_bottleneck(y)
    assert not torch.equal(noisy, torch.round(noisy))  # U(-½, ½) noise, not rounding
    assert (noisy - y).abs().max() <= 0.5
    out = codec(x)
    assert out.bits().item() > 0 and out.features.shape == (2, 64, 16, 16)
    assert codec.aux_loss().item() >= 0


def test_fingerprint_tracks_encoder_and_prior():
    torch.manual_seed(0)
    a = build_codec("entropic_student", feature_channels=64).eval()
    a.update()
    fp = a.fingerprint()
    assert len(fp) == 64 and fp == a.fingerprint()
    with torch.no_grad():
        a.decoder[0].weight.add_(1.0)  # the decoder is not part of the code
    assert a.fingerprint() == fp
    with torch.no_grad():
        a.encoder[0].weight[0, 0, 0, 0] += 1e-3
    assert a.fingerprint() != fp
    fp2 = a.fingerprint()
    with torch.no_grad():
        a.entropy_bottleneck.quantiles.add_(0.5)
    a.update()
    assert a.fingerprint() != fp2


def test_fingerprint_requires_update():
    with pytest.raises(RuntimeError, match="update"):
        build_codec("rac", blocks=0).fingerprint()


def test_rac_any_block_count():
    codec = build_codec("rac", blocks=2)
    assert codec.parameter_counts()["encoder"] == 24_704 + 2 * 147_648 + 8_256
