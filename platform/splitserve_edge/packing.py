"""Float latents → one payload, each image at a fixed rate or at the highest rate that fits a byte budget.

Both device sides run their encoder transform — PyTorch in ``splitserve.edge.EdgeEncoder``, ONNX
Runtime or ExecuTorch in :class:`~splitserve_edge.runtime.EdgeModel` — and hand the float latents
to a :class:`Packer`. Everything after the transform (gain, rounding, entropy coding, the rate
choice and the container) is this one code path, so the two produce the same bytes by
construction and the budget rule exists once.

The budget is per image and counts what a device sends for that image alone: header, bitstream
and CRC of a one-image payload. The transform runs once; the search codes the latent at about
log2 K + 1 rates (:meth:`RateCoder.within`). A single-rate codec has one rate, 0, and its payloads
stay format v2 byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

import numpy as np

from .errors import SplitserveError
from .payload import Payload, fingerprint_id, varint_size
from .rates import BudgetError, RateCoder, is_rate_index

__all__ = ["BudgetError", "Packer", "image_names"]


class Packer:
    """Codes float latents into a payload for one codec (its :class:`RateCoder` and fingerprint)."""

    def __init__(self, coder: RateCoder, fingerprint: str | bytes, latent_channels: int, default_rate: int = 0):
        self.coder = coder
        self.fingerprint = fingerprint_id(fingerprint)
        self.latent_channels = int(latent_channels)
        self.default_rate = self.check_rate(default_rate)

    @property
    def rates(self) -> int:
        return len(self.coder)

    def check_rate(self, rate: int) -> int:
        """``rate`` as an int, or an error naming the bundle's range (the CLIs print it as is)."""
        if not is_rate_index(rate, self.rates):
            kind = "a single-rate bundle codes at rate 0 only" if self.rates == 1 else "0 is the smallest payload"
            raise SplitserveError(f"rate {rate!r} is outside this bundle's rates 0..{self.rates - 1} ({kind})")
        return int(rate)

    def encode(self, latents: np.ndarray, original_sizes: Sequence[tuple[int, int]], *, rate: int | None = None,
               max_bytes: int | None = None, names: Sequence[str] | None = None) -> Payload:
        """(N, C, H, W) float latents → one payload: every image at ``rate`` (default: the bundle's
        default rate) or, with ``max_bytes``, each at the highest rate whose one-image payload has
        at most that many bytes (:class:`BudgetError` when even rate 0 does not fit; ``names``
        name the images in its message)."""
        y = np.asarray(latents, dtype=np.float32)
        if y.ndim != 4 or y.shape[1] != self.latent_channels:
            raise SplitserveError(f"expected latents (N, {self.latent_channels}, H, W), got shape {y.shape}")
        sizes = [(int(h), int(w)) for h, w in original_sizes]
        latent_hw = (int(y.shape[2]), int(y.shape[3]))
        if max_bytes is None:
            fixed = self.default_rate if rate is None else self.check_rate(rate)
            rates, strings = [fixed] * len(y), self.coder.encode(y, fixed)
        elif rate is not None:
            raise SplitserveError("give a rate or a byte budget, not both")
        else:
            rates, strings = self._within(y, latent_hw, sizes, max_bytes, names)
        return self.pack(strings, latent_hw, sizes, rates)

    def pack(self, strings: Sequence[bytes], latent_hw: tuple[int, int], original_sizes: Sequence[tuple[int, int]],
             rates: Sequence[int] | None = None) -> Payload:
        """The container for bitstreams already coded, image i at ``rates[i]`` (default: all rate 0,
        what ``FeatureCodec.compress`` codes at): v3 for a variable-rate codec, v2 for a single-rate one."""
        rates = (0,) * len(strings) if rates is None else tuple(self.check_rate(r) for r in rates)
        return Payload(fingerprint=self.fingerprint, latent_shape=(self.latent_channels, *map(int, latent_hw)),
                       original_sizes=tuple((int(h), int(w)) for h, w in original_sizes), strings=tuple(strings),
                       rates=rates if self.coder.variable else None)

    def _fixed(self, latent_hw: tuple[int, int], size: tuple[int, int]) -> int:
        """A one-image payload's bytes besides its bitstream and the bitstream's length varint
        (taken from the container itself, so the layout is written once, in payload.py)."""
        return self.pack([b"\0"], latent_hw, [size]).overhead_bytes - varint_size(1)

    def _within(self, y: np.ndarray, latent_hw: tuple[int, int], sizes: list[tuple[int, int]], max_bytes: int,
                names: Sequence[str] | None) -> tuple[list[int], list[bytes]]:
        """The budget on whole one-image payloads → each image's budget on its bitstream (the rest of
        its payload depends on its own original size) → :meth:`RateCoder.within`."""
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes < 1:
            raise SplitserveError(f"the byte budget must be a positive int, got {max_bytes!r}")
        fixed = [self._fixed(latent_hw, size) for size in sizes]
        try:
            return self.coder.within(y, [_longest_string(int(max_bytes), f) for f in fixed])
        except BudgetError as e:
            i = e.image
            smallest = fixed[i] + varint_size(e.smallest) + e.smallest
            name = names[i] if names is not None else f"image {i}"
            raise BudgetError(f"{name}: no rate fits {max_bytes} bytes; its smallest payload is {smallest} bytes "
                              f"(rate 0)", image=i, smallest=smallest) from None


def _longest_string(total: int, fixed: int) -> int:
    """The longest bitstream a one-image payload of at most ``total`` bytes carries (0: none): the
    length varint grows with the length, so step down until length + varint + the rest fit."""
    length = total - fixed - 1
    while length > 0 and fixed + varint_size(length) + length > total:
        length -= 1
    return max(length, 0)


def image_names(images: Sequence[object]) -> list[str]:
    """How messages name each image: its path when it has one, else its position."""
    return [str(im) if isinstance(im, (str, PathLike)) else f"image {i}" for i, im in enumerate(images)]
