"""``platform infer``: encode locally like a device, post to a gateway, print the answers."""

from __future__ import annotations

import json
from pathlib import Path

from . import add_command


def register(sub) -> None:
    p = add_command(sub, "infer", run, "Encode images locally, send them to a gateway, print the results.",
                    "Encode images with the local bundle (as a device would), POST the payloads to a running "
                    "gateway and print each task's answer, in the order of the images. Images go in requests of "
                    "at most the gateway's image limit (the max_images of GET /v1/encoder; a gateway that does "
                    "not state it is tried with 16 and re-split by its 400), several requests at once.")
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
    p.add_argument("--json", action="store_true", help="print the answer as JSON (one answer for all requests)")


def run(args) -> int:
    from ..client import Client, full_masks, stated_max_images
    from ..preprocess import load_image

    images = [load_image(p) for p in args.images]  # a bad file fails in one line, before network or models
    with Client(args.url, api_key=args.api_key) as client:
        if args.offload:
            answer = client.infer_all(args.images, lambda chunk: Path(chunk[0]).read_bytes(), args.tasks,
                                      concurrency=args.concurrency, images=True)
        else:
            from ..defaults import resolve_bundle
            from ..edge import EdgeEncoder

            encoder = EdgeEncoder.from_bundle(resolve_bundle(args.bundle))
            info = client.check_encoder(encoder.fingerprint)
            answer = client.infer_all(images, lambda chunk: encoder.encode(list(chunk)).data, args.tasks,
                                      max_images=stated_max_images(info), concurrency=args.concurrency)
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print_answer(args.images, answer)
    if args.save_masks:
        written = save_masks(args.save_masks, args.images, full_masks(answer))
        if not args.json:
            print(f"\nwrote {len(written)} full-size mask(s) to {args.save_masks}")
    return 0


def print_answer(paths: list[str], answer: dict) -> None:
    print(f"{answer['bytes_received']} bytes sent in {answer['requests']} request(s), fingerprint "
          f"{answer['fingerprint'][:16]}, tasks {', '.join(answer['tasks'])}")
    from ..plugins import PluginRegistry

    registry = PluginRegistry.discover()
    for path, result in zip(paths, answer["results"], strict=True):
        h, w = result["original_size"]
        print(f"\n{path} ({w}x{h})")
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
