"""The entropy coder both ends use: ANS from ``constriction`` (Rust), driven by the learned prior.

Why this coder. The server decodes bytes that anyone can send, so its decoder must be memory-safe
on any input; CompressAI's C++ rANS decoder reads past the end of short strings (a 27-byte payload
crashed the gateway). ``constriction`` is written in Rust: garbage in gives a wrong latent or an
error, never a crash. Its wheel needs only numpy, so a device encodes without torch, and it codes a
24×55×55 latent in the same bytes as CompressAI's rANS, faster.

The probabilities. CompressAI's ``EntropyBottleneck`` stays the training-time model of the rate;
after ``update()`` its coding tables (``quantized_cdf``, ``cdf_length``, ``offset``, and the
medians the latent is rounded around) are exported as :class:`CodingTables`. Channel ``c`` is coded
with one categorical model whose probabilities are the differences of its 16-bit CDF, so the
rate the prior predicts is the rate devices pay.

Escapes. A symbol ``s = round(y - median)`` has table index ``i = s - offset[c]``; the table covers
``0 <= i < cdf_length[c] - 1`` and its last entry is the escape. An index outside the table is
coded as the escape, followed by the zig-zag value ``v`` (``-2i-1`` below the table,
``2(i-max)`` above) in Elias-gamma form: its bit length ``n`` (uniform over 0..32), then its ``n``
bits, 16 at a time. Any int32 latent value codes, at bounded cost per element.

Stream. One ANS stack per image, words of 32 bits written little-endian: main symbols in
channel-major order, then the escape values in the same order. The decoder reads exactly
``C·H·W`` symbols plus the escapes they announce, and refuses a stream with words left over, an
impossible escape length, or a length that is not a whole number of words (:class:`CoderError`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from constriction import stream as _stream  # a compiled module: its submodules are attributes

Categorical = _stream.model.Categorical
Uniform = _stream.model.Uniform
AnsCoder = _stream.stack.AnsCoder

from .errors import PayloadError

PRECISION = 16  # CompressAI's CDF tables are 16-bit fixed point
MAX_ESCAPE_BITS = 32
_LENGTH_MODEL = Uniform(MAX_ESCAPE_BITS + 1)
_CHUNK = 16
_CHUNK_MODEL = Uniform(1 << _CHUNK)


class CoderError(PayloadError):
    """Coding tables or a bitstream are invalid (for a payload: the gateway answers 400)."""


@dataclass(frozen=True, eq=False)
class CodingTables:
    """The prior's coding tables, as numpy arrays (the portable form of a trained prior).

    ``quantized_cdf`` int32 (C, L): row c holds a CDF of ``cdf_length[c]`` entries from 0 to 2**16
    (the rest is padding); ``offset`` int32 (C,): the symbol of table index 0; ``medians``
    float32 (C,): the centres latents are rounded around.
    """

    quantized_cdf: np.ndarray
    cdf_length: np.ndarray
    offset: np.ndarray
    medians: np.ndarray

    def __post_init__(self) -> None:
        cdf = _array(self.quantized_cdf, np.int32, 2, "quantized_cdf")
        c = cdf.shape[0]
        lengths = _array(self.cdf_length, np.int32, 1, "cdf_length")
        offset = _array(self.offset, np.int32, 1, "offset")
        medians = _array(self.medians, np.float32, 1, "medians")
        if c < 1 or not (lengths.shape == offset.shape == medians.shape == (c,)):
            raise CoderError(f"coding tables disagree on the channel count: cdf {cdf.shape}, lengths {lengths.shape}, "
                             f"offset {offset.shape}, medians {medians.shape}")
        if (lengths < 3).any() or (lengths > cdf.shape[1]).any():
            raise CoderError(f"cdf_length must be in [3, {cdf.shape[1]}]")
        if not np.isfinite(medians).all():
            raise CoderError("medians must be finite")
        for ch in range(c):
            row = cdf[ch, : lengths[ch]]
            if row[0] != 0 or row[-1] != 1 << PRECISION or (np.diff(row) < 0).any():
                raise CoderError(f"channel {ch}: not a {PRECISION}-bit CDF (must rise from 0 to {1 << PRECISION})")
        for name, value in (("quantized_cdf", cdf), ("cdf_length", lengths), ("offset", offset), ("medians", medians)):
            value.setflags(write=False)
            object.__setattr__(self, name, value)

    @property
    def channels(self) -> int:
        return int(self.cdf_length.shape[0])

    # -- portable files (safetensors: no pickle, readable anywhere) ------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        return {"quantized_cdf": self.quantized_cdf, "cdf_length": self.cdf_length, "offset": self.offset,
                "medians": self.medians}

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        return save({k: np.ascontiguousarray(v) for k, v in self.arrays().items()}, metadata={"format": "splitserve-coding"})

    @classmethod
    def from_bytes(cls, data: bytes) -> "CodingTables":
        from safetensors.numpy import load

        try:
            arrays = load(bytes(data))
        except Exception as e:  # noqa: BLE001 — safetensors raises its own error types
            raise CoderError(f"not a coding-tables file ({type(e).__name__})") from None
        missing = {"quantized_cdf", "cdf_length", "offset", "medians"} - set(arrays)
        if missing:
            raise CoderError(f"coding tables lack {', '.join(sorted(missing))}")
        return cls(**{k: arrays[k] for k in ("quantized_cdf", "cdf_length", "offset", "medians")})

    def to_file(self, path) -> None:
        with open(path, "wb") as f:
            f.write(self.to_bytes())

    @classmethod
    def from_file(cls, path) -> "CodingTables":
        with open(path, "rb") as f:
            return cls.from_bytes(f.read())

    def digest(self) -> str:
        """SHA-256 over the tables' canonical bytes (dtype, shape, values of each array)."""
        h = hashlib.sha256()
        for name, value in self.arrays().items():
            h.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
            h.update(np.ascontiguousarray(value).tobytes())
        return h.hexdigest()


def _array(value, dtype, ndim: int, name: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != ndim or arr.dtype.kind not in ("i", "u", "f") or (np.dtype(dtype).kind == "i" and arr.dtype.kind == "f"):
        raise CoderError(f"coding tables: {name} must be a {ndim}-D {np.dtype(dtype).name} array, got {arr.dtype} {arr.shape}")
    out = arr.astype(dtype)
    if np.dtype(dtype).kind == "i" and not np.array_equal(out, arr):
        raise CoderError(f"coding tables: {name} does not fit {np.dtype(dtype).name}")
    return np.array(out, copy=True)


class EntropyCoder:
    """Encode/decode integer latents (C, H, W) with one categorical model per channel."""

    def __init__(self, tables: CodingTables):
        self.tables = tables
        self._models = []
        self._escape = []  # table index of each channel's escape symbol
        for ch in range(tables.channels):
            n = int(tables.cdf_length[ch])
            pmf = np.diff(tables.quantized_cdf[ch, :n].astype(np.float64))
            self._models.append(Categorical(pmf, perfect=False))
            self._escape.append(n - 2)
        self._offset = tables.offset.astype(np.int64)

    # -- symbols <-> latents ----------------------------------------------------------------------
    def symbols(self, y: np.ndarray) -> np.ndarray:
        """The integers a float latent (C, H, W) or (N, C, H, W) is coded as: round(y - median)
        (half to even, as ``torch.round``)."""
        med = self.tables.medians.reshape((-1, 1, 1))
        return np.rint(np.asarray(y, dtype=np.float32) - med).astype(np.int32)

    def dequantize(self, symbols: np.ndarray) -> np.ndarray:
        """The latent the server rebuilds: symbols + median (float32)."""
        med = self.tables.medians.reshape((-1, 1, 1))
        return (np.asarray(symbols, dtype=np.float32) + med).astype(np.float32)

    # -- coding -------------------------------------------------------------------------------------
    def encode(self, symbols: np.ndarray) -> bytes:
        """One image's int32 symbols (C, H, W) → bytes."""
        sym = np.asarray(symbols)
        if sym.ndim != 3 or sym.shape[0] != self.tables.channels:
            raise CoderError(f"expected symbols of shape ({self.tables.channels}, H, W), got {sym.shape}")
        if sym.dtype.kind not in ("i", "u"):
            raise CoderError(f"symbols must be integers, got {sym.dtype}")
        coder = AnsCoder()
        index = sym.reshape(sym.shape[0], -1).astype(np.int64) - self._offset[:, None]
        escapes = []  # (channel, zig-zag value) in decoding order
        mains = []
        for ch in range(sym.shape[0]):
            top = self._escape[ch]
            idx = index[ch]
            out = (idx < 0) | (idx >= top)
            if out.any():
                vals = idx[out]
                escapes.append(np.where(vals < 0, -2 * vals - 1, 2 * (vals - top)))
                idx = np.where(out, top, idx)
            mains.append(idx.astype(np.int32))
        # a stack: push in reverse of the decoding order (escapes are read after all main symbols)
        for zz in reversed(escapes):
            for v in zz[::-1]:
                _push_escape(coder, int(v))
        for ch in range(sym.shape[0] - 1, -1, -1):
            coder.encode_reverse(mains[ch], self._models[ch])
        words = coder.get_compressed()
        return words.astype("<u4").tobytes()

    def encode_batch(self, symbols: np.ndarray) -> list[bytes]:
        """(N, C, H, W) → one byte string per image."""
        return [self.encode(s) for s in np.asarray(symbols)]

    def decode(self, data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
        """Bytes → int32 symbols of ``shape`` = (C, H, W), or :class:`CoderError`.

        Safe on any input: the work is bounded by ``C·H·W`` (plus at most 3 words per escape, and
        escapes are at most one per element), and nothing is read outside ``data``.
        """
        c, h, w = (int(v) for v in shape)
        if c != self.tables.channels or h < 1 or w < 1:
            raise CoderError(f"latent shape {shape} does not fit {self.tables.channels}-channel tables")
        raw = bytes(data)
        if not raw or len(raw) % 4:
            raise CoderError(f"a bitstream is a whole number of 32-bit words, got {len(raw)} bytes")
        words = np.frombuffer(raw, dtype="<u4").astype(np.uint32)
        try:
            coder = AnsCoder(words)
            out = np.empty((c, h * w), dtype=np.int64)
            for ch in range(c):
                out[ch] = coder.decode(self._models[ch], h * w)
            for ch in range(c):
                top = self._escape[ch]
                hits = np.flatnonzero(out[ch] == top)
                for k in hits:
                    zz = _pop_escape(coder)
                    out[ch, k] = -(zz + 1) // 2 if zz % 2 else top + zz // 2
            if not coder.is_empty():
                raise CoderError("bitstream has data left over after the latent")
        except CoderError:
            raise
        except Exception as e:  # noqa: BLE001 — constriction reports a corrupt stream as ValueError/AssertionError
            raise CoderError(f"corrupt bitstream ({type(e).__name__})") from None
        symbols = out + self._offset[:, None]
        if (symbols < np.iinfo(np.int32).min).any() or (symbols > np.iinfo(np.int32).max).any():
            raise CoderError("decoded value out of the int32 range")
        return symbols.astype(np.int32).reshape(c, h, w)


def _push_escape(coder: AnsCoder, value: int) -> None:
    """Push Elias-gamma parts so that a decoder pops: bit length, then 16-bit chunks high to low."""
    n = value.bit_length()
    chunks = [(value >> s) & 0xFFFF for s in range(0, n, _CHUNK)]  # low to high: the high chunk is popped first
    for chunk in chunks:
        coder.encode_reverse(np.array([chunk], dtype=np.int32), _CHUNK_MODEL)
    coder.encode_reverse(np.array([n], dtype=np.int32), _LENGTH_MODEL)


def _pop_escape(coder: AnsCoder) -> int:
    n = int(coder.decode(_LENGTH_MODEL, 1)[0])
    if n > MAX_ESCAPE_BITS:
        raise CoderError(f"escape of {n} bits")
    value = 0
    chunks = (n + _CHUNK - 1) // _CHUNK
    for i in range(chunks):  # popped high chunk first (it was pushed last)
        value = (value << _CHUNK) | int(coder.decode(_CHUNK_MODEL, 1)[0])
    if value.bit_length() != n:
        raise CoderError("escape value does not have its announced length")
    return value


__all__ = ["CoderError", "CodingTables", "EntropyCoder", "MAX_ESCAPE_BITS"]
