"""Wire formats v2 (single-rate) and v3 (a rate index per image): round trips, exact overhead, and a
parser that rejects every malformed input with PayloadError (never another exception, never a large
allocation)."""

from __future__ import annotations

import pickle
import time
import tracemalloc
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitserve.errors import FingerprintMismatch, PayloadError
from splitserve_edge.payload import (
    FINGERPRINT_BYTES,
    FORMAT_VERSION,
    SINGLE_RATE_VERSION,
    MAGIC,
    MIN_PAYLOAD_BYTES,
    Payload,
    PayloadLimits,
    bits_per_pixel,
    bytes_per_image,
    fingerprint_id,
)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FP_HEX = "ab" * 32
FP = fingerprint_id(FP_HEX)


def varint(value: int) -> bytes:
    """Reference LEB128 encoder, independent of the module under test."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def raw_payload(
    c: int = 24,
    h: int = 55,
    w: int = 55,
    records: list[tuple[int, int, int]] | None = None,
    body: bytes | None = None,
    fix_crc: bool = True,
    varints: dict[str, bytes] | None = None,
    rates: list[int] | None = None,
) -> bytes:
    """Hand-assemble a payload (any field may be out of range) to test the parser from outside: v2,
    or v3 with ``rates`` (each image's rate index after its original width)."""
    records = [(224, 224, 3)] if records is None else records
    v = varints or {}
    out = bytearray(MAGIC + bytes([SINGLE_RATE_VERSION if rates is None else FORMAT_VERSION]) + FP)
    out += v.get("C", varint(c)) + v.get("H", varint(h)) + v.get("W", varint(w))
    out += v.get("N", varint(len(records)))
    for i, (oh, ow, sl) in enumerate(records):
        out += varint(oh) + varint(ow) + (b"" if rates is None else v.get(f"rate{i}", varint(rates[i]))) + varint(sl)
    out += body if body is not None else b"\x01" * sum(r[2] for r in records)
    return bytes(out + (zlib.crc32(out).to_bytes(4, "little") if fix_crc else b""))


def small_payload(rates: tuple[int, ...] | None = None) -> Payload:
    return Payload(FP, (24, 55, 55), ((224, 224), (64, 96)), (b"\x00\x01\x02\xff", b"rans"), rates)


BOTH = pytest.mark.parametrize("rates", [None, (5, 0)], ids=["v2", "v3"])


# -- strategies ---------------------------------------------------------------------------------------
sides = st.integers(1, 65535)


@st.composite
def payloads(draw) -> Payload:
    n = draw(st.integers(1, 6))
    return Payload(
        fingerprint=draw(st.binary(min_size=8, max_size=8)),
        latent_shape=(draw(st.integers(1, 1024)), draw(st.integers(1, 1024)), draw(st.integers(1, 1024))),
        original_sizes=tuple((draw(sides), draw(sides)) for _ in range(n)),
        strings=tuple(draw(st.binary(min_size=1, max_size=300)) for _ in range(n)),
        rates=draw(st.none() | st.tuples(*[st.integers(0, 63)] * n)),
    )


# -- round trip and size ------------------------------------------------------------------------------
@SETTINGS
@given(payloads())
def test_round_trip(payload: Payload) -> None:
    data = payload.to_bytes()
    assert data[2] == (2 if payload.rates is None else 3)
    back = Payload.from_bytes(data)
    assert back == payload
    assert back.to_bytes() == data
    assert back.num_images == len(payload.strings)
    assert payload.overhead_bytes == len(data) - sum(len(s) for s in payload.strings)


def test_round_trip_accepts_bytearray_and_memoryview() -> None:
    payload = small_payload()
    data = payload.to_bytes()
    assert Payload.from_bytes(bytearray(data)) == payload
    assert Payload.from_bytes(memoryview(data)) == payload
    padded = memoryview(b"xx" + data + b"yy")[2:-2]
    assert Payload.from_bytes(padded) == payload


def test_hand_assembled_payload_parses() -> None:
    """The parser matches the spec, not just its own encoder."""
    payload = Payload.from_bytes(raw_payload(records=[(224, 224, 3), (7, 300, 2)]))
    assert payload.fingerprint == FP
    assert payload.latent_shape == (24, 55, 55)
    assert payload.original_sizes == ((224, 224), (7, 300))
    assert payload.strings == (b"\x01" * 3, b"\x01" * 2)


def test_overhead_one_224_image_is_25_bytes() -> None:
    """docs/payload.md: 2 magic + 1 version + 8 fp + 3 shape + 1 N + (2+2+2) record + 4 crc."""
    payload = Payload(FP, (24, 55, 55), ((224, 224),), (b"x" * 300,))
    assert payload.overhead_bytes == 25
    assert len(payload.to_bytes()) == 300 + 25


def test_hand_assembled_v3_payload_parses() -> None:
    """v3: the rate index sits between an image's original width and its string length."""
    data = raw_payload(records=[(224, 224, 3), (7, 300, 2)], rates=[3, 0])
    payload = Payload.from_bytes(data)
    assert payload.version == 3 and payload.rates == payload.image_rates == (3, 0)
    assert payload.original_sizes == ((224, 224), (7, 300)) and payload.strings == (b"\x01" * 3, b"\x01" * 2)
    assert Payload(FP, (24, 55, 55), ((224, 224), (7, 300)), (b"\x01" * 3, b"\x01" * 2), (3, 0)).to_bytes() == data


def test_v2_is_read_as_rate_0_and_written_unchanged() -> None:
    """A payload without rate indices is v2, byte for byte what single-rate encoders always wrote."""
    data = raw_payload(records=[(224, 224, 3), (7, 300, 2)])
    payload = Payload.from_bytes(data)
    assert payload.version == 2 and payload.rates is None and payload.image_rates == (0, 0)
    assert Payload(FP, (24, 55, 55), ((224, 224), (7, 300)), (b"\x01" * 3, b"\x01" * 2)).to_bytes() == data


def test_v3_overhead_is_one_byte_per_image_more() -> None:
    payload = Payload(FP, (24, 55, 55), ((224, 224),) * 8, tuple(bytes([i]) * 300 for i in range(8)), (7,) * 8)
    assert payload.overhead_bytes == 67 + 8
    assert len(payload.to_bytes()) == 8 * 300 + 75


@pytest.mark.parametrize("rate, limits, ok", [
    (63, PayloadLimits(), True),
    (64, PayloadLimits(), False),
    (3, PayloadLimits(max_rates=4), True),
    (4, PayloadLimits(max_rates=4), False),
])
def test_rate_index_is_bounded_by_max_rates(rate: int, limits: PayloadLimits, ok: bool) -> None:
    data = raw_payload(records=[(5, 5, 1), (5, 5, 1)], rates=[0, rate])
    if ok:
        assert Payload.from_bytes(data, limits).rates == (0, rate)
    else:
        _assert_cheap_rejection(data, rf"image 1 rate index = {rate} out of range \[0, {limits.max_rates - 1}\]",
                                limits)


def test_huge_rate_index_rejected_without_allocation() -> None:
    _assert_cheap_rejection(raw_payload(rates=[2**34]), r"image 0 rate index = 17179869184 out of range")
    with pytest.raises(PayloadError, match="non-canonical varint for image 0 rate index"):
        Payload.from_bytes(raw_payload(rates=[1], varints={"rate0": b"\x81\x00"}))


def test_overhead_eight_224_images_is_67_bytes() -> None:
    payload = Payload(FP, (24, 55, 55), ((224, 224),) * 8, tuple(bytes([i]) * 300 for i in range(8)))
    assert payload.overhead_bytes == 67
    assert len(payload.to_bytes()) == 8 * 300 + 67


def test_reference_pickle_overhead_matches_doc() -> None:
    """The comparison numbers quoted in docs/payload.md (reference code pickles (strings, shape))."""
    assert len(pickle.dumps(([b"x" * 300], torch.Size([55, 55])))) - 300 == 50
    assert len(pickle.dumps(([b"x" * 300], (55, 55)))) - 300 == 29


def test_bytes_per_image_single_image_charges_whole_payload() -> None:
    payload = Payload(FP, (24, 55, 55), ((480, 640),), (b"x" * 300,))
    (nbytes,) = bytes_per_image(payload)
    assert nbytes == len(payload.to_bytes())
    # bpp is over the MODEL INPUT's pixels (224x224 here), never the original photo's 480x640
    assert bits_per_pixel(8 * nbytes, 1, (224, 224)) == pytest.approx(8 * len(payload.to_bytes()) / (224 * 224))


def test_bytes_per_image_shares_overhead_equally() -> None:
    payload = small_payload()
    share = payload.overhead_bytes / 2
    assert bytes_per_image(payload) == pytest.approx([4 + share, 4 + share])
    assert sum(bytes_per_image(payload)) == pytest.approx(len(payload.to_bytes()))


def test_bits_per_pixel_divides_by_input_pixels_of_every_image() -> None:
    assert bits_per_pixel(8 * 1000.0, 4, (64, 32)) == pytest.approx(8000 / (4 * 64 * 32))


# -- corruption ---------------------------------------------------------------------------------------
@BOTH
def test_every_truncation_rejected(rates) -> None:
    data = small_payload(rates).to_bytes()
    for cut in range(len(data)):
        with pytest.raises(PayloadError):
            Payload.from_bytes(data[:cut])


def test_truncated_body_message_says_expected_and_got() -> None:
    data = small_payload().to_bytes()
    with pytest.raises(PayloadError, match=f"truncated payload: header declares {len(data)} bytes, got {len(data) - 3}"):
        Payload.from_bytes(data[:-3])


@pytest.mark.parametrize("extra", [b"\x00", b"\x00" * 7, b"SS\x01"])
def test_trailing_bytes_rejected(extra: bytes) -> None:
    data = small_payload().to_bytes()
    with pytest.raises(PayloadError, match=f"{len(extra)} trailing bytes"):
        Payload.from_bytes(data + extra)


@BOTH
def test_every_single_bit_flip_rejected(rates) -> None:
    data = small_payload(rates).to_bytes()
    for i in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            with pytest.raises(PayloadError):
                Payload.from_bytes(bytes(flipped))


def test_flip_inside_string_is_a_checksum_error() -> None:
    data = bytearray(small_payload().to_bytes())
    data[-6] ^= 0x10  # inside the last rANS string, before the CRC
    with pytest.raises(PayloadError, match="checksum mismatch: payload corrupted in transit"):
        Payload.from_bytes(bytes(data))


@SETTINGS
@given(payloads(), st.data())
def test_random_mutations_rejected_or_equal(payload: Payload, data: st.DataObject) -> None:
    """Overwriting bytes either leaves the payload unchanged or raises PayloadError."""
    raw = bytearray(payload.to_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        back = Payload.from_bytes(bytes(raw))
    except PayloadError:
        return
    assert bytes(raw) == payload.to_bytes() and back == payload


@SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_payload_error(blob: bytes) -> None:
    try:
        Payload.from_bytes(blob)
    except PayloadError:
        pass


@SETTINGS
@given(st.binary(max_size=120))
def test_random_bytes_after_valid_preamble_only_raise_payload_error(blob: bytes) -> None:
    """Past magic and version the fields themselves are fuzzed, with and without a valid CRC, in
    both versions."""
    for version in (SINGLE_RATE_VERSION, FORMAT_VERSION):
        head = MAGIC + bytes([version]) + FP + blob
        for data in (head, head + zlib.crc32(head).to_bytes(4, "little")):
            try:
                Payload.from_bytes(data)
            except PayloadError:
                pass


# -- header fields ------------------------------------------------------------------------------------
def test_bad_magic_message() -> None:
    data = b"PK" + small_payload().to_bytes()[2:]
    with pytest.raises(PayloadError, match=r"not a splitserve payload \(bad magic\)"):
        Payload.from_bytes(data)


def test_pickle_is_not_a_payload() -> None:
    data = pickle.dumps(([b"x" * 300], (55, 55)))
    with pytest.raises(PayloadError, match="bad magic"):
        Payload.from_bytes(data)


def test_unsupported_version_message() -> None:
    data = bytearray(small_payload().to_bytes())
    data[2] = 4
    with pytest.raises(PayloadError, match=r"unsupported payload version 4.*version\(s\) 2, 3"):
        Payload.from_bytes(bytes(data))


def test_version1_rans_payloads_refused_with_the_reason() -> None:
    """The 27-byte payload that crashed the gateway through CompressAI's rANS decoder (a v1 header
    claiming a 24x1024x1024 latent, 1-byte string) is refused by the parser, before any decoder."""
    crash = bytes.fromhex("53530159c07ca6d5c5eb73188008800801e001e0010101d0d43928")
    with pytest.raises(PayloadError, match="version 1 is not accepted.*not memory-safe"):
        Payload.from_bytes(crash)


def test_too_short_message() -> None:
    with pytest.raises(PayloadError, match=f"payload too short: 3 bytes.*{MIN_PAYLOAD_BYTES}"):
        Payload.from_bytes(b"SS\x01")
    assert len(raw_payload(records=[(1, 1, 1)])) == MIN_PAYLOAD_BYTES
    Payload.from_bytes(raw_payload(records=[(1, 1, 1)]))


@pytest.mark.parametrize(
    "field, encoded",
    [
        ("C", b"\x98\x00"),  # 24 with a redundant zero continuation
        ("H", b"\xb7\x80\x00"),  # 55, three bytes
        ("N", b"\x81\x00"),  # 1
        ("W", b"\x80\x80\x80\x80\x80\x00"),  # six bytes: over the 5-byte cap
        ("W", b"\xff\xff\xff\xff\xff\x01"),  # 2**35 and up cannot be expressed
    ],
)
def test_non_minimal_or_overlong_varints_rejected(field: str, encoded: bytes) -> None:
    with pytest.raises(PayloadError, match="non-canonical varint|longer than 5 bytes"):
        Payload.from_bytes(raw_payload(varints={field: encoded}))


def test_non_minimal_record_varint_rejected() -> None:
    good = raw_payload(records=[(224, 224, 3)])
    header_end = len(good) - 3 - 4
    record = good[header_end - 5 : header_end]  # 224 = e0 01, 224 = e0 01, 3 = 03
    assert record == b"\xe0\x01\xe0\x01\x03"
    bad = good[: header_end - 1] + b"\x83\x00" + good[header_end:-4]
    bad += zlib.crc32(bad).to_bytes(4, "little")
    with pytest.raises(PayloadError, match="non-canonical varint for image 0 string length"):
        Payload.from_bytes(bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"c": 0}, "latent channels C = 0 out of range"),
        ({"c": 1025}, "latent channels C = 1025 out of range"),
        ({"h": 10**6}, "latent height H = 1000000 out of range"),
        ({"w": 0}, "latent width W = 0 out of range"),
        ({"records": [(0, 5, 1)]}, "image 0 original height = 0 out of range"),
        ({"records": [(5, 65536, 1)]}, "image 0 original width = 65536 out of range"),
        ({"records": [(5, 5, 1), (5, 5, 0)]}, "image 1 string length = 0 out of range"),
    ],
)
def test_out_of_range_fields_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(PayloadError, match=match):
        Payload.from_bytes(raw_payload(**kwargs))


def test_zero_images_rejected() -> None:
    with pytest.raises(PayloadError, match="image count N = 0 out of range"):
        Payload.from_bytes(raw_payload(records=[], body=b"\x00" * 8))


def _assert_cheap_rejection(data: bytes, match: str, limits: PayloadLimits = PayloadLimits()) -> None:
    """Rejected with PayloadError within 50 ms of this thread's CPU time (not wall-clock time, which
    other work on a shared machine stretches), allocating < 64 KiB."""
    tracemalloc.start()
    start = time.thread_time()
    try:
        with pytest.raises(PayloadError, match=match):
            Payload.from_bytes(data, limits)
        elapsed = time.thread_time() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.05
    assert peak < 64 * 1024


def test_huge_declared_sizes_rejected_without_allocation() -> None:
    _assert_cheap_rejection(raw_payload(h=10**6), "latent height H = 1000000")
    _assert_cheap_rejection(raw_payload(varints={"N": varint(10**6)}), "image count N = 1000000")
    huge_string = raw_payload(records=[(224, 224, 2**34)], body=b"\x00" * 8)
    _assert_cheap_rejection(huge_string, "string length = 17179869184 out of range")
    # A length within the per-string bound but beyond what actually arrived is a truncation.
    big_string = raw_payload(records=[(224, 224, 60 * 1024 * 1024)], body=b"\x00" * 8)
    _assert_cheap_rejection(big_string, "truncated payload: header declares 62914587 bytes, got 35")


def test_declared_total_above_limit_rejected() -> None:
    limits = PayloadLimits(max_total_bytes=100)
    data = raw_payload(records=[(5, 5, 60), (5, 5, 60)])
    _assert_cheap_rejection(data, "payload of 145 bytes exceeds the limit of 100", limits)
    declared = raw_payload(records=[(5, 5, 60), (5, 5, 60)], body=b"\x00" * 10)
    _assert_cheap_rejection(declared, "payload declares 145 bytes, above the limit of 100", limits)


def test_limits_are_configurable() -> None:
    data = raw_payload(records=[(5, 5, 1)] * 3)
    assert Payload.from_bytes(data).num_images == 3
    with pytest.raises(PayloadError, match="image count N = 3 out of range"):
        Payload.from_bytes(data, PayloadLimits(max_images=2))
    with pytest.raises(ValueError):
        PayloadLimits(max_images=0)


def test_non_bytes_input_is_a_payload_error() -> None:
    with pytest.raises(PayloadError, match="bytes-like"):
        Payload.from_bytes("SS\x01" + "x" * 40)  # type: ignore[arg-type]


# -- construction -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"fingerprint": b"short"},
        {"fingerprint": FP_HEX},
        {"latent_shape": (24, 55)},
        {"latent_shape": (24, 0, 55)},
        {"latent_shape": (True, 55, 55)},
        {"original_sizes": ((224, 224),)},
        {"original_sizes": ((224, 0), (1, 1))},
        {"strings": (b"ok", b"")},
        {"strings": (b"ok", 5)},
        {"strings": (), "original_sizes": ()},
        {"rates": (0,)},
        {"rates": (0, -1)},
        {"rates": (0, True)},
        {"rates": (0, 1.0)},
    ],
)
def test_constructor_rejects_invalid_fields(kwargs: dict) -> None:
    fields = {"fingerprint": FP, "latent_shape": (24, 55, 55), "original_sizes": ((1, 1), (2, 2)), "strings": (b"a", b"b")}
    fields.update(kwargs)
    with pytest.raises(PayloadError):
        Payload(**fields)


def test_constructor_normalises_sequences() -> None:
    payload = Payload(bytearray(FP), torch.Size([24, 55, 55]), [[224, 224]], [bytearray(b"abc")])  # type: ignore[arg-type]
    assert payload == Payload(FP, (24, 55, 55), ((224, 224),), (b"abc",))
    assert type(payload.strings[0]) is bytes


# -- fingerprints -------------------------------------------------------------------------------------
def test_fingerprint_id() -> None:
    assert fingerprint_id(FP_HEX) == bytes.fromhex(FP_HEX)[:FINGERPRINT_BYTES]
    assert fingerprint_id(FP_HEX.upper()) == fingerprint_id(FP_HEX[:16])
    assert fingerprint_id(bytes(range(32))) == bytes(range(8))
    for bad in ("abc", "zz" * 32, ""):
        with pytest.raises(ValueError):
            fingerprint_id(bad)
    with pytest.raises(ValueError):
        fingerprint_id(b"1234567")


def test_check_fingerprint() -> None:
    payload = small_payload()
    payload.check_fingerprint(FP_HEX)
    payload.check_fingerprint(bytes.fromhex(FP_HEX))
    other = "cd" * 32
    with pytest.raises(FingerprintMismatch) as info:
        payload.check_fingerprint(other)
    assert isinstance(info.value, PayloadError)
    assert FP_HEX[:16] in str(info.value) and other[:16] in str(info.value)


# -- end to end with the real codec -------------------------------------------------------------------
def test_real_codec_latent_round_trips_bit_exactly() -> None:
    from splitserve.models import build_codec

    torch.manual_seed(0)
    codec = build_codec("entropic_student").eval()
    codec.update()
    x = torch.randn(2, 3, 64, 96)
    strings, (h, w) = codec.compress(x)
    payload = Payload(
        fingerprint_id(codec.fingerprint()), (codec.latent_channels, h, w), ((64, 96), (64, 96)), tuple(strings)
    )
    back = Payload.from_bytes(payload.to_bytes())
    back.check_fingerprint(codec.fingerprint())
    y = codec.decompress(list(back.strings), back.latent_shape[1:])
    assert torch.equal(y, codec.quantize(x))
