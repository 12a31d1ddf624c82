"""``platform export``: the device side of a bundle in portable files, checked against PyTorch.

Writes a directory a device can run without torch (with ONNX Runtime and
:mod:`splitserve_edge`), or with TorchScript:

    edge.json            what it is: fingerprint, codec, preprocessing, payload version, file hashes
    encoder.onnx | encoder.pt   the encoder transform f_θ (image → float latent)
    coding.safetensors   the prior's coding tables and medians (numpy arrays, no pickle)

The rounding (``round(y − median)``, half to even) and the entropy coding are not part of the
exported graph: they run in :mod:`splitserve_edge.coder`, the same code the gateway uses.
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

from splitserve_edge.payload import FORMAT_VERSION as PAYLOAD_VERSION
from splitserve_edge.runtime import EDGE_FORMAT, EDGE_VERSION

from .bundle import EDGE_PARTS, load_codec, read_manifest
from .errors import SplitserveError
from .preprocess import load_image, to_input

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 17


@dataclass
class ExportReport:
    out: Path
    files: dict[str, Path]
    images: int
    elements: int
    mismatches: int
    max_abs_diff: float

    def summary(self) -> str:
        return (f"wrote {self.out}: " + ", ".join(p.name for p in self.files.values()) +
                f"; checked on {self.images} images: {self.mismatches} of {self.elements:,} rounded latent elements "
                f"differ from PyTorch's (max |Δ| before rounding {self.max_abs_diff:.2e})")


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


def export_edge(bundle: str | Path, fmt: str, out: str | Path, images: list) -> ExportReport:
    """Export the encoder of ``bundle`` as ``fmt`` with its coding tables into ``out``, then check
    the exported encoder's rounded latents against PyTorch's on ``images`` (paths or PIL images)."""
    if fmt not in FORMATS:
        raise SplitserveError(f"unsupported export format {fmt!r}; choose {' or '.join(FORMATS)}")
    if not images:
        raise SplitserveError("give at least one image to check the export on (--images)")
    manifest = read_manifest(bundle)
    codec = load_codec(bundle, parts=EDGE_PARTS, manifest=manifest).eval()
    policy = manifest.policy
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 3, *policy.nominal_size)
    encoder_path = out / ("encoder.onnx" if fmt == "onnx" else "encoder.pt")
    encoder = exportable(codec.encoder)
    with torch.no_grad():
        if fmt == "onnx":
            torch.onnx.export(
                encoder, example, str(encoder_path), input_names=["image"], output_names=["latent"],
                dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                              "latent": {0: "batch", 2: "latent_height", 3: "latent_width"}},
                opset_version=ONNX_OPSET, dynamo=False,
            )
        else:
            torch.jit.trace(encoder, example).save(str(encoder_path))
    tables_path = out / "coding.safetensors"
    tables_path.write_bytes(codec.coding_tables().to_bytes())
    meta = {
        "format": EDGE_FORMAT,
        "format_version": EDGE_VERSION,
        "fingerprint": manifest.fingerprint,
        "codec": {"family": codec.family, "config": codec.config, "latent_channels": codec.latent_channels,
                  "input_multiple": codec.input_multiple},
        "preprocessing": manifest.preprocessing,
        "payload_version": PAYLOAD_VERSION,
        "encoder": {"path": encoder_path.name, "format": fmt, "sha256": _sha256(encoder_path)},
        "coding_tables": {"path": tables_path.name, "sha256": _sha256(tables_path)},
        "rounding": "symbols = round_half_to_even(latent - median) in float32, then entropy-coded by "
                    "splitserve_edge.coder",
        "source_bundle": str(Path(bundle)),
    }
    (out / "edge.json").write_text(json.dumps(meta, indent=2) + "\n")
    report = _check(codec, fmt, encoder_path, policy, images)
    return ExportReport(out, {"encoder": encoder_path, "coding_tables": tables_path, "meta": out / "edge.json"},
                        *report)


def _check(codec, fmt: str, encoder_path: Path, policy, images: list) -> tuple[int, int, int, float]:
    """(images, elements, mismatching rounded elements, max |Δ| of the float latents)."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(encoder_path), providers=["CPUExecutionProvider"])

        def run(x: torch.Tensor) -> np.ndarray:
            return session.run(None, {"image": x.numpy()})[0]
    else:
        module = torch.jit.load(str(encoder_path))

        def run(x: torch.Tensor) -> np.ndarray:
            with torch.no_grad():
                return module(x).numpy()

    medians = codec.medians().reshape(1, -1, 1, 1).numpy()
    elements = mismatches = 0
    worst = 0.0
    for image in images:
        x = to_input(load_image(image), policy).unsqueeze(0)
        with torch.no_grad():
            ref = codec.encoder(x).numpy()
        got = run(x)
        worst = max(worst, float(np.abs(got - ref).max()))
        a = np.rint(ref.astype(np.float32) - medians)
        b = np.rint(got.astype(np.float32) - medians)
        mismatches += int((a != b).sum())
        elements += a.size
    return len(images), elements, mismatches, worst
