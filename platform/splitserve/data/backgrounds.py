"""Background photographs of fmnist-scenes, split by photograph so val measures generalisation.

A learned codec can learn the statistics of a small background set and spend fewer bits on it;
WebP cannot. So val scenes are cut only from photographs that no train scene used, and an
in-distribution val (``val_seen``: val objects on train photographs) is kept beside it for
continuity. Two sets:

- ``builtin``: the 15 scikit-image pictures (photographs, micrographs, textures) that ship in its
  wheel; no download, used by the tests.
- ``photos``: those 15 plus 23 real photographs from Debian's wallpaper packages (flat artwork
  left out), 8 of them held out for val. Needs ``apt-get install mate-backgrounds
  plasma-workspace-wallpapers``; ``ukui-wallpapers`` was checked and holds only artwork.

Every photo names its licence and author; docs/benchmarks/fmnist-scenes.md lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError

MAX_SIDE = 1280
"""Photos are reduced to this longer side on load: crops of at least a quarter of the shorter side
still hold > 64 px, and ten 5K PNGs per worker would otherwise cost ~0.5 GB."""

DEBIAN_PACKAGES = ("mate-backgrounds", "plasma-workspace-wallpapers")


@dataclass(frozen=True)
class Photo:
    """One background source: where it comes from and under what terms."""

    name: str
    source: str  # "skimage" or the Debian package that ships it
    locator: str  # skimage.data function name, or an absolute file path
    licence: str
    author: str

    def load(self) -> Image.Image:
        if self.source == "skimage":
            return _skimage(self.locator)
        path = Path(self.locator)
        if not path.is_file():
            raise DataError(
                f"fmnist-scenes background {self.name!r} ({path}) is missing: "
                f"apt-get install -y {' '.join(DEBIAN_PACKAGES)}"
            )
        img = Image.open(path)
        img.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at a reduced scale directly
        img = img.convert("RGB")
        img.thumbnail((MAX_SIDE, MAX_SIDE), Image.LANCZOS)
        return img


def _skimage(name: str) -> Image.Image:
    try:
        import skimage.data as skdata
    except ImportError:
        raise DataError(
            "fmnist-scenes needs scikit-image for its background photos: pip install scikit-image "
            "(the 'data' extra: pip install 'splitserve[data]')"
        ) from None
    arr = np.asarray(getattr(skdata, name)())
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise DataError(f"scikit-image's {name!r} is not an 8-bit image")
    if arr.ndim == 3:
        arr = arr[..., :3]
    return Image.fromarray(arr).convert("RGB")


@dataclass(frozen=True)
class BackgroundSet:
    """Train and val photographs, disjoint by construction (checked)."""

    name: str
    train: tuple[Photo, ...]
    val: tuple[Photo, ...]

    def __post_init__(self) -> None:
        shared = {p.name for p in self.train} & {p.name for p in self.val}
        if shared:
            raise ValueError(f"background set {self.name}: photos in both train and val: {sorted(shared)}")

    def photos(self, split: str) -> tuple[Photo, ...]:
        return {"train": self.train, "val": self.val}[split]


@dataclass
class LoadedBackgrounds:
    """A background set's photos in memory, per split."""

    spec: BackgroundSet
    loaded: dict[str, list[tuple[str, Image.Image]]]

    def images(self, split: str) -> list[tuple[str, Image.Image]]:
        return self.loaded[split]


def load_background_set(name: str) -> LoadedBackgrounds:
    """Load every photo of set ``name``; a missing one is one clear :class:`DataError`."""
    try:
        spec = BACKGROUND_SETS[name]
    except KeyError:
        raise DataError(f"unknown background set {name!r}; choose from {', '.join(BACKGROUND_SETS)}") from None
    return LoadedBackgrounds(spec, {split: [(p.name, p.load()) for p in spec.photos(split)] for split in ("train", "val")})


def _sk(name: str, licence: str, author: str) -> Photo:
    return Photo(name, "skimage", name, licence, author)


# Licences and authors as the docstrings of skimage.data state them.
SKIMAGE = {
    name: _sk(name, licence, author)
    for name, licence, author in (
        ("astronaut", "public domain", "NASA"),
        ("brick", "CC0", "CC0Textures (Bricks25)"),
        ("camera", "CC0", "Lav Varshney"),
        ("cell", "CC0", "scikit-image"),
        ("chelsea", "CC0", "Stefan van der Walt"),
        ("coffee", "CC0", "Rachel Michetti"),
        ("coins", "no known copyright restrictions", "Walters Art Museum"),
        ("grass", "CC0", "CC0Textures"),
        ("gravel", "CC0", "CC0Textures (Gravel04)"),
        ("hubble_deep_field", "public domain", "NASA"),
        ("immunohistochemistry", "no known copyright restrictions", "scikit-image"),
        ("moon", "no known copyright restrictions", "scikit-image"),
        ("retina", "CC0", "Mikael Häggström"),
        ("rocket", "public domain", "SpaceX"),
        ("text", "public domain", "scikit-image"),
    )
}


def _plasma(name: str, file: str, licence: str, author: str) -> Photo:
    return Photo(name, "plasma-workspace-wallpapers", f"/usr/share/wallpapers/{name}/contents/images/{file}", licence, author)


def _mate(name: str, author: str) -> Photo:
    return Photo(name, "mate-backgrounds", f"/usr/share/backgrounds/mate/nature/{name}.jpg", "GPL-2+", author)


# Photographs only: the packages' abstract and flat-artwork wallpapers (Canopee, Cascade, Elarun,
# Honeywave, Kay, Opal, Patak, Shell, MATE's abstract/ and desktop/, all of ukui-wallpapers) and
# the painted ones (Autumn, Elephants) are left out.
_PLASMA_TRAIN = (
    _plasma("BytheWater", "2560x1600.jpg", "LGPL-3.0", "Maciej Wiklo"),
    _plasma("ColdRipple", "2560x1600.jpg", "LGPL-3.0", "Risto Saukonpää"),
    _plasma("ColorfulCups", "2560x1600.jpg", "LGPL-3.0", "Dmitri Popov"),
    _plasma("DarkestHour", "2560x1600.jpg", "LGPL-3.0", "Risto Saukonpää"),
    _plasma("FallenLeaf", "2560x1600.jpg", "LGPL-3.0", "Martin Klapetek"),
    _plasma("Grey", "2560x1600.jpg", "LGPL-3.0", "Sigi Sagi"),
    _plasma("OneStandsOut", "2560x1600.jpg", "LGPL-3.0", "Risto Saukonpää"),
)
_MATE_TRAIN = (
    _mate("Aqua", "Charles Barbin"),
    _mate("Blinds", "Lennart Poettering, Andrea Cimitan"),
    _mate("Dune", "Marco Cogoni, Hylke Bons"),
    _mate("FreshFlower", "Jens Ansorg"),
    _mate("Garden", "Charles Barbin"),
    _mate("GreenMeadow", "Timothy Schellhase, Lapo Calamandrei"),
    _mate("RainDrops", "blackcombwhistler07"),
    _mate("TwoWings", "Charles Barbin, Hylke Bons"),
)
# Held out: a landscape, a forest path, sky, a lake at night, two flower close-ups, a storm, wood grain.
_PHOTOS_VAL = (
    _plasma("EveningGlow", "2560x1600.jpg", "LGPL-3.0", "Ian Hex"),
    _plasma("Path", "2560x1600.jpg", "LGPL-3.0", "Risto Saukonpää"),
    _plasma("Kite", "2560x1600.jpg", "LGPL-3.0", "Risto Saukonpää"),
    _plasma("summer_1am", "2560x1600.jpg", "LGPL-3.0", "Risto Saukonpää"),
    _mate("LadyBird", "Charles Barbin"),
    _mate("YellowFlower", "Charles Barbin"),
    _mate("Storm", "Sergey Nazarov"),
    _mate("Wood", "Jean-François Fortin Tam"),
)
_BUILTIN_VAL = ("chelsea", "coffee", "rocket", "retina")

BACKGROUND_SETS: dict[str, BackgroundSet] = {
    "builtin": BackgroundSet(
        "builtin",
        train=tuple(p for n, p in SKIMAGE.items() if n not in _BUILTIN_VAL),
        val=tuple(SKIMAGE[n] for n in _BUILTIN_VAL),
    ),
    "photos": BackgroundSet(
        "photos",
        train=tuple(SKIMAGE.values()) + _PLASMA_TRAIN + _MATE_TRAIN,
        val=_PHOTOS_VAL,
    ),
}
