"""The gateway on Ray Serve: an ingress that parses and decodes once, one deployment per task.

The ingress (:class:`Ingress`) checks and entropy-decodes the payload and runs the decoder — once
per request — then sends the decoded feature to the deployment of every requested task
(:class:`TaskServer`) through a ``DeploymentHandle``. Each task deployment batches across requests
with ``@serve.batch`` and scales on its own (``autoscaling_config``), so a busy detector gets
more replicas without copying the classifier. Answers and errors are those of the FastAPI gateway
(same JSON, same statuses and messages), because both run :class:`~splitserve.gateway.runtime.Runtime`.

Run locally with ``platform ray --bundle DIR``; on Kubernetes with KubeRay (deploy/k8s/ray). The
application builder ``app`` reads ``SPLITSERVE_*`` variables (``serve run
splitserve.gateway.ray_app:app``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

import numpy as np
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse

from ..errors import FingerprintMismatch, PluginError, SplitserveError
from ..plugins import ImageMeta, PluginRegistry
from .app import IMAGE_TYPES, PAYLOAD_TYPES, excerpt
from .runtime import Job, Runtime

TASK_CPUS = float(os.environ.get("SPLITSERVE_RAY_TASK_CPUS", "0.25"))


@serve.deployment(ray_actor_options={"num_cpus": TASK_CPUS},
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8})
class TaskServer:
    """One task's head (and the shared trunk, when the head uses it), batching across requests."""

    def __init__(self, bundle: str, task: str, device: str = "cpu"):
        self.runtime = Runtime(bundle, PluginRegistry.discover(), tasks=[task], device=device)
        self.plugin = self.runtime.plugins[0]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def predict(self, requests: list[tuple[np.ndarray, list]]) -> list[list[dict]]:
        """Per request: (features (n, C, H, W), [(original_size, input_size)] * n) → n answers."""
        features = torch.from_numpy(np.concatenate([f for f, _ in requests])).to(self.runtime.device)
        metas = [ImageMeta(tuple(o), tuple(i)) for _, ms in requests for o, i in ms]
        with torch.inference_mode():
            answers = self.runtime.predict(self.plugin, features, metas)
        out, k = [], 0
        for f, _ in requests:
            out.append([a.model_dump(mode="json") for a in answers[k: k + len(f)]])
            k += len(f)
        return out


@serve.deployment(ray_actor_options={"num_cpus": TASK_CPUS})
class Ingress:
    """Parse, verify, decode once; fan the feature out to the task deployments; answer."""

    def __init__(self, bundle: str, tasks: dict[str, DeploymentHandle], max_body_bytes: int = 8 * 1024 * 1024):
        self.runtime = Runtime(bundle, PluginRegistry.discover(), tasks=list(tasks), load_heads=False)
        self.tasks = tasks
        self.max_body_bytes = max_body_bytes

    async def __call__(self, request: Request):
        if request.url.path in ("/healthz", "/readyz"):
            return JSONResponse({"status": "ok" if request.url.path == "/healthz" else "ready"})
        if request.url.path != "/infer" or request.method != "POST":
            return _error(404, "Not Found")
        try:
            query = request.query_params.get("tasks")
            plugins = self.runtime.registry.resolve(query) if query is not None else list(self.runtime.plugins)
        except PluginError as e:
            return _error(400, str(e))
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in PAYLOAD_TYPES + IMAGE_TYPES:
            return _error(415, f"unsupported content type {excerpt(ctype) if ctype else '(none)'}; send "
                               f"{', '.join(PAYLOAD_TYPES + IMAGE_TYPES)}")
        body = await request.body()
        if len(body) > self.max_body_bytes:
            return _error(413, f"body exceeds the limit of {self.max_body_bytes} bytes")
        kind = "payload" if ctype in PAYLOAD_TYPES else "image"
        try:
            if kind == "payload":
                payload, metas = self.runtime.parse_payload(body)
                job = Job(plugins=plugins, payload=payload, metas=metas)
            else:
                pixels, metas = self.runtime.preprocess_image(body)
                job = Job(plugins=plugins, pixels=pixels, metas=metas)
            with torch.inference_mode():
                features, failed = self.runtime.decode([job])
            if failed:
                raise failed[0]
        except FingerprintMismatch as e:
            return _error(409, str(e))
        except SplitserveError as e:
            return _error(400, str(e))
        array = features.cpu().numpy()
        geometry = [(m.original_size, m.input_size) for m in metas]
        answers = await asyncio.gather(*[self.tasks[p.name].predict.remote((array, geometry)) for p in plugins])
        by_task = dict(zip((p.name for p in plugins), answers))
        served = [p.name for p in self.runtime.plugins]
        return JSONResponse({
            "fingerprint": self.runtime.fingerprint,
            "bytes_received": len(body),
            "input": kind,
            "tasks": [p.name for p in plugins],
            "results": [{"index": i, "original_size": list(m.original_size),
                         "tasks": {name: (by_task[name][i] if name in by_task else None) for name in served}}
                        for i, m in enumerate(metas)],
        })


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def build_app(bundle: str, tasks: Sequence[str] | None = None, device: str = "cpu", max_body_bytes: int = 8 << 20):
    """The Ray Serve application: an ingress and one deployment per served task."""
    served = [p.name for p in Runtime(bundle, PluginRegistry.discover(), tasks=tasks, load_heads=False).plugins]
    handles = {name: TaskServer.options(name=f"task-{name}").bind(str(bundle), name, device) for name in served}
    return Ingress.bind(str(bundle), handles, max_body_bytes)


def app(args: dict | None = None):
    """Application builder for ``serve run splitserve.gateway.ray_app:app`` and KubeRay's
    ``import_path``: ``args`` (bundle, tasks, device) over ``SPLITSERVE_*`` variables."""
    from ..defaults import resolve_bundle

    args = dict(args or {})
    tasks = args.get("tasks") or os.environ.get("SPLITSERVE_TASKS")
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    bundle = resolve_bundle(args.get("bundle") or os.environ.get("SPLITSERVE_BUNDLE"))
    return build_app(str(bundle), tasks, args.get("device") or os.environ.get("SPLITSERVE_DEVICE", "cpu"))
