"""The device picks the rate (issue 24 §3): a fixed ``--rate K`` or the highest rate whose one-image
payload fits ``--max-bytes B``, through one code path (splitserve_edge.packing) that the PyTorch edge
and the torch-free ONNX client share; single-rate bundles keep writing v2 payloads byte for byte."""

from __future__ import annotations

import json
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from splitserve.bundle import RateEntry, read_manifest
from splitserve.cli import main
from splitserve.edge import EdgeEncoder
from splitserve.errors import SplitserveError
from splitserve.export import export_edge
from splitserve.gateway.process import GatewayProcess
from splitserve_edge import cli as edge_cli
from splitserve_edge.payload import MAGIC, Payload
from splitserve_edge.rates import BudgetError, CoderError, RateCoder, RateTables, is_rate_index
from splitserve_edge.runtime import EdgeModel

from .helpers import informative_bundle
from .test_infer_chunks import photos  # noqa: F401 — twelve real photos, each of its own size

RATES = 4  # the vr_bundle_dir fixture's


@pytest.fixture(scope="module")
def vr(vr_bundle_dir, tmp_path_factory) -> Path:
    """The 4-rate fixture bundle (its heads too) with a default rate of 2 and measured costs in its manifest."""
    path = tmp_path_factory.mktemp("vr") / "bundle"
    shutil.copytree(vr_bundle_dir, path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["rates"] = [RateEntry(beta=0.01 * 2 ** k, bytes_per_image=3000.0 + 500 * k, bpp=5.0 + k).model_dump()
                         for k in range(RATES)]
    manifest["default_rate"] = 2
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(path).default_rate == 2
    return path


@pytest.fixture(scope="module")
def edge(vr) -> EdgeEncoder:
    return EdgeEncoder.from_bundle(vr)


@pytest.fixture(scope="module")
def sizes(edge, photos) -> list[list[int]]:
    """The exhaustive scan: each photo's one-image payload length at every rate."""
    table = [[edge.encode([p], rate=k).num_bytes for k in range(RATES)] for p in photos]
    assert all(len(set(row)) == RATES for row in table[:3])  # informative: the rates really differ
    return table


@pytest.fixture(scope="module")
def onnx_dir(vr, photos, tmp_path_factory) -> tuple[Path, str]:
    """The ONNX export of ``vr`` and its self-check's summary."""
    out = tmp_path_factory.mktemp("export") / "onnx"
    return out, export_edge(vr, "onnx", out, photos[:3]).summary()


def mixed_budget(sizes: list[list[int]]) -> int:
    """A budget every photo fits at some rate, and at which they get different rates."""
    return max(sorted(row[2] for row in sizes)[len(sizes) // 2], max(row[0] for row in sizes))


def scan(row: list[int], budget: int) -> int | None:
    """The highest rate whose payload fits ``budget``, by trying every rate."""
    fitting = [k for k, n in enumerate(row) if n <= budget]
    return max(fitting) if fitting else None


# -- round trip ------------------------------------------------------------------------------------
def test_round_trip_at_every_rate(edge, photos):
    """Each rate's payload decodes (RateCoder, from the export's file format) to the latent that
    CompressAI's own rounding gives at that rate's gain and medians; the server's path (decompress,
    inverse gain) to ``codec.quantize`` at that rate."""
    codec = edge.codec
    coder = RateCoder(RateTables.from_bytes(codec.rate_tables().to_bytes()))
    x, _ = edge.preprocess(photos)
    with torch.no_grad():
        y = codec.encoder(x)
    for rate in range(RATES):
        payload = Payload.from_bytes(edge.encode(photos, rate=rate).data)
        assert payload.version == 3 and payload.rates == (rate,) * len(photos)
        with torch.no_grad():
            local = codec.priors[rate].quantize(y * codec.gain(rate), "dequantize", codec.medians(rate)).numpy()
        for i, string in enumerate(payload.strings):
            assert np.array_equal(coder.decode(string, payload.latent_shape, rate), local[i]), (rate, i)
        served = codec.decompress(payload.strings, payload.latent_shape[1:], payload.image_rates)
        assert torch.equal(served, codec.quantize(x, rate))
    assert np.abs(local).sum() > 0


def test_default_rate_is_the_bundles(edge, photos, vr):
    assert read_manifest(vr).default_rate == 2 == edge.default_rate
    assert edge.encode(photos[:2]).rates == (2, 2)
    assert edge.encode(photos[:2]).data == edge.encode(photos[:2], rate=2).data


# -- the byte budget -------------------------------------------------------------------------------
def test_max_bytes_picks_the_largest_payload_that_fits(edge, photos, sizes):
    """At budgets on and either side of every rate's exact payload length, each image gets what an
    exhaustive scan over the rates gives; its payload is at most the budget and the largest that fits."""
    checked = set()
    for p, row in zip(photos, sizes):
        for budget in sorted({b for n in row for b in (n - 1, n, n + 1)} | {10 ** 6}):
            want = scan(row, budget)
            if want is None:
                with pytest.raises(BudgetError):
                    edge.encode([p], max_bytes=budget)
                continue
            encoded = edge.encode([p], max_bytes=budget)
            assert encoded.rates == (want,), (p, budget, row)
            assert encoded.num_bytes == row[want] == max(n for n in row if n <= budget) <= budget
            checked.add(want)
    assert checked == set(range(RATES))


def test_max_bytes_is_per_image_in_a_batch(edge, photos, sizes):
    """One payload of several images: each image at its own choice, as if sent alone; every image
    decodes at the rate the payload names for it."""
    budget = mixed_budget(sizes)
    encoded = edge.encode(photos, max_bytes=budget)
    assert encoded.rates == tuple(scan(row, budget) for row in sizes)
    assert len(set(encoded.rates)) > 1  # a mixed batch
    payload = Payload.from_bytes(encoded.data)
    x, _ = edge.preprocess(photos)
    served = edge.codec.decompress(payload.strings, payload.latent_shape[1:], payload.rates)
    batch = {rate: edge.codec.quantize(x, rate) for rate in set(payload.rates)}  # the batch's own float kernels
    agree = 0
    for i, rate in enumerate(payload.rates):
        in_batch = batch[rate][i]
        assert torch.equal(served[i], in_batch)
        # a batch runs other float kernels than one image and may round an element the other way
        # (docs/edge.md): where the rounded latents agree, the image's string is the one it gets alone
        same = torch.equal(in_batch, edge.codec.quantize(x[i:i + 1], rate)[0])
        alone = Payload.from_bytes(edge.encode([photos[i]], rate=rate).data)
        assert (payload.strings[i] == alone.strings[0]) == same, (photos[i], rate)
        agree += same
    assert agree >= len(photos) - 1


def test_no_rate_fits_names_the_image_and_its_smallest_payload(edge, photos, sizes):
    """In a batch where one image fits and one does not, the error names the one that does not and
    the exact length of its smallest (rate 0) payload, the least budget that works."""
    big, small = max(range(len(photos)), key=lambda i: sizes[i][0]), min(range(len(photos)), key=lambda i: sizes[i][0])
    smallest = sizes[big][0]
    assert sizes[small][0] < smallest
    with pytest.raises(BudgetError, match=f"^{re.escape(photos[big])}: no rate fits {smallest - 1} bytes; its "
                                          f"smallest payload is {smallest} bytes \\(rate 0\\)$") as info:
        edge.encode([photos[small], photos[big]], max_bytes=smallest - 1)
    assert info.value.smallest == smallest and info.value.image == 1
    assert edge.encode([photos[big]], max_bytes=smallest).rates == (0,)


def test_one_range_rule_for_codec_coder_and_packer():
    """Integers (numpy's too) in 0..count-1 are rate indices; bools, floats and strings are not."""
    assert [is_rate_index(r, 4) for r in (0, 3, np.int64(2), np.uint8(3))] == [True] * 4
    assert [is_rate_index(r, 4) for r in (4, -1, True, False, 1.0, "1", None, np.int64(4))] == [False] * 8
    assert not is_rate_index(0, 0)


def test_rate_out_of_range_names_the_range(edge, photos):
    for rate in (RATES, -1, True, 1.0):
        with pytest.raises(SplitserveError, match=r"outside this bundle's rates 0\.\.3"):
            edge.encode(photos[:1], rate=rate)
    with pytest.raises(SplitserveError, match="not both"):
        edge.encode(photos[:1], rate=1, max_bytes=10_000)
    with pytest.raises(SplitserveError, match="positive"):
        edge.encode(photos[:1], max_bytes=0)
    y = np.zeros((1, 8, 2, 2), np.float32)
    for rate in (RATES, -1):  # the coder itself, a public API: the same message, never an IndexError or rate 3
        with pytest.raises(CoderError, match=r"outside this codec's rates 0\.\.3"):
            edge.codec.coder.encode(y, rate)


# -- the torch-free client -------------------------------------------------------------------------
def test_coding_tables_file_is_the_same_bytes_every_time(edge):
    """edge.json pins the file's SHA-256: one codec must give one file (safetensors writes a metadata
    map's keys in a random order, so the file carries a single key)."""
    tables = edge.codec.rate_tables()
    assert len({tables.to_bytes() for _ in range(30)}) == 1
    assert RateTables.from_bytes(tables.to_bytes()).digest() == tables.digest()


def test_export_lists_the_rates_and_checks_every_one(onnx_dir, vr, edge):
    out, summary = onnx_dir
    meta = json.loads((out / "edge.json").read_text())
    manifest = read_manifest(vr)
    assert meta["format_version"] == 2 and meta["payload_version"] == 3 and meta["default_rate"] == 2
    assert meta["rates"] == [{"index": k, **e.model_dump()} for k, e in enumerate(manifest.rates)]
    assert meta["rates"][3]["bytes_per_image"] == 4500.0
    assert (out / "coding.safetensors").read_bytes() == edge.codec.rate_tables().to_bytes()
    # ONNX Runtime's floats differ from PyTorch's by a few ulps, so an element next to a .5 boundary
    # may round the other way (docs/edge.md): a handful in 64,800, not a systematic difference
    flips = int(re.search(r"at each of 4 rates: (\d+) of 64,800 rounded", summary).group(1))
    identical = int(re.search(r"(\d+) of 12 payloads byte-identical", summary).group(1))
    assert flips <= 4 and identical >= 12 - flips
    model = EdgeModel.load(out)
    assert model.rates == RATES and model.default_rate == 2
    assert model.coder.tables.digest() == edge.codec.rate_tables().digest()


def test_onnx_client_and_pytorch_payloads_are_byte_identical_at_every_rate(onnx_dir, edge, photos, sizes):
    """One image per payload, as a device sends it (a batch runs other float kernels than one image,
    on both sides, and may round an element differently: docs/edge.md): at every rate, at the
    default rate, and under budgets that land on every rate, the payload is PyTorch's byte for byte
    wherever the two rounded latents agree. ONNX Runtime's floats differ from PyTorch's by a few
    ulps, and which elements land next to a .5 boundary depends on the thread count: at most one
    payload of its 48 disagrees (none at this machine's two torch threads, one at one)."""
    model = EdgeModel.load(onnx_dir[0], threads=1)
    disagree = 0
    for p, row in zip(photos, sizes):
        x, _ = edge.preprocess([p])
        ours, theirs = model.latents(x.numpy()), edge.codec.encoder(x).detach().numpy()
        agree = [np.array_equal(model.coder.symbols(ours, rate), model.coder.symbols(theirs, rate))
                 for rate in range(RATES)]
        for rate in range(RATES):
            assert (model.encode([p], rate=rate).data == edge.encode([p], rate=rate).data) == agree[rate], (p, rate)
        disagree += RATES - sum(agree)
        if all(agree):
            assert model.encode([p]).data == edge.encode([p]).data  # the default rate
            for budget in row:
                assert model.encode([p], max_bytes=budget).data == edge.encode([p], max_bytes=budget).data
    assert disagree <= 1
    with pytest.raises(BudgetError, match="smallest payload is"):
        model.encode(photos[:1], max_bytes=50)


# -- the command lines -----------------------------------------------------------------------------
def test_platform_encode_rate_and_max_bytes(vr, photos, sizes, tmp_path, capsys):
    out = tmp_path / "p.ssp"
    budget = sizes[0][2]
    assert main(["encode", *photos[:3], "--bundle", str(vr), "-o", str(out), "--max-bytes", str(budget)]) == 0
    text = capsys.readouterr().out
    payload = Payload.from_bytes(out.read_bytes())
    assert payload.rates == tuple(scan(row, budget) for row in sizes[:3])
    for p, rate in zip(photos[:3], payload.rates):  # the rate column
        assert [line.split()[-1] for line in text.splitlines() if line.startswith(p)] == [str(rate)]
    assert main(["encode", photos[0], "--bundle", str(vr), "-o", str(out), "--rate", "3"]) == 0
    assert Payload.from_bytes(out.read_bytes()).rates == (3,)


@pytest.mark.parametrize("args, message", [
    (["--rate", "4"], r"rate 4 is outside this bundle's rates 0\.\.3"),
    (["--max-bytes", "100"], r"no rate fits 100 bytes; its smallest payload is \d+ bytes \(rate 0\)"),
])
def test_platform_encode_refusals_are_one_line(vr, photos, tmp_path, capsys, args, message):
    out = tmp_path / "p.ssp"
    assert main(["encode", photos[0], "--bundle", str(vr), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("platform encode: error: ")
    assert re.search(message, err[0]) and (photos[0] in err[0] or "--rate" in args)
    assert not out.exists()


@pytest.mark.parametrize("args, usage", [(["--rate", "1", "--max-bytes", "9"], "not allowed with"),
                                         (["--max-bytes", "0"], "expected an integer >= 1"),
                                         (["--rate", "x"], "expected an integer >= 0")])
def test_rate_options_are_checked_by_the_parser(vr, photos, tmp_path, capsys, args, usage):
    with pytest.raises(SystemExit) as code:
        main(["encode", photos[0], "--bundle", str(vr), "-o", str(tmp_path / "p"), *args])
    assert code.value.code == 2 and usage in capsys.readouterr().err


def test_splitserve_edge_encode_rate_and_max_bytes(onnx_dir, photos, sizes, tmp_path, capsys):
    out = tmp_path / "p.ssp"
    model = str(onnx_dir[0])
    budget = sizes[1][1]
    assert edge_cli.main(["encode", model, photos[1], "-o", str(out), "--max-bytes", str(budget)]) == 0
    assert Payload.from_bytes(out.read_bytes()).rates == (1,) and out.stat().st_size == budget
    text = capsys.readouterr().out
    assert f"{budget}.0 bytes" in text and "rate 1 of 0..3" in text
    assert edge_cli.main(["encode", model, photos[1], "-o", str(out), "--rate", "3"]) == 0
    assert "rate 3 of 0..3" in capsys.readouterr().out
    assert edge_cli.main(["encode", model, photos[1], "-o", str(tmp_path / "q"), "--max-bytes", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{photos[1]}: no rate fits 64 bytes; its smallest payload is {sizes[1][0]} bytes" in err[0]
    assert edge_cli.main(["encode", model, photos[1], "-o", str(tmp_path / "q"), "--rate", "9"]) == 2
    assert "rate 9 is outside this bundle's rates 0..3" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_platform_infer_sends_each_image_at_the_rate_that_fits(vr, photos, sizes, capsys):
    """Against a gateway serving the variable-rate bundle: each image goes at the scan's rate, the
    answer says which, and every request is answered."""
    budget = mixed_budget(sizes)
    with GatewayProcess("--bundle", str(vr), "--max-wait-ms", "0") as server:
        assert main(["infer", *photos, "--url", server.url, "--bundle", str(vr), "--tasks", "cls",
                     "--max-bytes", str(budget), "--json"]) == 0
        answer = json.loads(capsys.readouterr().out)
        assert [r["sent"]["rate"] for r in answer["results"]] == [scan(row, budget) for row in sizes]
        assert all(r["tasks"]["classification"] for r in answer["results"])
        assert main(["infer", photos[0], "--url", server.url, "--bundle", str(vr), "--tasks", "cls"]) == 0
        assert "sent at rate 2 in " in capsys.readouterr().out  # the bundle's default rate


# -- single-rate bundles: unchanged ----------------------------------------------------------------
@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    return informative_bundle(tmp_path_factory.mktemp("single") / "bundle", input_size=(64, 64),
                              tasks=["classification"])


def v2_bytes(edge: EdgeEncoder, photos: list[str]) -> bytes:
    """The v2 payload assembled by hand from the spec (docs/payload.md), around codec.compress's bitstreams."""
    def varint(v: int) -> bytes:
        out = bytearray()
        while True:
            out.append((v & 0x7F) | (0x80 if v >> 7 else 0))
            v >>= 7
            if not v:
                return bytes(out)

    x, sizes = edge.preprocess(photos)
    strings, (h, w) = edge.codec.compress(x)
    head = MAGIC + b"\x02" + bytes.fromhex(edge.fingerprint[:16])
    head += b"".join(map(varint, (edge.codec.latent_channels, h, w, len(strings))))
    head += b"".join(varint(a) + varint(b) + varint(len(s)) for (a, b), s in zip(sizes, strings))
    body = head + b"".join(strings)
    return body + zlib.crc32(body).to_bytes(4, "little")


def test_single_rate_payloads_stay_v2_bytes(single, photos, tmp_path, capsys):
    edge = EdgeEncoder.from_bundle(single)
    assert edge.rates == 1
    want = v2_bytes(edge, photos[:3])
    assert edge.encode(photos[:3]).data == want
    assert edge.encode(photos[:3], rate=0).data == want
    assert edge.encode(photos[:3], max_bytes=10 ** 6).data == want
    with pytest.raises(SplitserveError, match=r"rate 1 is outside this bundle's rates 0\.\.0 \(a single-rate"):
        edge.encode(photos[:1], rate=1)
    alone = len(v2_bytes(edge, photos[:1]))
    assert edge.encode(photos[:1], max_bytes=alone).data == v2_bytes(edge, photos[:1])
    with pytest.raises(BudgetError, match=f"smallest payload is {alone} bytes"):
        edge.encode(photos[:1], max_bytes=alone - 1)
