"""Summaries of rate–accuracy curves: BD-rate (Bjøntegaard) and Δ-accuracy (Duan & Zhu).

Both integrate an interpolated curve over the range two curves share. Accuracy curves saturate,
and a single cubic polynomial through 4–5 points then swings, giving wrong signs (on the papers'
own ImageNet points: see ``tests/test_evaluate.py``). As current video-coding practice does, the
curves are interpolated piecewise with monotone cubics (PCHIP, ``scipy.interpolate``), which
cannot overshoot between measured points.

- **BD-rate** of B against anchor A: the mean of log(rate_B / rate_A) at equal accuracy, over the
  accuracy range both curves cover, reported as a percentage (−50 % = half the bits).
- **Δ-accuracy** of B against A: the mean of accuracy_B − accuracy_A at equal rate, over the rate
  range both cover, with rate in *linear* bpp (Duan & Zhu).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.interpolate import PchipInterpolator
from scipy.integrate import quad


class CurveError(ValueError):
    """A curve has too few points, or two curves share no range."""


def _curve(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.size < 2:
        raise CurveError("a curve needs at least two (rate, accuracy) points")
    order = np.argsort(x)
    x, y = x[order], y[order]
    if np.any(np.diff(x) <= 0):
        raise CurveError("rates (or accuracies) along a curve must be distinct")
    return x, y


def _mean_over_overlap(xa, ya, xb, yb) -> float:
    """Mean of f_b − f_a over the x range both cover (PCHIP through each curve)."""
    xa, ya = _curve(xa, ya)
    xb, yb = _curve(xb, yb)
    lo, hi = max(xa[0], xb[0]), min(xa[-1], xb[-1])
    if hi <= lo:
        raise CurveError("the two curves share no range")
    fa, fb = PchipInterpolator(xa, ya), PchipInterpolator(xb, yb)
    area, _ = quad(lambda x: float(fb(x) - fa(x)), lo, hi, limit=200)
    return area / (hi - lo)


def delta_accuracy(rate_a, acc_a, rate_b, acc_b) -> float:
    """Mean accuracy gain of curve B over anchor A at equal rate (linear bpp), in accuracy units."""
    return _mean_over_overlap(rate_a, acc_a, rate_b, acc_b)


def bd_rate(rate_a, acc_a, rate_b, acc_b) -> float:
    """Bjøntegaard delta rate of B against anchor A at equal accuracy, in percent.

    Rate is interpolated (in log space) as a function of accuracy; points whose accuracy repeats
    (a saturated curve) keep their lowest rate.
    """
    def as_function_of_accuracy(rate, acc):
        rate, acc = np.asarray(rate, dtype=float), np.asarray(acc, dtype=float)
        best: dict[float, float] = {}
        for r, a in zip(rate, acc):
            best[a] = min(r, best.get(a, np.inf))
        a = np.array(sorted(best))
        return a, np.log(np.array([best[v] for v in a]))

    aa, la = as_function_of_accuracy(rate_a, acc_a)
    ab, lb = as_function_of_accuracy(rate_b, acc_b)
    return float((np.exp(_mean_over_overlap(aa, la, ab, lb)) - 1.0) * 100.0)
