"""A variable-rate codec with one shared prior (issue 24's second option, ``prior="shared"``): one
density over the un-gained latent, read by rate k at step 1/g_k, its per-rate coding tables cut
from that density. The wire format and the torch-free coder are those of the per-rate codec, so
these tests check the tables against the density, the coder against ``quantize``, and the bundle
against itself; ``distill --prior shared`` is tested in test_rates_training.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from splitserve.bundle import BundleError, load_codec, read_manifest, save_bundle
from splitserve.edge import EdgeEncoder
from splitserve.errors import SplitserveError
from splitserve.models import build_codec
from splitserve.models.priors import SharedPrior
from splitserve_edge.coder import PRECISION
from splitserve_edge.rates import RateCoder, RateTables

from .conftest import texture
from .helpers import informative_bundle

RATES = 4


def photos_tensor(size: int = 64) -> torch.Tensor:
    """Three real texture photos as a (3, 3, size, size) batch in [0, 1]."""
    imgs = [np.asarray(texture(name, (size, size)), dtype=np.float32) / 255 for name in ("brick", "grass", "gravel")]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def codec():
    """A shared-prior codec whose latents depend on the image, whose gains differ per channel, and
    whose density was fitted to the photos' latents through the training path at every rate (so
    its medians are not 0 and the tables are far from uniform)."""
    torch.manual_seed(3)
    codec = build_codec("entropic_student", feature_channels=64, rates=RATES, prior="shared").eval()
    with torch.no_grad():
        for gain, inverse in zip(codec.gains, codec.inverse_gains):
            gain.add_(0.1 * torch.randn_like(gain))
            inverse.copy_(-gain)
        codec.encoder[-1].weight.mul_(40.0)
        y = codec.encoder(photos_tensor())
    density = codec.priors.density
    opt = torch.optim.Adam([p for name, p in density.named_parameters() if name != "quantiles"], lr=0.05)
    for step in range(60):
        rate = step % RATES
        gain = codec.gain(rate).detach()
        _, likelihoods = codec.priors(y * gain, rate, gain, training=True)
        opt.zero_grad()
        (-torch.log2(likelihoods).mean()).backward()
        opt.step()
    with torch.no_grad():
        density._update_quantiles()  # CompressAI's bisection: the fitted density's quantiles
    codec.update(force=True)
    assert (density.quantiles[:, 0, 1].abs() > 1e-2).all()  # rounding around the medians matters
    return codec


def test_shared_prior_is_a_config_choice_and_per_rate_configs_are_unchanged():
    per_rate = build_codec("rac", blocks=0, rates=3)
    assert build_codec("rac", blocks=0, rates=3, prior="per-rate").config == per_rate.config
    assert "prior" not in per_rate.config and type(per_rate.priors).__name__ == "PerRatePriors"
    shared = build_codec("rac", blocks=0, rates=3, prior="shared")
    assert shared.config == {**per_rate.config, "prior": "shared"}
    assert isinstance(build_codec("rac", **shared.config).priors, SharedPrior)  # the config rebuilds the variant
    with pytest.raises(SplitserveError, match="needs rates > 1"):
        build_codec("rac", blocks=0, prior="shared")
    with pytest.raises(SplitserveError, match="prior must be one of"):
        build_codec("rac", blocks=0, rates=3, prior="hyper")


def test_shared_prior_round_trips_at_every_rate(codec):
    """compress → (the export's table file →) RateCoder → decompress gives ``codec.quantize`` at
    every rate, and the payloads grow with the rate."""
    x = photos_tensor()
    coder = RateCoder(RateTables.from_bytes(codec.rate_tables().to_bytes()))
    sizes = []
    for rate in range(RATES):
        strings, hw = codec.compress(x, rate)
        expected = codec.quantize(x, rate)
        assert expected.abs().sum() > 0 and not torch.equal(expected[0], expected[1])
        assert torch.equal(codec.decompress(strings, hw, [rate] * len(x)), expected), rate
        shape = (codec.latent_channels, *hw)
        gained = np.stack([coder.decode(s, shape, rate) for s in strings])  # the edge file's coder
        assert torch.equal(torch.from_numpy(gained) * codec.inverse_gain(rate), expected), rate
        sizes.append(sum(map(len, strings)))
    assert sizes == sorted(sizes) and len(set(sizes)) == RATES, sizes


def table_bits(tables, symbols: np.ndarray) -> np.ndarray:
    """Bits each image's symbols (N, C, H, W) cost under one rate's tables (none may escape)."""
    index = symbols - tables.offset[None, :, None, None]
    assert (index >= 0).all() and (index < tables.cdf_length[None, :, None, None] - 2).all()
    cdf = tables.quantized_cdf.astype(np.float64)
    channel = np.arange(symbols.shape[1])[None, :, None, None]
    mass = (cdf[channel, index + 1] - cdf[channel, index]) / (1 << PRECISION)
    return -np.log2(mass).reshape(len(symbols), -1).sum(1)


def test_shared_prior_tables_charge_what_the_density_models_at_every_rate(codec):
    """The per-rate tables come from the one density: at every rate, the bits the 16-bit tables
    charge for the coded symbols are the −log2 likelihoods of the eval forward (rounded latent,
    bins of width 1/g_k on y), and the bitstreams are that long."""
    x = photos_tensor()
    with torch.no_grad():
        y = codec.encoder(x)
    for rate in range(RATES):
        tables = codec.coding_tables(rate)
        symbols = RateCoder(codec.rate_tables()).symbols(y.numpy(), rate)
        with torch.no_grad():
            modelled = -torch.log2(codec(x, rate).likelihoods).flatten(1).sum(1).numpy()
        charged = table_bits(tables, symbols)
        np.testing.assert_allclose(charged, modelled, rtol=1e-3)
        coded = np.array([8 * len(s) for s in codec.compress(x, rate)[0]])
        assert (coded >= charged - 1).all() and (coded <= charged * 1.005 + 64).all(), (rate, coded, charged)


def test_at_unit_gain_the_tables_are_compressais_own(codec):
    """With g_k = 1 a rate's tables are exactly what CompressAI's ``EntropyBottleneck.update`` builds
    for the one density (offset, 16-bit CDF and its lengths): the derivation generalises CompressAI's,
    it does not approximate it."""
    import copy

    shared = copy.deepcopy(codec.priors)
    shared.update(torch.ones(RATES, codec.latent_channels), force=True)
    reference = copy.deepcopy(codec.priors.density)
    reference.update(force=True)
    for k in range(RATES):
        table = shared.cdfs(k)
        assert torch.equal(table._offset, reference._offset), k
        assert torch.equal(table._cdf_length, reference._cdf_length), k
        assert torch.equal(table._quantized_cdf, reference._quantized_cdf), k


def test_a_codec_that_has_coded_copies_and_its_copy_codes_the_same_bytes(codec):
    """The rate measurement deep-copies the codec being trained; once it has coded, it holds an
    entropy coder (constriction's models cannot be copied): a copy leaves it out and rebuilds it."""
    import copy

    x = photos_tensor()
    strings = codec.compress(x, 1)  # builds the coder
    twin = copy.deepcopy(codec)
    assert codec._coder is not None and twin._coder is None
    assert twin.compress(x, 1) == strings


def test_shared_prior_bundle_round_trips(tmp_path):
    """A shared-prior bundle rebuilds the shared codec from its manifest: the same fingerprint, prior
    file and payloads after a load and a second save; read as per-rate, its prior file is refused."""
    bundle = informative_bundle(tmp_path / "shared", input_size=(64, 64), tasks=["classification"],
                                codec_config={"rates": RATES, "prior": "shared"})
    manifest = read_manifest(bundle)
    assert manifest.codec.config["rates"] == RATES and manifest.codec.config["prior"] == "shared"
    first = load_codec(bundle)
    assert isinstance(first.priors, SharedPrior) and first.fingerprint() == manifest.fingerprint
    resaved = tmp_path / "resaved"
    save_bundle(resaved, first, backbone=manifest.backbone, preprocessing=manifest.policy)
    again = read_manifest(resaved)
    assert again.fingerprint == manifest.fingerprint
    prior_file = lambda root, m: (root / m.files["prior"].path).read_bytes()  # noqa: E731
    assert prior_file(resaved, again) == prior_file(bundle, manifest)
    photos = [texture(name, (90, 70)) for name in ("brick", "grass")]
    a, b = EdgeEncoder.from_bundle(bundle), EdgeEncoder.from_bundle(resaved)
    for rate in range(RATES):
        assert a.encode(photos, rate=rate).data == b.encode(photos, rate=rate).data
    # the config is what makes it a shared codec: without it the prior file does not fit
    raw = json.loads((resaved / "manifest.json").read_text())
    del raw["codec"]["config"]["prior"]
    (resaved / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="do not fit"):
        load_codec(resaved)


def test_shared_prior_users_bitmaps_finetune_and_bench(codec):
    """What reads ``codec.priors`` works on a shared prior: the bit map of an image at a rate sums to
    its coded bits, fine-tuning freezes the density, the tables and the gains, and the encode
    benchmark fits the one density so that the bytes grow with the rate."""
    from splitserve.bench.encode import realistic_codec
    from splitserve.evaluation.bitmaps import feature_codec_bits
    from splitserve.training.finetune import CodedObjective

    x = photos_tensor()[:1]
    for rate in range(RATES):
        coded = 8 * len(codec.compress(x, rate)[0][0])
        bits = feature_codec_bits(codec, x, rate).sum()
        assert coded - 64 <= bits <= coded * 1.002, (rate, bits, coded)

    fresh = build_codec("rac", blocks=0, feature_channels=64, rates=3, prior="shared")
    CodedObjective(fresh, train_decoder=False)
    assert not any(p.requires_grad for p in fresh.prior_parameters()) and not fresh.priors.training
    assert {"priors.density.quantiles", "gains.0", "inverse_gains.2"} <= {n for n, p in fresh.named_parameters() if not p.requires_grad}

    bench = realistic_codec("rac", {"blocks": 0}, photos_tensor(), 64, rates=3, prior="shared")
    assert isinstance(bench.priors, SharedPrior)
    with torch.no_grad():  # the one density models the un-gained latent: its median is the latent's
        latent_mean = bench.encoder(photos_tensor()).mean((0, 2, 3))  # (up to ±4.4 apart from 0, the unfitted median)
    torch.testing.assert_close(bench.priors.density.quantiles[:, 0, 1].detach(), latent_mean, rtol=0, atol=0.15)
    sizes = [sum(map(len, bench.compress(photos_tensor(), rate)[0])) for rate in range(3)]
    assert sizes[0] < sizes[1] < sizes[2], sizes
