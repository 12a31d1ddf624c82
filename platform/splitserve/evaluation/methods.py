"""The methods a study compares, each measured on its served path.

- **Our bundles** (:class:`BundlePoint`): every image is encoded by the bundle's
  :class:`~splitserve.edge.EdgeEncoder` into its own payload (one image per payload, as a device
  sends it); the rate is that payload's length, header included. The bytes go through the gateway
  :class:`~splitserve.gateway.runtime.Runtime` (strict parse, fingerprint and shape checks,
  entropy decode, decoder, heads), whose answers are scored. A variable-rate bundle is one point
  per rate (:meth:`BundlePoint.per_rate`): the same models, each image coded at that rate.
- **Input codecs** (:class:`PillowCodec` for JPEG/WebP, :class:`CompressAICodec` for learned image
  codecs): the image is brought to the *model input* geometry by the teacher's declared
  preprocessing (resize/crop, before normalisation), encoded, decoded to 8-bit RGB, normalised and
  answered by the *uncompressed* teacher (:class:`TeacherPath`). The rate is the encoded file's
  size. With no codec, the teacher path gives the uncompressed reference accuracy.

Rates are in bits per pixel of the model input (:func:`splitserve_edge.payload.bits_per_pixel`)
and bytes per image.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from splitserve_edge.payload import Encoded, bits_per_pixel
from splitserve_edge.preprocessing import normalize

from ..errors import BundleError, SplitserveError
from ..plugins import ImageMeta
from ..preprocess import load_image
from .complexity import count_macs, count_parameters, latency_ms
from .imagecodec import ImageCodec, to_unit_tensor
from .tasks import TaskData, scoring_config


@dataclass
class Measured:
    """One method point on one task: the answers and what each image cost on the wire."""

    answers: list = field(default_factory=list)
    num_bytes: list[int] = field(default_factory=list)
    bpp: list[float] = field(default_factory=list)
    input_hw: tuple[int, int] | None = None

    @property
    def bytes_per_image(self) -> float:
        return float(np.mean(self.num_bytes)) if self.num_bytes else 0.0

    @property
    def mean_bpp(self) -> float:
        """Mean over images of each image's bits over its model-input pixels (for a fixed input
        size: total bits over total pixels)."""
        return float(np.mean(self.bpp)) if self.bpp else 0.0


def rate_of(num_bytes: Sequence[int], input_hws: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """(bytes per image, bpp of the model input) of images that cost ``num_bytes`` each."""
    if len(num_bytes) != len(input_hws) or not num_bytes:
        raise ValueError("one byte count and one input size per image")
    bpp = [bits_per_pixel(8 * n, 1, hw) for n, hw in zip(num_bytes, input_hws)]
    return float(np.mean(num_bytes)), float(np.mean(bpp))


def _chunks(seq: Sequence, n: int):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


# -- the device's call site -----------------------------------------------------------------------
def encode_at(edge, x: torch.Tensor, sizes: Sequence[tuple[int, int]], rate: int | None) -> Encoded:
    """The payload a device sends for the normalised batch ``x`` coded at ``rate`` (None: the
    bundle's default rate). Every payload a study or ``bench link`` measures is made here or in
    :func:`encode_within`: the edge encoder's own path."""
    return edge.encode_tensor(x, sizes, rate=rate)


@torch.inference_mode()
def encode_within(edge, x: torch.Tensor, sizes: Sequence[tuple[int, int]], max_bytes: int) -> Encoded:
    """Each image at the highest rate whose one-image payload has at most ``max_bytes`` bytes (the
    device's ``--max-bytes``); :class:`splitserve_edge.rates.BudgetError` when even rate 0 does not fit."""
    return edge.encode_tensor(x, sizes, max_bytes=max_bytes)


# -- our bundles -----------------------------------------------------------------------------------
class BundlePoint:
    """One bundle at one rate: edge encoder + gateway runtime for the tasks it has.

    ``rate`` is None for a single-rate bundle. A variable-rate bundle starts at its default rate
    and is one point per rate (:meth:`per_rate`), every one sharing the loaded models."""

    def __init__(self, path: Path, tasks: Sequence[str], registry):
        from ..bundle import read_manifest
        from ..edge import EdgeEncoder
        from ..gateway.runtime import Runtime

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.tasks = [t for t in tasks if t in self.manifest.tasks]
        self.edge = EdgeEncoder.from_bundle(self.path, self.manifest)
        self.runtime = Runtime(self.path, registry, tasks=self.tasks) if self.tasks else None
        if self.runtime is not None:
            for name, cfg in self.runtime.head_configs.items():  # the plugins' scoring settings
                self.runtime.head_configs[name] = scoring_config(registry.get(name), cfg)
        self.rate: int | None = None if self.rates == 1 else self.manifest.default_rate

    @property
    def rates(self) -> int:
        """How many rates the bundle's codec has (1: single-rate)."""
        return self.edge.codec.rates

    def at_rate(self, rate: int) -> "BundlePoint":
        """This bundle coding every image at ``rate`` (the models are shared, not copied)."""
        point = copy.copy(self)
        point.rate = self.edge.codec.check_rate(rate)
        return point

    def per_rate(self) -> list["BundlePoint"]:
        """A variable-rate bundle's points, rate 0 (the smallest payload) first; a single-rate
        bundle is its own one point."""
        return [self] if self.rates == 1 else [self.at_rate(k) for k in range(self.rates)]

    @property
    def setting(self) -> str:
        return self.path.name if self.rate is None else f"{self.path.name} r{self.rate}"

    def config(self, task: str) -> dict[str, Any]:
        """The head config ``task``'s answers were made with."""
        return self.runtime.head_configs[task]

    def encode(self, images: Sequence) -> Encoded:
        """One payload for ``images`` at this point's rate (one image: what a device sends)."""
        x, sizes = self.edge.preprocess(images)
        return encode_at(self.edge, x, sizes, self.rate)

    def cost(self, items: Sequence) -> tuple[float, float]:
        """(bytes per image, bpp) of ``items`` (EvalSamples), each in its own payload, as :meth:`run` counts them."""
        encoded = [self.encode([item.path]) for item in items]
        return rate_of([e.num_bytes for e in encoded], [e.input_hw for e in encoded])

    def _job(self, tasks: Sequence[str], data: bytes):
        from ..gateway.runtime import Job

        payload, metas = self.runtime.parse_payload(data)
        return Job(plugins=[self.runtime.registry.get(t) for t in tasks], payload=payload, metas=metas)

    def answer(self, task: str, payloads: Sequence[bytes]) -> list:
        """The gateway runtime's answers for ``task`` to payloads this bundle's edge made (one batch)."""
        answers = []
        for result in self.runtime.run([self._job([task], data) for data in payloads]):  # decode once, heads
            if isinstance(result, Exception):
                raise SplitserveError(f"{self.path}: the runtime refused its own payload: {result}")
            answers.append(result[0][task])
        return answers

    def run(self, data: TaskData, batch_size: int, progress: bool, desc: str) -> Measured:
        out = Measured()
        bar = tqdm(total=len(data.items), desc=desc, unit="img", disable=not progress, leave=False)
        for chunk in _chunks(data.items, batch_size):
            payloads = []
            for item in chunk:
                encoded = self.encode([item.path])  # one payload per image, as a device sends
                out.num_bytes.append(len(encoded.data))
                out.bpp.append(encoded.bpp[0])
                out.input_hw = encoded.input_hw
                payloads.append(encoded.data)
            out.answers += self.answer(data.task, payloads)  # the gateway's batch path
            bar.update(len(chunk))
        bar.close()
        return out

    def device(self, sample: Image.Image, threads: int, repeat: int) -> dict[str, Any]:
        """Device-side parameters (encoder + prior), encoder MACs and encode latency
        (transform + entropy coding + payload assembly) at batch 1."""
        codec = self.edge.codec
        x, sizes = self.edge.preprocess([sample])
        counts = codec.parameter_counts()
        return {
            "device_params": counts["encoder"] + counts["prior"],
            "device_macs": count_macs([codec.encoder], lambda: codec.encoder(x)),
            "encode_ms": latency_ms(lambda: encode_at(self.edge, x, sizes, self.rate), threads, repeat),
            "input_hw": tuple(x.shape[-2:]),
        }

    def server_ms(self, task: str, sample: Image.Image, threads: int, repeat: int) -> float:
        """Gateway time of one image: parse + entropy decode + decoder + the task's head."""
        data = self.encode([sample]).data
        return latency_ms(lambda: self.runtime.run([self._job([task], data)]), threads, repeat)

    def request_ms(self, sample: Image.Image, threads: int, repeat: int) -> float:
        """Gateway time of one image asking for every task of this point in one request (one parse,
        entropy decode and decoder pass, then each head): what a multi-task request costs the server."""
        data = self.encode([sample]).data
        result = self.runtime.run([self._job(self.tasks, data)])[0]
        if isinstance(result, Exception) or set(result[0]) != set(self.tasks):
            raise SplitserveError(f"{self.path}: a request for {', '.join(self.tasks)} was not answered on every "
                                  f"task: {result}")
        return latency_ms(lambda: self.runtime.run([self._job(self.tasks, data)]), threads, repeat)


@dataclass
class BundleMeasurement:
    """What ``platform bundle measure`` writes: each task's metrics at the bundle's default rate,
    the task whose rate stands for the bundle's, and (variable-rate) what every rate costs."""

    tasks: dict[str, dict[str, float]]
    summary_task: str
    rate: int | None  # the rate the task metrics were measured at (None: a single-rate bundle)
    rates: list[dict[str, float]]  # by rate index: {bytes_per_image, bpp}; [] for a single-rate bundle


def measure_bundle(path: Path, data_root: Path, *, split: str = "val", limit: int | None = None,
                   batch_size: int = 32, progress: bool = True) -> BundleMeasurement:
    """Every task of a bundle scored on its served path (payload bytes → gateway runtime) at its
    default rate, with what each image cost: task → {metric…, payload_bpp, bytes, images}. A
    variable-rate bundle's every rate is costed on the summary task's images (the manifest's first
    task), exactly as ``platform evaluate`` costs that rate's point there."""
    from ..bundle import read_manifest
    from ..plugins import PluginRegistry
    from .tasks import load_task_data

    manifest = read_manifest(path)
    if not manifest.tasks:  # a clear error before any model or data is loaded
        raise BundleError(f"{path}: the bundle has no task heads to measure")
    registry = PluginRegistry.discover()
    point = BundlePoint(path, list(manifest.tasks), registry)
    served = point if point.rates == 1 else point.at_rate(manifest.default_rate)
    summary_task = point.tasks[0]
    out, items = {}, {}
    for task in point.tasks:
        data = load_task_data(registry.get(task), data_root, split, manifest.policy, limit)
        m = served.run(data, batch_size, progress, task)
        out[task] = {**data.score(m.answers, served.config(task)), "payload_bpp": m.mean_bpp,
                     "bytes": m.bytes_per_image, "images": float(len(m.answers))}
        items[task] = data.items
    rates = [dict(zip(("bytes_per_image", "bpp"), p.cost(items[summary_task]))) for p in point.per_rate()]
    return BundleMeasurement(out, summary_task, served.rate, rates if point.rates > 1 else [])


# -- input codecs ----------------------------------------------------------------------------------
class PillowCodec:
    """JPEG or WebP through Pillow at one quality (Pillow's defaults otherwise: JPEG 4:2:0
    chroma subsampling, baseline; WebP lossy, method 4)."""

    def __init__(self, kind: str, quality: int):
        if kind not in ("jpeg", "webp"):
            raise ValueError(kind)
        self.kind, self.quality = kind, int(quality)
        self.format = "JPEG" if kind == "jpeg" else "WEBP"

    @property
    def setting(self) -> str:
        return f"q{self.quality}"

    def encode(self, img: Image.Image) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=self.format, quality=self.quality)
        return buf.getvalue()

    def decode(self, data: bytes) -> Image.Image:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")

    def device(self, img: Image.Image, threads: int, repeat: int) -> dict[str, Any]:
        return {"device_params": None, "device_macs": None, "encode_ms": latency_ms(lambda: self.encode(img), threads, repeat),
                "input_hw": (img.height, img.width)}


class CompressAICodec:
    """A trained CompressAI image codec (``platform train-image-codec``) as an input codec."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.codec = ImageCodec.load(self.path)

    @property
    def setting(self) -> str:
        return self.path.name

    def encode(self, img: Image.Image) -> bytes:
        return self.codec.encode(img)

    def decode(self, data: bytes) -> Image.Image:
        return self.codec.decode(data)

    def device(self, img: Image.Image, threads: int, repeat: int) -> dict[str, Any]:
        x = to_unit_tensor(img)
        mods = self.codec.device_modules()
        return {"device_params": count_parameters(mods),
                "device_macs": count_macs(mods, lambda: self.codec.device_forward(x)),
                "encode_ms": latency_ms(lambda: self.codec.encode_tensor(x), threads, repeat),
                "input_hw": (img.height, img.width)}


class TeacherPath:
    """Encode → decode → the uncompressed teacher of one task (stem + head + the plugin's predict)."""

    def __init__(self, teacher, plugin):
        self.teacher, self.plugin = teacher, plugin
        self.policy = teacher.preprocessing
        self.config = scoring_config(plugin, plugin.resolve_config(teacher.arch, teacher.config))
        teacher.stem.eval()
        teacher.head.eval()

    def _input(self, path_or_img, codec) -> tuple[np.ndarray, int, ImageMeta]:
        pil = load_image(path_or_img)
        geo = self.policy.geometry(pil)
        n = 0
        if codec is not None:
            data = codec.encode(geo)
            n = len(data)
            geo = codec.decode(data)
        meta = ImageMeta((pil.height, pil.width), (geo.height, geo.width))
        return normalize(np.asarray(geo, dtype=np.uint8)), n, meta

    @torch.inference_mode()
    def _answer(self, arrays: list[np.ndarray], metas: list[ImageMeta]) -> list:
        answers: list = [None] * len(arrays)
        by_shape: dict[tuple, list[int]] = {}
        for i, a in enumerate(arrays):
            by_shape.setdefault(a.shape, []).append(i)
        for rows in by_shape.values():
            x = torch.from_numpy(np.stack([arrays[i] for i in rows]))
            got = self.plugin.predict(self.teacher.head, self.teacher.stem(x), [metas[i] for i in rows], self.config)
            for i, a in zip(rows, got):
                answers[i] = a
        return answers

    def run(self, data: TaskData, codec, batch_size: int, progress: bool, desc: str) -> Measured:
        out = Measured()
        bar = tqdm(total=len(data.items), desc=desc, unit="img", disable=not progress, leave=False)
        for chunk in _chunks(data.items, batch_size):
            arrays, metas = [], []
            for item in chunk:
                arr, n, meta = self._input(item.path, codec)
                arrays.append(arr)
                metas.append(meta)
                if codec is not None:
                    out.num_bytes.append(n)
                    out.bpp.append(bits_per_pixel(8 * n, 1, meta.input_size))
                out.input_hw = meta.input_size
            out.answers += self._answer(arrays, metas)
            bar.update(len(chunk))
        bar.close()
        return out

    def server_ms(self, codec, sample: Image.Image, threads: int, repeat: int) -> float:
        """Server time of one image: decode the file, normalise, teacher stem + head + predict."""
        geo = self.policy.geometry(sample)
        data = codec.encode(geo)
        meta = ImageMeta((sample.height, sample.width), (geo.height, geo.width))

        def serve():
            arr = normalize(np.asarray(codec.decode(data), dtype=np.uint8))
            return self._answer([arr], [meta])

        return latency_ms(serve, threads, repeat)


def input_codec(kind: str, point) -> PillowCodec | CompressAICodec:
    return CompressAICodec(point) if kind == "compressai" else PillowCodec(kind, point)
