"""``platform bundle``: inspect a bundle, or create an untrained one to start from."""

from __future__ import annotations

import json
from pathlib import Path

from . import add_command


def register(sub) -> None:
    p = add_command(sub, "bundle", lambda a: a.bundle_parser.print_help(), "Inspect or create model bundles.")
    bsub = p.add_subparsers(title="bundle commands", metavar="ACTION")
    p.set_defaults(bundle_parser=p)

    i = add_command(bsub, "inspect", inspect, "Verify a bundle and print its manifest, parameter counts and fingerprint.",
                    group="bundle")
    i.add_argument("path", metavar="DIR", nargs="?", help="bundle directory (default: the embedded default)")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")

    c = add_command(bsub, "init", init, "Write a bundle with deterministic untrained weights (a starting point).",
                    group="bundle")
    c.add_argument("path", metavar="DIR")
    c.add_argument("--encoder", default="entropic_student", metavar="FAMILY",
                   help="codec family from the registry (built in: entropic_student, rac)")
    c.add_argument("--blocks", type=int, default=None, help="residual blocks for the rac family (0, 4, 8, …)")
    c.add_argument("--backbone", default="resnet18", help="resnet18 | resnet50 | …")
    c.add_argument("--input-size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    c.add_argument("--tasks", default=None, help="comma-separated tasks (default: every installed plugin)")
    c.add_argument("--seed", type=int, default=0)

    k = add_command(bsub, "pack", pack,
                    "Copy a bundle with decoder, trunk and heads in float16 or int8 (encoder and prior exact).",
                    group="bundle")
    k.add_argument("path", metavar="DIR")
    k.add_argument("out", metavar="OUT")
    k.add_argument("--fp16-encoder", action="store_true",
                   help="store the encoder in float16 too (half the device download; a new fingerprint and "
                        "slightly different latents, so measure the packed bundle again: `bundle measure`)")
    k.add_argument("--int8", action="store_true",
                   help="store the trunk's and heads' conv and linear weights in int8, one scale per output "
                        "channel (a quarter of float32; loaded back to float32; the code is unchanged, the "
                        "answers round differently: `bundle measure` the copy)")
    k.add_argument("--default-rate", type=int, default=None, metavar="K",
                   help="a variable-rate bundle's default rate in the copy (what a device codes at unless it "
                        "chooses); the metrics measured at the old default are dropped: `bundle measure` the copy")

    m = add_command(bsub, "measure", measure,
                    "Score every head through the served path and write the metrics into the manifest.",
                    "Encode each image of a split into its own payload with the bundle's encoder, answer it with the "
                    "gateway runtime, score it (top-1/top-5, COCO box mAP, mIoU) and replace the manifest's metrics "
                    "with what was measured, bytes per image included. A variable-rate bundle's heads are scored at "
                    "its default rate, and every rate's bytes per image and bpp (on the images of "
                    "the manifest's first task) go into the manifest's rates. Only manifest.json changes.", group="bundle")
    m.add_argument("path", metavar="DIR")
    m.add_argument("--data", required=True, type=Path, metavar="ROOT",
                   help="fmnist-scenes tree (imagefolder/ + coco/), or the one tree every task reads")
    m.add_argument("--split", default="val")
    m.add_argument("--limit", type=int, default=None, help="an evenly spaced subset of this many images per task")
    m.add_argument("--batch-size", type=int, default=32)
    m.add_argument("--no-progress", action="store_true")

    u = add_command(bsub, "upgrade", upgrade, "Convert a bundle written by an older splitserve to the current format.",
                    group="bundle")
    u.add_argument("path", metavar="DIR")


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
    if codec.rates > 1:
        print(f"rates        {codec.rates}, default {manifest.default_rate} (0 is the smallest payload)")
        for k, r in enumerate(manifest.rates):
            parts = [f"β {r.beta:g}" if r.beta is not None else "", f"λ {r.lmbda:g}" if r.lmbda is not None else "",
                     f"{r.bytes_per_image:.1f} bytes, {r.bpp:.4f} bpp" if r.bytes_per_image is not None else ""]
            print(f"  rate {k:<8}{', '.join(p for p in parts if p) or 'not measured (bundle measure)'}")
    print("device side  {:>12,} parameters (encoder {:,} + prior {:,})".format(
        counts["encoder"] + counts["prior"], counts["encoder"], counts["prior"]))
    print("server side  {:>12,} parameters (decoder {:,} + heads {:,})".format(
        counts["decoder"] + sum(heads.values()), counts["decoder"], sum(heads.values())))
    for name, task in manifest.tasks.items():
        metrics = ", ".join(f"{k} {v:.2f}" for k, v in task.metrics.items()) or "no metrics"
        print(f"  {name:<14}{task.file.parameters:>12,} parameters  {metrics}")
    int8 = [k for k, e in manifest.files.items() if e.storage == "int8"]
    int8 += [f"{k} head" for k, t in manifest.tasks.items() if t.file.storage == "int8"]
    if int8:
        print(f"stored int8  {', '.join(int8)} (bundle pack --int8)")
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
    from ..bundle import bundle_bytes, pack_bundle

    manifest = pack_bundle(args.path, args.out, half_encoder=args.fp16_encoder, int8_server=args.int8,
                           default_rate=args.default_rate)
    size = bundle_bytes(args.out, manifest)
    print(f"wrote {args.out}: {size:,} bytes ({size / 2**20:.1f} MiB), fingerprint {manifest.fingerprint[:16]} "
          f"({'new: measure it again' if args.fp16_encoder else 'unchanged'})"
          + (f", default rate {manifest.default_rate}" if args.default_rate is not None else ""))
    return 0


def measure(args) -> int:
    import datetime as dt

    from ..bundle import RateEntry, record_metrics, write_manifest
    from ..evaluation.methods import measure_bundle

    path = Path(args.path)
    measured = measure_bundle(path, args.data, split=args.split, limit=args.limit,
                              batch_size=args.batch_size, progress=not args.no_progress)
    tasks, first = measured.tasks, measured.tasks[measured.summary_task]
    images = {int(m["images"]) for m in tasks.values()}
    manifest = record_metrics(path, tasks, {"payload_bpp": first["payload_bpp"], "bytes": first["bytes"]},
                              {"measured": f"served path (payload → gateway runtime), {args.split} split of "
                                           f"{args.data}, {'/'.join(map(str, sorted(images)))} images"
                                           + (f" at rate {measured.rate}" if measured.rate is not None else "")
                                           + f", {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}"})
    if measured.rates:  # every rate's cost; the β or λ each was trained at stays
        old = manifest.rates or [RateEntry() for _ in measured.rates]
        manifest.rates = [entry.model_copy(update=cost) for entry, cost in zip(old, measured.rates)]
        write_manifest(path, manifest)
    for task, m in tasks.items():
        scores = ", ".join(f"{k} {v:.2f}" for k, v in m.items() if k not in ("payload_bpp", "bytes", "images"))
        print(f"{task:<14} {scores}  ({m['bytes']:.1f} bytes, {m['payload_bpp']:.4f} bpp, {int(m['images'])} images)")
    for k, cost in enumerate(measured.rates):
        print(f"rate {k:<9} {cost['bytes_per_image']:.1f} bytes, {cost['bpp']:.4f} bpp ({measured.summary_task} images)"
              + ("  (the default: the task metrics above)" if k == measured.rate else ""))
    print(f"wrote the metrics into {path / 'manifest.json'}")
    return 0
