"""The edge→server payload: a small, versioned, strictly parsed binary container (spec: docs/payload.md).

Why not pickle: unpickling runs arbitrary code chosen by whoever sent the bytes, and a pickle says
nothing about which encoder produced the latent. This format carries the codec's fingerprint (so a
server refuses a bitstream it would silently mis-decode), each image's original size (so bpp and
task outputs refer to the real input), and a CRC32 (so corruption is an error, not garbage).

Layout (varints are unsigned LEB128, fixed-width integers little-endian)::

    v3: b"SS" | 3 | fingerprint 8B | C H W | N | N × (orig_h orig_w rate str_len) | strings | crc32 u32
    v2: b"SS" | 2 | fingerprint 8B | C H W | N | N × (orig_h orig_w str_len) | strings | crc32 u32

A variable-rate bundle's encoders write v3 (each image names the rate it was coded at); a
single-rate bundle's write v2, byte for byte what they wrote before rates existed, and a v2 image
is read as rate 0.
"""

from __future__ import annotations

import operator
import struct
import zlib
from dataclasses import dataclass
from typing import Union

from .errors import FingerprintMismatch, PayloadError

__all__ = [
    "FINGERPRINT_BYTES",
    "FORMAT_VERSION",
    "MAGIC",
    "MIN_PAYLOAD_BYTES",
    "SINGLE_RATE_VERSION",
    "SUPPORTED_VERSIONS",
    "Payload",
    "PayloadLimits",
    "bits_per_pixel",
    "bytes_per_image",
    "Encoded",
    "fingerprint_id",
    "varint_size",
]

MAGIC = b"SS"
FORMAT_VERSION = 3  # 3: + a rate index per image; 2: ANS bitstreams of splitserve_edge.coder (constriction)
SINGLE_RATE_VERSION = 2  # what a payload without rate indices is written as
SUPPORTED_VERSIONS: tuple[int, ...] = (2, 3)
RETIRED_VERSIONS = {1: "version 1 carried CompressAI bitstreams, whose decoder is not memory-safe; "
                       "re-encode the image with this splitserve's edge encoder"}
FINGERPRINT_BYTES = 8

VARINT_MAX_BYTES = 5
VARINT_MAX = (1 << (7 * VARINT_MAX_BYTES)) - 1  # 2**35 - 1: the largest value 5 varint bytes hold
_CRC = struct.Struct("<I")
# magic + version + fingerprint + (C, H, W, N) + one record + one string byte + crc
MIN_PAYLOAD_BYTES = len(MAGIC) + 1 + FINGERPRINT_BYTES + 4 + 3 + 1 + _CRC.size

BytesLike = Union[bytes, bytearray, memoryview]


@dataclass(frozen=True)
class PayloadLimits:
    """Hard bounds the parser enforces before trusting any declared size (defaults suit a server).

    Every length or shape read from the wire is checked against these before it drives a loop or an
    allocation, so a hostile 20-byte payload cannot make the server reserve gigabytes.
    """

    max_images: int = 256
    max_rates: int = 64
    max_channels: int = 1024
    max_latent_side: int = 1024
    max_image_side: int = 65535
    max_total_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_images", "max_rates", "max_channels", "max_latent_side", "max_image_side", "max_total_bytes"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"PayloadLimits.{name} must be a positive int, got {value!r}")


def _is_int(value: object) -> bool:
    """True for real ints only: bool is an int subclass but never a valid size."""
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_ints(values: object, count: int) -> tuple[int, ...]:
    """``count`` ints in [1, VARINT_MAX] as a plain tuple (accepts torch.Size, numpy ints; not bools)."""
    items = tuple(values)  # type: ignore[call-overload]
    if len(items) != count or any(isinstance(v, bool) for v in items):
        raise ValueError(f"expected {count} ints, got {values!r}")
    ints = tuple(operator.index(v) for v in items)
    if not all(1 <= v <= VARINT_MAX for v in ints):
        raise ValueError(f"expected {count} ints in [1, {VARINT_MAX}], got {values!r}")
    return ints


# -- varints --------------------------------------------------------------------------------------
def encode_varint(value: int, out: bytearray) -> None:
    """Append unsigned LEB128 (minimal by construction); values must fit in 5 bytes."""
    if value < 0 or value > VARINT_MAX:
        raise PayloadError(f"value {value} does not fit a {VARINT_MAX_BYTES}-byte varint")
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def varint_size(value: int) -> int:
    """Bytes encode_varint writes for ``value`` (overhead arithmetic without encoding, e.g. the
    longest bitstream a byte budget leaves room for)."""
    return max(1, (value.bit_length() + 6) // 7)


def read_varint(buf: memoryview, pos: int, field: str, index: int = -1) -> tuple[int, int]:
    """Decode one canonical varint at ``pos``; return (value, next position).

    Rejects truncation, more than 5 bytes, and non-minimal encodings (a multi-byte varint whose
    last byte is 0 encodes the same value as a shorter one), so every payload has one encoding.
    ``field`` (with ``index`` for per-image fields) only names the field in error messages.
    """
    end = len(buf)
    value = 0
    for i in range(VARINT_MAX_BYTES):
        if pos + i >= end:
            raise PayloadError(f"truncated payload: header ends inside {_name(field, index)} at byte {end}")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            if byte == 0 and i > 0:
                raise PayloadError(f"non-canonical varint for {_name(field, index)} at byte {pos}")
            return value, pos + i + 1
    raise PayloadError(f"varint for {_name(field, index)} at byte {pos} is longer than {VARINT_MAX_BYTES} bytes")


def _read_bounded(buf: memoryview, pos: int, field: str, low: int, high: int, index: int = -1) -> tuple[int, int]:
    """Read a varint and require ``low <= value <= high`` before anyone uses it."""
    value, pos = read_varint(buf, pos, field, index)
    if value < low or value > high:
        raise PayloadError(f"{_name(field, index)} = {value} out of range [{low}, {high}]")
    return value, pos


def _name(field: str, index: int) -> str:
    """Field name for messages, built only on the error path (keeps parsing allocation-free)."""
    return field if index < 0 else f"image {index} {field}"


def _as_byte_view(data: object) -> memoryview:
    """A flat 1-D unsigned-byte view of any bytes-like input, or PayloadError."""
    try:
        view = memoryview(data)  # type: ignore[arg-type]
        if view.ndim != 1 or view.itemsize != 1 or not view.c_contiguous:
            view = memoryview(view.tobytes())
    except (TypeError, ValueError):  # not bytes-like, or a released memoryview
        raise PayloadError(f"payload must be bytes-like and readable, got {type(data).__name__}") from None
    if view.format != "B":
        view = view.cast("B")
    return view


# -- fingerprints -----------------------------------------------------------------------------------
def fingerprint_id(fingerprint: str | bytes) -> bytes:
    """The 8-byte id carried on the wire: the first 8 bytes of a codec's SHA-256 fingerprint.

    Accepts the 64-hex string from ``FeatureCodec.fingerprint()`` (any hex string of at least 16
    chars, e.g. the short id printed in error messages) or raw bytes (at least 8). 8 bytes is
    enough to tell codecs apart (accidental collision odds 2**-64) while keeping the header small.
    """
    if isinstance(fingerprint, str):
        text = fingerprint.strip().lower()
        if len(text) < 2 * FINGERPRINT_BYTES or any(c not in "0123456789abcdef" for c in text):
            raise ValueError(
                f"fingerprint must be a hex string of at least {2 * FINGERPRINT_BYTES} chars, got {fingerprint!r}"
            )
        return bytes.fromhex(text[: 2 * FINGERPRINT_BYTES])
    if isinstance(fingerprint, (bytes, bytearray, memoryview)):
        raw = bytes(fingerprint)
        if len(raw) < FINGERPRINT_BYTES:
            raise ValueError(f"fingerprint must be at least {FINGERPRINT_BYTES} bytes, got {len(raw)}")
        return raw[:FINGERPRINT_BYTES]
    raise TypeError(f"fingerprint must be str or bytes, got {type(fingerprint).__name__}")


# -- the container ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Payload:
    """N images' bitstreams coded by one codec, with the latent shape they share.

    ``rates`` is each image's rate index for a variable-rate codec (written as format v3), or None
    for a single-rate one (format v2; every image is rate 0). Construction validates everything
    ``to_bytes`` needs, so a Payload that exists always serialises to bytes that ``from_bytes``
    (with limits wide enough) accepts.
    """

    fingerprint: bytes
    latent_shape: tuple[int, int, int]
    original_sizes: tuple[tuple[int, int], ...]
    strings: tuple[bytes, ...]
    rates: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        fp = self.fingerprint
        if not isinstance(fp, (bytes, bytearray, memoryview)) or len(bytes(fp)) != FINGERPRINT_BYTES:
            raise PayloadError(f"fingerprint must be exactly {FINGERPRINT_BYTES} bytes (use fingerprint_id())")
        try:
            shape = _positive_ints(self.latent_shape, 3)
            sizes = tuple(_positive_ints(size, 2) for size in self.original_sizes)
            if not all(isinstance(s, (bytes, bytearray, memoryview)) for s in self.strings):
                raise TypeError("strings must be bytes")
            strings = tuple(bytes(s) for s in self.strings)
            rates = None if self.rates is None else tuple(operator.index(r) for r in self.rates)
            if rates is not None and any(isinstance(r, bool) or not 0 <= r <= VARINT_MAX for r in self.rates):
                raise ValueError(f"rate indices must be ints in [0, {VARINT_MAX}], got {self.rates!r}")
        except (TypeError, ValueError) as exc:
            raise PayloadError(f"malformed payload fields: {exc}") from None
        if not strings:
            raise PayloadError("a payload carries at least one image")
        if len(sizes) != len(strings):
            raise PayloadError(f"{len(sizes)} original sizes for {len(strings)} strings")
        if rates is not None and len(rates) != len(strings):
            raise PayloadError(f"{len(rates)} rate indices for {len(strings)} strings")
        for i, s in enumerate(strings):
            if not 1 <= len(s) <= VARINT_MAX:
                raise PayloadError(f"strings[{i}] has length {len(s)}; bitstreams are never empty")
        object.__setattr__(self, "fingerprint", bytes(fp))
        object.__setattr__(self, "latent_shape", shape)
        object.__setattr__(self, "original_sizes", sizes)
        object.__setattr__(self, "strings", strings)
        object.__setattr__(self, "rates", rates)

    def __repr__(self) -> str:
        lengths = [len(s) for s in self.strings]
        rates = "" if self.rates is None else f", rates={self.rates}"
        return (
            f"Payload(fingerprint={self.fingerprint.hex()}, latent_shape={self.latent_shape}, "
            f"original_sizes={self.original_sizes}, string_lengths={lengths}{rates})"
        )

    @property
    def num_images(self) -> int:
        return len(self.strings)

    @property
    def version(self) -> int:
        return SINGLE_RATE_VERSION if self.rates is None else FORMAT_VERSION

    @property
    def image_rates(self) -> tuple[int, ...]:
        """Each image's rate index (all 0 for a single-rate payload)."""
        return self.rates if self.rates is not None else (0,) * self.num_images

    def _records(self):
        """Each image's header fields, in wire order."""
        for (h, w), r, s in zip(self.original_sizes, self.image_rates, self.strings):
            yield (h, w, len(s)) if self.rates is None else (h, w, r, len(s))

    def _header(self) -> bytearray:
        out = bytearray(MAGIC)
        out.append(self.version)
        out += self.fingerprint
        for v in self.latent_shape:
            encode_varint(v, out)
        encode_varint(self.num_images, out)
        for record in self._records():
            for v in record:
                encode_varint(v, out)
        return out

    def to_bytes(self) -> bytes:
        """Serialise to the wire (header, strings, CRC32 of everything before it)."""
        out = self._header()
        for s in self.strings:
            out += s
        out += _CRC.pack(zlib.crc32(out))
        return bytes(out)

    @property
    def overhead_bytes(self) -> int:
        """Bytes on the wire that are not entropy-coded data: header plus CRC (computed without encoding)."""
        n = len(MAGIC) + 1 + FINGERPRINT_BYTES + _CRC.size
        n += sum(varint_size(v) for v in self.latent_shape) + varint_size(self.num_images)
        for record in self._records():
            n += sum(varint_size(v) for v in record)
        return n

    @classmethod
    def from_bytes(cls, data: BytesLike, limits: PayloadLimits = PayloadLimits()) -> Payload:
        """Parse and fully validate wire bytes; raises PayloadError (and nothing else) on bad input.

        Checks run cheapest-first and every declared size is bounded before use: total size limit,
        minimum length, magic, version, header fields, exact total length, then the CRC.
        """
        buf = _as_byte_view(data)
        size = len(buf)
        if size > limits.max_total_bytes:
            raise PayloadError(f"payload of {size} bytes exceeds the limit of {limits.max_total_bytes}")
        if size < MIN_PAYLOAD_BYTES:
            raise PayloadError(f"payload too short: {size} bytes, a payload has at least {MIN_PAYLOAD_BYTES}")
        if buf[: len(MAGIC)] != MAGIC:
            raise PayloadError("not a splitserve payload (bad magic)")
        version = buf[len(MAGIC)]
        if version in RETIRED_VERSIONS:
            raise PayloadError(f"payload version {version} is not accepted: {RETIRED_VERSIONS[version]}")
        if version not in SUPPORTED_VERSIONS:
            supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
            raise PayloadError(f"unsupported payload version {version}; this build reads version(s) {supported}")
        pos = len(MAGIC) + 1
        fingerprint = bytes(buf[pos : pos + FINGERPRINT_BYTES])
        pos += FINGERPRINT_BYTES

        c, pos = _read_bounded(buf, pos, "latent channels C", 1, limits.max_channels)
        h, pos = _read_bounded(buf, pos, "latent height H", 1, limits.max_latent_side)
        w, pos = _read_bounded(buf, pos, "latent width W", 1, limits.max_latent_side)
        n, pos = _read_bounded(buf, pos, "image count N", 1, limits.max_images)
        sizes: list[tuple[int, int]] = []
        rates: list[int] | None = [] if version >= 3 else None
        lengths: list[int] = []
        body = 0
        for i in range(n):
            oh, pos = _read_bounded(buf, pos, "original height", 1, limits.max_image_side, i)
            ow, pos = _read_bounded(buf, pos, "original width", 1, limits.max_image_side, i)
            if rates is not None:
                rate, pos = _read_bounded(buf, pos, "rate index", 0, limits.max_rates - 1, i)
                rates.append(rate)
            sl, pos = _read_bounded(buf, pos, "string length", 1, limits.max_total_bytes, i)
            sizes.append((oh, ow))
            lengths.append(sl)
            body += sl

        expected = pos + body + _CRC.size
        if expected > limits.max_total_bytes:
            raise PayloadError(f"payload declares {expected} bytes, above the limit of {limits.max_total_bytes}")
        if size < expected:
            raise PayloadError(f"truncated payload: header declares {expected} bytes, got {size}")
        if size > expected:
            raise PayloadError(f"payload has {size - expected} trailing bytes after the declared {expected}")
        (crc,) = _CRC.unpack_from(buf, expected - _CRC.size)
        if zlib.crc32(buf[: expected - _CRC.size]) != crc:
            raise PayloadError("checksum mismatch: payload corrupted in transit")

        strings = []
        for sl in lengths:
            strings.append(bytes(buf[pos : pos + sl]))
            pos += sl
        # Every field was validated above (against tighter bounds than __post_init__'s), so skip
        # re-validation: it would double the parse time of a small payload.
        payload = object.__new__(cls)
        object.__setattr__(payload, "fingerprint", fingerprint)
        object.__setattr__(payload, "latent_shape", (c, h, w))
        object.__setattr__(payload, "original_sizes", tuple(sizes))
        object.__setattr__(payload, "strings", tuple(strings))
        object.__setattr__(payload, "rates", None if rates is None else tuple(rates))
        return payload

    def check_fingerprint(self, expected: str | bytes) -> None:
        """Raise FingerprintMismatch unless this payload was coded by the codec with ``expected``.

        Decoding another codec's bitstream does not fail — it yields a plausible wrong latent — so
        the server must refuse it up front.
        """
        want = fingerprint_id(expected)
        if self.fingerprint != want:
            raise FingerprintMismatch(
                f"payload was encoded by an encoder with fingerprint {self.fingerprint.hex()}, but this server decodes with "
                f"fingerprint {want.hex()} (see GET /v1/encoder); encode with the bundle this server serves"
            )


def bytes_per_image(payload: Payload) -> list[float]:
    """What each image costs on the wire: its bitstream plus an equal share of the header + CRC.

    The shares sum to ``len(payload.to_bytes())`` exactly.
    """
    share = payload.overhead_bytes / payload.num_images
    return [len(s) + share for s in payload.strings]


def bits_per_pixel(bits, images: int, input_hw: tuple[int, int]):
    """The one bpp definition: bits over the pixels of the *model input* (the encoder's input after
    the bundle's preprocessing), never the original photo's. Training, evaluation, ``platform
    encode`` and reports all use it, so a rate measured anywhere means the same thing. ``bits`` may
    be a float or a tensor.
    """
    h, w = input_hw
    return bits / (images * h * w)


@dataclass(frozen=True)
class Encoded:
    """One encoded batch, as a device sends it: the bytes plus what they cost."""

    data: bytes
    payload: Payload
    input_hw: tuple[int, int]  # the model input every image was made into

    @property
    def num_bytes(self) -> int:
        return len(self.data)

    @property
    def bytes_per_image(self) -> list[float]:
        """Each image's bytes on the wire, header share included."""
        return bytes_per_image(self.payload)

    @property
    def rates(self) -> tuple[int, ...]:
        """The rate index each image was coded at (0 for a single-rate bundle)."""
        return self.payload.image_rates

    @property
    def bpp(self) -> list[float]:
        """Bits per pixel of each image's model input, header share included."""
        return [bits_per_pixel(8 * b, 1, self.input_hw) for b in self.bytes_per_image]
