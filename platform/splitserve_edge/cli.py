"""``splitserve-edge``: encode images on a device and send them, without torch.

    splitserve-edge encode MODEL_DIR IMAGE... -o OUT.ssp [--rate K | --max-bytes B]
    splitserve-edge post   MODEL_DIR IMAGE... --url http://gateway:8000 --tasks cls,det [--api-key-file F]

MODEL_DIR is what ``platform export --format onnx`` wrote. Errors are one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from .errors import SplitserveError

CONTENT_TYPE = "application/x-splitserve"


def _count(minimum: int):
    """An argparse type: an int of at least ``minimum`` (a one-line usage error otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    return parse


def add_rate_options(parser: argparse.ArgumentParser) -> None:
    """``--rate K | --max-bytes B``, the same on every command that encodes (here and ``platform``)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--rate", type=_count(0), metavar="K",
                       help="code every image at rate K of a variable-rate bundle (0 is the smallest payload; "
                            "default: the bundle's default rate)")
    group.add_argument("--max-bytes", type=_count(1), metavar="B",
                       help="code each image at the highest rate whose payload, sent alone (header, bitstream, "
                            "CRC), has at most B bytes (a binary search: payloads grow with the rate index); the "
                            "encoder runs once. An error names the smallest size when no rate fits")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splitserve-edge", description="Torch-free splitserve edge client.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (("encode", "write a payload file; prints bytes, bpp and rate per image"),
                            ("post", "encode and POST to a gateway's /infer; prints the JSON answer (each image's "
                                     "rate and bytes on stderr)")):
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.add_argument("model", metavar="MODEL_DIR", help="directory written by `platform export --format onnx`")
        s.add_argument("images", nargs="+", metavar="IMAGE")
        s.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all)")
        add_rate_options(s)
        if name == "encode":
            s.add_argument("-o", "--output", required=True, metavar="OUT", help="payload file to write")
        else:
            s.add_argument("--url", required=True, help="gateway base URL, e.g. http://127.0.0.1:8000")
            s.add_argument("--tasks", default=None, help="comma-separated tasks (default: all the gateway serves)")
            s.add_argument("--api-key-file", default=None, help="file holding the gateway's API key "
                                                                "(or $SPLITSERVE_API_KEY)")
            s.add_argument("--timeout", type=float, default=60.0)
    return p


def _post(url: str, data: bytes, tasks: str | None, api_key: str | None, timeout: float) -> dict:
    query = f"?{urllib.parse.urlencode({'tasks': tasks})}" if tasks else ""
    headers = {"Content-Type": CONTENT_TYPE}
    if api_key:
        headers["X-API-Key"] = api_key
    request = urllib.request.Request(url.rstrip("/") + "/infer" + query, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 — the user's own URL
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("detail", "")
        except ValueError:
            detail = ""
        raise SplitserveError(f"gateway answered {e.code}: {detail or e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise SplitserveError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from .runtime import EdgeModel

        model = EdgeModel.load(args.model, threads=args.threads)
        encoded = model.encode(list(args.images), rate=args.rate, max_bytes=args.max_bytes)
        ih, iw = encoded.input_hw
        lines = [f"{path}  {nbytes:.1f} bytes  {bpp:.4f} bpp  rate {rate} of 0..{model.rates - 1} "
                 f"(model input {iw}x{ih})"
                 for path, nbytes, bpp, rate in zip(args.images, encoded.bytes_per_image, encoded.bpp, encoded.rates)]
        if args.command == "encode":
            Path(args.output).write_bytes(encoded.data)
            print("\n".join(lines))
            print(f"wrote {args.output}: {len(encoded.data)} bytes, fingerprint {model.fingerprint[:16]}")
            return 0
        print("\n".join(lines), file=sys.stderr)  # stdout stays the gateway's JSON
        key = None
        if args.api_key_file:
            key = Path(args.api_key_file).read_text().strip()
        key = key or os.environ.get("SPLITSERVE_API_KEY")
        print(json.dumps(_post(args.url, encoded.data, args.tasks, key, args.timeout), indent=2))
        return 0
    except (SplitserveError, OSError) as e:
        print(f"splitserve-edge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
