"""Entropic Student (Matsubara et al., WACV 2022): GDN encoder, 4× down, IGDN decoder.

With ``feature_channels=256`` (ResNet-50 layer1) the layer spec is the paper's exactly:
encoder 138,672 parameters, decoder 1,164,032. Smaller backbones scale the decoder widths
(2C, C, C) so ResNet-18's 64-channel layer1 is rebuilt by a proportionally smaller decoder.
"""

from __future__ import annotations

from compressai.layers import GDN1
from torch import nn

from .codec import FeatureCodec, conv_out
from .registry import register_codec


class EntropicStudentEncoder(nn.Sequential):
    def __init__(self, latent_channels: int = 24):
        super().__init__(
            nn.Conv2d(3, 96, 5, stride=2, padding=2, bias=False),
            GDN1(96),
            nn.Conv2d(96, 48, 5, stride=2, padding=2, bias=False),
            GDN1(48),
            nn.Conv2d(48, latent_channels, 2, stride=1, padding=0, bias=False),
        )

    @staticmethod
    def output_hw(height: int, width: int) -> tuple[int, int]:
        f = lambda n: conv_out(conv_out(conv_out(n, 5, 2, 2), 5, 2, 2), 2)  # noqa: E731
        return f(height), f(width)

    @staticmethod
    def input_hw(latent_h: int, latent_w: int) -> tuple[int, int]:
        return 4 * (latent_h + 1), 4 * (latent_w + 1)


class EntropicStudentDecoder(nn.Sequential):
    def __init__(self, latent_channels: int = 24, feature_channels: int = 256):
        c = feature_channels
        super().__init__(
            nn.Conv2d(latent_channels, 2 * c, 2, padding=1, bias=False),
            GDN1(2 * c, inverse=True),
            nn.Conv2d(2 * c, c, 2, padding=0, bias=False),
            GDN1(c, inverse=True),
            nn.Conv2d(c, c, 2, padding=1, bias=False),
        )


@register_codec("entropic_student")
def entropic_student(latent_channels: int = 24, feature_channels: int = 256) -> FeatureCodec:
    """Entropic Student codec; 4× down, so any input size maps onto ResNet's layer1 grid."""
    return FeatureCodec(
        family="entropic_student",
        config={"latent_channels": latent_channels, "feature_channels": feature_channels},
        encoder=EntropicStudentEncoder(latent_channels),
        decoder=EntropicStudentDecoder(latent_channels, feature_channels),
        latent_channels=latent_channels,
        feature_channels=feature_channels,
        input_multiple=4,
    )
