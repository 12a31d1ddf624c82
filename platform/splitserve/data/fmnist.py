"""Read the real Fashion-MNIST idx files (gzip) — the object source of fmnist-scenes.

The idx format: a big-endian header ``0x00 0x00 <dtype> <ndim>``, then ``ndim`` big-endian uint32
sizes, then the data. Fashion-MNIST uses dtype 0x08 (unsigned byte): images are 3-D (N, 28, 28),
labels 1-D (N,). The header is checked strictly so a truncated or foreign file gives a clear error.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError

DEFAULT_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Folder- and URL-safe versions, used as category / ImageFolder class names.
CLASS_SLUGS = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_UBYTE = 0x08


def _not_found(directory: Path) -> DataError:
    return DataError(
        f"Fashion-MNIST not found in {directory}; install it with: apt-get install dataset-fashion-mnist "
        f"(or pass --fmnist-dir)"
    )


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read one gzip'd idx file of unsigned bytes with ``ndim`` dimensions."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"{path}: not a readable gzip file ({type(e).__name__})") from None
    header = 4 + 4 * ndim
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE or raw[3] != ndim:
        raise DataError(
            f"{path}: not an idx file of {ndim}-D unsigned bytes (magic {raw[:4].hex() or 'missing'}, expected 000008{ndim:02x})"
        )
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header ({len(raw)} bytes)")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        raise DataError(f"{path}: idx header says shape {shape} ({expected} bytes) but the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(split: str, directory: Path = DEFAULT_FMNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images uint8 (N,28,28), labels int64 (N,))`` for split ``"train"`` or ``"test"``."""
    if split not in FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r} (expected 'train' or 'test')")
    directory = Path(directory)
    if not directory.is_dir():
        raise _not_found(directory)
    img_name, lbl_name = FILES[split]
    if not (directory / img_name).is_file() or not (directory / lbl_name).is_file():
        raise _not_found(directory)
    images = read_idx(directory / img_name, 3)
    labels = read_idx(directory / lbl_name, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{directory}: {img_name} holds {images.shape[0]} images but {lbl_name} {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= len(CLASS_NAMES):
        raise DataError(f"{directory / lbl_name}: label {int(labels.max())} out of range 0..{len(CLASS_NAMES) - 1}")
    return images, labels.astype(np.int64)
