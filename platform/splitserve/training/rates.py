"""Variable-rate training: one codec, K rates, one rate per batch.

``distill --betas`` and ``train --joint --lmbdas`` build the codec with K rates (a gain and a prior
per rate around one transform, :class:`~splitserve.models.codec.FeatureCodec`) and weight each
batch's rate term by the weight of the rate it was coded at: ``β_k · bits`` or ``λ_k · bpp``.
``finetune`` on a variable-rate bundle draws the rate the same way, so its heads learn every rate.

The rate of a training step is drawn uniformly from the K rates by a generator seeded with
(``--seed``, global step) alone — like the data order, which depends on (seed, epoch) alone — so a
run resumed from a checkpoint draws exactly the rates the uninterrupted run draws, and every process
of a torchrun job draws the same rate for the same step (one batch, one rate, across processes).

Rate 0 is the smallest payload: the weights are sorted so that rate 0 has the largest β (or λ).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from ..errors import SplitserveError
from .sampling import mix_seed

_RATE_STREAM = 0x4A7E  # keeps the rate draws apart from the other seeded streams


def rate_weights(single: float | None, several: Sequence[float] | None, flag: str) -> list[float]:
    """The run's rate weights, rate 0 first: ``[single]`` (``--beta``), or ``several`` (``--betas``,
    at least two different values >= 0) sorted from the largest (smallest payload) down."""
    if (single is None) == (several is None):
        raise SplitserveError(f"give --{flag} W (one rate) or --{flag}s W1,W2,... (a variable-rate codec), "
                              "exactly one of them")
    values = [float(single)] if several is None else [float(v) for v in several]
    if several is not None and len(values) < 2:
        raise SplitserveError(f"--{flag}s needs at least two values (for one rate use --{flag})")
    if any(not v >= 0 for v in values):
        raise SplitserveError(f"--{flag}{'s' if several is not None else ''} must be >= 0, got "
                              f"{','.join(map(str, values))}")
    if len(set(values)) != len(values):
        raise SplitserveError(f"--{flag}s: every rate needs its own value, got {','.join(map(str, values))}")
    return sorted(values, reverse=True)


class RateDraw:
    """The rate of each training step: uniform over the K rates, a function of (seed, step) only."""

    def __init__(self, rates: int, seed: int):
        self.rates = int(rates)
        self.seed = int(seed)

    def at(self, step: int) -> int:
        """The rate of global step ``step`` (0-based); 0 for a single-rate codec (no draw)."""
        if self.rates == 1:
            return 0
        g = torch.Generator().manual_seed(mix_seed(self.seed, step, _RATE_STREAM))
        return int(torch.randint(self.rates, (1,), generator=g))


class PerStepRate:
    """Mixin of an :class:`~splitserve.training.objective.Objective` on a codec: ``self.rate`` is the
    rate of the current training step, drawn in ``begin_step`` (which the engine calls)."""

    rate: int = 0

    def draw_rates(self, rates: int, seed: int, weights: float | Sequence[float] | None = None) -> list[float]:
        """Draw one of ``rates`` rates per step (:class:`RateDraw` with ``seed``). ``weights``, the
        rate term's weight or one per rate (rate 0 first), come back as one per rate; an objective
        with a rate term trains the gains, and a step trains only its rate's, so DDP must look for
        parameters without a gradient."""
        self.draw = RateDraw(rates, seed)
        self.rate = 0
        if weights is None:
            return []
        out = [float(w) for w in (weights if isinstance(weights, Sequence) else [weights])]
        if len(out) != rates:
            raise SplitserveError(f"{len(out)} rate weights for a codec with {rates} rates")
        self.unused_parameters = rates > 1
        return out

    def begin_step(self, step: int) -> None:
        self.rate = self.draw.at(step)

    def prior_fit(self, out, rate: int, weights: Sequence[float], measure: Callable) -> dict[str, torch.Tensor]:
        """``{"prior_fit": Σ_k w_k · measure(rate k's likelihoods)}`` over the rates other than ``rate``,
        the one ``out`` was coded at (:meth:`~splitserve.models.codec.FeatureCodec.fit_priors`: the
        latent and gains detached), with ``measure`` and ``weights`` those of the coded rate's term,
        so each density learns every step as if its rate were drawn; ``{}`` when there is nothing to
        fit (one rate, a shared prior, eval mode). It counts in the logged ``loss``, which is what
        the main and prior optimizers minimise."""
        fits = self.codec.fit_priors(out.latent, rate)
        if not fits:
            return {}
        return {"prior_fit": sum(weights[k] * measure(replace(out, likelihoods=lik)) for k, lik in fits.items())}


def rate_logs(rate: int, rates: int, term: torch.Tensor, bpp: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a variable-rate step logs beside its loss terms, so learning curves can be drawn per
    rate: the rate it drew (``rate_index``) and that rate's weighted rate term and bpp under
    rate-named keys (``rate_rK``, ``bpp_rK``). Nothing for a single-rate codec."""
    if rates == 1:
        return {}
    return {"rate_index": torch.tensor(float(rate)), f"rate_r{rate}": term.detach(), f"bpp_r{rate}": bpp.detach()}


def per_rate(metrics: Sequence[dict[str, float]], default_rate: int) -> dict[str, float]:
    """One dict of validation metrics from one per rate: every value under ``KEY_rK``, and the
    default rate's under the plain ``KEY`` (what a device codes at unless told otherwise). A
    single rate's metrics come back as they are."""
    if len(metrics) == 1:
        return dict(metrics[0])
    out = dict(metrics[default_rate])
    for k, values in enumerate(metrics):
        out.update({f"{key}_r{k}": v for key, v in values.items()})
    return out


def every_rate(codec, default_rate: int, evaluate: Callable[[Callable], dict[str, float]],
               metric: str | None = None, measured: Sequence[dict[str, float]] | None = None) -> dict[str, float]:
    """``evaluate(features)`` on the real coding path at every rate of ``codec`` (with what each rate
    was ``measured`` to cost merged in), as :func:`per_rate` gives them; with ``metric``, also the
    mean over the rates of ``metric`` as ``METRIC_mean`` (what selects the best epoch when the heads
    serve every rate)."""
    from .common import coded_features

    per = [{k: float(v) for k, v in evaluate(coded_features(codec, rate)).items()} for rate in range(codec.rates)]
    for metrics, cost in zip(per, measured or ()):
        metrics.update(cost)
    out = per_rate(per, default_rate)
    if metric is not None and codec.rates > 1:
        out[f"{metric}_mean"] = sum(m[metric] for m in per) / len(per)
    return out


def is_per_rate(key: str) -> bool:
    """Whether a metric's name is one rate's (``KEY_rK``, see :func:`per_rate`)."""
    head, sep, tail = key.rpartition("_r")
    return bool(sep and head and tail.isdigit())


def rate_entries(metrics: dict[str, float], rates: int, weight: str, weights: Sequence[float]) -> list[dict]:
    """The manifest's ``rates`` (one entry per rate: its β or λ and its measured payload bytes and
    bpp, as ``platform evaluate`` measures them) from :func:`per_rate`'s metrics; [] for one rate."""
    if rates == 1:
        return []
    return [{weight: float(weights[k]), "bytes_per_image": metrics[f"bytes_r{k}"],
             "bpp": metrics[f"payload_bpp_r{k}"]} for k in range(rates)]
