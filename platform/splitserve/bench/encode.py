"""Device-side encoding benchmark: every runtime, side by side in one run, at batch 1.

For Entropic Student and RAC N = 0/4/8 (224×224 input, ResNet-50 feature width unless told):
model input → payload bytes, including rounding and entropy coding, with eager PyTorch,
TorchScript, ONNX Runtime and the torch-free client, at 1 thread and at all threads; the old
(CompressAI rANS) and new (constriction ANS) coders' encode/decode times and bytes on the same
latents; and the installed size of the edge environment against the full one.

The codecs are untrained, with their encoder's last layer scaled so the latent has a realistic
spread and the prior fitted to it: time depends on shapes and symbol statistics, not on what the
weights learned.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from splitserve_edge.coder import EntropyCoder
from splitserve_edge.payload import Payload, fingerprint_id

from ..models import FeatureCodec, build_codec
from .timing import median_ms

FAMILIES = {"Entropic Student": ("entropic_student", {}), "RAC N=0": ("rac", {"blocks": 0}),
            "RAC N=4": ("rac", {"blocks": 4}), "RAC N=8": ("rac", {"blocks": 8})}


def realistic_codec(family: str, cfg: dict, x: torch.Tensor, feature_channels: int) -> FeatureCodec:
    torch.manual_seed(0)
    codec = build_codec(family, feature_channels=feature_channels, **cfg).eval()
    last = [m for m in codec.encoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        y = codec.encoder(x)
        last.weight.mul_(2.0 / max(float(y.std()), 1e-6))
        y = codec.encoder(x)
    opt = torch.optim.Adam([codec.entropy_bottleneck.quantiles], lr=0.1)
    for _ in range(300):
        loss = codec.entropy_bottleneck.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    codec.entropy_bottleneck.train()
    with torch.no_grad():  # the medians follow the latent
        codec.entropy_bottleneck.quantiles[:, :, 1] = y.mean(dim=(0, 2, 3)).reshape(-1, 1)
    codec.eval()
    codec.update(force=True)
    return codec


@dataclass
class Row:
    name: str
    params: int
    ms: dict[str, dict[int, float]] = field(default_factory=dict)  # runtime -> threads -> ms
    coder: dict[str, float] = field(default_factory=dict)


def run(repeat: int = 20, size: int = 224, feature_channels: int = 256, edge_venv: Path | None = None) -> str:
    import onnxruntime as ort
    from PIL import Image
    from skimage import data

    from ..export import exportable
    from ..preprocess import Preprocessing, to_input
    from .report import machine

    photo = Image.fromarray(data.astronaut())
    policy = Preprocessing.fixed(size, size, 8)
    x = to_input(photo, policy).unsqueeze(0)
    all_threads = torch.get_num_threads()
    threads = sorted({1, all_threads})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (family, cfg) in tqdm(FAMILIES.items(), desc="codecs", unit="codec"):
            codec = realistic_codec(family, cfg, x, feature_channels)
            coder = EntropyCoder(codec.coding_tables())
            fp = fingerprint_id(codec.fingerprint())
            enc = exportable(codec.encoder)
            onnx_path = Path(tmp) / f"{family}{cfg.get('blocks', '')}.onnx"
            torch.onnx.export(enc, x, str(onnx_path), input_names=["image"], output_names=["latent"],
                              opset_version=17, dynamo=False)
            traced = torch.jit.trace(enc, x)

            def finish(y: np.ndarray) -> bytes:
                """Rounding + entropy coding + container: the same for every runtime."""
                strings = coder.encode_batch(coder.symbols(y))
                return Payload(fp, (codec.latent_channels, y.shape[-2], y.shape[-1]), ((size, size),),
                               tuple(strings)).to_bytes()

            row = Row(label, codec.parameter_counts()["encoder"] + codec.parameter_counts()["prior"])
            for n in threads:
                torch.set_num_threads(n)
                so = ort.SessionOptions()
                so.intra_op_num_threads, so.inter_op_num_threads = n, 1
                session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
                xn = x.numpy()
                with torch.inference_mode():
                    row.ms.setdefault("eager PyTorch", {})[n] = median_ms(lambda: finish(codec.encoder(x).numpy()), repeat)
                    row.ms.setdefault("TorchScript", {})[n] = median_ms(lambda: finish(traced(x).numpy()), repeat)
                row.ms.setdefault("ONNX Runtime", {})[n] = median_ms(
                    lambda: finish(session.run(None, {"image": xn})[0]), repeat)
                row.ms.setdefault("torch-free client (JPEG → payload)", {})[n] = median_ms(
                    lambda: finish(session.run(None, {"image": policy.apply(photo)[None]})[0]), repeat)
            torch.set_num_threads(all_threads)
            with torch.inference_mode():
                y = codec.encoder(x)
                sym = coder.symbols(y.numpy())[0]
                eb = codec.entropy_bottleneck
                old = eb.compress(y)
                new = coder.encode(sym)
                row.coder = {
                    "old bytes": len(old[0]), "new bytes": len(new),
                    "old encode ms": median_ms(lambda: eb.compress(y), repeat),
                    "new encode ms": median_ms(lambda: coder.encode(sym), repeat),
                    "old decode ms": median_ms(lambda: eb.decompress(old, y.shape[-2:]), repeat),
                    "new decode ms": median_ms(lambda: coder.decode(new, sym.shape), repeat),
                }
                assert np.array_equal(coder.decode(new, sym.shape), sym)
            rows.append(row)

    runtimes = list(rows[0].ms)
    base = rows[0].ms["eager PyTorch"]
    lines = [
        "## Encoding on the device (`platform bench encode`)",
        "",
        f"Machine: {machine()}. Batch 1, {size}×{size} input, model input → payload bytes (encoder, rounding, "
        f"entropy coding, container); median of {repeat} after a warm-up. Codecs untrained with a realistic latent "
        "spread (see the module docstring). The client row starts from the decoded photo and includes the "
        "preprocessing.",
        "",
        "| codec | device params | " + " | ".join(f"{r} ({n} thr) ms" for r in runtimes for n in threads) + " |",
        "|---|---:|" + "---:|" * (len(runtimes) * len(threads)),
    ]
    for row in rows:
        lines.append(f"| {row.name} | {row.params:,} | " +
                     " | ".join(f"{row.ms[r][n]:.1f}" for r in runtimes for n in threads) + " |")
    lines += ["", "Ratios to eager PyTorch for Entropic Student (same thread count):", ""]
    for r in runtimes:
        lines.append(f"- {r}: " + ", ".join(f"{rows[0].ms[r][n] / base[n]:.2f}× at {n} thread{'s' if n > 1 else ''}"
                                             for n in threads))
    lines += ["", "Encoder latency relative to Entropic Student's (ONNX Runtime, 1 thread): " +
              ", ".join(f"{row.name} {row.ms['ONNX Runtime'][1] / rows[0].ms['ONNX Runtime'][1]:.2f}×" for row in rows),
              "", "### The old and the new entropy coder on the same latents", "",
              "| codec | CompressAI rANS bytes | constriction ANS bytes | rANS encode ms | ANS encode ms | "
              "rANS decode ms | ANS decode ms |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        c = row.coder
        lines.append(f"| {row.name} | {c['old bytes']:,} | {c['new bytes']:,} | {c['old encode ms']:.2f} | "
                     f"{c['new encode ms']:.2f} | {c['old decode ms']:.2f} | {c['new decode ms']:.2f} |")
    lines += ["", "### Installed size", ""]
    full = _du(Path(torch.__file__).parents[1])
    lines.append(f"- full environment (this one's site-packages: torch, torchvision, compressai, …): {full:,.0f} MB")
    if edge_venv is not None:
        lines.append("- edge client environment (a fresh venv with `pip install ./platform/splitserve_edge`), "
                     f"without pip and setuptools: {_du(_site(edge_venv), skip=('pip', 'setuptools', '_distutils_hack')):,.0f} MB")
    else:
        lines.append("- edge client environment: pass `--edge-venv DIR` (a venv with `pip install ./platform/splitserve_edge`)")
    return "\n".join(lines)


def _site(venv: Path) -> Path:
    return next(Path(venv).glob("lib/python*/site-packages"))


def _du(path: Path, skip: tuple[str, ...] = ()) -> float:
    total = 0
    for p in Path(path).iterdir():
        if p.name.split("-")[0] in skip:
            continue
        total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return total / 2**20
