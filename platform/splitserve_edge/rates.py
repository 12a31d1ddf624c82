"""Every rate a codec codes at: per-rate gains and coding tables, and the coder that uses them.

A variable-rate codec has one encoder transform and K operating points. Rate k scales the latent
by a per-channel gain g_k, rounds it around rate k's medians and entropy-codes it with rate k's
tables; the server undoes the gain (an inverse gain it learned, not here). The transform runs
once, so coding one image at several rates costs a gain, a rounding and an ANS pass each — which
is what lets a device pick, per image, the largest payload that fits its link (:meth:`RateCoder.within`).

Rates are indexed in order of size: 0 is the smallest payload. A single-rate codec is the case
K = 1 without a gain, and its files and bitstreams are exactly those of :class:`CodingTables`.
Both ends multiply by the same float32 gains read from the same file, so the PyTorch edge and
the torch-free one produce identical bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .coder import CoderError, CodingTables, EntropyCoder, load_arrays
from .errors import SplitserveError

__all__ = ["BudgetError", "RateCoder", "RateTables", "is_rate_index"]


class BudgetError(SplitserveError, ValueError):
    """No rate codes an image within the byte budget asked for.

    ``image`` is the image's index in its batch and ``smallest`` the bytes its lowest rate needs
    (the bitstream for :meth:`RateCoder.within`, the whole one-image payload for
    :mod:`splitserve_edge.packing`), so a caller can say what budget would have worked.
    """

    def __init__(self, message: str, *, image: int | None = None, smallest: int | None = None):
        super().__init__(message)
        self.image, self.smallest = image, smallest



def is_rate_index(rate: object, count: int) -> bool:
    """True when ``rate`` is an integer index into ``count`` rates. The one range rule of the
    codec, the coder and the packer (each words its own error); a bool is not an index."""
    return not isinstance(rate, bool) and isinstance(rate, (int, np.integer)) and 0 <= rate < count

@dataclass(frozen=True, eq=False)
class RateTables:
    """K rates' coding tables, plus their gains (float32 (K, C)) when K > 1."""

    tables: tuple[CodingTables, ...]
    gains: np.ndarray | None = None

    def __post_init__(self) -> None:
        tables = tuple(self.tables)
        if not tables or not all(isinstance(t, CodingTables) for t in tables):
            raise CoderError("rate tables: at least one CodingTables is required")
        channels = {t.channels for t in tables}
        if len(channels) != 1:
            raise CoderError(f"rate tables disagree on the channel count: {sorted(channels)}")
        gains = self.gains
        if len(tables) == 1 and gains is None:
            object.__setattr__(self, "tables", tables)
            return
        if gains is None:
            raise CoderError(f"{len(tables)} rates need a gain vector each")
        arr = np.asarray(gains)
        if arr.dtype.kind != "f" or arr.shape != (len(tables), tables[0].channels):
            raise CoderError(f"rate tables: gains must be float32 ({len(tables)}, {tables[0].channels}), "
                             f"got {arr.dtype} {arr.shape}")
        arr = np.array(arr, dtype=np.float32, copy=True)
        if not np.isfinite(arr).all() or (arr <= 0).any():
            raise CoderError("rate tables: gains must be finite and positive")
        arr.setflags(write=False)
        object.__setattr__(self, "tables", tables)
        object.__setattr__(self, "gains", arr)

    def __len__(self) -> int:
        return len(self.tables)

    @property
    def channels(self) -> int:
        return self.tables[0].channels

    # -- portable files (safetensors) ----------------------------------------------------------
    def to_bytes(self) -> bytes:
        """One rate: the :class:`CodingTables` file unchanged. K rates: ``{k}.{field}`` + ``gains``."""
        if self.gains is None:
            return self.tables[0].to_bytes()
        from safetensors.numpy import save

        arrays = {f"{k}.{name}": np.ascontiguousarray(v) for k, t in enumerate(self.tables)
                  for name, v in t.arrays().items()}
        arrays["gains"] = np.ascontiguousarray(self.gains)
        # one metadata key: safetensors writes a map's keys in a random order, and the file's
        # SHA-256 (edge.json) must not change from one export of the same codec to the next
        return save(arrays, metadata={"format": "splitserve-coding"})

    @classmethod
    def from_bytes(cls, data: bytes) -> "RateTables":
        arrays = load_arrays(data)
        if "gains" not in arrays:
            return cls((CodingTables.from_arrays(arrays),))
        gains = arrays["gains"]
        if gains.ndim != 2 or not 1 <= gains.shape[0] <= 64:
            raise CoderError(f"coding tables: gains must be (K, C) with 1 <= K <= 64, got {gains.shape}")
        return cls(tuple(CodingTables.from_arrays(arrays, f"{k}.") for k in range(gains.shape[0])), gains)

    def digest(self) -> str:
        """SHA-256 (hex); one rate: :meth:`CodingTables.digest` (what single-rate exports always had)."""
        if self.gains is None:
            return self.tables[0].digest()
        h = hashlib.sha256()
        for t in self.tables:
            h.update(bytes.fromhex(t.digest()))
        h.update(f"gains|{self.gains.dtype.str}|{self.gains.shape}|".encode())
        h.update(self.gains.tobytes())
        return h.hexdigest()


class RateCoder:
    """Codes float latents at any of a codec's rates (the one implementation both edges and the server use)."""

    def __init__(self, tables: RateTables):
        if not isinstance(tables, RateTables):
            raise CoderError(f"RateCoder needs RateTables, got {type(tables).__name__}")
        self.tables = tables
        self.coders = [EntropyCoder(t) for t in tables.tables]
        self._gains = None if tables.gains is None else tables.gains.reshape(len(tables), -1, 1, 1)

    def __len__(self) -> int:
        return len(self.coders)

    @property
    def variable(self) -> bool:
        """True for a variable-rate codec: its payloads name each image's rate (format v3)."""
        return self._gains is not None

    def check_rate(self, rate: int) -> int:
        if not is_rate_index(rate, len(self)):
            raise CoderError(f"rate index {rate!r} is outside this codec's rates 0..{len(self) - 1}")
        return int(rate)

    def symbols(self, y: np.ndarray, rate: int = 0) -> np.ndarray:
        """A float latent (C, H, W) or (N, C, H, W) → the integers rate ``rate`` codes it as."""
        rate = self.check_rate(rate)
        y = np.asarray(y, dtype=np.float32)
        if self._gains is not None:
            y = y * self._gains[rate]
        return self.coders[rate].symbols(y)

    def encode(self, y: np.ndarray, rates: int | Sequence[int] = 0) -> list[bytes]:
        """(N, C, H, W) float latents → one bitstream per image, image i at ``rates[i]`` (or all at one rate)."""
        y = np.asarray(y, dtype=np.float32)
        if y.ndim != 4:
            raise CoderError(f"expected a batch of latents (N, C, H, W), got shape {y.shape}")
        per_image = [rates] * len(y) if isinstance(rates, (int, np.integer)) else list(rates)
        if len(per_image) != len(y):
            raise CoderError(f"{len(per_image)} rate indices for {len(y)} images")
        per_image = [self.check_rate(r) for r in per_image]  # before any index: -1 is not the last rate
        return [self.coders[r].encode(self.symbols(yi, r)) for yi, r in zip(y, per_image)]

    def within(self, y: np.ndarray, budgets: Sequence[int]) -> tuple[list[int], list[bytes]]:
        """Per image, the highest rate whose bitstream has at most ``budgets[i]`` bytes, and that bitstream.

        A binary search over the rates (about log2 K codings per image rather than K). It relies
        on bitstreams growing with the rate index, as a trained codec's do (the gains rise with
        the index; tests compare it with an exhaustive scan). Raises :class:`BudgetError` when
        even rate 0 does not fit.
        """
        y = np.asarray(y, dtype=np.float32)
        if y.ndim != 4 or len(budgets) != len(y):
            raise CoderError(f"expected (N, C, H, W) latents and N budgets, got {y.shape} and {len(budgets)}")
        rates, strings = [], []
        for i, (yi, budget) in enumerate(zip(y, budgets)):
            best: tuple[int, bytes] | None = None
            low, high = 0, len(self) - 1
            while low <= high:
                mid = (low + high) // 2
                data = self.coders[mid].encode(self.symbols(yi, mid))
                if len(data) <= budget:
                    best, low = (mid, data), mid + 1
                else:
                    high = mid - 1
            if best is None:  # the search's last probe was rate 0: ``data`` is its bitstream
                raise BudgetError(f"image {i}: even the lowest rate needs {len(data)} bytes, more than its "
                                  f"{budget}-byte budget", image=i, smallest=len(data))
            rates.append(best[0])
            strings.append(best[1])
        return rates, strings

    def decode(self, data: bytes, shape: tuple[int, int, int], rate: int = 0) -> np.ndarray:
        """Bytes → the gained latent rate ``rate`` rebuilds (symbols + medians, float32), or CoderError."""
        coder = self.coders[self.check_rate(rate)]
        return coder.dequantize(coder.decode(data, shape))
