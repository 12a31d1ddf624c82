"""The segmentation answer (FastAPI publishes it in the OpenAPI schema) and its mask codec.

The server answers at the model's resolution, so its work and the answer's size are set by the
model, never by the original size a payload declares; :func:`full_mask` enlarges a mask to the
original image on the client. This module needs only numpy, Pillow and pydantic (no torch), so a
device or a thin client can import it.
"""

from __future__ import annotations

import base64
import io
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field


class ClassShare(BaseModel):
    """A class present in the mask and the share of the image it covers."""

    index: int = Field(description="Class index: the pixel value in the mask.", ge=0)
    label: str = Field(description="Human-readable class name.")
    fraction: float = Field(description="Fraction of the mask's pixels of this class (at the mask's resolution, "
                                        "where every pixel stands for an equal part of the original image).",
                            ge=0.0, le=1.0)


class SegmentationResult(BaseModel):
    """Per-pixel class map of one image at the model's resolution, as a compact PNG, with the
    geometry that maps it onto the original image: original pixel (x, y) has the class of mask pixel
    (⌊(2x+1)·mask_width / (2·width)⌋, ⌊(2y+1)·mask_height / (2·height)⌋), the one whose area contains
    its centre (nearest neighbour). ``splitserve_tasks.segmentation.schema.full_mask`` does this."""

    width: int = Field(description="Width of the original image in pixels (as the payload declared it).", ge=1)
    height: int = Field(description="Height of the original image in pixels (as the payload declared it).", ge=1)
    mask_width: int = Field(description="Width of `mask` in pixels: the model input's width.", ge=1)
    mask_height: int = Field(description="Height of `mask` in pixels: the model input's height.", ge=1)
    scale: list[float] = Field(
        description="[x, y]: original pixels per mask pixel along each axis (width / mask_width, "
        "height / mask_height); the mask covers the whole original image.", min_length=2, max_length=2)
    encoding: Literal["png"] = Field(default="png", description="Encoding of `mask`.")
    mask: str = Field(
        description="Base64 PNG of mask_height × mask_width pixels, an 8-bit palette image whose pixel values "
        "are class indices (the palette only colours them for viewing)."
    )
    classes: list[ClassShare] = Field(description="Classes present in the mask, by index; fractions sum to 1.")


def _voc_palette() -> list[int]:
    """The PASCAL VOC colour map, so the PNG is viewable as-is."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


_PALETTE = _voc_palette()


def encode_mask(classes: np.ndarray) -> str:
    """Base64 PNG of a uint8 class map, with the VOC palette attached."""
    img = Image.fromarray(classes)
    img.putpalette(_PALETTE)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # label maps compress well even at level 1
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_mask(result: dict | SegmentationResult) -> np.ndarray:
    """The mask of ``result`` at its own (the model's) resolution: (mask_height, mask_width) uint8."""
    r = result if isinstance(result, SegmentationResult) else SegmentationResult.model_validate(result)
    with Image.open(io.BytesIO(base64.b64decode(r.mask, validate=True))) as img:
        classes = np.asarray(img)
    if classes.shape != (r.mask_height, r.mask_width):
        raise ValueError(f"segmentation mask is {classes.shape[:2]}, the answer says "
                         f"{(r.mask_height, r.mask_width)}")
    return classes


def full_mask(result: dict | SegmentationResult) -> np.ndarray:
    """The class map of the whole original image, (height, width) uint8: the answer's mask enlarged
    nearest-neighbour (see :class:`SegmentationResult`), in exact integer arithmetic. Its size is
    what the payload declared, so it costs the caller, never the server."""
    r = result if isinstance(result, SegmentationResult) else SegmentationResult.model_validate(result)
    classes = decode_mask(r)
    rows = (2 * np.arange(r.height, dtype=np.int64) + 1) * r.mask_height // (2 * r.height)
    cols = (2 * np.arange(r.width, dtype=np.int64) + 1) * r.mask_width // (2 * r.width)
    return classes.take(rows, axis=0).take(cols, axis=1)
