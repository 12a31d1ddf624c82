"""Variable-rate bundles behind the gateway, as users meet it: a real uvicorn process (and a real
local Ray Serve) on loopback, real httpx clients, payloads whose images name different rates.

- A batch mixing every rate answers, image for image and task for task, what each image gets when
  sent alone at its rate — and what the codec's own model of that rate (``quantize``: rounding with
  rate k's gain and medians, inverse gain) predicts, so the server decodes every image at its rate.
- A rate index the bundle does not have, or a variable-rate payload without rates (v2), is a 400
  that says why, refused before any decode work; the next request is answered.
- ``GET /v1/encoder`` lists the rates a device may choose from.
- A single-rate bundle still reads v2 payloads, and reads a v3 payload at rate 0 the same.

Payloads are made with ``codec.compress(x, rates)`` and :class:`Payload` directly.
"""

from __future__ import annotations

import functools
import io
import shutil

import httpx
import pytest
import torch

from splitserve.bundle import RateEntry, read_manifest, write_manifest
from splitserve.edge import EdgeEncoder
from splitserve.gateway.process import GatewayProcess
from splitserve_edge.payload import Payload, fingerprint_id

from .conftest import texture
from .test_gateway import metric, scrape
from .test_ray import _assert_close

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20")]
PAYLOAD = {"Content-Type": "application/x-splitserve"}
TASKS = "cls,det,seg"
# every rate, several images; one photo at every rate (so the rate visibly changes its answers)
IMAGES = [("brick", (90, 70)), ("brick", (90, 70)), ("brick", (90, 70)), ("brick", (90, 70)),
          ("grass", (64, 64)), ("coffee", (120, 40)), ("astronaut", (70, 90)), ("chelsea", (80, 80))]
RATES = [0, 1, 2, 3, 3, 1, 0, 2]
DEFAULT_RATE = 2


class RateEdge:
    """Payloads at chosen rates from the bundle's own codec (``compress(x, rates)`` + :class:`Payload`)."""

    def __init__(self, bundle):
        self.edge = EdgeEncoder.from_bundle(bundle)
        self.codec = self.edge.codec
        self.fp = fingerprint_id(self.edge.fingerprint)

    def payload(self, images, rates) -> bytes:
        """``images`` (texture names and sizes), image i coded at ``rates[i]``."""
        x, sizes = self.edge.preprocess([texture(name, size) for name, size in images])
        strings, hw = self.codec.compress(x, rates)
        return Payload(self.fp, (self.codec.latent_channels, *hw), tuple(sizes), tuple(strings),
                       rates=tuple(rates)).to_bytes()


@pytest.fixture(scope="module")
def vr_bundle(vr_bundle_dir, tmp_path_factory):
    """The 4-rate test bundle with its rates measured into the manifest (real payload bytes of two
    photos per rate) and a default rate that is not 0."""
    path = tmp_path_factory.mktemp("rates") / "vr4"
    shutil.copytree(vr_bundle_dir, path)
    manifest, edge = read_manifest(path), RateEdge(path)
    pixels = manifest.input_size[0] * manifest.input_size[1]
    rates = []
    for k in range(edge.codec.rates):
        size = len(edge.payload([("brick", (90, 70)), ("grass", (90, 70))], [k, k])) / 2
        beta = 0.01 * 2 ** (edge.codec.rates - 1 - k)  # a larger β, a smaller payload
        rates.append(RateEntry(beta=beta, bytes_per_image=size, bpp=8 * size / pixels))
    write_manifest(path, manifest.model_copy(update={"rates": rates, "default_rate": DEFAULT_RATE}))
    return path


@pytest.fixture(scope="module")
def vr_server(vr_bundle):
    with GatewayProcess("--bundle", str(vr_bundle), "--max-wait-ms", "0") as s:
        yield s


@pytest.fixture(scope="module")
def vr_edge(vr_bundle):
    return RateEdge(vr_bundle)


@pytest.fixture(scope="module")
def predicted(vr_bundle, vr_edge):
    """Per (image, rate): the answers the codec's model of that rate predicts, computed here from
    ``codec.quantize`` (not the server's entropy decode) through the bundle's decoder and heads."""
    from splitserve.gateway.runtime import Runtime
    from splitserve.plugins import ImageMeta, PluginRegistry

    runtime = Runtime(vr_bundle, PluginRegistry.discover())
    codec = runtime.codec

    @functools.cache
    def answers(image, rate: int) -> dict:
        x, sizes = vr_edge.edge.preprocess([texture(*image)])
        with torch.inference_mode():
            h = codec.decode(codec.quantize(x, rate))
            metas = [ImageMeta(sizes[0], tuple(x.shape[-2:]))]
            return {p.name: runtime.heads.predict(p, h, metas)[0].model_dump(mode="json") for p in runtime.plugins}

    return answers


def restated(data: bytes, rates: tuple[int, ...] | None) -> bytes:
    """The same bitstreams under other rate indices (None: format v2, no rates)."""
    p = Payload.from_bytes(data)
    return Payload(p.fingerprint, p.latent_shape, p.original_sizes, p.strings, rates=rates).to_bytes()


def post(url: str, body: bytes, tasks: str | None = TASKS, headers=PAYLOAD) -> httpx.Response:
    return httpx.post(url + "/infer", params={"tasks": tasks} if tasks else None, content=body, headers=headers,
                      timeout=120)


def answers_of(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text[:300]
    return [r["tasks"] for r in response.json()["results"]]


def test_a_mixed_rate_batch_answers_what_each_image_gets_alone_at_its_rate(vr_server, vr_edge, predicted):
    before = scrape(vr_server)
    mixed = answers_of(post(vr_server.url, vr_edge.payload(IMAGES, RATES)))
    after = scrape(vr_server)
    for stage in ("entropy_decode", "feature_decode", "task:classification", "task:detection", "task:segmentation"):
        count = lambda text: metric(text, "splitserve_stage_seconds_count", stage=stage)  # noqa: E731
        assert count(after) - count(before) == 1, stage  # one batch, not one per rate
    assert len(mixed) == len(IMAGES)
    for image, rate, answer in zip(IMAGES, RATES, mixed):
        (alone,) = answers_of(post(vr_server.url, vr_edge.payload([image], [rate])))
        _assert_close(answer, alone)
        _assert_close(alone, predicted(image, rate))
        assert set(answer) == {"classification", "detection", "segmentation"}
    # the answers depend on the rate: the same photo at rates 0 and 3 is told apart
    p0, p3 = ([c["probability"] for c in mixed[k]["classification"]["top"]] for k in (0, 3))
    assert max(abs(a - b) for a, b in zip(p0, p3)) > 1e-3
    assert mixed[0]["segmentation"] != mixed[3]["segmentation"] or mixed[0]["detection"] != mixed[3]["detection"]


def test_a_rate_the_bundle_lacks_is_a_400_before_any_decode_and_the_server_keeps_serving(vr_server, vr_edge):
    good = vr_edge.payload(IMAGES[:2], [3, 0])
    v2 = restated(vr_edge.payload(IMAGES[:2], [0, 0]), None)  # rate-0 bitstreams, the rates left out
    before = scrape(vr_server)
    r = post(vr_server.url, restated(good, (3, 7)))
    assert (r.status_code, r.json()) == (400, {"detail": "image 1: rate index 7 is outside this bundle's rates 0..3"})
    r = post(vr_server.url, v2, "cls")
    assert r.status_code == 400
    assert r.json()["detail"] == ("this bundle codes at 4 rates and its payloads name each image's rate "
                                  "(format v3); this one is v2, without rates")
    after = scrape(vr_server)
    for stage in ("entropy_decode", "feature_decode"):  # refused while parsing: no decode work
        assert metric(after, "splitserve_stage_seconds_count", stage=stage) == \
            metric(before, "splitserve_stage_seconds_count", stage=stage), stage
    assert metric(after, "splitserve_requests_total", task="classification", status="400") - \
        metric(before, "splitserve_requests_total", task="classification", status="400") == 2
    assert len(answers_of(post(vr_server.url, good))) == 2  # and the next request is answered


def test_v1_encoder_lists_the_rates_a_device_may_choose_from(vr_server, vr_bundle, server):
    manifest = read_manifest(vr_bundle)
    info = httpx.get(vr_server.url + "/v1/encoder").json()
    assert info["payload_format_version"] == 3 and info["default_rate"] == DEFAULT_RATE
    assert [r["index"] for r in info["rates"]] == [0, 1, 2, 3]
    for listed, entry in zip(info["rates"], manifest.rates, strict=True):
        assert listed == {"index": listed["index"], **entry.model_dump()}
    sizes = [r["bytes_per_image"] for r in info["rates"]]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]  # rate 0 is the smallest payload
    # a single-rate bundle: one rate, v2 payloads
    single = httpx.get(server.url + "/v1/encoder").json()
    assert single["payload_format_version"] == 2 and single["default_rate"] == 0
    assert [r["index"] for r in single["rates"]] == [0]


def test_an_upload_is_encoded_at_the_default_rate(vr_server, vr_edge):
    """Full offloading on a variable-rate bundle: what a device sending the same photo at the
    default rate gets."""
    buf = io.BytesIO()
    texture("coffee", (120, 40)).save(buf, format="PNG")
    (upload,) = answers_of(post(vr_server.url, buf.getvalue(), headers={"Content-Type": "image/png"}))
    (device,) = answers_of(post(vr_server.url, vr_edge.payload([("coffee", (120, 40))], [DEFAULT_RATE])))
    _assert_close(upload, device)


def test_a_single_rate_bundle_reads_v2_as_before_and_v3_only_at_rate_0(server, edge):
    v2 = edge.encode([texture("brick", (90, 70)), texture("grass", (64, 64))]).data
    assert Payload.from_bytes(v2).rates is None
    before = answers_of(post(server.url, v2))
    assert answers_of(post(server.url, restated(v2, (0, 0)))) == before
    r = post(server.url, restated(v2, (0, 1)))
    assert (r.status_code, r.json()) == (400, {"detail": "image 1: rate index 1 is outside this bundle's rates 0..0"})
    assert answers_of(post(server.url, v2)) == before


def test_ray_answers_a_mixed_rate_batch_as_the_local_gateway(local_ray, vr_bundle, vr_server, vr_edge, predicted):
    """The Ray executor (decode in the ingress, heads in task deployments) decodes each image at
    its rate with the same code: the same answers, refusals and encoder description."""
    from ray import serve

    from splitserve.gateway.config import ServerConfig
    from splitserve.gateway.ray_app import build_app

    mixed = vr_edge.payload(IMAGES, RATES)
    rate7, v2 = restated(mixed, (*RATES[:-1], 7)), restated(mixed, None)
    url = local_ray.start() + "/vr"  # the Ray instance the Ray test modules share (conftest.py)
    serve.run(build_app(str(vr_bundle), config=ServerConfig(threads=1)), name="vr", route_prefix="/vr")
    try:
        answers = answers_of(post(url, mixed))
        _assert_close(answers, answers_of(post(vr_server.url, mixed)))
        for image, rate, answer in zip(IMAGES, RATES, answers):
            _assert_close(answer, predicted(image, rate))
        for bad in (rate7, v2):
            r, f = post(url, bad), post(vr_server.url, bad)
            assert (r.status_code, r.json()) == (f.status_code, f.json()) and r.status_code == 400
        assert httpx.get(url + "/v1/encoder").json() == httpx.get(vr_server.url + "/v1/encoder").json()
        assert len(answers_of(post(url, mixed, "cls"))) == len(IMAGES)
    finally:
        serve.delete("vr")
