"""The entropy coder both ends use (splitserve_edge.coder): exact, as small as the modelled rate,
torch-free, and safe on any bytes — at the coder, through the gateway's decode path, and over HTTP."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from compressai.entropy_models import EntropyBottleneck
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitserve_edge.coder import MAX_ELEMENTS, CoderError, CodingTables, EntropyCoder
from splitserve_edge.errors import PayloadError
from splitserve_edge.payload import Payload

I32 = np.iinfo(np.int32)


def _fitted_prior(channels: int, seed: int = 0) -> EntropyBottleneck:
    """A real CompressAI prior whose quantiles and density were fitted to 3·N(0, 1) latents."""
    torch.manual_seed(seed)
    eb = EntropyBottleneck(channels)
    opt = torch.optim.Adam(eb.parameters(), lr=0.05)
    for _ in range(200):
        y = 3 * torch.randn(4, channels, 8, 8)
        _, lik = eb(y)
        loss = -torch.log2(lik).mean() + eb.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    eb.update(force=True)
    return eb


def _tables_of(eb: EntropyBottleneck) -> CodingTables:
    return CodingTables(eb.quantized_cdf.numpy(), eb.cdf_length.numpy(), eb.offset.numpy(),
                        eb._get_medians().detach().reshape(-1).numpy())


def _latent(eb: EntropyBottleneck, shape, seed: int = 1):
    torch.manual_seed(seed)
    y = 3 * torch.randn(1, *shape)
    return y, eb.quantize(y, "symbols", eb._get_medians()).numpy()[0].astype(np.int32)


@pytest.fixture(scope="module")
def prior():
    return _fitted_prior(24)


@pytest.fixture(scope="module")
def prior64():
    return _fitted_prior(64, seed=2)


@pytest.fixture(scope="module")
def tables(prior) -> CodingTables:
    return _tables_of(prior)


@pytest.fixture(scope="module")
def tables64(prior64) -> CodingTables:
    return _tables_of(prior64)


@pytest.fixture(scope="module")
def latent(prior):
    return _latent(prior, (24, 55, 55))


@pytest.fixture(scope="module")
def coder(tables) -> EntropyCoder:
    return EntropyCoder(tables)


def _edges(tables: CodingTables, ch: int) -> list[int]:
    """The symbols around channel ``ch``'s table: just below, first, last regular, escape index, above."""
    lo = int(tables.offset[ch])
    top = lo + int(tables.cdf_length[ch]) - 2  # the symbol whose index is the escape's
    return [lo - 2, lo - 1, lo, lo + 1, top - 1, top, top + 1]


# -- exact round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["es", "rac"])
def test_round_trip_is_exact(which, prior, prior64):
    eb, shape = (prior, (24, 55, 55)) if which == "es" else (prior64, (64, 28, 28))
    _, sym = _latent(eb, shape)
    coder = EntropyCoder(_tables_of(eb))
    out = coder.decode(coder.encode(sym), sym.shape)
    assert out.dtype == np.int32 and np.array_equal(out, sym)


def test_escape_coding_covers_values_outside_the_table(tables, coder, latent):
    _, base = latent
    sym = base.copy()
    extremes = [1000, -1000, 2**20, -(2**20), I32.max, I32.min, I32.max - 1, I32.min + 1] + _edges(tables, 3)
    for k, v in enumerate(extremes):
        sym[k % 24, 7, k] = v
    data = coder.encode(sym)
    assert np.array_equal(coder.decode(data, sym.shape), sym)
    # bounded cost per element: the escape symbol (≤ 16 bits at this table's precision) + 6 + 31 bits
    assert len(data) - len(coder.encode(base)) <= len(extremes) * (16 + 6 + 31) / 8 + 8


def test_every_bit_length_of_an_escape_round_trips(tables, coder):
    """Distances 2**k - 1, 2**k, 2**k + 1 beyond both edges of the table, for every k to int32."""
    lo = int(tables.offset[0])
    top = lo + int(tables.cdf_length[0]) - 2
    values = sorted({v for k in range(32) for d in (2**k - 1, 2**k, 2**k + 1) for v in (lo - 1 - d, top + d)
                     if I32.min <= v <= I32.max})
    sym = np.zeros((24, 1, len(values)), dtype=np.int32)
    sym[0, 0] = values
    sym[23, 0] = values[::-1]
    assert np.array_equal(coder.decode(coder.encode(sym), sym.shape), sym)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), h=st.integers(1, 6), w=st.integers(1, 6))
def test_any_int32_latent_round_trips(tables, coder, data, h, w):
    near = st.integers(-40, 40)
    anywhere = st.integers(int(I32.min), int(I32.max))
    flat = data.draw(st.lists(st.one_of(near, near, near, anywhere), min_size=24 * h * w, max_size=24 * h * w))
    sym = np.array(flat, dtype=np.int32).reshape(24, h, w)
    stream = coder.encode(sym)
    assert len(stream) >= 4 and len(stream) % 4 == 0
    assert np.array_equal(coder.decode(stream, sym.shape), sym)


def test_a_latent_of_index_zero_still_gives_a_non_empty_stream(tables, coder):
    """ANS codes "all symbols at table index 0" in zero words; payloads forbid empty bitstreams, so
    the terminator keeps every stream at least one word long."""
    sym = np.broadcast_to(tables.offset[:, None, None], (24, 3, 2)).astype(np.int32)
    stream = coder.encode(sym)
    assert len(stream) == 4
    assert np.array_equal(coder.decode(stream, sym.shape), sym)
    with pytest.raises(CoderError):
        coder.decode(b"", sym.shape)


def test_encode_batch_is_encode_per_image(prior, coder):
    _, a = _latent(prior, (24, 9, 11), seed=5)
    _, b = _latent(prior, (24, 9, 11), seed=6)
    assert coder.encode_batch(np.stack([a, b])) == [coder.encode(a), coder.encode(b)]


@pytest.mark.parametrize("bad", [
    np.zeros((24, 4), np.int32),  # not 3-D
    np.zeros((23, 4, 4), np.int32),  # wrong channel count
    np.zeros((24, 0, 4), np.int32),  # empty
    np.zeros((24, 4, 4), np.float32),  # not integers
    np.full((24, 4, 4), 2**40, np.int64),  # outside int32
])
def test_encode_refuses_what_it_cannot_code(coder, bad):
    with pytest.raises(CoderError):
        coder.encode(bad)


# -- rate: what training measures is what devices pay --------------------------------------------

@pytest.mark.parametrize("which", ["es", "rac"])
def test_rate_is_compressai_rate(which, prior, prior64):
    """The bytes devices pay equal CompressAI's rANS bytes for the same latent (within 3 % + 8 B)."""
    eb, shape = (prior, (24, 55, 55)) if which == "es" else (prior64, (64, 28, 28))
    y, sym = _latent(eb, shape)
    ours = len(EntropyCoder(_tables_of(eb)).encode(sym))
    theirs = len(eb.compress(y)[0])
    assert abs(ours - theirs) <= 0.03 * theirs + 8, (ours, theirs)


@pytest.mark.parametrize("magnitude", [30, 1000, 2**20])
def test_escapes_cost_no_more_than_compressai_bypass_coding(prior, coder, magnitude):
    """1 % of the elements far outside the table: our escape coding is at most CompressAI's + 8 B."""
    y, _ = _latent(prior, (24, 55, 55))
    g = torch.Generator().manual_seed(magnitude)
    hit = torch.rand(y.shape, generator=g) < 0.01
    sign = torch.where(torch.rand(y.shape, generator=g) < 0.5, -1.0, 1.0)
    y = torch.where(hit, sign * magnitude * (1 + torch.rand(y.shape, generator=g)), y)
    sym = prior.quantize(y, "symbols", prior._get_medians()).numpy()[0].astype(np.int32)
    ours = coder.encode(sym)
    assert np.array_equal(coder.decode(ours, sym.shape), sym)
    assert len(ours) <= len(prior.compress(y)[0]) + 8


# -- determinism ------------------------------------------------------------------------------------

def test_same_symbols_same_bytes(tables, latent, tmp_path):
    _, sym = latent
    tables.to_safetensors(tmp_path / "t.safetensors")
    again = CodingTables.from_safetensors(tmp_path / "t.safetensors")
    assert again is not tables and again.digest() == tables.digest()
    assert EntropyCoder(tables).encode(sym) == EntropyCoder(again).encode(sym)


def _synthetic_tables() -> CodingTables:
    """Laplace-shaped 16-bit tables in CompressAI's layout, made without torch."""
    rows = []
    for ch in range(3):
        n_sym = 9 + 4 * ch
        counts = np.floor(np.exp(-np.abs(np.arange(n_sym) - n_sym // 2) / (1.0 + ch)) * 4000).astype(np.int64) + 1
        counts = np.append(counts, 1)  # the escape
        counts[n_sym // 2] += (1 << 16) - counts.sum()
        rows.append(np.concatenate([[0], np.cumsum(counts)]))
    cdf = np.zeros((3, max(map(len, rows))), np.int32)
    for ch, row in enumerate(rows):
        cdf[ch, : len(row)] = row
    return CodingTables(cdf, np.array([len(r) for r in rows], np.int32),
                        np.array([-((9 + 4 * ch) // 2) for ch in range(3)], np.int32),
                        np.array([0.25, -1.5, 3.0], np.float32))


def test_bytes_are_pinned_across_machines_and_versions():
    """A device and the server must produce identical bytes: a change in constriction's model
    quantisation or in our stream format shows up here as a different hash."""
    tables = _synthetic_tables()
    sym = (np.arange(105, dtype=np.int64).reshape(3, 7, 5) * 7919 % 23 - 11).astype(np.int32)
    sym[0, 0, 0], sym[2, 6, 4], sym[1, 3, 3] = I32.max, I32.min, -300
    stream = EntropyCoder(tables).encode(sym)
    assert np.array_equal(EntropyCoder(tables).decode(stream, sym.shape), sym)
    assert (len(stream), hashlib.sha256(stream).hexdigest()) == (GOLDEN_LEN, GOLDEN_SHA256)
    assert tables.digest() == GOLDEN_TABLES_DIGEST


GOLDEN_LEN = 192
GOLDEN_SHA256 = "48bd146a6a1f540de54ab91c938d11dfcc779f74df01afd380a2853c491cd05b"
GOLDEN_TABLES_DIGEST = "8163292b5e5f679ff2cb023e69967661509af5d264490711158e9a0aa1e887df"


# -- coding tables ----------------------------------------------------------------------------------

def _set(name, index, value):
    def mutate(a):
        a[name][index] = value
    return mutate


@pytest.mark.parametrize("mutate,match", [
    (_set("quantized_cdf", (0, 1), 70000), "CDF"),  # not monotone (and above 2**16)
    (lambda a: a["quantized_cdf"].__setitem__((2, 3), a["quantized_cdf"][2, 2]), "CDF"),  # a zero-probability step
    (lambda a: a["quantized_cdf"].__setitem__((1, slice(2, 4)), a["quantized_cdf"][1, [3, 2]]), "CDF"),  # falls
    (_set("quantized_cdf", (0, 0), 1), "CDF"),  # does not start at 0
    (lambda a: a["quantized_cdf"].__setitem__((5, a["cdf_length"][5] - 1), 65535), "CDF"),  # does not end at 2**16
    (lambda a: a.__setitem__("cdf_length", a["cdf_length"][:-1]), "channel count"),
    (lambda a: a.__setitem__("medians", a["medians"][:-1]), "channel count"),
    (lambda a: a.__setitem__("quantized_cdf", a["quantized_cdf"][0]), "2-D"),
    (lambda a: a.__setitem__("cdf_length", np.full_like(a["cdf_length"], 2)), "cdf_length"),
    (lambda a: a.__setitem__("cdf_length", a["cdf_length"] + a["quantized_cdf"].shape[1]), "cdf_length"),
    (lambda a: a.__setitem__("medians", np.full_like(a["medians"], np.nan)), "finite"),
    (lambda a: a.__setitem__("offset", a["offset"].astype(np.float32) + 0.5), "int32"),
    (lambda a: a.__setitem__("quantized_cdf", a["quantized_cdf"].astype(np.float64)), "int32"),
    (lambda a: a.__setitem__("cdf_length", a["cdf_length"] > 0), "int32"),  # bool
    (lambda a: a.__setitem__("offset", a["offset"].astype(np.int64) - 2**33), "fit"),
    (lambda a: a.__setitem__("offset", np.full_like(a["offset"], -(2**25))), "offset"),
    (lambda a: a["quantized_cdf"].__setitem__((int(np.argmin(a["cdf_length"])), -1), 7), "zero past"),  # padding
])
def test_invalid_tables_rejected(tables, mutate, match):
    arrays = {k: np.array(v) for k, v in tables.arrays().items()}
    mutate(arrays)
    with pytest.raises(CoderError, match=match):
        CodingTables(**arrays)


def test_tables_file_round_trip_is_exact(tables, tmp_path):
    tables.to_safetensors(tmp_path / "t.safetensors")
    loaded = CodingTables.from_safetensors(tmp_path / "t.safetensors")
    for again in (loaded, CodingTables.from_bytes(tables.to_bytes())):
        for name, value in tables.arrays().items():
            got = again.arrays()[name]
            assert got.dtype == value.dtype and np.array_equal(got, value), name
        assert again.digest() == tables.digest()
    assert (tmp_path / "t.safetensors").read_bytes() == tables.to_bytes()
    with pytest.raises(ValueError):  # stored arrays are read-only
        tables.offset[0] = 0


def test_digest_tracks_every_value(tables):
    arrays = {k: np.array(v) for k, v in tables.arrays().items()}
    arrays["medians"][3] += np.float32(1e-3)
    assert CodingTables(**arrays).digest() != tables.digest()


def test_garbage_tables_files_rejected(tables):
    from safetensors.numpy import save

    with pytest.raises(CoderError, match="not a coding-tables file"):
        CodingTables.from_bytes(b"\x00" * 40)
    partial = save({k: np.ascontiguousarray(v) for k, v in tables.arrays().items() if k != "offset"})
    with pytest.raises(CoderError, match="lack offset"):
        CodingTables.from_bytes(partial)


def test_coder_error_is_a_payload_error_and_a_value_error():
    assert issubclass(CoderError, PayloadError) and issubclass(CoderError, ValueError)


# -- torch-free ---------------------------------------------------------------------------------------

def test_torch_free_import_and_decode(tables, latent, tmp_path):
    """A device has no torch: the coder imports, loads tables and decodes with torch, torchvision and
    compressai made unimportable."""
    _, sym = latent
    tables.to_safetensors(tmp_path / "tables.safetensors")
    (tmp_path / "stream.bin").write_bytes(EntropyCoder(tables).encode(sym))
    np.save(tmp_path / "sym.npy", sym)
    script = textwrap.dedent(f"""
        import sys
        BLOCKED = ('torch', 'torchvision', 'compressai')
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in BLOCKED:
                    raise ImportError('no ' + name + ' on this device')
        sys.meta_path.insert(0, Block())
        import numpy as np
        import splitserve_edge
        from splitserve_edge.coder import CodingTables, EntropyCoder
        t = CodingTables.from_safetensors({str(tmp_path / 'tables.safetensors')!r})
        sym = np.load({str(tmp_path / 'sym.npy')!r})
        coder = EntropyCoder(t)
        data = open({str(tmp_path / 'stream.bin')!r}, 'rb').read()
        assert np.array_equal(coder.decode(data, sym.shape), sym)
        assert coder.encode(sym) == data
        assert not [m for m in sys.modules if m.split('.')[0] in BLOCKED]
        print('ok')
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# -- hostile bitstreams -------------------------------------------------------------------------------

def _decode_or_coder_error(coder, data, shape):
    """Decode's contract: an int32 array of exactly ``shape``, or CoderError (None here)."""
    try:
        out = coder.decode(data, shape)
    except CoderError:
        return None
    assert out.shape == tuple(shape) and out.dtype == np.int32
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=600), shape=st.sampled_from([(24, 1, 1), (24, 5, 7), (24, 55, 55)]))
def test_any_bytes_decode_to_the_shape_or_coder_error(coder, data, shape):
    _decode_or_coder_error(coder, data, shape)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 10**6), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), max_size=4),
       extra=st.binary(max_size=12))
def test_mutated_real_streams_decode_canonically_or_fail(coder, prior, cut, flips, extra):
    """Truncations, bit flips and appended bytes of a real stream (small latent, with escapes):
    decode returns the shape or CoderError, and an accepted stream is exactly the encoding of what
    it decodes to (one meaning per payload)."""
    _, sym = _latent(prior, (24, 3, 4), seed=7)
    sym = sym.copy()
    sym[0, 0, 0], sym[5, 2, 3] = 500, -(2**20)
    data = bytearray(coder.encode(sym))
    data = data[: cut % (len(data) + 1)]
    for pos, bit in flips:
        if data:
            data[pos % len(data)] ^= 1 << bit
    data = bytes(data) + extra
    out = _decode_or_coder_error(coder, data, sym.shape)
    if out is not None:
        assert coder.encode(out) == data


def test_truncations_leftovers_and_bad_lengths_of_a_real_stream(coder, latent):
    _, sym = latent
    data = coder.encode(sym)
    for cut in range(0, len(data), 97):
        with pytest.raises(CoderError):
            coder.decode(data[:cut], sym.shape)
    # appended bytes are never ignored: the stream is refused, or (like any accepted stream) it is
    # exactly the encoding of the latent it decodes to, which then differs from ``sym``
    rng = np.random.default_rng(3)
    tails = [b"\x01\x00\x00\x00", b"\xff\xff\xff\xff"] + [rng.bytes(4 * int(rng.integers(1, 4))) for _ in range(50)]
    for extra in tails:
        out = _decode_or_coder_error(coder, data + extra, sym.shape)
        assert out is None or (coder.encode(out) == data + extra and not np.array_equal(out, sym))
    with pytest.raises(CoderError, match="does not end where the latent ends"):
        coder.decode(data + b"\x01\x00\x00\x00", sym.shape)
    for bad in (b"", b"\x00" * 4, data + b"\x00" * 4, b"\x01", data[:-1], data + b"\x01"):
        with pytest.raises(CoderError):
            coder.decode(bad, sym.shape)
    with pytest.raises(CoderError, match="whole 32-bit words"):  # longer than any (24, 1, 1) latent needs
        coder.decode(b"\x01\x00\x00\x00" * 51, (24, 1, 1))
    for shape in [(23, 55, 55), (24, 0, 5), (24, 1, -1), (24, MAX_ELEMENTS, 2), "24x55x55", (24, 55)]:
        with pytest.raises(CoderError):
            coder.decode(data, shape)
    assert np.array_equal(coder.decode(bytearray(data), sym.shape), coder.decode(memoryview(data), sym.shape))


def _hand_made_stream(tables: CodingTables, above: bool, u: int) -> bytes:
    """A (24, 1, 1) stream written with constriction directly, following the documented format:
    channel 0 escapes with distance ``u - 1`` (1 <= u < 2**32), every other channel sits at table
    index 0."""
    import constriction

    model = constriction.stream.model
    k = u.bit_length()
    mantissa, hi_bits, lo_bits = u - (1 << (k - 1)), max(k - 1 - 16, 0), min(k - 1, 16)
    parts = [(mantissa >> 16, hi_bits), (mantissa & 0xFFFF, lo_bits)]
    parts = [(v, b) for v, b in parts if b > 0]
    ans = constriction.stream.stack.AnsCoder()
    ans.encode_reverse(np.ones(1, np.int32), model.Categorical(np.array([0.0, 1.0]), perfect=False))
    if parts:
        ans.encode_reverse(np.array([v for v, _ in parts], np.int32), model.Uniform(),
                           np.array([1 << b for _, b in parts], np.int32))
    ans.encode_reverse(np.array([2 * (k - 1) + int(above)], np.int32), model.Uniform(64))
    for ch in range(23, -1, -1):
        n = int(tables.cdf_length[ch])
        pmf = np.diff(tables.quantized_cdf[ch, :n].astype(np.float64))
        ans.encode_reverse(np.array([n - 2 if ch == 0 else 0], np.int32), model.Categorical(pmf, perfect=False))
    return ans.get_compressed().astype("<u4").tobytes()


def test_escapes_beyond_int32_are_refused(tables, coder):
    """The header allows distances up to 2**32 - 2; those that land outside int32 must not wrap."""
    top = int(tables.offset[0]) + int(tables.cdf_length[0]) - 2  # escape's symbol: value = top + u - 1
    low = int(tables.offset[0])  # below: value = offset - u
    for above, u, want in [(True, 1, top), (True, I32.max - top + 1, I32.max), (False, 1, low - 1),
                           (False, low - int(I32.min), int(I32.min))]:
        out = coder.decode(_hand_made_stream(tables, above, u), (24, 1, 1))
        assert out[0, 0, 0] == want and (out[1:] == tables.offset[1:, None, None]).all()
    for above, u in [(True, I32.max - top + 2), (True, 2**32 - 1), (False, low - int(I32.min) + 1), (False, 2**32 - 1)]:
        with pytest.raises(CoderError, match="outside int32"):
            coder.decode(_hand_made_stream(tables, above, u), (24, 1, 1))

def test_every_accepted_stream_is_the_encoding_of_its_latent(coder):
    """Random 1-3 word streams for a (24, 1, 1) latent: a few hundredths of them decode (short ANS
    streams are dense), and each of those is byte for byte what encode gives for its latent."""
    rng = np.random.default_rng(0)
    accepted = 0
    for _ in range(20000):
        data = rng.integers(0, 2**32, size=int(rng.integers(1, 4)), dtype=np.uint64).astype("<u4").tobytes()
        out = _decode_or_coder_error(coder, data, (24, 1, 1))
        if out is not None:
            accepted += 1
            assert coder.encode(out) == data
    assert accepted > 10


FUZZ = """
import sys, traceback, numpy as np
from splitserve_edge.coder import CoderError, CodingTables, EntropyCoder
coders = {24: EntropyCoder(CodingTables.from_safetensors(sys.argv[1])),
          64: EntropyCoder(CodingTables.from_safetensors(sys.argv[2]))}
valid = {24: open(sys.argv[3], 'rb').read(), 64: open(sys.argv[4], 'rb').read()}
shapes = [(24, 55, 55), (24, 1, 1), (64, 28, 28)]
rng = np.random.default_rng(int(sys.argv[5]))
ok = bad = 0
for i in range(int(sys.argv[6])):
    shape = shapes[i % 3]
    real = valid[shape[0]] if shape[1] > 1 else valid[24]
    kind = (i // 3) % 4
    if kind == 0:
        data = rng.bytes(int(rng.integers(0, 4097)))
    elif kind == 1:
        data = real[: int(rng.integers(0, len(real) + 1))]
    elif kind == 2:
        b = bytearray(real)
        for _ in range(int(rng.integers(1, 9))):
            b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
        data = bytes(b)
    else:
        cut = int(rng.integers(0, len(real) // 4 + 1)) * 4
        data = real[:cut] + rng.bytes(int(rng.integers(0, 4097)))
    try:
        out = coders[shape[0]].decode(data, shape)
        assert out.shape == shape and out.dtype == np.int32
        ok += 1
    except CoderError:
        bad += 1
    except BaseException:
        traceback.print_exc()
        sys.exit(3)
print(ok, bad)
"""


@pytest.mark.slow
def test_ten_thousand_forged_streams_never_crash_the_process(tables, tables64, latent, prior64, tmp_path):
    """In a subprocess, so a crash (a negative return code, e.g. SIGSEGV) fails the test instead of
    killing pytest: random bytes, truncations, bit flips and spliced tails of real streams, for
    (24, 55, 55), (24, 1, 1) and (64, 28, 28); each decodes to its shape or raises CoderError."""
    _, sym64 = _latent(prior64, (64, 28, 28))
    tables.to_safetensors(tmp_path / "t24.safetensors")
    tables64.to_safetensors(tmp_path / "t64.safetensors")
    (tmp_path / "v24.bin").write_bytes(EntropyCoder(tables).encode(latent[1]))
    (tmp_path / "v64.bin").write_bytes(EntropyCoder(tables64).encode(sym64))
    args = [str(tmp_path / n) for n in ("t24.safetensors", "t64.safetensors", "v24.bin", "v64.bin")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", FUZZ, *args, "0", "10200"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    ok, bad = map(int, proc.stdout.split())
    assert ok + bad == 10200 and bad > 9000


# -- through the gateway: the crash repros of the coder issue ---------------------------------------

def _forge(real: Payload, latent=None, strings=None) -> bytes:
    strings = strings if strings is not None else real.strings
    return Payload(real.fingerprint, latent or real.latent_shape, real.original_sizes[: len(strings)] or
                   real.original_sizes, strings).to_bytes()


def test_crash_repros_get_4xx_from_a_live_gateway(server, edge, photo_jpeg):
    import httpx

    real = edge.encode([photo_jpeg]).payload
    c, h, w = real.latent_shape
    headers = {"Content-Type": "application/x-splitserve"}
    attacks = {
        "27-byte v1 payload claiming 24x1024x1024": bytes.fromhex("53530159c07ca6d5c5eb73188008800801e001e0010101d0d43928"),
        "valid header, 1-byte bitstream": _forge(real, strings=(b"\x22",)),
        "valid header, one-word bitstream": _forge(real, strings=(b"\x22\x00\x00\x00",)),
        "real bitstream, H and W forged to 1024": _forge(real, latent=(c, 1024, 1024)),
        "real bitstream, truncated to half": _forge(real, strings=(real.strings[0][: len(real.strings[0]) // 2 // 4 * 4],)),
    }
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for name, body in attacks.items():
            r = client.post("/infer", params={"tasks": "cls"}, content=body, headers=headers)
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        # the process survived all of them and still answers real payloads
        ok = client.post("/infer", params={"tasks": "cls"}, content=real.to_bytes(), headers=headers)
        assert ok.status_code == 200
    assert server.proc.poll() is None


RUNTIME_FUZZ = """
import sys, numpy as np
from splitserve.errors import PayloadError
from splitserve.gateway.runtime import Job, Runtime
from splitserve.plugins import PluginRegistry
from splitserve_edge.payload import Payload
rt = Runtime(sys.argv[1], PluginRegistry.discover(), tasks=['classification'])
real = Payload.from_bytes(open(sys.argv[2], 'rb').read())
rng = np.random.default_rng(1)
answered = refused = 0
for i in range(int(sys.argv[3])):
    s = bytearray(real.strings[0])
    if i % 2:
        s = bytearray(rng.bytes(int(rng.integers(1, 600))))
    else:
        for _ in range(int(rng.integers(1, 6))):
            s[int(rng.integers(len(s)))] ^= 1 << int(rng.integers(8))
    body = Payload(real.fingerprint, real.latent_shape, real.original_sizes, (bytes(s),)).to_bytes()
    try:
        payload, metas = rt.parse_payload(body)
        out = rt.run([Job(plugins=list(rt.plugins), payload=payload, metas=metas)])[0]
    except PayloadError:
        refused += 1
        continue
    if isinstance(out, PayloadError):
        refused += 1
    else:
        assert len(out) == 1 and 'classification' in out[0]
        answered += 1
print(answered, refused)
"""


@pytest.mark.slow
def test_forged_bitstreams_with_valid_headers_through_the_real_decode_path(bundle_dir, edge, photo_jpeg, tmp_path):
    """10,000 forged bitstreams behind valid headers (real fingerprint, accepted latent shape) go
    through the gateway's own parse → entropy decode → decoder → head, in a subprocess that must
    survive: each is answered or refused with PayloadError."""
    (tmp_path / "real.ssp").write_bytes(edge.encode([photo_jpeg]).data)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", RUNTIME_FUZZ, str(bundle_dir), str(tmp_path / "real.ssp"), "10000"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    answered, refused = map(int, proc.stdout.split())
    assert answered + refused == 10000 and refused > 0


def test_a_bad_bitstream_fails_its_request_alone(bundle_dir, edge, photo_jpeg):
    from splitserve.errors import PayloadError
    from splitserve.gateway.runtime import Job, Runtime
    from splitserve.plugins import PluginRegistry

    runtime = Runtime(bundle_dir, PluginRegistry.discover(), tasks=["classification"])
    real = edge.encode([photo_jpeg]).payload
    good_payload, good_metas = runtime.parse_payload(real.to_bytes())
    bad_payload, bad_metas = runtime.parse_payload(_forge(real, strings=(b"\x22\x00\x00\x00",)))
    plugins = list(runtime.plugins)
    alone = runtime.run([Job(plugins=plugins, payload=good_payload, metas=good_metas)])[0]
    mixed = runtime.run([Job(plugins=plugins, payload=bad_payload, metas=bad_metas),
                         Job(plugins=plugins, payload=good_payload, metas=good_metas)])
    assert isinstance(mixed[0], PayloadError)
    assert mixed[1] == alone
