"""``platform encode``: what the device does — images in, one payload file out."""

from __future__ import annotations

from pathlib import Path

from splitserve_edge.cli import add_rate_options

from . import add_command


def register(sub) -> None:
    p = add_command(sub, "encode", run, "Encode images into a payload file, as an edge device would.",
                    "Encode images with the bundle's encoder and prior into one payload (entropy-coded bitstreams in "
                    "splitserve's binary format), each image at the bundle's default rate, at --rate K, or at the "
                    "highest rate that fits --max-bytes B; prints bytes, bits per pixel and the rate of each image.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WebP, …) of any size")
    p.add_argument("--bundle", metavar="DIR", help="bundle directory (default: $SPLITSERVE_BUNDLE or the embedded default)")
    p.add_argument("-o", "--output", metavar="OUT", required=True, help="payload file to write")
    add_rate_options(p)


def run(args) -> int:
    from splitserve_edge.preprocessing import load_image  # numpy + Pillow: a bad file fails before torch loads

    images = [load_image(path) for path in args.images]

    from ..defaults import resolve_bundle
    from ..edge import EdgeEncoder

    encoder = EdgeEncoder.from_bundle(resolve_bundle(args.bundle))
    encoded = encoder.encode(images, rate=args.rate, max_bytes=args.max_bytes, names=args.images)
    Path(args.output).write_bytes(encoded.data)
    payload = encoded.payload
    width = max(len(p) for p in args.images)
    ih, iw = encoded.input_hw
    print(f"{'image':<{width}}  {'original':>11}  {'input':>9}  {'bytes':>8}  {'bpp':>7}  {'rate':>4}   "
          f"(bpp: bits per pixel of the model input; rates 0..{encoder.rates - 1}, 0 the smallest)")
    for path, (h, w), nbytes, bpp, rate in zip(args.images, payload.original_sizes, encoded.bytes_per_image,
                                               encoded.bpp, encoded.rates):
        print(f"{path:<{width}}  {f'{w}x{h}':>11}  {f'{iw}x{ih}':>9}  {nbytes:>8.1f}  {bpp:>7.4f}  {rate:>4}")
    print(f"wrote {args.output}: {encoded.num_bytes} bytes ({payload.overhead_bytes} header), "
          f"latent {'x'.join(map(str, payload.latent_shape))}, fingerprint {encoder.fingerprint[:16]}")
    return 0
