"""`platform infer` with more images than the gateway takes in one request: split at the server's
stated limit, sent concurrently within a bound, answered in input order; segmentation masks saved at
each image's own size; --rate and --max-bytes on a single-rate bundle. A real gateway (uvicorn) with
--max-batch 4, real payloads."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import numpy as np
import pytest
from PIL import Image

from splitserve.cli import main
from splitserve.client import AsyncClient, Client
from splitserve.edge import EdgeEncoder
from splitserve.gateway.process import GatewayProcess
from splitserve_tasks.segmentation.schema import full_mask

from .conftest import jpeg_bytes, texture
from .helpers import informative_bundle

MAX_BATCH = 4
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "brick", "grass", "gravel", "camera", "moon", "page",
          "text", "horse")  # 3 × MAX_BATCH


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return informative_bundle(tmp_path_factory.mktemp("chunks") / "bundle", input_size=(64, 64),
                              tasks=["classification", "segmentation"])


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    """Twelve real photos, each of its own size: a result in the wrong place shows in its original_size."""
    root = tmp_path_factory.mktemp("photos")
    paths = []
    for i, name in enumerate(PHOTOS):
        path = root / f"{name}.jpg"
        path.write_bytes(jpeg_bytes(texture(name, (60 + 7 * i, 50 + 5 * i))))
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def gateway(bundle):
    with GatewayProcess("--bundle", str(bundle), "--max-batch", str(MAX_BATCH), "--max-wait-ms", "20") as server:
        yield server


@pytest.fixture(scope="module")
def singles(gateway, bundle, photos) -> list[dict]:
    """Each photo's answer to a request of its own."""
    edge = EdgeEncoder.from_bundle(bundle)
    with Client(gateway.url) as client:
        return [client.infer(edge.encode([p]).data, "cls,seg")["results"][0] for p in photos]


def refused(gateway) -> int:
    """400 answers the gateway has counted so far (its Prometheus metrics)."""
    text = httpx.get(gateway.url + "/metrics").text
    return int(sum(float(v) for v in re.findall(
        r'^splitserve_requests_total\{(?=[^}]*status="400")(?=[^}]*task="classification")[^}]*\} (\S+)$', text, re.M)))


def assert_same_answers(results: list[dict], singles: list[dict]) -> None:
    """Result i is photo i's: its original size (distinct per photo) and its classification, equal up to
    float rounding (a batch of four runs other kernels than a batch of one)."""
    assert len(results) == len(singles)
    for i, (got, alone) in enumerate(zip(results, singles)):
        assert got["index"] == i and got["original_size"] == alone["original_size"], i
        top, ref = got["tasks"]["classification"]["top"], alone["tasks"]["classification"]["top"]
        assert [t["label"] for t in top] == [t["label"] for t in ref], i
        assert [t["probability"] for t in top] == pytest.approx([t["probability"] for t in ref], rel=1e-4, abs=1e-6)
    assert len({tuple(s["original_size"]) for s in singles}) == len(singles)  # a swap could not hide


def test_infer_splits_at_the_server_limit_and_answers_in_order(gateway, bundle, photos, singles, capsys):
    assert httpx.get(gateway.url + "/v1/encoder").json()["max_images"] == MAX_BATCH
    before = refused(gateway)
    assert main(["infer", *photos, "--url", gateway.url, "--bundle", str(bundle), "--tasks", "cls,seg",
                 "--concurrency", "3", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["requests"] == len(photos) // MAX_BATCH  # full requests: the server's limit, not fewer
    assert_same_answers(answer["results"], singles)
    assert refused(gateway) == before  # the stated limit: never sent more
    assert [r["sent"]["rate"] for r in answer["results"]] == [0] * len(photos)  # single-rate: rate 0


def test_infer_rate_options_on_a_single_rate_bundle(gateway, bundle, photos, singles, capsys):
    """Any budget its rate-0 payload fits gives the same answers; --rate 1 and a budget below the
    smallest payload are one line each, exit 2."""
    edge = EdgeEncoder.from_bundle(bundle)
    alone = [edge.encode([p]).num_bytes for p in photos[:4]]
    assert main(["infer", *photos[:4], "--url", gateway.url, "--bundle", str(bundle), "--tasks", "cls",
                 "--max-bytes", str(max(alone))]) == 0
    text = capsys.readouterr().out
    for path in photos[:4]:
        assert f"{path} (" in text and "sent at rate 0 in " in text.split(f"{path} (")[1].splitlines()[0]
    assert main(["infer", *photos[:4], "--url", gateway.url, "--bundle", str(bundle), "--tasks", "cls",
                 "--max-bytes", str(max(alone)), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert_same_answers(results, singles[:4])  # the answers of the payloads sent without a budget
    assert [r["sent"]["rate"] for r in results] == [0] * 4
    # photo 0 is the first whose smallest payload exceeds min(alone) - 1 bytes (every photo's does)
    for args, message in ((["--rate", "1"], "rate 1 is outside this bundle's rates 0..0"),
                          (["--max-bytes", str(min(alone) - 1)],
                           f"{photos[0]}: no rate fits {min(alone) - 1} bytes; its smallest payload is "
                           f"{alone[0]} bytes")):
        assert main(["infer", *photos[:4], "--url", gateway.url, "--bundle", str(bundle), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_requests_in_flight_stay_within_the_bound(gateway, bundle, photos, singles):
    edge = EdgeEncoder.from_bundle(bundle)
    flight = {"now": 0, "most": 0}
    before = refused(gateway)

    async def run() -> dict:
        async with AsyncClient(gateway.url) as client:
            real = client.infer

            async def counted(body, tasks):  # the real request, watched
                flight["now"] += 1
                flight["most"] = max(flight["most"], flight["now"])
                try:
                    return await real(body, tasks)
                finally:
                    flight["now"] -= 1

            client.infer = counted
            return await client.infer_all(photos, lambda chunk: edge.encode(list(chunk)).data, "cls,seg",
                                          max_images=MAX_BATCH, concurrency=2)

    answer = asyncio.run(run())
    assert flight["most"] == 2  # concurrent, and never more than asked
    assert answer["requests"] == 3 and refused(gateway) == before
    assert_same_answers(answer["results"], singles)


def test_save_masks_writes_each_image_at_its_own_size(gateway, bundle, photos, tmp_path, capsys):
    out = tmp_path / "masks"
    assert main(["infer", *photos[:5], photos[0], "--url", gateway.url, "--bundle", str(bundle), "--tasks", "seg",
                 "--save-masks", str(out), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    masks = Client.full_masks(answer)
    names = [f"{p.rsplit('/', 1)[1][:-4]}.png" for p in photos[:5]] + [f"{PHOTOS[0]}-5.png"]
    assert sorted(f.name for f in out.iterdir()) == sorted(names)
    for name, path, mask, result in zip(names, photos[:5] + photos[:1], masks, answer["results"]):
        with Image.open(path) as photo, Image.open(out / name) as saved:
            assert saved.mode == "P" and saved.size == photo.size  # the original image's size, not the model's
            assert np.array_equal(np.asarray(saved), mask)
        assert np.array_equal(mask, full_mask(result["tasks"]["segmentation"]))
    assert len(np.unique(masks[0])) > 1  # an informative mask: the comparison means something


def test_save_masks_without_segmentation_is_one_line(gateway, bundle, photos, tmp_path, capsys):
    assert main(["infer", photos[0], "--url", gateway.url, "--bundle", str(bundle), "--tasks", "cls",
                 "--save-masks", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no segmentation" in err[0]
