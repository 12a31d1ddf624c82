"""The gateway on Ray Serve: an ingress that parses and decodes once, one deployment per task.

The ingress (:class:`Ingress`) checks and entropy-decodes the payload and runs the decoder — once
per request — and, when some requested heads sit on the bundle's shared trunk (layer2..4), runs
that trunk once too. It then hands the decoded feature (and the trunk's outputs, to the heads that
use them) to the deployment of every requested task (:class:`TaskServer`) through a
``DeploymentHandle``. Each task deployment loads only its head, batches images across requests with
``@serve.batch`` and scales on its own (``autoscaling_config``), so a busy detector gets more
replicas without copying the classifier.

Answers and errors are those of the FastAPI gateway (same JSON, same statuses and messages): both
run :class:`~splitserve.gateway.runtime.Runtime` with the same :class:`ServerConfig` limits.

Run locally with ``platform ray --bundle DIR``; with Ray's CLI (``serve run
deploy/ray/serve_config.yaml``); on Kubernetes with KubeRay (deploy/k8s/ray). :func:`app` is the
application builder Ray's ``import_path`` names (``splitserve.gateway.ray_app:app``): its ``args``
and the ``SPLITSERVE_*`` variables are those of ``platform serve``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from fastapi import HTTPException
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..bundle import load_trunk
from ..errors import FingerprintMismatch, SplitserveError
from ..plugins import ImageMeta, PluginContractError, PluginRegistry
from .app import UPLOAD_DECODES, encoder_info, head_refusal, read_job, task_infos
from .config import ServerConfig
from .runtime import Job, Runtime

log = logging.getLogger("splitserve.gateway.ray")

# Per replica; every deployment can be changed by name (``task-<name>``, ``ingress``) in a Serve
# config file or with build_app(deployment_options=...).
REPLICA_CPUS = 0.25
AUTOSCALING = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
MAX_ONGOING = 64  # ≥ max_batch requests must reach a task replica for @serve.batch to fill a batch


def _images(items: list[dict[str, Any]]) -> int:
    """Batch size in images, not requests (a payload may carry several)."""
    return sum(len(item["metas"]) for item in items)


class _Lent:
    """Trunk outputs computed elsewhere, in the shape :meth:`Runtime.predict` asks for them."""

    def __init__(self, outputs: dict[str, torch.Tensor]):
        self._outputs = outputs

    def outputs(self, rows: Sequence[int] | None):
        return self._outputs if rows is None else {k: v[list(rows)] for k, v in self._outputs.items()}


@serve.deployment(ray_actor_options={"num_cpus": REPLICA_CPUS}, max_ongoing_requests=MAX_ONGOING,
                  autoscaling_config=AUTOSCALING)
class TaskServer:
    """One task's head, batching images across requests. A head on the shared trunk gets the
    trunk's outputs from the ingress, which ran it once for every task of the request."""

    def __init__(self, bundle: str, task: str, device: str = "cpu", max_batch: int = 16,
                 max_wait_ms: float = 5.0, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.runtime = Runtime(bundle, PluginRegistry.discover(), tasks=[task], device=device)
        self.plugin = self.runtime.plugins[0]
        head = self.runtime.heads[self.plugin.name]
        trunk = self.runtime.trunk
        # A dilated head on the shared trunk only ties its weights to it (no SharedTrunk module
        # inside): it never asks for the trunk's outputs, so none are sent or computed for it.
        self.on_trunk = trunk is not None and any(m is trunk for m in head.modules())
        self.tied = self.plugin.name in self.runtime.shared and not self.on_trunk
        self.predict.set_max_batch_size(max_batch)
        self.predict.set_batch_wait_timeout_s(max_wait_ms / 1000)

    def uses_trunk(self) -> bool:
        """Whether this head wants the shared trunk's outputs with the feature."""
        return self.on_trunk

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005, batch_size_fn=_images)
    async def predict(self, items: list[dict[str, Any]]) -> list[list[dict] | dict[str, str]]:
        """Per request ``{"features": (n, C, H, W), "trunk": {name: array} | None, "metas":
        [(original_size, input_size)] * n}`` → its n answers (JSON), or ``{"error": reason}``."""
        return await asyncio.to_thread(self._run, items)

    def _run(self, items: list[dict[str, Any]]) -> list:
        out: list = [None] * len(items)
        groups: dict[tuple, list[int]] = defaultdict(list)  # features of one shape go in one forward
        for i, item in enumerate(items):
            groups[(item["features"].shape[1:], item["trunk"] is not None)].append(i)
        for members in groups.values():
            answers = self._answer([items[i] for i in members])
            if isinstance(answers, dict) and len(members) > 1:  # one bad request must not fail the others
                log.warning("batch of %d requests failed (%s); retrying them one by one", len(members),
                            answers["error"])
                for i in members:
                    out[i] = self._answer([items[i]])
                continue
            k = 0
            for i in members:
                n = len(items[i]["metas"])
                out[i], k = (answers if isinstance(answers, dict) else answers[k: k + n]), k + n
        return out

    def _answer(self, items: list[dict[str, Any]]) -> list[dict] | dict[str, str]:
        try:
            return self._predict(items)
        except Exception as e:  # noqa: BLE001 — reported to the ingress, which answers 500
            log.exception("task %s failed", self.plugin.name)
            return {"error": f"{type(e).__name__}: {e}"}

    def _predict(self, items: list[dict[str, Any]]) -> list[dict]:
        device = self.runtime.device
        features = torch.from_numpy(np.concatenate([it["features"] for it in items])).to(device)
        metas = [ImageMeta(tuple(o), tuple(i)) for it in items for o, i in it["metas"]]
        lent = None
        if self.on_trunk and items[0]["trunk"] is not None:
            lent = _Lent({k: torch.from_numpy(np.concatenate([it["trunk"][k] for it in items])).to(device)
                          for k in items[0]["trunk"]})
        elif self.tied:
            lent = _Lent({})
        with torch.inference_mode():
            answers = self.runtime.predict(self.plugin, features, metas, None, lent)  # one per image, or raises
        return [a.model_dump(mode="json") for a in answers]


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


@serve.deployment(ray_actor_options={"num_cpus": REPLICA_CPUS}, max_ongoing_requests=MAX_ONGOING,
                  autoscaling_config=AUTOSCALING)
class Ingress:
    """HTTP: parse, verify, decode once (and the shared trunk once); fan out to the task
    deployments; answer like the FastAPI gateway. Routes: ``POST /infer``, ``GET /v1/encoder``,
    ``GET /v1/tasks``, ``GET|HEAD /healthz``, ``GET|HEAD /readyz`` (Ray Serve routes a replica
    requests only once it is constructed, and Ray restarts a replica that fails its health check).
    Prometheus metrics are Ray Serve's own (per deployment), not the gateway's ``/metrics``."""

    def __init__(self, config: dict[str, Any], handles: dict[str, DeploymentHandle]):
        from splitserve_edge.payload import PayloadLimits

        self.config = c = ServerConfig.model_validate(config)
        if c.threads:
            torch.set_num_threads(c.threads)
        limits = PayloadLimits(max_images=c.max_batch, max_image_side=c.max_image_side,
                               max_total_bytes=c.max_body_bytes)
        self.runtime = Runtime(c.bundle, PluginRegistry.discover(), list(handles), payload_limits=limits,
                               device=c.device, load_heads=False)
        self.handles = handles
        self.api_key = c.resolved_api_key()
        manifest = self.runtime.manifest
        self.shared = {p.name for p in self.runtime.plugins if manifest.tasks[p.name].trunk == "shared"}
        self.trunk = load_trunk(self.runtime.path, manifest) if self.shared else None
        if self.trunk is not None:
            self.trunk.to(self.runtime.device)
        self.on_trunk: dict[str, bool] = {}  # asked once per task deployment
        self.image_decodes: asyncio.Semaphore | None = None

    async def __call__(self, request: Request) -> Response:
        refusal = head_refusal(request.scope, self.config.max_header_bytes)
        if refusal is not None:
            return refusal
        path, method = _route(request), request.method
        routes = {"/infer": ("POST",), "/v1/encoder": ("GET",), "/v1/tasks": ("GET",),
                  "/healthz": ("GET", "HEAD"), "/readyz": ("GET", "HEAD")}
        if path not in routes:
            return _error(404, "Not Found")
        if method not in routes[path]:
            return _error(405, "Method Not Allowed", {"Allow": ", ".join(routes[path])})
        if path == "/healthz":
            return JSONResponse({"status": "ok"})
        if path == "/readyz":
            return JSONResponse({"status": "ready"})
        if path == "/infer" or self.config.auth_all:
            denied = self._check_key(request)
            if denied is not None:
                return denied
        if path == "/v1/encoder":
            return JSONResponse(encoder_info(self.runtime).model_dump(mode="json"))
        if path == "/v1/tasks":
            return JSONResponse([t.model_dump(mode="json") for t in task_infos(self.runtime)])
        try:
            return await self._infer(request)
        except FingerprintMismatch as e:
            return _error(409, str(e))
        except SplitserveError as e:  # PayloadError, PluginError (unknown task), image errors
            return _error(400, str(e))
        except HTTPException as e:  # 408, 413, 415
            return _error(e.status_code, e.detail, e.headers)

    def _check_key(self, request: Request) -> JSONResponse | None:
        if self.api_key is None:
            return None
        given = request.headers.get("x-api-key") or ""
        if secrets.compare_digest(given.encode(), self.api_key.encode()):
            return None
        return _error(401, "missing or wrong API key (send it in the X-API-Key header)",
                      {"WWW-Authenticate": "X-API-Key"})

    async def _infer(self, request: Request) -> Response:
        c, runtime = self.config, self.runtime
        self.image_decodes = self.image_decodes or asyncio.Semaphore(UPLOAD_DECODES)
        job, size, kind = await read_job(request, request.query_params.get("tasks"), runtime, c, self.image_decodes)
        plugins, metas = job.plugins, job.metas
        for p in plugins:
            if p.name in self.shared and p.name not in self.on_trunk:
                self.on_trunk[p.name] = await self.handles[p.name].uses_trunk.remote()
        on_trunk = [p.name for p in plugins if self.on_trunk.get(p.name)]
        features, trunk = await asyncio.to_thread(self._decode, job, bool(on_trunk))

        geometry = [(list(m.original_size), list(m.input_size)) for m in metas]
        calls = [self.handles[p.name].predict.remote(
            {"features": features, "trunk": trunk if p.name in on_trunk else None, "metas": geometry})
            for p in plugins]
        replies = await asyncio.gather(*calls, return_exceptions=True)
        by_task = {}
        for p, reply in zip(plugins, replies):
            if isinstance(reply, BaseException) or isinstance(reply, dict):
                reason = reply.get("error") if isinstance(reply, dict) else f"{type(reply).__name__}: {reply}"
                log.error("task %s failed: %s", p.name, reason)
                return _error(500, f"task {p.name} failed on the server")
            if len(reply) != len(metas):
                log.error("%s", PluginContractError(f"task {p.name!r} returned {len(reply)} answers for "
                                                    f"{len(metas)} images"))
                return _error(500, f"task {p.name} failed on the server")
            by_task[p.name] = reply
        served = [p.name for p in runtime.plugins]
        return JSONResponse({
            "fingerprint": runtime.fingerprint,
            "bytes_received": size,
            "input": kind,
            "tasks": [p.name for p in plugins],
            "results": [{"index": i, "original_size": list(m.original_size),
                         "tasks": {name: by_task[name][i] if name in by_task else None for name in served}}
                        for i, m in enumerate(metas)],
        })

    def _decode(self, job: Job, with_trunk: bool) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        """Entropy decode + decoder (and the shared trunk, when a requested head uses it), once."""
        with torch.inference_mode():
            features, failed = self.runtime.decode([job])
            if failed:
                raise failed[0]  # a bitstream that does not decode: 400
            outputs = self.trunk.tail(features) if with_trunk else None
        trunk = {k: v.cpu().numpy() for k, v in outputs.items()} if outputs is not None else None
        return features.cpu().numpy(), trunk


def _route(request: Request) -> str:
    """The path below the application's route prefix."""
    path, root = request.scope.get("path", "/"), request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


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
    served = [p.name for p in Runtime(path, PluginRegistry.discover(), config.tasks, load_heads=False).plugins]

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
