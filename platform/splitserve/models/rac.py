"""Rate-accuracy-complexity encoder (Duan & Zhu, "Efficient Feature Compression for Edge-Cloud
Systems"): 8×8 patch embedding, N residual GELU blocks, 1×1 projection; decoder upsamples 2×.

``blocks`` trades edge complexity for rate: 32,960 / 623,552 / 1,214,144 encoder parameters for
N = 0 / 4 / 8, and the decoder has 2,835,712 for ResNet-50's 256-channel layer1.
"""

from __future__ import annotations

from torch import Tensor, nn

from .codec import FeatureCodec
from .registry import register_codec


class ResidualBlock(nn.Module):
    """x + Conv3×3(c/2→c)(GELU(Conv3×3(c→c/2)(GELU(x))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GELU(),
            nn.Conv2d(channels, channels // 2, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(channels // 2, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class RACEncoder(nn.Sequential):
    def __init__(self, blocks: int = 8, embed_channels: int = 128, latent_channels: int = 64):
        if blocks < 0:
            raise ValueError(f"blocks must be >= 0, got {blocks}")
        body = [ResidualBlock(embed_channels) for _ in range(blocks)] if blocks else [nn.GELU()]
        super().__init__(
            nn.Conv2d(3, embed_channels, 8, stride=8),
            *body,
            nn.Conv2d(embed_channels, latent_channels, 1),
        )

    @staticmethod
    def output_hw(height: int, width: int) -> tuple[int, int]:
        return height // 8, width // 8

    @staticmethod
    def input_hw(latent_h: int, latent_w: int) -> tuple[int, int]:
        return 8 * latent_h, 8 * latent_w


class RACDecoder(nn.Sequential):
    def __init__(self, latent_channels: int = 64, feature_channels: int = 256):
        c = feature_channels
        super().__init__(
            nn.ConvTranspose2d(latent_channels, c, 5, stride=2, padding=2, output_padding=1),
            nn.GELU(),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(2 * c, c, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(c, c, 1),
        )


@register_codec("rac")
def rac(
    blocks: int = 8,
    feature_channels: int = 256,
    embed_channels: int = 128,
    latent_channels: int = 64,
) -> FeatureCodec:
    """RAC-N codec; inputs must be multiples of 8 so the 2× decoder lands on layer1's grid."""
    return FeatureCodec(
        family="rac",
        config={
            "blocks": blocks,
            "feature_channels": feature_channels,
            "embed_channels": embed_channels,
            "latent_channels": latent_channels,
        },
        encoder=RACEncoder(blocks, embed_channels, latent_channels),
        decoder=RACDecoder(latent_channels, feature_channels),
        latent_channels=latent_channels,
        feature_channels=feature_channels,
        input_multiple=8,
    )
