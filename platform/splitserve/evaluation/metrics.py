"""Summaries of rate–accuracy curves: BD-rate (Bjøntegaard) and Δ-accuracy (Duan & Zhu).

Both are the mean gap between two interpolated curves over the range they share. Accuracy curves
saturate, and a single cubic polynomial through 4–5 such points swings between them: on the papers'
own ImageNet points it says Entropic Student needs 70 % *more* bits than WebP, where the data show
about 66 % fewer (``tests/test_evaluate.py``). As current video-coding practice does (the piecewise
cubic Bjøntegaard variant), each curve is interpolated with piecewise cubic Hermite, monotone
interpolation (PCHIP, :class:`scipy.interpolate.PchipInterpolator`), which passes through every
measured point and cannot overshoot between them; its integral is taken exactly.

- **Δ-accuracy** of B against anchor A (Duan & Zhu)::

      ΔAcc = 1/(r1 − r0) ∫_{r0}^{r1} (acc_B(r) − acc_A(r)) dr

  with rate r in *linear* bits per pixel and [r0, r1] the rate range both curves cover. In the
  accuracy's unit (percentage points).

- **BD-rate** of B against anchor A::

      BD = exp( 1/(a1 − a0) ∫_{a0}^{a1} (ln r_B(a) − ln r_A(a)) da ) − 1        (× 100 %)

  with ln r(a) interpolated over accuracy a and [a0, a1] the accuracy range both cover. −50 % = the
  same accuracy for half the bits. Rate as a function of accuracy is read off each curve's Pareto
  front: a point with more bits and no more accuracy than another (noise, saturation) is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.interpolate import PchipInterpolator


class CurveError(ValueError):
    """A curve has too few points, or two curves share no range."""


def _curve(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise CurveError("fewer than two points")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise CurveError("a curve has a non-finite value")
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if np.any(np.diff(x) <= 0):
        raise CurveError("two points at the same rate")
    return x, y


def mean_gap(xa, ya, xb, yb) -> float:
    """Mean of f_b − f_a over the x range both curves cover, f = PCHIP through each curve."""
    xa, ya = _curve(xa, ya)
    xb, yb = _curve(xb, yb)
    lo, hi = max(xa[0], xb[0]), min(xa[-1], xb[-1])
    if hi <= lo:
        raise CurveError("no shared range")
    fa, fb = PchipInterpolator(xa, ya), PchipInterpolator(xb, yb)
    return float((fb.integrate(lo, hi) - fa.integrate(lo, hi)) / (hi - lo))


def delta_accuracy(rate_a, acc_a, rate_b, acc_b) -> float:
    """Mean accuracy gain of curve B over anchor A at equal rate (linear bpp), in accuracy units."""
    return mean_gap(rate_a, acc_a, rate_b, acc_b)


def pareto_front(rate, acc) -> tuple[np.ndarray, np.ndarray]:
    """The points no other point beats (fewer or equal bits and at least the accuracy), by rate;
    along the front accuracy strictly rises with rate."""
    rate, acc = np.asarray(rate, dtype=float), np.asarray(acc, dtype=float)
    if rate.shape != acc.shape or rate.ndim != 1:
        raise CurveError("one accuracy per rate")
    order = np.lexsort((-acc, rate))  # by rate, the best accuracy first among equal rates
    keep_r, keep_a = [], []
    for r, a in zip(rate[order], acc[order]):
        if not keep_a or a > keep_a[-1]:
            if keep_r and r == keep_r[-1]:
                continue
            keep_r.append(r)
            keep_a.append(a)
    return np.array(keep_r), np.array(keep_a)


def bd_rate(rate_a, acc_a, rate_b, acc_b) -> float:
    """Bjøntegaard delta rate of B against anchor A at equal accuracy, in percent."""
    for r in (rate_a, rate_b):
        if np.any(np.asarray(r, dtype=float) <= 0):
            raise CurveError("BD-rate needs positive rates (it averages log-rates)")
    ra, aa = pareto_front(rate_a, acc_a)
    rb, ab = pareto_front(rate_b, acc_b)
    if min(len(ra), len(rb)) < 2:
        raise CurveError("fewer than two points on a Pareto front")
    return float((np.exp(mean_gap(aa, np.log(ra), ab, np.log(rb))) - 1.0) * 100.0)
