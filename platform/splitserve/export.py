"""``platform export``: the device side of a bundle in portable files, checked against PyTorch.

Writes a directory a device can run without torch (ONNX Runtime and :mod:`splitserve_edge`), or
with ExecuTorch, PyTorch's own edge runtime (``torch.export`` → ``.pte``, XNNPACK delegate):

    edge.json            what it is: fingerprint, codec, rates, preprocessing, payload version, file hashes
    encoder.onnx | encoder.pte   the encoder transform f_θ (image → float latent)
    coding.safetensors   every rate's coding tables and medians, and (variable-rate) the gains
                         (numpy arrays, no pickle; a single-rate file is the CodingTables file)

The gain, the rounding (``round(g·y − median)``, half to even) and the entropy coding are not part
of the exported graph: they run in :mod:`splitserve_edge.packing`, the same code the PyTorch edge
runs, so one graph serves every rate.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from compressai.layers import GDN, GDN1
from torch import nn

from splitserve_edge.payload import FORMAT_VERSION, SINGLE_RATE_VERSION
from splitserve_edge.preprocessing import MAX_SIDE
from splitserve_edge.runtime import EDGE_FORMAT, EDGE_VERSION, RUNNERS, SINGLE_RATE_EDGE_VERSION, EdgeModel, Latents

from .bundle import EDGE_PARTS, Manifest, RateEntry, load_codec, read_manifest
from .edge import EdgeEncoder
from .errors import SplitserveError
from .preprocess import Preprocessing, load_image, to_input

FORMATS = {"onnx": "encoder.onnx", "pte": "encoder.pte"}
# 20: ONNX's own Gelu op (RAC's blocks), which ONNX Runtime runs as one kernel; at 18 the exporter
# spells GELU out in erf arithmetic that ONNX Runtime does not fuse (RAC N=8 5 % slower at 1 thread)
ONNX_OPSET = 20
# executorch 1.5.1's metadata asks for numpy>=2, which compressai 1.2.8 cannot load, so pip cannot
# resolve it beside splitserve; installed without its dependencies it exports and runs here.
EXECUTORCH_INSTALL = "install the pte extra, then `pip install --no-deps executorch==1.5.1` (docs/edge.md)"


@dataclass
class ExportReport:
    out: Path
    files: dict[str, Path]
    images: int
    rates: int
    elements: int
    mismatches: int
    max_abs_diff: float
    identical_payloads: int

    def summary(self) -> str:
        at = "" if self.rates == 1 else f" at each of {self.rates} rates"
        return (f"wrote {self.out}: " + ", ".join(p.name for p in self.files.values()) +
                f"; checked on {self.images} images{at}: {self.mismatches} of {self.elements:,} rounded latent "
                f"elements differ from PyTorch's (max |Δ| before rounding {self.max_abs_diff:.2e}); "
                f"{self.identical_payloads} of {self.images * self.rates} payloads byte-identical to the PyTorch "
                "edge's")


class FrozenGDN1(nn.Module):
    """A trained simplified GDN with its reparametrised β and γ fixed as buffers: the same ops as
    CompressAI's ``GDN1.forward`` (so the same numbers), minus the autograd-only lower bound that
    tracers and exporters cannot follow."""

    def __init__(self, gdn: GDN1):
        super().__init__()
        c = gdn.beta.numel()
        with torch.no_grad():
            self.register_buffer("beta", gdn.beta_reparam(gdn.beta).detach().clone())
            self.register_buffer("gamma", gdn.gamma_reparam(gdn.gamma).detach().reshape(c, c, 1, 1).clone())
        self.inverse = bool(gdn.inverse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = F.conv2d(torch.abs(x), self.gamma, self.beta)
        if not self.inverse:
            norm = 1.0 / norm
        return x * norm


def exportable(encoder: nn.Module) -> nn.Module:
    """A copy of ``encoder`` that tracers and exporters can follow (GDN parameters frozen)."""
    frozen = copy.deepcopy(encoder).eval()
    for name, module in list(frozen.named_modules()):
        if isinstance(module, GDN1):
            parent, _, attr = name.rpartition(".")
            setattr(frozen.get_submodule(parent) if parent else frozen, attr, FrozenGDN1(module))
        elif isinstance(module, GDN):
            raise SplitserveError(f"{type(module).__name__} layers cannot be exported; the encoder uses full GDN")
    return frozen


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_encoder(encoder: nn.Module, fmt: str, policy: Preprocessing, path: Path) -> None:
    """The encoder transform f_θ as ``fmt`` at ``path``: ONNX with dynamic batch, height and width;
    ExecuTorch one image per call at the policy's input size (any size it produces, under
    ``shorter_side``), delegated to XNNPACK."""
    encoder = exportable(encoder)
    example = torch.zeros(1, 3, *policy.nominal_size)
    with torch.no_grad():
        if fmt == "onnx":  # torch.export's graph, translated by onnxscript (PyTorch's supported exporter)
            sizes = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
            torch.onnx.export(encoder, (example,), str(path), input_names=["image"], output_names=["latent"],
                              dynamic_shapes=(sizes,), opset_version=ONNX_OPSET, dynamo=True, external_data=False,
                              verbose=False)
            return
        try:
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import to_edge_transform_and_lower
        except ImportError as e:
            raise SplitserveError(f"--format pte needs ExecuTorch ({e.name} is missing): {EXECUTORCH_INSTALL}") from None
        dims = None
        if policy.kind == "shorter_side":  # memory is planned for the largest side the policy produces
            side = (4 * policy.multiple, max(policy.input_size(1, MAX_SIDE)))
            dims = ({2: torch.export.Dim("height", min=side[0], max=side[1]),
                     3: torch.export.Dim("width", min=side[0], max=side[1])},)
        program = torch.export.export(encoder, (example,), dynamic_shapes=dims)
        path.write_bytes(to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)


def pte_runner(model: bytes, threads: int | None = None) -> Latents:
    """ExecuTorch's runtime (its Python binding needs torch), one image per call; ``threads`` sizes
    its process-wide thread pool."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime

    if threads:
        _unsafe_reset_threadpool(threads)
    program = Runtime.get().load_program(model)
    method = program.load_method("forward")

    def latents(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        try:
            return np.concatenate([method.execute([torch.from_numpy(x[i:i + 1])])[0].numpy() for i in range(len(x))])
        except RuntimeError as e:  # ExecuTorch checks inputs against the shapes it was exported for
            raise SplitserveError(f"the .pte refused a {x.shape[-2]}x{x.shape[-1]} input ({e})") from None

    latents.program = program  # the method runs on the program's buffers: keep it alive with the function
    return latents


EXPORT_RUNNERS = {**RUNNERS, "pte": pte_runner}


def load_export(path: str | Path, threads: int | None = None) -> EdgeModel:
    """An export directory of any format :func:`export_edge` writes (ONNX without torch, .pte with ExecuTorch)."""
    return EdgeModel.load(path, threads, EXPORT_RUNNERS)


def export_edge(bundle: str | Path, fmt: str, out: str | Path, images: list) -> ExportReport:
    """Export the encoder of ``bundle`` as ``fmt`` with its coding tables into ``out``, then check
    the exported encoder against PyTorch on ``images`` (paths or PIL images): rounded latents and
    payload bytes."""
    if fmt not in FORMATS:
        raise SplitserveError(f"unsupported export format {fmt!r}; choose {' or '.join(FORMATS)}")
    if not images:
        raise SplitserveError("give at least one image to check the export on (--images)")
    manifest = read_manifest(bundle)
    codec = load_codec(bundle, parts=EDGE_PARTS, manifest=manifest).eval()
    policy = manifest.policy
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    encoder_path = out / FORMATS[fmt]
    write_encoder(codec.encoder, fmt, policy, encoder_path)
    tables_path = out / "coding.safetensors"
    tables_path.write_bytes(codec.rate_tables().to_bytes())
    variable = codec.rates > 1
    meta = {
        "format": EDGE_FORMAT,
        "format_version": EDGE_VERSION if variable else SINGLE_RATE_EDGE_VERSION,
        "fingerprint": manifest.fingerprint,
        "codec": {"family": codec.family, "config": codec.config, "latent_channels": codec.latent_channels,
                  "input_multiple": codec.input_multiple},
        "rates": rate_list(manifest, codec.rates),
        "default_rate": manifest.default_rate,
        "preprocessing": manifest.preprocessing,
        "payload_version": FORMAT_VERSION if variable else SINGLE_RATE_VERSION,
        "encoder": {"path": encoder_path.name, "format": fmt, "sha256": _sha256(encoder_path)},
        "coding_tables": {"path": tables_path.name, "sha256": _sha256(tables_path)},
        "rounding": "symbols = round_half_to_even(gain[rate] * latent - median[rate]) in float32 (no gain when "
                    "single-rate), then entropy-coded by splitserve_edge.coder with rate's tables",
        "source_bundle": str(Path(bundle)),
    }
    (out / "edge.json").write_text(json.dumps(meta, indent=2) + "\n")
    report = _check(EdgeEncoder(codec, policy, manifest.default_rate), load_export(out), images)
    return ExportReport(out, {"encoder": encoder_path, "coding_tables": tables_path, "meta": out / "edge.json"},
                        *report)


def rate_list(manifest: Manifest, rates: int) -> list[dict]:
    """edge.json's rates: index, the weight each was trained at and its measured cost (None where
    the manifest does not say)."""
    entries = manifest.rates or [RateEntry()] * rates
    return [{"index": k, **entry.model_dump()} for k, entry in enumerate(entries)]


def _check(reference: EdgeEncoder, exported: EdgeModel, images: list) -> tuple[int, int, int, int, float, int]:
    """(images, rates, elements, mismatching rounded elements, max |Δ| of the float latents, identical
    payloads), the rounded latents and payloads compared at every rate."""
    coder = exported.coder
    elements = mismatches = identical = 0
    worst = 0.0
    for image in images:
        pil = load_image(image)
        x = to_input(pil, reference.preprocessing).unsqueeze(0)
        with torch.no_grad():
            ref = reference.codec.encoder(x).numpy()
        got = exported.latents(x.numpy())
        worst = max(worst, float(np.abs(got - ref).max()))
        sizes = [(pil.height, pil.width)]
        for rate in range(len(coder)):
            a, b = coder.symbols(ref, rate), coder.symbols(got, rate)
            mismatches += int((a != b).sum())
            elements += a.size
            identical += (exported.encode_input(x.numpy(), sizes, rate=rate).data ==
                          reference.encode_tensor(x, sizes, rate=rate).data)
    return len(images), len(coder), elements, mismatches, worst, identical
