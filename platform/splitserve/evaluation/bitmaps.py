"""Bit-allocation maps (Entropic Student's Fig. 7): where a codec spends its bits.

For one image, the map holds at each latent position the bits the prior charges for it:
``−log2 p(ŷ)`` of the rounded latent under the codec's entropy model, summed over channels. For
our bundles that is the factorized prior of the feature codec (latent at 1/4 or 1/8 of the input);
for a CompressAI image codec it is the prior of its latent ``y`` (1/16 of the input; for the
hyperprior, ``y`` under the Gaussian conditional, without the side information ``z``). The map's
sum is the rate the entropy coder approaches; the payload adds its header and the coder's few
bytes of overhead. Maps are shown upsampled (nearest) and overlaid on the model input.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


@dataclass
class BitMap:
    method: str
    setting: str
    image: Image.Image  # the model input (8-bit RGB)
    bits: np.ndarray  # (h, w) bits per latent position

    @property
    def total_bits(self) -> float:
        return float(self.bits.sum())


@torch.inference_mode()
def feature_codec_bits(codec, x: torch.Tensor, rate: int = 0) -> np.ndarray:
    """Bits per latent position of a :class:`~splitserve.models.FeatureCodec` for one normalised
    input (1, 3, H, W) at ``rate``: −log2 of that rate's prior likelihood of the rounded (gained)
    latent, summed over channels."""
    y = codec.encoder(x).float()  # the device half only: an edge codec has no decoder
    gain = codec.gain(rate)
    if gain is not None:
        y = y * gain
    # rounded around the medians, as coded; a shared prior reads it at this rate's step
    _, likelihoods = codec.priors(y, codec.check_rate(rate), gain, training=False)
    return (-torch.log2(likelihoods[0])).sum(0).cpu().numpy()


def bundle_map(point, method: str, img: Image.Image) -> BitMap:
    """``point`` is a :class:`~splitserve.evaluation.methods.BundlePoint`."""
    x, _ = point.edge.preprocess([img])
    shown = point.edge.preprocessing.geometry(img)
    return BitMap(method, point.setting, shown, feature_codec_bits(point.edge.codec, x, point.rate or 0))


def image_codec_map(codec, method: str, img: Image.Image, policy) -> BitMap:
    """``codec`` is a :class:`~splitserve.evaluation.methods.CompressAICodec`; ``policy`` the
    teacher's preprocessing (the model input the codec compresses)."""
    from .imagecodec import to_unit_tensor

    shown = policy.geometry(img)
    return BitMap(method, codec.setting, shown, codec.codec.bit_map(to_unit_tensor(shown)))


def plot_bitmaps(maps: Sequence[Sequence[BitMap]], out: Path) -> Path:
    """One row per image; first column the model input, then each method's map over it. Colours
    are bits per latent position; each panel's title gives its total bits."""
    rows = len(maps)
    cols = 1 + max(len(r) for r in maps)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for r, row in enumerate(maps):
        base = row[0].image if row else None
        axes[r][0].imshow(base)
        axes[r][0].set_title("model input", fontsize=8)
        for c in range(cols):
            axes[r][c].axis("off")
        for c, m in enumerate(row, start=1):
            ax = axes[r][c]
            ax.imshow(m.image)
            w, h = m.image.size
            im = ax.imshow(m.bits, cmap="inferno", alpha=0.6, interpolation="nearest", extent=(0, w, h, 0))
            label = textwrap.fill(f"{m.method} {m.setting}", 34)  # long method names would overlap
            ax.set_title(f"{label}\n{m.total_bits:.0f} bits", fontsize=7)
            cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            cb.formatter.set_useOffset(False)
            cb.update_ticks()
            cb.ax.tick_params(labelsize=6)
    fig.suptitle("bits per latent position under the prior (−log2 p, summed over channels)", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
