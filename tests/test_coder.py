"""The entropy coder both ends use (splitserve_edge.coder): exact, as small as the modelled rate,
torch-free, and safe on any bytes — at the coder, through the gateway's decode path, and over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from compressai.entropy_models import EntropyBottleneck
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve_edge.coder import CoderError, CodingTables, EntropyCoder
from splitserve_edge.payload import Payload


@pytest.fixture(scope="module")
def prior():
    """A real CompressAI prior whose quantiles were fitted to a latent distribution."""
    torch.manual_seed(0)
    eb = EntropyBottleneck(24)
    opt = torch.optim.Adam(eb.parameters(), lr=0.05)
    for _ in range(200):
        y = 3 * torch.randn(4, 24, 8, 8)
        _, lik = eb(y)
        loss = -torch.log2(lik).mean() + eb.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    eb.update(force=True)
    return eb


@pytest.fixture(scope="module")
def tables(prior) -> CodingTables:
    return CodingTables(prior.quantized_cdf.numpy(), prior.cdf_length.numpy(), prior.offset.numpy(),
                        prior._get_medians().detach().reshape(-1).numpy())


@pytest.fixture(scope="module")
def latent(prior):
    torch.manual_seed(1)
    y = 3 * torch.randn(1, 24, 55, 55)
    return y, prior.quantize(y, "symbols", prior._get_medians()).numpy()[0].astype(np.int32)


def test_round_trip_is_exact(tables, latent):
    _, sym = latent
    coder = EntropyCoder(tables)
    assert np.array_equal(coder.decode(coder.encode(sym), sym.shape), sym)


def test_escape_coding_covers_values_outside_the_table(tables, latent):
    _, sym = latent
    sym = sym.copy()
    extremes = [1000, -1000, 2**20, -(2**20), np.iinfo(np.int32).max - 1000, np.iinfo(np.int32).min + 1000]
    for k, v in enumerate(extremes):
        sym[k, k, k] = v
    coder = EntropyCoder(tables)
    data = coder.encode(sym)
    assert np.array_equal(coder.decode(data, sym.shape), sym)
    # each escape costs a few words, not a table's worth
    assert len(data) - len(coder.encode(latent[1])) < 16 * len(extremes)


def test_rate_is_what_the_prior_predicts(prior, tables, latent):
    """The bytes devices pay equal CompressAI's rANS bytes for the same latent (within 3 %)."""
    y, sym = latent
    ours = len(EntropyCoder(tables).encode(sym))
    theirs = len(prior.compress(y)[0])
    assert abs(ours - theirs) <= 0.03 * theirs + 8, (ours, theirs)


def test_same_symbols_same_bytes(tables, latent):
    _, sym = latent
    again = CodingTables.from_bytes(tables.to_bytes())
    assert again.digest() == tables.digest()
    assert EntropyCoder(tables).encode(sym) == EntropyCoder(again).encode(sym)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a["quantized_cdf"].__setitem__((0, 1), 70000), "CDF"),
    (lambda a: a.__setitem__("cdf_length", a["cdf_length"][:-1]), "channel count"),
    (lambda a: a.__setitem__("cdf_length", np.full_like(a["cdf_length"], 2)), "cdf_length"),
    (lambda a: a.__setitem__("medians", np.full_like(a["medians"], np.nan)), "finite"),
    (lambda a: a.__setitem__("offset", a["offset"].astype(np.float32) + 0.5), "int32"),
])
def test_invalid_tables_rejected(tables, mutate, match):
    arrays = {k: np.array(v) for k, v in tables.arrays().items()}
    mutate(arrays)
    with pytest.raises(CoderError, match=match):
        CodingTables(**arrays)


def test_garbage_tables_file_rejected():
    with pytest.raises(CoderError, match="not a coding-tables file"):
        CodingTables.from_bytes(b"\x00" * 40)


def test_torch_free_import_and_decode(tables, latent, tmp_path):
    """A device has no torch: the coder imports and decodes with torch, torchvision and compressai
    made unimportable."""
    _, sym = latent
    (tmp_path / "tables.safetensors").write_bytes(tables.to_bytes())
    (tmp_path / "stream.bin").write_bytes(EntropyCoder(tables).encode(sym))
    np.save(tmp_path / "sym.npy", sym)
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'torchvision', 'compressai'):
                    raise ImportError('no ' + name + ' on this device')
        sys.meta_path.insert(0, Block())
        import numpy as np
        from splitserve_edge.coder import CodingTables, EntropyCoder
        t = CodingTables.from_file({str(tmp_path / 'tables.safetensors')!r})
        sym = np.load({str(tmp_path / 'sym.npy')!r})
        got = EntropyCoder(t).decode(open({str(tmp_path / 'stream.bin')!r}, 'rb').read(), sym.shape)
        assert np.array_equal(got, sym)
        assert not any(m.split('.')[0] in ('torch', 'compressai') for m in sys.modules)
        print('ok')
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=0, max_size=600), shape=st.sampled_from([(24, 1, 1), (24, 5, 7), (24, 55, 55)]))
def test_any_bytes_decode_to_the_shape_or_coder_error(tables, data, shape):
    coder = EntropyCoder(tables)
    try:
        out = coder.decode(data, shape)
    except CoderError:
        return
    assert out.shape == shape and out.dtype == np.int32


def test_truncations_and_bit_flips_of_a_real_stream(tables, latent):
    _, sym = latent
    coder = EntropyCoder(tables)
    data = coder.encode(sym)
    for cut in range(0, len(data), 97):
        with pytest.raises(CoderError):
            coder.decode(data[:cut], sym.shape)
    with pytest.raises(CoderError, match="left over"):
        coder.decode(data + b"\x01\x00\x00\x00", sym.shape)
    for bad in (b"\x00" * 4, data + b"\x00" * 4, b"\x01"):  # ANS streams never end in a zero word
        with pytest.raises(CoderError):
            coder.decode(bad, sym.shape)
    rng = np.random.default_rng(0)
    for _ in range(200):
        flipped = bytearray(data)
        pos = int(rng.integers(len(data)))
        flipped[pos] ^= 1 << int(rng.integers(8))
        try:
            out = coder.decode(bytes(flipped), sym.shape)
        except CoderError:
            continue
        assert out.shape == sym.shape


FUZZ = """
import os, sys, numpy as np
from splitserve_edge.coder import CoderError, CodingTables, EntropyCoder
t = CodingTables.from_file(sys.argv[1])
coder = EntropyCoder(t)
valid = open(sys.argv[2], 'rb').read()
rng = np.random.default_rng(int(sys.argv[3]))
shapes = [(24, 55, 55), (24, 1, 1), (24, 14, 9)]
ok = bad = 0
for i in range(int(sys.argv[4])):
    kind = i % 3
    if kind == 0:
        data = rng.bytes(int(rng.integers(0, 4097)))
    elif kind == 1:
        data = valid[: int(rng.integers(0, len(valid) + 1))]
    else:
        b = bytearray(valid)
        for _ in range(int(rng.integers(1, 9))):
            b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
        data = bytes(b)
    try:
        coder.decode(data, shapes[i % len(shapes)] if kind == 0 else (24, 55, 55))
        ok += 1
    except CoderError:
        bad += 1
print(ok, bad)
"""


@pytest.mark.slow
def test_ten_thousand_forged_streams_never_crash_the_process(tables, latent, tmp_path):
    """In a subprocess, so a crash (a negative return code, e.g. SIGSEGV) fails the test instead of
    killing pytest; every forged stream decodes or raises CoderError."""
    _, sym = latent
    (tmp_path / "t.safetensors").write_bytes(tables.to_bytes())
    (tmp_path / "v.bin").write_bytes(EntropyCoder(tables).encode(sym))
    proc = subprocess.run([sys.executable, "-c", FUZZ, str(tmp_path / "t.safetensors"), str(tmp_path / "v.bin"),
                           "0", "10000"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    ok, bad = map(int, proc.stdout.split())
    assert ok + bad == 10000 and bad > 5000


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
