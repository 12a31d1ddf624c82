"""Refit a trained codec's entropy model to its final latent, the transform frozen.

Training moves the transform and its priors together, and on the task's SGD a density lags the
latent it models: the first study's shipped single-rate codec charged about twice the entropy of its
rounded latent. Training it faster from the start made things worse (docs/training.md, "--prior-lr"),
so the densities catch up once training is over: every prior's density learns the latent of the
trained transform on training images (gains, transform and decoder fixed), then its quantiles, and
the coding tables are cut again. Only the rate model changes, so the payloads get smaller; the
decoded features change only where a re-fitted median moves a rounding offset, and the final
validation measures the written weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ..models import FeatureCodec
from .optim import split_codec_params
from .sampling import move_to

DENSITY_LR = 1e-2  # a density fitted to a fixed latent reaches its entropy in ~50 Adam steps at 1e-2
QUANTILE_LR = 0.1
PASSES = 10  # at most this many passes over the stored latents: more would fit the sample, not the latent


@torch.no_grad()
def _latents(codec: FeatureCodec, batches: Iterable, images: int, device: torch.device) -> list[Tensor]:
    """The transform's output for the first ``images`` images of ``batches``, batch by batch."""
    out: list[Tensor] = []
    seen = 0
    for batch in batches:
        x = move_to(batch, device).images
        out.append(codec.encoder(x).float()[: images - seen])
        seen += out[-1].shape[0]
        if seen >= images:
            break
    return out


def _bits(codec: FeatureCodec, y: Tensor) -> Tensor:
    """Mean bits per image over every rate of the noisy latent ``y`` at each rate's gain: what the
    densities charge (each rate's own prior, or the shared one read at each rate's step)."""
    total = y.new_zeros(())
    for k in range(codec.rates):
        gain = codec.gain(k)
        u = y if gain is None else y * gain.detach()
        _, likelihoods = codec.priors(u, k, None if gain is None else gain.detach(), training=True)
        total = total + -torch.log2(likelihoods).sum()
    return total / (y.shape[0] * codec.rates)


def refit_entropy_model(codec: FeatureCodec, batches: Iterable, *, images: int = 1024, steps: int = 300,
                        seed: int = 0, device: torch.device | str = "cpu") -> dict[str, float]:
    """Fit every density of ``codec`` to its transform's latent on ``images`` training images
    (``steps`` Adam steps, at most :data:`PASSES` passes over the stored batches of latents, one
    batch per step), then the quantiles, then rebuild the coding tables. Returns the mean bits per
    image the densities charged before and after, the images and the steps taken."""
    device = torch.device(device)
    codec.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the images' augmentation and the training noise, so the fit, are the same on every run
    try:
        return fit_entropy_model(codec, _latents(codec, batches, images, device), steps)
    finally:
        torch.random.set_rng_state(generator_state)
        for p in codec.prior_parameters():
            p.grad = None


def fit_entropy_model(codec: FeatureCodec, latents: list[Tensor], steps: int,
                      passes: int = PASSES) -> dict[str, float]:
    """Fit every density to the transform outputs ``latents`` (one per Adam step, cycling, at most
    ``passes`` passes), then the quantiles, then rebuild the tables: the refit's work, also how the
    encode benchmark gives an untrained codec the priors a trained one would have."""
    steps = min(steps, passes * len(latents))
    if steps < 1:
        return {}
    densities, quantiles = split_codec_params(codec.priors)
    with torch.no_grad():
        before = sum(float(_bits(codec, y)) for y in latents) / len(latents)
    for params, loss_of, lr in ((densities, lambda y: _bits(codec, y), DENSITY_LR),
                                (quantiles, lambda y: codec.aux_loss(), QUANTILE_LR)):
        opt = torch.optim.Adam(params, lr=lr)
        for step in range(steps):
            loss = loss_of(latents[step % len(latents)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        after = sum(float(_bits(codec, y)) for y in latents) / len(latents)
    codec.update(force=True)
    return {"bits_before": before, "bits_after": after, "images": sum(y.shape[0] for y in latents), "steps": steps}
