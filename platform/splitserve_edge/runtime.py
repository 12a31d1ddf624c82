"""The torch-free device: an exported encoder (ONNX Runtime) + the coder → payload bytes.

Loads a directory written by ``platform export --format onnx`` and produces the same payload the
PyTorch edge (:class:`splitserve.edge.EdgeEncoder`) produces for the same image: the same
preprocessing code, the same rounding, the same coder, the same container. Needs numpy, Pillow,
onnxruntime, constriction and safetensors — no torch. Other encoder formats plug in as a
:data:`Runner` (``splitserve.export`` adds ExecuTorch's ``.pte``, whose Python runtime needs torch).

A variable-rate export codes each image at a rate the device picks: a fixed ``rate`` or the
highest rate whose payload fits ``max_bytes`` (:mod:`splitserve_edge.packing`, the code the PyTorch
edge runs too).

>>> from splitserve_edge.runtime import EdgeModel
>>> model = EdgeModel.load("bundle-edge/")
>>> data = model.encode(["photo.jpg"]).data                     # payload bytes for POST /infer
>>> data = model.encode(["photo.jpg"], max_bytes=300).data      # the largest payload up to 300 bytes
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SplitserveError
from .packing import Packer, image_names
from .payload import Encoded
from .preprocessing import ImageLike, Preprocessing, PreprocessingError
from .rates import RateCoder, RateTables

EDGE_FORMAT = "splitserve-edge"
# 2: a variable-rate export (coding tables of K rates with gains, ``rates`` and ``default_rate`` in
# edge.json); single-rate exports stay 1, so clients from before rates existed still load them.
EDGE_VERSION = 2
SINGLE_RATE_EDGE_VERSION = 1
EDGE_VERSIONS = (1, 2)

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
    """An exported encoder: preprocessing → encoder → (gain, round, entropy code at the chosen rate) → payload."""

    def __init__(self, latents: Latents, coder: RateCoder, policy: Preprocessing, fingerprint: str,
                 latent_channels: int, meta: dict[str, Any] | None = None, root: Path | None = None,
                 default_rate: int = 0):
        self.latents = latents
        self.coder = coder
        self.preprocessing = policy
        self.fingerprint = fingerprint
        self.packer = Packer(coder, fingerprint, latent_channels, default_rate)
        self.meta = meta or {}
        self.root = root

    @property
    def rates(self) -> int:
        """How many rates the export codes at (1: single-rate)."""
        return len(self.coder)

    @property
    def default_rate(self) -> int:
        return self.packer.default_rate

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
        if meta.get("format_version") not in EDGE_VERSIONS:
            raise EdgeModelError(f"{root}/edge.json: version {meta.get('format_version')!r} is not supported "
                                 f"(this client reads {', '.join(map(str, EDGE_VERSIONS))})")
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
            coder = RateCoder(RateTables.from_bytes(files["coding_tables"]))
            if len(meta.get("rates", [None] * len(coder))) != len(coder):
                raise SplitserveError(f"{len(meta['rates'])} rates listed, the coding tables hold {len(coder)}")
            if coder.tables.channels != meta["codec"]["latent_channels"]:
                raise SplitserveError("the coding tables' channels differ from codec.latent_channels")
        except (PreprocessingError, TypeError, KeyError, SplitserveError) as e:
            raise EdgeModelError(f"{root}/edge.json: {e}") from None
        try:
            latents = runners[fmt](files["encoder"], threads)
        except Exception as e:  # noqa: BLE001 — each runtime raises its own exception types
            raise EdgeModelError(f"{root}: the encoder is not a valid {fmt} model ({type(e).__name__})") from None
        try:
            return cls(latents, coder, policy, meta["fingerprint"], meta["codec"]["latent_channels"], meta, root,
                       meta.get("default_rate", 0))
        except (ValueError, TypeError, SplitserveError) as e:  # a bad fingerprint or default rate
            raise EdgeModelError(f"{root}/edge.json: {e}") from None

    def preprocess(self, images: Sequence[ImageLike]) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """(N, 3, H, W) float32 model inputs and the original (height, width) of each image."""
        return self.preprocessing.batch(images)

    def encode(self, images: Sequence[ImageLike] | ImageLike, *, rate: int | None = None,
               max_bytes: int | None = None) -> Encoded:
        """One payload for the images, at ``rate`` (default: the export's default rate) or, with
        ``max_bytes``, each image at the highest rate whose one-image payload fits that many bytes."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        return self.encode_input(*self.preprocess(images), rate=rate, max_bytes=max_bytes, names=image_names(images))

    def encode_input(self, x: np.ndarray, sizes: Sequence[tuple[int, int]], *, rate: int | None = None,
                     max_bytes: int | None = None, names: Sequence[str] | None = None) -> Encoded:
        """Model inputs (already preprocessed) and their original sizes → the payload (see :meth:`encode`)."""
        payload = self.packer.encode(self.latents(x), sizes, rate=rate, max_bytes=max_bytes, names=names)
        return Encoded(payload.to_bytes(), payload, (int(x.shape[-2]), int(x.shape[-1])))
