"""``platform data``: build datasets. ``platform data fmnist-scenes`` writes the fmnist-scenes
COCO 2017 + ImageFolder trees that every other command can train and evaluate on."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_command

DEFAULT_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


def register(sub) -> None:
    p = add_command(
        sub,
        "data",
        _no_action,
        help="Build datasets (fmnist-scenes: real photos as COCO + ImageFolder trees).",
        description="Build datasets in real formats (COCO 2017, ImageFolder).",
    )
    p.set_defaults(_data_parser=p)
    data_sub = p.add_subparsers(title="data commands", metavar="DATA_COMMAND")
    f = data_sub.add_parser(
        "fmnist-scenes",
        help="generate fmnist-scenes: Fashion-MNIST objects on real photos, as COCO + ImageFolder trees",
        description=(
            "Generate fmnist-scenes: real Fashion-MNIST items composited onto crops of real photographs. "
            "Writes OUT/coco (COCO 2017 detection/segmentation tree) and OUT/imagefolder (classification), "
            "deterministically from --seed. Val scenes use only photographs that no train scene used; "
            "val_seen scenes put val objects on the train photographs (in-distribution)."
        ),
    )
    f.add_argument("--out", type=Path, required=True, help="output directory")
    f.add_argument("--train", type=_count, default=4000, metavar="N", help="train scenes and train classification images (default 4000)")
    f.add_argument("--val", type=_count, default=1000, metavar="N", help="val scenes and val classification images (default 1000)")
    f.add_argument("--val-seen", type=_count, default=None, metavar="N",
                   help="val_seen scenes and images: val objects on train photographs (default: as many as --val; 0: none)")
    f.add_argument("--backgrounds", choices=["photos", "builtin"], default="photos",
                   help="background photographs: 'photos' (default; scikit-image's 15 + 23 from Debian's "
                        "mate-backgrounds and plasma-workspace-wallpapers, which must be installed) or 'builtin' "
                        "(scikit-image's 15 only, no system packages)")
    f.add_argument("--size", type=int, default=128, metavar="PX", help="image side in pixels (default 128)")
    f.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    f.add_argument("--fmnist-dir", type=Path, default=Path(DEFAULT_FMNIST_DIR), metavar="DIR", help=f"Fashion-MNIST idx files (default {DEFAULT_FMNIST_DIR})")
    f.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs; output does not depend on it)")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.set_defaults(func=_fmnist_scenes, command="data fmnist-scenes")


def _count(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def _no_action(args) -> int:
    args._data_parser.print_help()
    return 0


def _fmnist_scenes(args) -> int:
    from ..data.scenes import make_fmnist_scenes

    summary = make_fmnist_scenes(
        args.out,
        train_scenes=args.train,
        val_scenes=args.val,
        val_seen_scenes=args.val if args.val_seen is None else args.val_seen,
        backgrounds=args.backgrounds,
        image_size=args.size,
        seed=args.seed,
        fmnist_dir=args.fmnist_dir,
        progress=not args.no_progress,
        workers=args.workers,
    )
    print(
        f"fmnist-scenes ({summary['image_size']}px, seed {summary['seed']}, backgrounds {summary['backgrounds']}) "
        f"in {summary['seconds']:.1f}s\n"
        + "".join(
            f"  {split}: {summary[f'{split}_scenes']} scenes, {summary[f'{split}_annotations']} objects, "
            f"{summary[f'{split}_classification_images']} classification images\n"
            for split in summary["splits"]
        )
        + f"  coco:        {summary['coco']}  (instances_<split>2017.json, <split>2017/)\n"
        f"  imagefolder: {summary['imagefolder']}  (<split>/<class>/)"
    )
    return 0
