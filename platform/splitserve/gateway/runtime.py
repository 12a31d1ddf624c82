"""Everything the gateway computes: decode once per batch, then every requested head.

Loaded and checked at start-up (plugins vs bundle), so a bad deployment fails before the
first request rather than on it. Runs in a worker thread; holds no HTTP concepts.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from ..bundle import Manifest, load_codec, load_head, load_trunk, read_manifest
from ..models.backbone import tail_path
from ..errors import PayloadError, PluginError
from splitserve_edge.payload import Payload, PayloadLimits, fingerprint_id
from ..plugins import ImageMeta, PluginContractError, PluginRegistry, TaskPlugin
from ..preprocess import load_image, to_input
from .metrics import GatewayMetrics

log = logging.getLogger("splitserve.gateway")


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


class TrunkOnce:
    """The shared layer2..4 of one batch, computed on first use and then sliced per plugin."""

    def __init__(self, runtime: "Runtime", features: torch.Tensor):
        self.runtime, self.features, self._out = runtime, features, None

    def outputs(self, rows: Sequence[int] | None):
        if self._out is None:
            with self.runtime.metrics.stage("trunk"):
                self._out = self.runtime.trunk.tail(self.features)
        return self._out if rows is None else {k: v[list(rows)] for k, v in self._out.items()}


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (one clear error without a GPU) or ``auto`` (cuda when available)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise PluginError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    return torch.device(name)


class Runtime:
    """The codec, the heads and the plugins of one bundle, validated and warmed up."""

    def __init__(self, bundle: str | Path, registry: PluginRegistry, tasks: Sequence[str] | None = None,
                 metrics: GatewayMetrics | None = None, payload_limits: PayloadLimits | None = None,
                 device: str = "cpu", load_heads: bool = True):
        self.path = Path(bundle)
        self.manifest: Manifest = read_manifest(self.path)
        self.policy = self.manifest.policy
        self.metrics = metrics or GatewayMetrics()
        self.payload_limits = payload_limits or PayloadLimits()
        self.codec = load_codec(self.path, manifest=self.manifest)
        self.fingerprint = self.codec.fingerprint()
        self.fingerprint_id = fingerprint_id(self.fingerprint)
        self.plugins = self._select_plugins(registry, tasks)
        self.registry = PluginRegistry(self.plugins)  # only what is served resolves
        backbone, tasks = self.manifest.backbone, self.manifest.tasks
        self.head_configs: dict[str, dict[str, Any]] = {
            p.name: p.resolve_config(backbone, tasks[p.name].config) for p in self.plugins}
        # load_heads=False: parse and decode only (a front end that hands features to head servers)
        self.trunk = load_trunk(self.path, self.manifest) if load_heads else None
        self.heads = {
            p.name: load_head(self.path, p.name, p.build_head(backbone, self.head_configs[p.name]), self.manifest,
                              trunk=self.trunk)
            for p in (self.plugins if load_heads else ())}
        # heads that run the trunk module itself get its outputs lent once per batch; a dilated head
        # only ties its weights to the trunk and computes its own layer3/4, so it needs no lending
        self.shared = {name for name, head in self.heads.items()
                       if tasks[name].trunk == "shared" and head.get_submodule(tail_path(head)) is self.trunk}
        self.device = resolve_device(device)
        self.codec.to(self.device)
        for head in self.heads.values():
            head.to(self.device)
        if self.trunk is not None:
            self.trunk.to(self.device)

    def _select_plugins(self, registry: PluginRegistry, tasks: Sequence[str] | None) -> list[TaskPlugin]:
        if tasks:
            chosen = registry.resolve(list(tasks))
            missing = [p.name for p in chosen if p.name not in self.manifest.tasks]
            if missing:
                raise PluginError(f"bundle {self.path} has no head for {', '.join(missing)} "
                                  f"(it has: {', '.join(self.manifest.tasks) or 'none'})")
        else:
            chosen = []
            for name in self.manifest.tasks:
                try:
                    chosen.append(registry.get(name))
                except PluginError:
                    log.warning("bundle head %r has no installed plugin; not serving it", name)
            if not chosen:
                raise PluginError(f"bundle {self.path} has no head for any installed plugin "
                                  f"(installed: {registry.describe_available()})")
        for plugin in chosen:
            spec = plugin.feature_spec(self.manifest.backbone)
            if (spec.channels, spec.stride) != (self.codec.feature_channels, self.codec.stride):
                raise PluginError(
                    f"task {plugin.name!r} consumes {spec.describe()}, but the bundle's codec produces "
                    f"{self.codec.feature_channels} channels at stride {self.codec.stride}")
        return chosen

    # -- request side (event loop) -----------------------------------------------------------
    def parse_payload(self, body: bytes) -> tuple[Payload, list[ImageMeta]]:
        """Strict parse, fingerprint check, and a latent shape this codec can decode."""
        with self.metrics.stage("parse"):
            payload = Payload.from_bytes(body, self.payload_limits)
            payload.check_fingerprint(self.fingerprint_id)
            metas = self.check_latent_shape(payload)
        return payload, metas

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
            features, failed = self.decode([jobs[i] for i in members])
            for k, error in failed.items():
                results[members[k]] = error
            members = [ji for k, ji in enumerate(members) if k not in failed]
            if not members:
                continue
            metas = [m for ji in members for m in jobs[ji].metas]
            owners = [(ji, k) for ji in members for k in range(jobs[ji].num_images)]
            trunk = TrunkOnce(self, features)
            for plugin in self.plugins:
                rows = [r for r, (ji, _) in enumerate(owners) if plugin in jobs[ji].plugins]
                if not rows:
                    continue
                answers = self.predict(plugin, features, [metas[r] for r in rows],
                                       rows if len(rows) < len(owners) else None, trunk)
                for r, answer in zip(rows, answers):
                    ji, k = owners[r]
                    results[ji][k][plugin.name] = answer
        return results

    def predict(self, plugin: TaskPlugin, features: torch.Tensor, metas: Sequence[ImageMeta],
                rows: Sequence[int] | None = None, trunk: "TrunkOnce | None" = None) -> list[BaseModel]:
        """One plugin's answers for ``features`` (or its ``rows``): exactly one per image, or
        :class:`PluginContractError` naming the plugin. A head on the shared trunk gets the trunk's
        outputs computed once per batch (``trunk``)."""
        sel = features if rows is None else features[list(rows)]
        lend = contextlib.nullcontext()
        if plugin.name in self.shared:
            trunk = trunk or TrunkOnce(self, features)
            lend = self.trunk.reuse(sel, trunk.outputs(rows))
        with self.metrics.stage(f"task:{plugin.name}"), lend:
            answers = plugin.predict(self.heads[plugin.name], sel, metas, self.head_configs[plugin.name])
        if len(answers) != len(metas):  # zip would silently drop answers or images
            raise PluginContractError(f"task plugin {plugin.name!r} returned {len(answers)} answers for "
                                      f"{len(metas)} images")
        return answers

    def decode(self, group: Sequence[Job]) -> tuple[torch.Tensor | None, dict[int, PayloadError]]:
        """Features of the group's images (one decoder pass), and the jobs whose bitstreams failed."""
        failed: dict[int, PayloadError] = {}
        if group[0].payload is not None:
            latents = []
            with self.metrics.stage("entropy_decode"):
                for k, job in enumerate(group):
                    try:
                        latents.append(self.codec.decompress(list(job.payload.strings), job.payload.latent_shape[1:]))
                    except PayloadError as e:  # a forged or corrupt bitstream: that request alone gets a 400
                        failed[k] = e
            if not latents:
                return None, failed
            y_hat = torch.cat(latents)
        else:
            with self.metrics.stage("image_encode"):
                y_hat = self.codec.quantize(torch.cat([job.pixels for job in group]).to(self.device))
        with self.metrics.stage("feature_decode"):
            return self.codec.decode(y_hat), failed

    def warmup(self) -> None:
        """One full pass through every head, so the first real request is not the slow one.

        Its timings go to a throwaway registry: /metrics describes requests only.
        """
        h, w = self.manifest.input_size
        x = torch.zeros(1, 3, h, w)
        metas = [ImageMeta((h, w), (h, w))]
        served, self.metrics = self.metrics, GatewayMetrics()
        try:
            self.run([Job(plugins=list(self.plugins), pixels=x, metas=metas)])
        finally:
            self.metrics = served
