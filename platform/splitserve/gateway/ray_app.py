"""The gateway on Ray Serve: the same FastAPI app, its work spread over deployments.

The ingress deployment (:class:`Ingress`) mounts :func:`~splitserve.gateway.app.create_app` with
``@serve.ingress`` over a :class:`RayExecutor`, so routes, auth, limits, errors and response models
are those of ``platform serve``. The executor checks and entropy-decodes each payload and runs the
decoder — once per request — and, when a requested head runs on the bundle's shared trunk
(layer2..4), the trunk once too. It hands the feature (and the trunk's outputs, to the heads that use
them) to the deployment of every requested task (:class:`TaskServer`). Each task deployment loads
only its head, batches images across requests with ``@serve.batch`` and scales on its own
(``autoscaling_config``), so a busy detector gets more replicas without copying the classifier.

Run locally with ``platform ray --bundle DIR``; with Ray's CLI (``serve run
deploy/ray/serve_config.yaml``); on Kubernetes with KubeRay (deploy/k8s/ray). :func:`app` is the
application builder Ray's ``import_path`` names (``splitserve.gateway.ray_app:app``): its ``args``
and the ``SPLITSERVE_*`` variables are those of ``platform serve``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from ..bundle import load_trunk, read_manifest
from ..errors import SplitserveError
from ..plugins import ImageMeta, PluginRegistry
from .app import create_app
from .batching import Unavailable, isolate, out_of_memory
from .config import ServerConfig
from .executor import Executor
from .metrics import GatewayMetrics
from .runtime import Features, Heads, Job, Served, TaskFailed, TrunkOnce, resolve_device

log = logging.getLogger("splitserve.gateway.ray")

# Per replica; every deployment can be changed by name (``task-<name>``, ``ingress``) in a Serve
# config file or with build_app(deployment_options=...).
REPLICA_CPUS = 0.25
AUTOSCALING = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
MAX_ONGOING = 64  # ≥ max_batch requests must reach a task replica for @serve.batch to fill a batch
# A replica that is gone or not yet there: ask again (Serve routes to a live one, or to the one it
# starts instead) until the task deadline; then 503 + Retry-After.
REPLICA_LOST = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError)
RETRY_PAUSE_S = 0.2


def _images(items: list[dict[str, Any]]) -> int:
    """Batch size in images, not requests (a payload may carry several)."""
    return sum(len(item["metas"]) for item in items)


@serve.deployment(ray_actor_options={"num_cpus": REPLICA_CPUS}, max_ongoing_requests=MAX_ONGOING,
                  autoscaling_config=AUTOSCALING)
class TaskServer:
    """One task's head, batching images across requests. A head on the shared trunk gets the
    trunk's outputs from the ingress, which ran it once for every task of the request."""

    def __init__(self, bundle: str, task: str, device: str = "cpu", max_batch: int = 16,
                 max_wait_ms: float = 5.0, threads: int | None = None):
        ServerConfig(threads=threads).apply_threads()
        path = Path(bundle)
        manifest = read_manifest(path)
        served = Served.select(path, manifest, PluginRegistry.discover(), [task])
        self.plugin = served.plugins[0]
        self.heads = Heads(path, manifest, served, load_trunk(path, manifest), resolve_device(device))
        self.broken: str | None = None
        self.predict.set_max_batch_size(max_batch)
        self.predict.set_batch_wait_timeout_s(max_wait_ms / 1000)

    def uses_trunk(self) -> bool:
        """Whether this head wants the shared trunk's outputs with the feature."""
        return self.heads.uses_trunk(self.plugin.name)

    def check_health(self) -> None:
        """Ray Serve's health check: a replica that ran out of memory is replaced."""
        if self.broken is not None:
            raise RuntimeError(self.broken)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005, batch_size_fn=_images)
    async def predict(self, items: list[dict[str, Any]]) -> list[list[dict] | dict[str, str]]:
        """Per request ``{"features": (n, C, H, W), "trunk": {name: array} | None, "metas":
        [(original_size, input_size)] * n}`` → its n answers (JSON), or ``{"error": kind}``. A
        failing batch is retried request by request (:func:`isolate`)."""
        results, error = await asyncio.to_thread(isolate, self._answer, items)
        out = []
        for r in results:
            if isinstance(r, BaseException):
                out.append({"error": "out_of_memory" if out_of_memory(r) else "task_failed"})
            else:
                out.append(r)
        if any(isinstance(e, BaseException) and out_of_memory(e) for e in [error, *results]):
            self.broken = f"out of memory in a batch of {len(items)} requests"
        return out

    def _answer(self, items: list[dict[str, Any]]) -> list[list[dict]]:
        """Answers per item; features of one shape (and trunk use) go through one forward."""
        out: list = [None] * len(items)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[(item["features"].shape[1:], item["trunk"] is not None)].append(i)
        for members in groups.values():
            answers = self._predict([items[i] for i in members])
            k = 0
            for i in members:
                n = len(items[i]["metas"])
                out[i], k = answers[k: k + n], k + n
        return out

    def _predict(self, items: list[dict[str, Any]]) -> list[dict]:
        device = self.heads.device
        features = torch.from_numpy(np.concatenate([it["features"] for it in items])).to(device)
        metas = [ImageMeta(tuple(o), tuple(i)) for it in items for o, i in it["metas"]]
        trunk = None
        if items[0]["trunk"] is not None:
            trunk = TrunkOnce(outputs={k: torch.from_numpy(np.concatenate([it["trunk"][k] for it in items])).to(device)
                                       for k in items[0]["trunk"]})
        with torch.inference_mode():
            answers = self.heads.predict(self.plugin, features, metas, None, trunk)
        return [a.model_dump(mode="json") for a in answers]


class RayExecutor(Executor):
    """Decode in the ingress (once per request), heads in the task deployments."""

    def __init__(self, config: ServerConfig, handles: dict[str, DeploymentHandle]):
        config.apply_threads()
        self.metrics = GatewayMetrics()
        self.features = Features(config.bundle, self.metrics, config.payload_limits(), config.device)
        self.served = self.features.serve(PluginRegistry.discover(), config.tasks)
        self.handles, self.task_timeout_s = handles, config.task_timeout_s
        self.on_trunk: dict[str, bool] = {}  # asked once per task deployment

    async def run(self, job: Job) -> list[dict[str, Any]]:
        for p in job.plugins:
            if p.name not in self.on_trunk:
                self.on_trunk[p.name] = await self._call(p.name, "uses_trunk")
        on_trunk = {p.name for p in job.plugins if self.on_trunk[p.name]}
        features, trunk = await asyncio.to_thread(self._decode, job, bool(on_trunk))
        geometry = [(list(m.original_size), list(m.input_size)) for m in job.metas]
        replies = await asyncio.gather(*[
            self._call(p.name, "predict", {"features": features, "trunk": trunk if p.name in on_trunk else None,
                                           "metas": geometry})
            for p in job.plugins])
        for p, reply in zip(job.plugins, replies):
            if isinstance(reply, dict):  # the task failed on its replica (logged there)
                if reply["error"] == "out_of_memory":
                    raise MemoryError(f"task {p.name} ran out of memory")
                raise TaskFailed(p.name)
        return [{p.name: reply[i] for p, reply in zip(job.plugins, replies)} for i in range(job.num_images)]

    async def _call(self, task: str, method: str, *args) -> Any:
        """``method`` of the task's deployment. A replica lost mid-request (its process killed) or
        none ready yet: ask again until ``--task-timeout-s``, then :class:`Unavailable` (503)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.task_timeout_s
        while (left := deadline - loop.time()) > 0:
            response = getattr(self.handles[task], method).remote(*args)
            try:
                return await asyncio.wait_for(response, left)
            except asyncio.TimeoutError:
                response.cancel()
                break
            except REPLICA_LOST as e:
                log.warning("task %s: %s; asking again", task, type(e).__name__)
                await asyncio.sleep(min(RETRY_PAUSE_S, max(0.0, deadline - loop.time())))
        raise Unavailable(f"task {task} has no replica ready", retry_after=1)

    def _decode(self, job: Job, with_trunk: bool) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        """Entropy decode + decoder (and the shared trunk, when a requested head uses it), once."""
        with torch.inference_mode():
            features, failed = self.features.decode([job])
            if failed:
                raise failed[0]  # a bitstream that does not decode: 400
            outputs = self.features.trunk_outputs(features) if with_trunk else None
        trunk = {k: v.cpu().numpy() for k, v in outputs.items()} if outputs is not None else None
        return features.cpu().numpy(), trunk


@serve.deployment(ray_actor_options={"num_cpus": REPLICA_CPUS}, max_ongoing_requests=MAX_ONGOING,
                  autoscaling_config=AUTOSCALING)
@serve.ingress()
class Ingress:
    """HTTP: the gateway's one FastAPI app over a :class:`RayExecutor`, built in the replica (Ray
    runs its lifespan, and routes the replica requests only once it is constructed)."""

    def __init__(self, config: dict[str, Any], handles: dict[str, DeploymentHandle]):
        self.config = ServerConfig.model_validate(config)
        self.executor = RayExecutor(self.config, handles)

    def __serve_build_asgi_app__(self):
        return create_app(self.config, self.executor)


def build_app(bundle: str | None = None, tasks: Sequence[str] | None = None, *, config: ServerConfig | None = None,
              device: str | None = None, autoscaling_config: dict[str, Any] | None = None,
              ray_actor_options: dict[str, Any] | None = None,
              deployment_options: dict[str, dict[str, Any]] | None = None) -> Application:
    """The Ray Serve application: an ingress (deployment ``ingress``) and one deployment per served
    task (``task-<name>``).

    ``config`` (default: the ``SPLITSERVE_*`` variables) carries the limits of ``platform serve``;
    ``bundle``, ``tasks`` and ``device`` override it. ``autoscaling_config`` and
    ``ray_actor_options`` apply to every deployment (default: 1–4 replicas of 0.25 CPU each);
    ``deployment_options`` maps a deployment name to further ``.options()`` for it alone. The
    bundle directory must be readable on every Ray node.
    """
    from ..defaults import resolve_bundle

    config = config or ServerConfig.from_env()
    overrides = {"bundle": bundle, "tasks": list(tasks) if tasks else None, "device": device}
    config = config.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    path = resolve_bundle(config.bundle).resolve()
    config = config.model_copy(update={"bundle": str(path)})
    # Fails here, before anything is deployed, on a bad bundle or an unknown task.
    served = [p.name for p in Features(path).serve(PluginRegistry.discover(), config.tasks).plugins]

    def options(name: str) -> dict[str, Any]:
        common = {"autoscaling_config": autoscaling_config, "ray_actor_options": ray_actor_options}
        return {"name": name, **{k: v for k, v in common.items() if v is not None},
                **(deployment_options or {}).get(name, {})}

    handles = {
        name: TaskServer.options(**options(f"task-{name}")).bind(
            str(path), name, config.device, config.max_batch, config.max_wait_ms, config.threads)
        for name in served
    }
    return Ingress.options(**options("ingress")).bind(config.model_copy(update={"tasks": served}).model_dump(),
                                                      handles)


def app(args: dict[str, Any]) -> Application:
    """Application builder for ``serve run splitserve.gateway.ray_app:app`` and KubeRay's
    ``import_path``: ``args`` (any ``platform serve`` option by its field name: ``bundle``,
    ``tasks``, ``device``, ``max_batch``, …) over the ``SPLITSERVE_*`` variables."""
    args = dict(args or {})
    unknown = sorted(set(args) - set(ServerConfig.model_fields))
    if unknown:
        raise SplitserveError(f"unknown application argument(s) {', '.join(unknown)}; "
                              f"known: {', '.join(ServerConfig.model_fields)}")
    if isinstance(args.get("tasks"), str):
        args["tasks"] = [t for t in args["tasks"].split(",") if t]
    return build_app(config=ServerConfig.from_env(**args))
