"""The torch-free device: an exported encoder (ONNX Runtime) + the coder → payload bytes.

Loads a directory written by ``platform export --format onnx`` and produces the same payload the
PyTorch edge (:class:`splitserve.edge.EdgeEncoder`) produces for the same image: the same
preprocessing code, the same rounding, the same coder, the same container. Needs numpy, Pillow,
onnxruntime, constriction and safetensors — no torch. Other encoder formats plug in as a
:data:`Runner` (``splitserve.export`` adds ExecuTorch's ``.pte``, whose Python runtime needs torch).

>>> from splitserve_edge.runtime import EdgeModel
>>> model = EdgeModel.load("bundle-edge/")
>>> data = model.encode(["photo.jpg"])          # payload bytes for POST /infer
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .coder import CodingTables, EntropyCoder
from .errors import SplitserveError
from .payload import Encoded, Payload, fingerprint_id
from .preprocessing import ImageLike, Preprocessing, PreprocessingError

EDGE_FORMAT = "splitserve-edge"
EDGE_VERSION = 1

Latents = Callable[[np.ndarray], np.ndarray]  # model inputs (N, 3, H, W) float32 → float latents
Runner = Callable[[bytes, int | None], Latents]  # (encoder file, threads) → its latent function


class EdgeModelError(SplitserveError):
    """An export directory is missing, corrupt, or in a format this process cannot run."""


def onnx_runner(model: bytes, threads: int | None = None) -> Latents:
    """ONNX Runtime on the CPU: the torch-free path."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"image": np.ascontiguousarray(x, dtype=np.float32)})[0]


RUNNERS: Mapping[str, Runner] = {"onnx": onnx_runner}


class EdgeModel:
    """An exported encoder: preprocessing → encoder → round → entropy code → payload."""

    def __init__(self, latents: Latents, coder: EntropyCoder, policy: Preprocessing, fingerprint: str,
                 latent_channels: int, meta: dict[str, Any] | None = None, root: Path | None = None):
        self.latents = latents
        self.coder = coder
        self.preprocessing = policy
        self.fingerprint = fingerprint
        self._fp_id = fingerprint_id(fingerprint)
        self.latent_channels = int(latent_channels)
        self.meta = meta or {}
        self.root = root

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None, runners: Mapping[str, Runner] = RUNNERS) -> "EdgeModel":
        """Load an export directory, checking its files against edge.json; ``runners`` maps the
        encoder formats this process can run to their :data:`Runner`."""
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
        fmt = meta.get("encoder", {}).get("format")
        if fmt not in runners:
            raise EdgeModelError(f"{root}: this client runs {' and '.join(runners)} exports (this one is {fmt!r}"
                                 f"{'; run it with ExecuTorch: splitserve.export.load_export' if fmt == 'pte' else ''})")
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
        try:
            latents = runners[fmt](files["encoder"], threads)
        except Exception as e:  # noqa: BLE001 — each runtime raises its own exception types
            raise EdgeModelError(f"{root}: the encoder is not a valid {fmt} model ({type(e).__name__})") from None
        return cls(latents, EntropyCoder(CodingTables.from_bytes(files["coding_tables"])), policy, meta["fingerprint"],
                   meta["codec"]["latent_channels"], meta, root)

    def preprocess(self, images: Sequence[ImageLike]) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """(N, 3, H, W) float32 model inputs and the original (height, width) of each image."""
        return self.preprocessing.batch(images)

    def encode(self, images: Sequence[ImageLike] | ImageLike) -> Encoded:
        if not isinstance(images, (list, tuple)):
            images = [images]
        return self.encode_input(*self.preprocess(images))

    def encode_input(self, x: np.ndarray, sizes: Sequence[tuple[int, int]]) -> Encoded:
        """Model inputs (already preprocessed) and their original sizes → the payload."""
        y = self.latents(x)
        strings = self.coder.encode_batch(self.coder.symbols(y))
        payload = Payload(fingerprint=self._fp_id, latent_shape=(self.latent_channels, int(y.shape[-2]), int(y.shape[-1])),
                          original_sizes=tuple(sizes), strings=tuple(strings))
        return Encoded(payload.to_bytes(), payload, (int(x.shape[-2]), int(x.shape[-1])))
