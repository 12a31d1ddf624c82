"""Everything the gateway computes, in two sides that can live in one process or in several.

- :class:`Features` — the feature side: parse + fingerprint and shape checks, entropy decode,
  decoder, and the shared trunk (layer2..4). Bytes in, ``h`` (and the trunk's outputs) out.
- :class:`Heads` — the head side: each served plugin's head and ``predict``; the trunk's outputs
  are lent to the heads that run the trunk module itself.
- :class:`Runtime` — both sides in one process (the local executor, evaluation, tests): decode once
  per batch, trunk once, every requested head.

Loaded and checked at start-up (plugins vs bundle), so a bad deployment fails before the first
request rather than on it. Holds no HTTP concepts.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from ..bundle import Manifest, load_codec, load_head, load_trunk, read_manifest
from ..models.backbone import SharedTrunk, trunk_of
from ..errors import PayloadError, PluginError
from splitserve_edge.payload import Payload, PayloadLimits, fingerprint_id
from splitserve_edge.rates import is_rate_index
from ..plugins import ImageMeta, PluginContractError, PluginRegistry, TaskPlugin
from ..preprocess import load_image, to_input
from .batching import out_of_memory
from .metrics import GatewayMetrics

log = logging.getLogger("splitserve.gateway")

TrunkOutputs = Mapping[str, torch.Tensor]


@dataclass
class Job:
    """One request's images: either a parsed payload or preprocessed pixels (full offloading)."""

    plugins: list[TaskPlugin]
    payload: Payload | None = None
    pixels: torch.Tensor | None = None  # (B, 3, H, W), normalised
    metas: list[ImageMeta] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return len(self.metas)

    @property
    def group_key(self) -> tuple:
        """Jobs with equal keys share one entropy decode and one decoder forward."""
        if self.payload is not None:
            return ("payload", self.payload.latent_shape)
        return ("pixels", tuple(self.pixels.shape[1:]))


class TaskFailed(Exception):
    """A task failed on the server (a plugin bug, not the request): 500 naming the task."""

    def __init__(self, task: str):
        super().__init__(f"task {task} failed on the server")


class TrunkOnce:
    """The shared layer2..4 outputs of one batch: computed on first use (or handed over by
    another process), then sliced per plugin."""

    def __init__(self, compute: Callable[[], TrunkOutputs] | None = None, outputs: TrunkOutputs | None = None):
        self._compute, self._out = compute, outputs

    def outputs(self, rows: Sequence[int] | None) -> TrunkOutputs:
        if self._out is None:
            self._out = self._compute()
        return self._out if rows is None else {k: v[list(rows)] for k, v in self._out.items()}


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (one clear error without a GPU) or ``auto`` (cuda when available)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise PluginError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    return torch.device(name)


@dataclass
class Served:
    """The task plugins served for one bundle, with their resolved head configs: what the feature
    side (task names, ``/v1/tasks``) and the head side agree on."""

    plugins: list[TaskPlugin]
    configs: dict[str, dict[str, Any]]
    registry: PluginRegistry  # only what is served resolves

    @classmethod
    def select(cls, path: Path, manifest: Manifest, registry: PluginRegistry, tasks: Sequence[str] | None,
               feature: tuple[int, int] | None = None) -> "Served":
        """The plugins for ``tasks`` (default: every bundle head with an installed plugin); with
        ``feature`` = the codec's (channels, stride), each plugin must consume exactly that."""
        if tasks:
            chosen = registry.resolve(list(tasks))
            missing = [p.name for p in chosen if p.name not in manifest.tasks]
            if missing:
                raise PluginError(f"bundle {path} has no head for {', '.join(missing)} "
                                  f"(it has: {', '.join(manifest.tasks) or 'none'})")
        else:
            chosen = []
            for name in manifest.tasks:
                try:
                    chosen.append(registry.get(name))
                except PluginError:
                    log.warning("bundle head %r has no installed plugin; not serving it", name)
            if not chosen:
                raise PluginError(f"bundle {path} has no head for any installed plugin "
                                  f"(installed: {registry.describe_available()})")
        for plugin in chosen if feature else ():
            plugin.feature_spec(manifest.backbone).require(plugin.name, *feature)
        configs = {p.name: p.resolve_config(manifest.backbone, manifest.tasks[p.name].config) for p in chosen}
        return cls(chosen, configs, PluginRegistry(chosen))


class Features:
    """The feature side of one bundle: payload bytes or pixels → the decoded feature ``h``."""

    def __init__(self, bundle: str | Path, metrics: GatewayMetrics | None = None,
                 payload_limits: PayloadLimits | None = None, device: str = "cpu"):
        self.path = Path(bundle)
        self.manifest: Manifest = read_manifest(self.path)
        self.policy = self.manifest.policy
        self.metrics = metrics or GatewayMetrics()
        self.payload_limits = payload_limits or PayloadLimits()
        self.codec = load_codec(self.path, manifest=self.manifest)
        self.fingerprint = self.codec.fingerprint()
        self.fingerprint_id = fingerprint_id(self.fingerprint)
        self.trunk: SharedTrunk | None = load_trunk(self.path, self.manifest)  # None: every head has its own
        self.device = resolve_device(device)
        self.codec.to(self.device)
        if self.trunk is not None:
            self.trunk.to(self.device)

    def serve(self, registry: PluginRegistry, tasks: Sequence[str] | None = None) -> Served:
        """The plugins that can consume this codec's feature (a mismatch fails at start-up)."""
        return Served.select(self.path, self.manifest, registry, tasks,
                             (self.codec.feature_channels, self.codec.stride))

    # -- request side (event loop) -----------------------------------------------------------
    def parse_payload(self, body: bytes) -> tuple[Payload, list[ImageMeta]]:
        """Strict parse, fingerprint check, rate indices this codec has, and a latent shape it can
        decode — all before any decode work."""
        with self.metrics.stage("parse"):
            payload = Payload.from_bytes(body, self.payload_limits)
            payload.check_fingerprint(self.fingerprint_id)
            self.check_rates(payload)
            metas = self.check_latent_shape(payload)
        return payload, metas

    def check_rates(self, payload: Payload) -> None:
        """Every image's rate index must be one of this codec's rates. A variable-rate bundle
        needs them stated (format v3): a payload without them (v2) is refused rather than read as
        rate 0, since a bitstream decoded at a rate it was not coded at can decode into wrong
        features instead of failing. A single-rate bundle reads v2 as it always did, and v3 at rate 0."""
        count = self.codec.rates
        if payload.rates is None:
            if count > 1:
                raise PayloadError(f"this bundle codes at {count} rates and its payloads name each image's rate "
                                   f"(format v3); this one is v{payload.version}, without rates")
            return
        for i, rate in enumerate(payload.rates):
            if not is_rate_index(rate, count):
                raise PayloadError(f"image {i}: rate index {rate} is outside this bundle's rates 0..{count - 1}")

    def check_latent_shape(self, payload: Payload) -> list[ImageMeta]:
        """Accept exactly the latent shapes the bundle's preprocessing produces for the images'
        declared sizes: the decode cost a payload can claim is what a real device would send."""
        c, h, w = payload.latent_shape
        if c != self.codec.latent_channels:
            raise PayloadError(f"latent has {c} channels, this encoder produces {self.codec.latent_channels}")
        metas = []
        for i, (oh, ow) in enumerate(payload.original_sizes):
            input_hw = self.policy.input_size(oh, ow)
            if self.codec.latent_hw(*input_hw) != (h, w):
                expected = "x".join(map(str, self.codec.latent_hw(*input_hw)))
                raise PayloadError(f"image {i}: latent {h}x{w} is not what this bundle's preprocessing "
                                   f"({self.policy.describe()}) makes of a {ow}x{oh} image (expected {expected})")
            metas.append(ImageMeta((oh, ow), input_hw))
        return metas

    def preprocess_image(self, body: bytes, max_pixels: int = 16_000_000) -> tuple[torch.Tensor, list[ImageMeta]]:
        """Full-offloading mode: the server applies the bundle's preprocessing exactly like the edge
        would. Images above ``max_pixels`` or the payload limits' largest side are refused from
        their header, before decoding."""
        with self.metrics.stage("image_decode"):
            img = load_image(body, max_pixels)
            side = self.payload_limits.max_image_side
            if max(img.height, img.width) > side:
                raise PayloadError(f"image of {img.width}x{img.height} pixels has a side above {side}")
            x = to_input(img, self.policy).unsqueeze(0)
        return x, [ImageMeta((img.height, img.width), tuple(x.shape[-2:]))]

    # -- batch side (worker thread) ------------------------------------------------------------
    def decode(self, group: Sequence[Job]) -> tuple[torch.Tensor | None, dict[int, PayloadError]]:
        """Features of the group's images (one decoder pass, whatever their rates), and the jobs
        whose bitstreams failed. Each payload image is entropy-decoded with its rate's prior and
        inverse gain; an uploaded image is encoded at the bundle's default rate."""
        failed: dict[int, PayloadError] = {}
        if group[0].payload is not None:
            latents = []
            with self.metrics.stage("entropy_decode"):
                for k, job in enumerate(group):
                    try:
                        payload = job.payload  # each image at its own rate, one batch for the decoder
                        latents.append(self.codec.decompress(payload.strings, payload.latent_shape[1:],
                                                             payload.image_rates))
                    except PayloadError as e:  # a forged or corrupt bitstream: that request alone gets a 400
                        failed[k] = e
            if not latents:
                return None, failed
            y_hat = torch.cat(latents)
        else:
            with self.metrics.stage("image_encode"):
                pixels = torch.cat([job.pixels for job in group]).to(self.device)
                y_hat = self.codec.quantize(pixels, self.manifest.default_rate)
        with self.metrics.stage("feature_decode"):
            return self.codec.decode(y_hat), failed

    def trunk_outputs(self, features: torch.Tensor) -> TrunkOutputs:
        """The shared layer2..4 on ``features``, for the heads that run the trunk module itself."""
        with self.metrics.stage("trunk"):
            return self.trunk.tail(features)


class Heads:
    """The head side: the served plugins' heads, each answering a batch of features.

    A head loaded onto the bundle's shared trunk either runs the trunk module itself (it is then
    *lent* the outputs computed once per batch) or, dilated, only ties its weights to the trunk and
    computes its own layer3/4 (nothing to lend)."""

    def __init__(self, path: Path, manifest: Manifest, served: Served, trunk: SharedTrunk | None,
                 device: torch.device, metrics: GatewayMetrics | None = None):
        self.served, self.trunk, self.device = served, trunk, device
        self.metrics = metrics or GatewayMetrics()
        self.heads = {p.name: load_head(path, p.name, p.build_head(manifest.backbone, served.configs[p.name]),
                                        manifest, trunk=trunk).to(device)
                      for p in served.plugins}
        self.shared = {name for name, head in self.heads.items()
                       if trunk is not None and trunk_of(head) is trunk}

    def uses_trunk(self, name: str) -> bool:
        """Whether the head ``name`` wants the shared trunk's outputs with its features."""
        return name in self.shared

    def predict(self, plugin: TaskPlugin, features: torch.Tensor, metas: Sequence[ImageMeta],
                rows: Sequence[int] | None = None, trunk: TrunkOnce | None = None) -> list[BaseModel]:
        """One plugin's answers for ``features`` (or its ``rows``): exactly one per image. A head on
        the shared trunk gets the trunk's outputs computed once per batch (``trunk``). A plugin
        that fails or breaks its contract raises :class:`TaskFailed` naming it (the cause chained);
        running out of memory is raised as it is, for the executor to act on."""
        sel = features if rows is None else features[list(rows)]
        lend = contextlib.nullcontext()
        if plugin.name in self.shared:
            trunk = trunk or TrunkOnce(lambda: self.trunk.tail(features))
            lend = self.trunk.reuse(sel, trunk.outputs(rows))
        try:
            with self.metrics.stage(f"task:{plugin.name}"), lend:
                answers = plugin.predict(self.heads[plugin.name], sel, metas, self.served.configs[plugin.name])
            if len(answers) != len(metas):  # zip would silently drop answers or images
                raise PluginContractError(f"task plugin {plugin.name!r} returned {len(answers)} answers for "
                                          f"{len(metas)} images")
        except Exception as e:
            if out_of_memory(e):
                raise
            raise TaskFailed(plugin.name) from e
        return answers


class Runtime:
    """Both sides of one bundle in one process, validated and warmed up."""

    def __init__(self, bundle: str | Path, registry: PluginRegistry, tasks: Sequence[str] | None = None,
                 metrics: GatewayMetrics | None = None, payload_limits: PayloadLimits | None = None,
                 device: str = "cpu"):
        self.features = Features(bundle, metrics, payload_limits, device)
        self.served = self.features.serve(registry, tasks)
        f = self.features
        self.heads = Heads(f.path, f.manifest, self.served, f.trunk, f.device, f.metrics)

    # the names callers use (evaluation, benchmarks, tests)
    path = property(lambda self: self.features.path)
    manifest = property(lambda self: self.features.manifest)
    codec = property(lambda self: self.features.codec)
    trunk = property(lambda self: self.features.trunk)
    fingerprint = property(lambda self: self.features.fingerprint)
    plugins = property(lambda self: self.served.plugins)
    registry = property(lambda self: self.served.registry)
    head_configs = property(lambda self: self.served.configs)
    metrics = property(lambda self: self.features.metrics)

    def parse_payload(self, body: bytes) -> tuple[Payload, list[ImageMeta]]:
        return self.features.parse_payload(body)

    def preprocess_image(self, body: bytes, max_pixels: int = 16_000_000) -> tuple[torch.Tensor, list[ImageMeta]]:
        return self.features.preprocess_image(body, max_pixels)

    @torch.inference_mode()
    def run(self, jobs: Sequence[Job]) -> list[list[dict[str, BaseModel]] | PayloadError]:
        """Per job, per image: {task name: response} — or, for a job whose bitstream does not
        decode, its :class:`PayloadError` (that request fails alone; its batch-mates are answered).
        Entropy decode + decoder once per group of jobs with the same latent shape."""
        results: list = [[{} for _ in range(j.num_images)] for j in jobs]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[job.group_key].append(i)
        for members in groups.values():
            features, failed = self.features.decode([jobs[i] for i in members])
            for k, error in failed.items():
                results[members[k]] = error
            members = [ji for k, ji in enumerate(members) if k not in failed]
            if not members:
                continue
            metas = [m for ji in members for m in jobs[ji].metas]
            owners = [(ji, k) for ji in members for k in range(jobs[ji].num_images)]
            trunk = TrunkOnce(lambda h=features: self.features.trunk_outputs(h))
            for plugin in self.plugins:
                rows = [r for r, (ji, _) in enumerate(owners) if plugin in jobs[ji].plugins]
                if not rows:
                    continue
                answers = self.heads.predict(plugin, features, [metas[r] for r in rows],
                                             rows if len(rows) < len(owners) else None, trunk)
                for r, answer in zip(rows, answers):
                    ji, k = owners[r]
                    results[ji][k][plugin.name] = answer
        return results

    def warmup(self) -> None:
        """One full pass through every head, so the first real request is not the slow one.

        Its timings go to a throwaway registry: /metrics describes requests only.
        """
        h, w = self.manifest.input_size
        metas = [ImageMeta((h, w), (h, w))]
        served = self.features.metrics
        self.features.metrics = self.heads.metrics = GatewayMetrics()
        try:
            self.run([Job(plugins=list(self.plugins), pixels=torch.zeros(1, 3, h, w), metas=metas)])
        finally:
            self.features.metrics = self.heads.metrics = served
