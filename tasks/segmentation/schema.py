"""Response models of the segmentation task (FastAPI publishes them in the OpenAPI schema)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ClassShare(BaseModel):
    """A class present in the mask and the share of the image it covers."""

    index: int = Field(description="Class index: the pixel value in the mask.", ge=0)
    label: str = Field(description="Human-readable class name.")
    fraction: float = Field(description="Fraction of the image's pixels of this class.", ge=0.0, le=1.0)


class SegmentationResult(BaseModel):
    """Per-pixel class map of one image at its original resolution, as a compact PNG."""

    width: int = Field(description="Mask width in pixels (the original image's width).", ge=1)
    height: int = Field(description="Mask height in pixels (the original image's height).", ge=1)
    encoding: Literal["png"] = Field(default="png", description="Encoding of `mask`.")
    mask: str = Field(
        description="Base64 PNG, 8-bit palette image whose pixel values are class indices "
        "(the palette only colours them for viewing)."
    )
    classes: list[ClassShare] = Field(description="Classes present in the mask, by index; fractions sum to 1.")
