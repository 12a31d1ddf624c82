"""Device-side encoding benchmark: every runtime, side by side in one run, at batch 1.

For Entropic Student and RAC N = 0/4/8 (224×224 input, ResNet-50 feature width unless told):
model input → payload bytes, including rounding and entropy coding, with eager PyTorch,
ExecuTorch (the ``.pte`` of ``platform export``, XNNPACK; when installed), ONNX Runtime and the
torch-free client, at 1 thread and at all threads — every runtime through the same
:class:`~splitserve_edge.runtime.EdgeModel`, so only the encoder differs; the old (CompressAI
rANS) and new (constriction ANS) coders' encode/decode times and bytes on the same latents; what
picking the rate within a byte budget costs against coding at one fixed rate, on a variable-rate
codec of each family (the transform once, then the search's codings); and the installed size of
the edge environment against the full one.

The codecs are untrained, with their encoder's last layer scaled so the latent has a realistic
spread and each rate's prior (density, then quantiles) fitted to it: time depends on shapes and
symbol statistics, not on what the weights learned.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from splitserve_edge.coder import EntropyCoder
from splitserve_edge.rates import RateCoder
from splitserve_edge.runtime import EdgeModel

from ..models import FeatureCodec, build_codec
from ..training.refit import fit_entropy_model
from .timing import median_ms

FAMILIES = {"Entropic Student": ("entropic_student", {}), "RAC N=0": ("rac", {"blocks": 0}),
            "RAC N=4": ("rac", {"blocks": 4}), "RAC N=8": ("rac", {"blocks": 8})}
RATES = 6  # the variable-rate codec of the budget-search table (issue 24's goal: at least 6 rates)


def realistic_codec(family: str, cfg: dict, x: torch.Tensor, feature_channels: int, rates: int = 1,
                    prior: str = "per-rate") -> FeatureCodec:
    """An untrained codec whose latent has a realistic spread, each rate's prior (or the shared
    one, ``prior="shared"``) fitted to it."""
    torch.manual_seed(0)
    codec = build_codec(family, feature_channels=feature_channels, rates=rates, prior=prior, **cfg).eval()
    last = [m for m in codec.encoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        y = codec.encoder(x)
        last.weight.mul_(2.0 / max(float(y.std()), 1e-6))
        y = codec.encoder(x)
    # each density learns the latent's distribution (so the bytes are its entropy and grow with the
    # gain, as a trained codec's do), then the quantiles the tables are cut from: the refit's fit
    fit_entropy_model(codec, [y.detach()], steps=300, passes=300)
    codec.eval()
    return codec


@dataclass
class Row:
    name: str
    params: int
    ms: dict[str, dict[int, float]] = field(default_factory=dict)  # runtime -> threads -> ms
    coder: dict[str, float] = field(default_factory=dict)
    budget: dict[str, float] = field(default_factory=dict)  # fixed rate vs budget search, ONNX Runtime, 1 thread


def paired_ms(first: Callable[[], object], second: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median ms of two calls timed alternately (after a warm-up of each), so a machine shared with
    other work slows both alike and their ratio stays fair."""
    first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat):
        for fn, out in zip((first, second), times):
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])


def budget_cost(model: EdgeModel, x, sizes, repeat: int) -> dict[str, float]:
    """Device time of coding at one fixed rate (the middle one) against ``max_bytes`` set to that
    rate's one-image payload length, so the search ends where the fixed rate is and makes every
    probe a real search makes (about log2 K + 1 codings) — both from model input to payload bytes."""
    rate = model.rates // 2
    budget = model.encode_input(x, sizes, rate=rate).num_bytes
    assert model.encode_input(x, sizes, max_bytes=budget).rates == (rate,)
    fixed, search = paired_ms(lambda: model.encode_input(x, sizes, rate=rate),
                              lambda: model.encode_input(x, sizes, max_bytes=budget), repeat)
    return {"rate": rate, "bytes": budget, "fixed ms": fixed, "search ms": search}


def run(repeat: int = 20, size: int = 224, feature_channels: int = 256, edge_venv: Path | None = None) -> str:
    from PIL import Image
    from skimage import data

    from ..export import EXPORT_RUNNERS, FORMATS, write_encoder
    from ..preprocess import Preprocessing, to_input
    from .report import machine

    photo = Image.fromarray(data.astronaut())
    policy = Preprocessing.fixed(size, size, 8)
    x = to_input(photo, policy).unsqueeze(0)
    xn, sizes = x.numpy(), [(photo.height, photo.width)]
    all_threads = torch.get_num_threads()
    threads = sorted({1, all_threads})
    formats = {"ExecuTorch (XNNPACK)": "pte", "ONNX Runtime": "onnx"}
    skipped = []
    if not _executorch_installed():
        skipped.append("ExecuTorch (XNNPACK): not installed (see docs/edge.md)")
        del formats["ExecuTorch (XNNPACK)"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (family, cfg) in tqdm(FAMILIES.items(), desc="codecs", unit="codec"):
            codec = realistic_codec(family, cfg, x, feature_channels)
            coder = EntropyCoder(codec.coding_tables())
            files = {}
            for fmt in formats.values():
                files[fmt] = Path(tmp) / f"{family}{cfg.get('blocks', '')}-{FORMATS[fmt]}"
                write_encoder(codec.encoder, fmt, policy, files[fmt])

            def edge(latents, codec: FeatureCodec = codec) -> EdgeModel:
                return EdgeModel(latents, RateCoder(codec.rate_tables()), policy, codec.fingerprint(),
                                 codec.latent_channels)

            row = Row(label, codec.parameter_counts()["encoder"] + codec.parameter_counts()["prior"])
            for n in threads:
                torch.set_num_threads(n)
                with torch.inference_mode():
                    eager = edge(lambda a: codec.encoder(torch.from_numpy(a)).numpy())
                    row.ms.setdefault("eager PyTorch", {})[n] = median_ms(lambda: eager.encode_input(xn, sizes), repeat)
                for name, fmt in formats.items():
                    model = edge(EXPORT_RUNNERS[fmt](files[fmt].read_bytes(), n))
                    row.ms.setdefault(name, {})[n] = median_ms(lambda: model.encode_input(xn, sizes), repeat)
                client = edge(EXPORT_RUNNERS["onnx"](files["onnx"].read_bytes(), n))
                row.ms.setdefault("torch-free client (JPEG → payload)", {})[n] = median_ms(
                    lambda: client.encode([photo]), repeat)
            vr = realistic_codec(family, cfg, x, feature_channels, RATES)
            vr_file = Path(tmp) / f"{family}{cfg.get('blocks', '')}-vr.onnx"
            write_encoder(vr.encoder, "onnx", policy, vr_file)
            torch.set_num_threads(1)
            row.budget = budget_cost(edge(EXPORT_RUNNERS["onnx"](vr_file.read_bytes(), 1), vr), xn, sizes, repeat)
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
        "preprocessing." + "".join(f" Not measured: {s}." for s in skipped),
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
    lines += ["", "### Picking the rate on the device: a byte budget against one fixed rate", "",
              f"A variable-rate codec of each family ({RATES} rates, one transform), ONNX Runtime at 1 thread, "
              "model input → payload bytes, timed alternately in the same run (median of "
              f"{repeat}). Fixed: every image at the middle rate (`--rate {RATES // 2}`). Budget: `--max-bytes` set "
              "to that rate's one-image payload length, so the binary search ends at the same rate after "
              f"{RATES.bit_length()} codings at most (the transform runs once). Issue 24's goal: at most 1.3×.", "",
              "| codec | payload bytes | fixed rate ms | budget search ms | search / fixed |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        b = row.budget
        lines.append(f"| {row.name} | {b['bytes']:,} | {b['fixed ms']:.2f} | {b['search ms']:.2f} | "
                     f"{b['search ms'] / b['fixed ms']:.2f}× |")
    lines += ["", "### Installed size", ""]
    full = _du(Path(torch.__file__).parents[1])
    lines.append(f"- full environment (this one's site-packages: torch, torchvision, compressai, …): {full:,.0f} MB")
    if edge_venv is not None:
        lines.append("- edge client environment (a fresh venv with `pip install ./platform/splitserve_edge`), "
                     f"without pip and setuptools: {_du(_site(edge_venv), skip=('pip', 'setuptools', '_distutils_hack')):,.0f} MB")
    else:
        lines.append("- edge client environment: pass `--edge-venv DIR` (a venv with `pip install ./platform/splitserve_edge`)")
    return "\n".join(lines)


def _executorch_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("executorch") is not None


def _site(venv: Path) -> Path:
    return next(Path(venv).glob("lib/python*/site-packages"))


def _du(path: Path, skip: tuple[str, ...] = ()) -> float:
    total = 0
    for p in Path(path).iterdir():
        if p.name.split("-")[0] in skip:
            continue
        total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return total / 2**20
