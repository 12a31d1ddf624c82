"""Refitting a trained codec's entropy model (``--refit-steps``): the densities learn the latent the
transform gives, nothing else moves, and the coding tables are cut again, so real payloads shrink."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from splitserve.models import build_codec
from splitserve.training.refit import refit_entropy_model


def _batches(n: int = 64, size: int = 32, batch: int = 16) -> list:
    g = torch.Generator().manual_seed(0)
    # smooth images, so the latent has structure a density can learn
    x = torch.nn.functional.interpolate(torch.randn(n, 3, size // 8, size // 8, generator=g), size=(size, size),
                                        mode="bilinear", align_corners=False)
    return [SimpleNamespace(images=x[i:i + batch]) for i in range(0, n, batch)]


def _grown(codec):
    """An untrained codec whose latent spreads over several quantisation steps (as a trained one's
    does) and whose priors are CompressAI's initial, broad densities: what a lagging prior looks like."""
    torch.manual_seed(0)
    last = [m for m in codec.encoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.mul_(20.0)
    codec.eval().update(force=True)
    return codec


def _payload_bytes(codec, batches, rate: int) -> int:
    return sum(len(s) for b in batches for s in codec.compress(b.images, [rate] * len(b.images))[0])


@pytest.mark.parametrize("prior", ["per-rate", "shared"])
def test_refit_charges_the_latents_entropy_moves_only_the_densities_and_shrinks_real_payloads(prior):
    rates = 3
    codec = _grown(build_codec("rac", blocks=0, rates=rates, prior=prior))
    batches = _batches()
    frozen = {k: v.clone() for k, v in codec.state_dict().items()
              if k.startswith(("encoder.", "decoder.", "gains.", "inverse_gains."))}
    before = [_payload_bytes(codec, batches, k) for k in range(rates)]

    fit = refit_entropy_model(codec, batches, images=48, steps=300, seed=0)

    assert fit["images"] == 48 and fit["steps"] == 30  # 10 passes over its 3 batches of latents
    assert fit["bits_after"] < 0.8 * fit["bits_before"], fit
    after_state = codec.state_dict()
    assert all(torch.equal(after_state[k], v) for k, v in frozen.items())  # transform, decoder, gains
    after = [_payload_bytes(codec, batches, k) for k in range(rates)]
    assert all(a < 0.9 * b for a, b in zip(after, before)), (before, after)
    # the tables were cut from the refitted densities: a fresh update() gives the same ones
    tables = [codec.coding_tables(k) for k in range(rates)]
    codec.update(force=True)
    for k, t in enumerate(tables):
        assert (t.quantized_cdf == codec.coding_tables(k).quantized_cdf).all()
    # and they decode what they code
    x = batches[0].images[:2]
    strings, hw = codec.compress(x, [0, rates - 1])
    y_hat = codec.decompress(strings, hw, [0, rates - 1])
    assert y_hat.shape == (2, codec.latent_channels, *hw)


def test_refit_is_deterministic_and_leaves_the_global_rng_alone():
    batches = _batches()
    torch.manual_seed(123)
    expected = torch.rand(1)
    fingerprints = []
    for _ in range(2):
        codec = _grown(build_codec("rac", blocks=0))
        torch.manual_seed(123)
        refit_entropy_model(codec, batches, images=32, steps=20, seed=7)
        assert torch.equal(torch.rand(1), expected)  # the caller's random stream goes on as if nothing ran
        fingerprints.append(codec.fingerprint())
    assert fingerprints[0] == fingerprints[1]
