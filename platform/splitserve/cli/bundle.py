"""``platform bundle``: inspect a bundle, or create an untrained one to start from."""

from __future__ import annotations

import json
from pathlib import Path

from . import add_command


def register(sub) -> None:
    p = add_command(sub, "bundle", lambda a: a.bundle_parser.print_help(), "Inspect or create model bundles.")
    bsub = p.add_subparsers(title="bundle commands", metavar="ACTION")
    p.set_defaults(bundle_parser=p)

    i = bsub.add_parser("inspect", help="Verify a bundle and print its manifest, parameter counts and fingerprint.")
    i.add_argument("path", metavar="DIR", nargs="?", help="bundle directory (default: the embedded default)")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    i.set_defaults(func=inspect, command="bundle inspect")

    c = bsub.add_parser("init", help="Write a bundle with deterministic untrained weights (a starting point).")
    c.add_argument("path", metavar="DIR")
    c.add_argument("--encoder", default="entropic_student", metavar="FAMILY",
                   help="codec family from the registry (built in: entropic_student, rac)")
    c.add_argument("--blocks", type=int, default=None, help="residual blocks for the rac family (0, 4, 8, …)")
    c.add_argument("--backbone", default="resnet18", help="resnet18 | resnet50 | …")
    c.add_argument("--input-size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    c.add_argument("--tasks", default=None, help="comma-separated tasks (default: every installed plugin)")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=init, command="bundle init")

    k = bsub.add_parser("pack", help="Copy a bundle with decoder, trunk and heads in float16 (encoder and prior exact).")
    k.add_argument("path", metavar="DIR")
    k.add_argument("out", metavar="OUT")
    k.add_argument("--fp16-encoder", action="store_true",
                   help="store the encoder in float16 too (half the device download; a new fingerprint and "
                        "slightly different latents, so measure the packed bundle again: `bundle measure`)")
    k.set_defaults(func=pack, command="bundle pack")

    m = bsub.add_parser("measure", help="Score every head through the served path and write the metrics into the manifest.",
                        description="Encode each image of a split into its own payload with the bundle's encoder, answer "
                                    "it with the gateway runtime, score it (top-1/top-5, COCO box mAP, mIoU) and replace "
                                    "the manifest's metrics with what was measured, bytes per image included. Only "
                                    "manifest.json changes.")
    m.add_argument("path", metavar="DIR")
    m.add_argument("--data", required=True, type=Path, metavar="ROOT",
                   help="fmnist-scenes tree (imagefolder/ + coco/), or the one tree every task reads")
    m.add_argument("--split", default="val")
    m.add_argument("--limit", type=int, default=None, help="an evenly spaced subset of this many images per task")
    m.add_argument("--batch-size", type=int, default=32)
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(func=measure, command="bundle measure")

    u = bsub.add_parser("upgrade", help="Convert a bundle written by an older splitserve to the current format.")
    u.add_argument("path", metavar="DIR")
    u.set_defaults(func=upgrade, command="bundle upgrade")


def inspect(args) -> int:
    from ..bundle import load_codec, read_manifest
    from ..defaults import resolve_bundle

    path = resolve_bundle(args.path)
    manifest = read_manifest(path)
    codec = load_codec(path, manifest=manifest)  # verifies hashes and fingerprint
    if args.json:
        print(json.dumps(manifest.model_dump(mode="json"), indent=2))
        return 0
    counts = codec.parameter_counts()
    heads = {name: t.file.parameters for name, t in manifest.tasks.items()}
    print(f"bundle       {path}")
    print(f"fingerprint  {manifest.fingerprint}")
    print(f"codec        {manifest.codec.family} {json.dumps(manifest.codec.config)}")
    print(f"backbone     {manifest.backbone}, input {manifest.input_size[0]}x{manifest.input_size[1]} "
          f"(preprocessing: {manifest.policy.describe()})")
    lat = codec.latent_hw(*manifest.input_size)
    print(f"latent       {codec.latent_channels}x{lat[0]}x{lat[1]}")
    print("device side  {:>12,} parameters (encoder {:,} + prior {:,})".format(
        counts["encoder"] + counts["prior"], counts["encoder"], counts["prior"]))
    print("server side  {:>12,} parameters (decoder {:,} + heads {:,})".format(
        counts["decoder"] + sum(heads.values()), counts["decoder"], sum(heads.values())))
    for name, task in manifest.tasks.items():
        metrics = ", ".join(f"{k} {v:.2f}" for k, v in task.metrics.items()) or "no metrics"
        print(f"  {name:<14}{task.file.parameters:>12,} parameters  {metrics}")
    for key, value in manifest.provenance.items():
        print(f"provenance   {key}: {value}")
    return 0


def init(args) -> int:
    from ..defaults import build_untrained_bundle

    cfg = {} if args.blocks is None else {"blocks": args.blocks}
    tasks = args.tasks.split(",") if args.tasks else None
    build_untrained_bundle(args.path, family=args.encoder, backbone=args.backbone, input_size=tuple(args.input_size),
                           tasks=tasks, seed=args.seed, codec_config=cfg)
    print(f"wrote untrained bundle {args.path}")
    return 0


def upgrade(args) -> int:
    from ..bundle import FORMAT_VERSION, load_codec, upgrade_bundle

    manifest = upgrade_bundle(args.path)
    load_codec(args.path, manifest=manifest)  # the converted bundle verifies: hashes and fingerprint
    print(f"{args.path}: bundle format version {FORMAT_VERSION} (preprocessing: {manifest.policy.describe()})")
    return 0


def pack(args) -> int:
    from ..bundle import pack_bundle

    manifest = pack_bundle(args.path, args.out, half_encoder=args.fp16_encoder)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"wrote {args.out}: {size:,} bytes ({size / 2**20:.1f} MiB), fingerprint {manifest.fingerprint[:16]} "
          f"({'new: measure it again' if args.fp16_encoder else 'unchanged'})")
    return 0


def measure(args) -> int:
    import datetime as dt

    from ..bundle import record_metrics
    from ..evaluation.methods import measure_bundle

    measured = measure_bundle(Path(args.path), args.data, split=args.split, limit=args.limit,
                              batch_size=args.batch_size, progress=not args.no_progress)
    first = measured.get("classification") or next(iter(measured.values()))
    images = {int(m["images"]) for m in measured.values()}
    record_metrics(args.path, measured, {"payload_bpp": first["payload_bpp"], "bytes": first["bytes"]},
                   {"measured": f"served path (payload → gateway runtime), {args.split} split of {args.data}, "
                                f"{'/'.join(map(str, sorted(images)))} images, "
                                f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}"})
    for task, m in measured.items():
        scores = ", ".join(f"{k} {v:.2f}" for k, v in m.items() if k not in ("payload_bpp", "bytes", "images"))
        print(f"{task:<14} {scores}  ({m['bytes']:.1f} bytes, {m['payload_bpp']:.4f} bpp, {int(m['images'])} images)")
    print(f"wrote the metrics into {Path(args.path) / 'manifest.json'}")
    return 0
