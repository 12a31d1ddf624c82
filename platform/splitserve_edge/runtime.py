"""The torch-free device: an exported encoder (ONNX Runtime) + the coder → payload bytes.

Loads a directory written by ``platform export --format onnx`` and produces the same payload the
PyTorch edge (:class:`splitserve.edge.EdgeEncoder`) produces for the same image: the same
preprocessing code, the same rounding, the same coder, the same container. Needs numpy, Pillow,
onnxruntime, constriction and safetensors — no torch.

>>> from splitserve_edge.runtime import EdgeModel
>>> model = EdgeModel.load("bundle-edge/")
>>> data = model.encode(["photo.jpg"])          # payload bytes for POST /infer
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .coder import CodingTables, EntropyCoder
from .errors import SplitserveError
from .payload import Encoded, Payload, fingerprint_id
from .preprocessing import ImageLike, Preprocessing, PreprocessingError

EDGE_FORMAT = "splitserve-edge"
EDGE_VERSION = 1


class EdgeModelError(SplitserveError):
    """An export directory is missing, corrupt, or not an ONNX export."""


class EdgeModel:
    """An ONNX export: preprocessing → encoder → round → entropy code → payload."""

    def __init__(self, root: Path, meta: dict[str, Any], session, coder: EntropyCoder, policy: Preprocessing):
        self.root = root
        self.meta = meta
        self.session = session
        self.coder = coder
        self.preprocessing = policy
        self.fingerprint: str = meta["fingerprint"]
        self._fp_id = fingerprint_id(self.fingerprint)
        self.latent_channels = int(meta["codec"]["latent_channels"])

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None) -> "EdgeModel":
        import onnxruntime as ort

        root = Path(path)
        try:
            meta = json.loads((root / "edge.json").read_text())
        except FileNotFoundError:
            raise EdgeModelError(f"{root}: no edge.json (make one with `platform export --format onnx`)") from None
        except (OSError, ValueError) as e:
            raise EdgeModelError(f"{root}/edge.json: unreadable ({type(e).__name__})") from None
        if not isinstance(meta, dict) or meta.get("format") != EDGE_FORMAT:
            raise EdgeModelError(f"{root}/edge.json: not a splitserve edge export")
        if meta.get("format_version") != EDGE_VERSION:
            raise EdgeModelError(f"{root}/edge.json: version {meta.get('format_version')!r} is not supported "
                                 f"(this client reads {EDGE_VERSION})")
        if meta.get("encoder", {}).get("format") != "onnx":
            raise EdgeModelError(f"{root}: the torch-free client runs ONNX exports "
                                 f"(this one is {meta.get('encoder', {}).get('format')!r})")
        files = {}
        for key in ("encoder", "coding_tables"):
            entry = meta[key]
            fpath = (root / entry["path"]).resolve()
            if root.resolve() not in fpath.parents or not fpath.is_file():
                raise EdgeModelError(f"{root}: {key} file {entry['path']!r} is missing")
            data = fpath.read_bytes()
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise EdgeModelError(f"{root}: {entry['path']} does not match edge.json (sha256); re-export it")
            files[key] = data
        try:
            policy = Preprocessing.from_dict(meta["preprocessing"])
        except (PreprocessingError, TypeError, KeyError) as e:
            raise EdgeModelError(f"{root}/edge.json: {e}") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(files["encoder"], options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 — onnxruntime raises its own exception types
            raise EdgeModelError(f"{root}: the encoder is not a valid ONNX model ({type(e).__name__})") from None
        return cls(root, meta, session, EntropyCoder(CodingTables.from_bytes(files["coding_tables"])), policy)

    def preprocess(self, images: Sequence[ImageLike]) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """(N, 3, H, W) float32 model inputs and the original (height, width) of each image."""
        return self.preprocessing.batch(images)

    def latents(self, x: np.ndarray) -> np.ndarray:
        """The encoder's float latents for model inputs ``x``."""
        return self.session.run(None, {"image": np.ascontiguousarray(x, dtype=np.float32)})[0]

    def encode(self, images: Sequence[ImageLike] | ImageLike) -> Encoded:
        if not isinstance(images, (list, tuple)):
            images = [images]
        x, sizes = self.preprocess(images)
        y = self.latents(x)
        strings = self.coder.encode_batch(self.coder.symbols(y))
        payload = Payload(fingerprint=self._fp_id, latent_shape=(self.latent_channels, int(y.shape[-2]), int(y.shape[-1])),
                          original_sizes=tuple(sizes), strings=tuple(strings))
        return Encoded(payload.to_bytes(), payload, (int(x.shape[-2]), int(x.shape[-1])))
