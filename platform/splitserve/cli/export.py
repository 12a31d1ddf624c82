"""``platform export``: the device side of a bundle for ONNX Runtime or ExecuTorch."""

from __future__ import annotations

from pathlib import Path

from . import add_command


def register(sub) -> None:
    p = add_command(sub, "export", run, "Export a bundle's encoder + coding tables for devices (ONNX, ExecuTorch .pte).",
                    "Write the encoder transform (ONNX, or torch.export → ExecuTorch .pte with the XNNPACK delegate) "
                    "and the coding tables of every rate (safetensors; with a variable-rate bundle's gains) with an "
                    "edge.json that lists the rates, then check on real images, at every rate, that the exported "
                    "encoder's rounded latent equals PyTorch's and its payloads are byte-identical to the PyTorch "
                    "edge's; print the counts. The graph is rate-free: one graph serves every rate. The ONNX export "
                    "runs on the torch-free client "
                    "(`pip install ./platform/splitserve_edge`, `splitserve-edge`); .pte needs ExecuTorch "
                    "(docs/edge.md).")
    p.add_argument("--bundle", metavar="DIR", help="bundle directory (default: $SPLITSERVE_BUNDLE or the embedded default)")
    p.add_argument("--format", required=True, choices=("onnx", "pte"), help="onnx | pte (ExecuTorch)")
    p.add_argument("--out", metavar="DIR", help="output directory (default: BUNDLE-edge-FORMAT next to the bundle)")
    p.add_argument("--images", nargs="+", metavar="IMAGE",
                   help="real images to check the export on (default: the photos shipped with scikit-image)")


def _sample_images() -> list:
    from ..errors import SplitserveError

    try:
        from PIL import Image
        from skimage import data
    except ImportError:
        raise SplitserveError("no --images given and scikit-image is not installed; pass --images FILE …") from None
    return [Image.fromarray(getattr(data, n)()).convert("RGB") for n in ("astronaut", "coffee", "chelsea", "rocket")]


def run(args) -> int:
    from ..defaults import resolve_bundle
    from ..export import export_edge
    from ..preprocess import load_image

    images = [load_image(p) for p in args.images] if args.images else _sample_images()  # bad files fail first
    bundle = resolve_bundle(args.bundle)
    out = Path(args.out) if args.out else bundle.with_name(f"{bundle.name}-edge-{args.format}")
    print(export_edge(bundle, args.format, out, images).summary())
    return 0
