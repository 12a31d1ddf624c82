"""``platform infer``: encode locally like a device, post to a gateway, print the answers."""

from __future__ import annotations

import json

from . import add_command


def register(sub) -> None:
    p = add_command(sub, "infer", run, "Encode images locally, send them to a gateway, print the results.",
                    "Encode images with the local bundle (as a device would), POST the payload to a "
                    "running gateway and print each task's answer.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--tasks", default=None, help="comma-separated tasks, e.g. cls,det,seg (default: all served)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="gateway URL (default %(default)s)")
    p.add_argument("--bundle", metavar="DIR", help="bundle to encode with (default: the embedded default)")
    p.add_argument("--api-key", help="API key, if the gateway requires one")
    p.add_argument("--offload", action="store_true",
                   help="send the image files themselves (full offloading) instead of encoding locally")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")


def run(args) -> int:
    from pathlib import Path

    from ..client import Client
    from ..preprocess import load_image

    images = [load_image(p) for p in args.images]  # a bad file fails in one line, before network or models
    with Client(args.url, api_key=args.api_key) as client:
        if args.offload:
            answers = [client.infer_image(Path(p).read_bytes(), args.tasks) for p in args.images]
            results = [r for a in answers for r in a["results"]]
            answer = {**answers[0], "results": results}
        else:
            from ..defaults import resolve_bundle
            from ..edge import EdgeEncoder

            encoder = EdgeEncoder.from_bundle(resolve_bundle(args.bundle))
            client.check_encoder(encoder.fingerprint)
            encoded = encoder.encode(images)
            answer = client.infer(encoded.data, args.tasks)
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    print(f"{answer['bytes_received']} bytes sent, fingerprint {answer['fingerprint'][:16]}, "
          f"tasks {', '.join(answer['tasks'])}")
    from ..plugins import PluginRegistry

    registry = PluginRegistry.discover()
    for path, result in zip(args.images, answer["results"]):
        h, w = result["original_size"]
        print(f"\n{path} ({w}x{h})")
        for task, section in result["tasks"].items():
            if section is not None:
                print(f"  {task}: {summarize(registry, task, section)}")
    return 0


def summarize(registry, task: str, section: dict) -> str:
    """One human-readable line per task section, by the task's plugin when it is installed here
    (the JSON has everything)."""
    from ..errors import PluginError

    try:
        plugin = registry.get(task)
        return plugin.summarize(plugin.response_model.model_validate(section))
    except (PluginError, ValueError):
        return json.dumps(section)[:200]
