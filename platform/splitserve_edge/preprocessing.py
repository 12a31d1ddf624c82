"""How an image becomes the model input: a policy the bundle declares and every side applies.

A bundle's manifest names one policy, the way torchvision weights carry their transforms; the edge
(PyTorch or torch-free), the gateway's full-offloading path, training and evaluation all read it
from there, so a head always sees inputs made the way it was trained. This module needs only
numpy and Pillow: the torch-free edge client and the server run the very same code, so their
model inputs are bit-identical by construction.

Policies:

``fixed``          squash the whole image to ``size`` = (height, width) (aspect not kept).
``resize_crop``    resize the shorter side to ``resize`` (aspect kept), then centre-crop ``size``:
                   the ImageNet evaluation protocol (256 → 224). For classification: a crop has no
                   inverse, so boxes or masks could not be mapped back to the original image.
``shorter_side``   scale so the shorter side is ``shorter`` unless the longer side would exceed
                   ``max_longer`` (then the longer side is ``max_longer``), aspect kept: the
                   detection/segmentation protocol (800/1333 for RetinaNet, 520 for DeepLabv3).

Every policy rounds the sides it produces to a multiple of ``multiple`` (the encoder's input
multiple, at least twice it), so the latent is exactly input/stride. Resizing is Pillow's
antialiased bilinear filter on the 8-bit RGB image; normalisation uses ImageNet's mean and std in
float32.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import SplitserveError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINDS = ("fixed", "resize_crop", "shorter_side")
MAX_SIDE = 8192  # no policy may produce (or declare) a model input side above this
MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs with a clear message

ImageLike = Union[str, Path, bytes, Image.Image, np.ndarray]


def load_image(source: ImageLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """A path, encoded bytes, PIL image or HxWx{1,3,4} uint8 array as an RGB PIL image; anything
    unreadable is one :class:`SplitserveError` line naming the input. Encoded images larger than
    ``max_pixels`` are refused from their header, before any pixel is decoded."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3):
            raise SplitserveError(f"array images must be HxW or HxWxC uint8, got {source.dtype} {source.shape}")
        return Image.fromarray(source).convert("RGB")
    name = "image bytes"
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise SplitserveError(f"{path}: no such file")
        source = path.read_bytes()
    try:
        with Image.open(io.BytesIO(source)) as img:
            if img.width * img.height > max_pixels:
                raise SplitserveError(f"{name}: image of {img.width}x{img.height} pixels is too large")
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        raise SplitserveError(f"{name}: not a readable image ({type(e).__name__})") from None


class PreprocessingError(SplitserveError, ValueError):
    """A preprocessing declaration is malformed or cannot apply to an image."""


def _side(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_SIDE:
        raise PreprocessingError(f"preprocessing {name} must be an int in [1, {MAX_SIDE}], got {value!r}")
    return value


def _round_to(value: float, multiple: int) -> int:
    """Nearest multiple of ``multiple`` (ties up), and never below two multiples."""
    return max(2 * multiple, int(math.floor(value / multiple + 0.5)) * multiple)


@dataclass(frozen=True)
class Preprocessing:
    """One declared policy (see the module docstring); build with the class methods."""

    kind: str
    size: tuple[int, int] | None = None  # fixed: output (h, w); resize_crop: crop (h, w)
    resize: int | None = None  # resize_crop: shorter side before the crop
    shorter: int | None = None  # shorter_side: target shorter side
    max_longer: int | None = None  # shorter_side: cap on the longer side
    multiple: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PreprocessingError(f"unknown preprocessing kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        _side("multiple", self.multiple)
        if self.kind in ("fixed", "resize_crop"):
            if self.size is None or len(tuple(self.size)) != 2:
                raise PreprocessingError(f"preprocessing {self.kind} needs size = [height, width]")
            size = tuple(_side("size", v) for v in self.size)
            object.__setattr__(self, "size", size)
            if any(v % self.multiple or v < 2 * self.multiple for v in size):
                raise PreprocessingError(
                    f"preprocessing size {size[0]}x{size[1]} must be multiples of {self.multiple} (at least {2 * self.multiple})")
        if self.kind == "resize_crop":
            if _side("resize", self.resize) < max(self.size):
                raise PreprocessingError(f"resize_crop: resize {self.resize} is smaller than the crop {self.size}")
        if self.kind == "shorter_side":
            _side("shorter", self.shorter)
            if _side("max_longer", self.max_longer) < self.shorter:
                raise PreprocessingError(f"shorter_side: max_longer {self.max_longer} < shorter {self.shorter}")

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def fixed(cls, height: int, width: int, multiple: int = 1) -> "Preprocessing":
        return cls("fixed", size=(height, width), multiple=multiple)

    @classmethod
    def resize_crop(cls, resize: int, crop: tuple[int, int], multiple: int = 1) -> "Preprocessing":
        return cls("resize_crop", size=tuple(crop), resize=resize, multiple=multiple)

    @classmethod
    def shorter_side(cls, shorter: int, max_longer: int, multiple: int = 1) -> "Preprocessing":
        return cls("shorter_side", shorter=shorter, max_longer=max_longer, multiple=multiple)

    @classmethod
    def from_dict(cls, data: Any) -> "Preprocessing":
        """The manifest form, strictly: unknown keys and wrong types are errors."""
        if not isinstance(data, dict):
            raise PreprocessingError(f"preprocessing must be an object, got {type(data).__name__}")
        known = {"kind", "size", "resize", "shorter", "max_longer", "multiple"}
        extra = sorted(set(data) - known)
        if extra:
            raise PreprocessingError(f"unknown preprocessing field(s): {', '.join(extra)}")
        values = dict(data)
        if "size" in values and values["size"] is not None:
            if not isinstance(values["size"], (list, tuple)):
                raise PreprocessingError("preprocessing size must be [height, width]")
            values["size"] = tuple(values["size"])
        return cls(**values)

    @classmethod
    def from_spec(cls, spec: str, multiple: int = 1) -> "Preprocessing":
        """Command-line form: ``fixed:H[xW]``, ``resize-crop:R:H[xW]`` or ``shorter-side:S:L``."""

        def hw(text: str) -> tuple[int, int]:
            parts = text.lower().split("x")
            if len(parts) not in (1, 2):
                raise ValueError
            h = int(parts[0])
            return (h, int(parts[-1]))

        kind, _, rest = spec.strip().partition(":")
        args = rest.split(":") if rest else []
        try:
            if kind == "fixed" and len(args) == 1:
                return cls.fixed(*hw(args[0]), multiple=multiple)
            if kind == "resize-crop" and len(args) == 2:
                return cls.resize_crop(int(args[0]), hw(args[1]), multiple=multiple)
            if kind == "shorter-side" and len(args) == 2:
                return cls.shorter_side(int(args[0]), int(args[1]), multiple=multiple)
        except ValueError as e:
            if isinstance(e, PreprocessingError):
                raise
        raise PreprocessingError(f"bad preprocessing {spec!r}: use fixed:H[xW], resize-crop:R:H[xW] or shorter-side:S:L "
                                 "(e.g. fixed:64, resize-crop:256:224, shorter-side:800:1333)")

    def with_multiple(self, multiple: int) -> "Preprocessing":
        """The same policy rounding to a (new) multiple, e.g. that of the codec it will feed."""
        return Preprocessing(self.kind, self.size, self.resize, self.shorter, self.max_longer, multiple)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        if "size" in out:
            out["size"] = list(out["size"])
        return out

    # -- geometry ----------------------------------------------------------------------------
    @property
    def nominal_size(self) -> tuple[int, int]:
        """The input size of a square image: what training crops to and what warm-up uses."""
        return self.input_size(self.shorter or 1, self.shorter or 1) if self.kind == "shorter_side" else self.size

    @property
    def keeps_geometry(self) -> bool:
        """False when the input is a crop: then outputs cannot be mapped back to the whole image."""
        return self.kind != "resize_crop"

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Size of the image after resizing (before any crop)."""
        if height < 1 or width < 1:
            raise PreprocessingError(f"image size must be positive, got {height}x{width}")
        m = self.multiple
        if self.kind == "fixed":
            return self.size
        if self.kind == "resize_crop":  # torchvision Resize(int): shorter side, longer side truncated
            short, long = (height, width) if height <= width else (width, height)
            new_long = int(self.resize * long / short)
            return (self.resize, new_long) if height <= width else (new_long, self.resize)
        scale = self.shorter / min(height, width)
        if max(height, width) * scale > self.max_longer:
            scale = self.max_longer / max(height, width)
        cap = max(2 * m, self.max_longer // m * m)  # rounding never takes a side past max_longer
        return min(_round_to(height * scale, m), cap), min(_round_to(width * scale, m), cap)

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the model input for an original image of ``height × width``."""
        if self.kind == "resize_crop":
            self.resized_size(height, width)  # validates
            return self.size
        return self.resized_size(height, width)

    # -- pixels ------------------------------------------------------------------------------
    def geometry(self, image: Image.Image) -> Image.Image:
        """The resized (and cropped) RGB image the model input is made of, before normalisation:
        what an input codec (JPEG, WebP) would have to send instead of features."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        rh, rw = self.resized_size(image.height, image.width)
        if (rh, rw) != (image.height, image.width):
            image = image.resize((rw, rh), Image.BILINEAR)
        if self.kind == "resize_crop":
            ch, cw = self.size
            top, left = int(round((rh - ch) / 2.0)), int(round((rw - cw) / 2.0))
            image = image.crop((left, top, left + cw, top + ch))
        return image

    def apply(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image → float32 (3, H, W) array, normalised: the encoder's input."""
        return normalize(np.asarray(self.geometry(image), dtype=np.uint8))

    def batch(self, images) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Load ``images`` and make them model inputs: (N, 3, H, W) float32 and each image's original
        (height, width). One payload carries one latent shape, so every image must map to the same
        input size (always true for fixed sizes; under ``shorter_side`` images of other aspect ratios
        go in separate payloads)."""
        pils = [load_image(img) for img in images]
        sizes = [(p.height, p.width) for p in pils]
        if len({self.input_size(h, w) for h, w in sizes}) > 1:
            raise SplitserveError("these images map to different input sizes under the bundle's preprocessing "
                                  f"({self.describe()}); encode them in separate payloads")
        return np.stack([self.apply(p) for p in pils]), sizes

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"fixed {self.size[0]}x{self.size[1]}"
        if self.kind == "resize_crop":
            return f"shorter side {self.resize}, centre crop {self.size[0]}x{self.size[1]}"
        return f"shorter side {self.shorter}, longer side at most {self.max_longer}, multiples of {self.multiple}"


_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) → float32 (3, H, W): /255, then ImageNet mean/std (one definition)."""
    x = pixels.astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
    return np.ascontiguousarray((x - _MEAN) / _STD, dtype=np.float32)
