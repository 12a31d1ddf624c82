"""``platform infer``: encode locally like a device, post to a gateway, print the answers."""

from __future__ import annotations

import json
from pathlib import Path

from splitserve_edge.cli import add_rate_options

from . import add_command


def register(sub) -> None:
    p = add_command(sub, "infer", run, "Encode images locally, send them to a gateway, print the results.",
                    "Encode images with the local bundle (as a device would), POST the payloads to a running "
                    "gateway and print each task's answer, in the order of the images, with the rate and bytes "
                    "each image was sent at (--rate K, --max-bytes B; default: the bundle's default rate). Images "
                    "go in requests of at most the gateway's image limit (the max_images of GET /v1/encoder; 16 "
                    "for a gateway that does not state it), several requests at once.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--tasks", default=None, help="comma-separated tasks, e.g. cls,det,seg (default: all served)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="gateway URL (default %(default)s)")
    p.add_argument("--bundle", metavar="DIR", help="bundle to encode with (default: the embedded default)")
    p.add_argument("--api-key", help="API key, if the gateway requires one")
    p.add_argument("--offload", action="store_true",
                   help="send the image files themselves (full offloading, one per request) instead of encoding "
                        "locally")
    p.add_argument("--concurrency", type=int, default=4, metavar="N",
                   help="requests in flight at once (default %(default)s)")
    p.add_argument("--save-masks", type=Path, metavar="DIR",
                   help="write each image's segmentation as DIR/<image name>.png at the image's own size "
                        "(8-bit palette PNG, pixel value = class index)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON (one answer for all requests; "
                                                         "each result's \"sent\" gives its rate and bytes)")
    add_rate_options(p)


def run(args) -> int:
    from splitserve_edge.preprocessing import load_image  # numpy + Pillow: a bad file fails before torch loads

    from ..client import Client, full_masks
    from ..errors import SplitserveError

    if args.offload and (args.rate is not None or args.max_bytes is not None):
        raise SplitserveError("--offload sends the image files: --rate and --max-bytes apply to local encoding")
    images = [load_image(p) for p in args.images]  # a bad file fails in one line, before network or models
    with Client(args.url, api_key=args.api_key) as client:
        if args.offload:
            answer = client.infer_all(args.images, lambda chunk: Path(chunk[0]).read_bytes(), args.tasks,
                                      concurrency=args.concurrency, images=True)
        else:
            answer = send_encoded(client, args, images)
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print_answer(args.images, answer)
    if args.save_masks:
        written = save_masks(args.save_masks, args.images, full_masks(answer))
        if not args.json:
            print(f"\nwrote {len(written)} full-size mask(s) to {args.save_masks}")
    return 0


def send_encoded(client, args, images: list) -> dict:
    """Encode like a device (at --rate, within --max-bytes, or at the bundle's default rate) and send;
    each result of the answer gets ``sent``: the rate and bytes its image went at."""
    from ..client import check_fingerprint, stated_max_images

    info = client.encoder()  # an unreachable gateway fails in one line before the models load

    from ..defaults import resolve_bundle
    from ..edge import EdgeEncoder

    encoder = EdgeEncoder.from_bundle(resolve_bundle(args.bundle))
    if args.rate is not None:
        encoder.packer.check_rate(args.rate)  # out of range: one line before any image is sent
    check_fingerprint(info, encoder.fingerprint)
    sent: dict[int, dict] = {}

    def encode(chunk: list[int]) -> bytes:
        encoded = encoder.encode([images[i] for i in chunk], rate=args.rate, max_bytes=args.max_bytes,
                                 names=[args.images[i] for i in chunk])
        for i, rate, nbytes in zip(chunk, encoded.rates, encoded.bytes_per_image):
            sent[i] = {"rate": rate, "bytes": round(nbytes, 1)}
        return encoded.data

    answer = client.infer_all(list(range(len(images))), encode, args.tasks, max_images=stated_max_images(info),
                              concurrency=args.concurrency)
    for i, result in enumerate(answer["results"]):
        result["sent"] = sent[i]
    return answer


def print_answer(paths: list[str], answer: dict) -> None:
    print(f"{answer['bytes_received']} bytes sent in {answer['requests']} request(s), fingerprint "
          f"{answer['fingerprint'][:16]}, tasks {', '.join(answer['tasks'])}")
    from ..plugins import PluginRegistry

    registry = PluginRegistry.discover()
    for path, result in zip(paths, answer["results"], strict=True):
        h, w = result["original_size"]
        sent = result.get("sent")
        print(f"\n{path} ({w}x{h})" + (f", sent at rate {sent['rate']} in {sent['bytes']:.1f} bytes" if sent else ""))
        for task, section in result["tasks"].items():
            if section is not None:
                print(f"  {task}: {summarize(registry, task, section)}")


def save_masks(out: Path, paths: list[str], masks: list) -> list[Path]:
    """``--save-masks``: one PNG per image that has a mask, named after the image (a repeated name gets
    its position appended), coloured with the palette the answer's own PNG carries."""
    import base64

    from splitserve_tasks.segmentation.schema import encode_mask

    from ..errors import SplitserveError

    if all(m is None for m in masks):
        raise SplitserveError("--save-masks: the answer has no segmentation (ask for --tasks seg)")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for i, (path, mask) in enumerate(zip(paths, masks, strict=True)):
        if mask is None:
            continue
        name = Path(path).stem
        target = out / (f"{name}.png" if out / f"{name}.png" not in written else f"{name}-{i}.png")
        target.write_bytes(base64.b64decode(encode_mask(mask)))
        written.append(target)
    return written


def summarize(registry, task: str, section: dict) -> str:
    """One human-readable line per task section, by the task's plugin when it is installed here
    (the JSON has everything)."""
    from ..errors import PluginError

    try:
        plugin = registry.get(task)
        return plugin.summarize(plugin.response_model.model_validate(section))
    except (PluginError, ValueError):
        return json.dumps(section)[:200]
