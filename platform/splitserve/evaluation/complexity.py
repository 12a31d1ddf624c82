"""Device-side complexity: parameters, multiply–accumulates (MACs) and latency at a fixed thread count.

MACs are counted with forward hooks, no extra dependency: a convolution costs
``out elements × in_channels/groups × kernel area``, a transposed convolution
``in elements × out_channels/groups × kernel area``, a linear layer ``out elements × in_features``,
and a (simplified) GDN — a 1×1 convolution over channels inside — ``elements × channels``.
Element-wise work (activations, additions, rounding) and entropy coding are not counted as MACs;
entropy coding is in the measured latency.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from ..bench.timing import median_ms

try:  # compressai's GDN (and its simplified GDN1 subclass) computes a 1x1 conv functionally
    from compressai.layers import GDN as _GDN
except ImportError:  # pragma: no cover
    _GDN = ()


def count_parameters(modules: Iterable[nn.Module | None]) -> int:
    """Parameters of the given modules (each counted once)."""
    seen: set[int] = set()
    total = 0
    for m in modules:
        if m is None:
            continue
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def _macs_of(m: nn.Module, inputs, out) -> int:
    if isinstance(m, nn.Conv2d):
        k = m.kernel_size[0] * m.kernel_size[1]
        return out.numel() * (m.in_channels // m.groups) * k
    if isinstance(m, nn.ConvTranspose2d):
        k = m.kernel_size[0] * m.kernel_size[1]
        return inputs[0].numel() * (m.out_channels // m.groups) * k
    if isinstance(m, nn.Linear):
        return out.numel() * m.in_features
    if _GDN and isinstance(m, _GDN):
        return out.numel() * out.shape[1]
    return 0


def count_macs(modules: Iterable[nn.Module], fn: Callable[[], object]) -> int:
    """MACs of every convolution, linear layer and GDN inside ``modules`` while ``fn()`` runs once."""
    total = 0

    def hook(m, inputs, out):
        nonlocal total
        total += _macs_of(m, inputs, out)

    kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear) + ((_GDN,) if _GDN else ())
    handles = [sub.register_forward_hook(hook) for m in modules for sub in m.modules() if isinstance(sub, kinds)]
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in handles:
            h.remove()
    return total


@contextlib.contextmanager
def threads(k: int) -> Iterator[None]:
    """``torch.set_num_threads(k)`` for the block (every latency of a study uses the same k)."""
    before = torch.get_num_threads()
    torch.set_num_threads(k)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def latency_ms(fn: Callable[[], object], threads_: int, repeat: int) -> float:
    """Median wall time of ``fn`` (batch 1) in ms at ``threads_`` torch threads, after a warm-up."""
    with threads(threads_), torch.inference_mode():
        return median_ms(fn, repeat=repeat)
