"""Command-line options that a recipe file can also set.

Every training option is declared once as an :class:`Opt`. The argparse parser gets them with
``default=SUPPRESS``, so after parsing we know exactly which flags the user typed; the final value
of each option is then *flag > recipe > built-in default*. A recipe (``--recipe FILE.yaml`` or
``.toml``) is a flat mapping of option names (``batch_size`` or ``batch-size``) to values, plus the
reserved keys ``command`` (checked against the command it is used with) and ``notes`` (free text).

This module imports no torch, so ``platform --help`` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..errors import SplitserveError

RESERVED_RECIPE_KEYS = ("command", "notes")


@dataclass(frozen=True)
class Opt:
    """One option: its flags, its default, and how a recipe value is checked/converted."""

    flags: tuple[str, ...]
    dest: str
    default: Any = None
    type: Callable[[str], Any] | None = None
    help: str = ""
    choices: Sequence[Any] | None = None
    nargs: str | int | None = None
    action: str | None = None  # "store_true" / "store_false" / "store_const" / "extend" (repeatable, with nargs)
    const: Any = None
    metavar: str | None = None
    required: bool = False
    recipe: bool = True  # may a recipe set it?
    group: str | None = None  # mutually exclusive group name (flags that share a dest)
    hidden: bool = False
    replaces: tuple[str, ...] = ()  # options a recipe set that this flag, when typed, takes the place of


def opt(*flags: str, dest: str | None = None, **kw) -> Opt:
    dest = dest or flags[0].lstrip("-").replace("-", "_")
    return Opt(tuple(flags), dest, **kw)


def add_options(parser: argparse.ArgumentParser, options: Sequence[Opt]) -> None:
    """Add ``options`` to ``parser`` with suppressed defaults (help still shows the defaults)."""
    groups: dict[str, Any] = {}
    for o in options:
        target = parser
        if o.group:
            if o.group not in groups:
                groups[o.group] = parser.add_mutually_exclusive_group()
            target = groups[o.group]
        kw: dict[str, Any] = {"dest": o.dest, "default": argparse.SUPPRESS}
        help_text = o.help
        if o.hidden:
            help_text = argparse.SUPPRESS
        elif o.action is None and o.default is not None and "default" not in help_text:
            shown = " ".join(map(str, o.default)) if isinstance(o.default, (list, tuple)) else o.default
            help_text = f"{help_text} (default: {shown})" if help_text else f"default: {shown}"
        elif o.required and "required" not in help_text:
            help_text = f"{help_text} (required; or set it in the recipe)"
        kw["help"] = help_text
        if o.action:
            kw["action"] = o.action
            if o.action == "store_const":
                kw["const"] = o.const
        if o.action in (None, "extend"):  # extend: a repeatable flag whose values add up
            if o.type is not None:
                kw["type"] = o.type
            if o.choices is not None:
                kw["choices"] = o.choices
            if o.nargs is not None:
                kw["nargs"] = o.nargs
            if o.metavar is not None:
                kw["metavar"] = o.metavar
        target.add_argument(*o.flags, **kw)
    parser.add_argument(
        "--recipe",
        type=Path,
        default=None,
        metavar="FILE",
        help="YAML or TOML file setting any of these options (flags given here override it)",
    )


def load_recipe(path: Path) -> dict[str, Any]:
    """Read a recipe file into a flat dict (keys normalised to option dests)."""
    path = Path(path)
    if not path.is_file():
        raise SplitserveError(f"recipe {path}: no such file")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError / tomllib.TOMLDecodeError; one line, no traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SplitserveError(f"recipe {path}: not valid {'TOML' if suffix == '.toml' else 'YAML'} ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SplitserveError(f"recipe {path}: expected a mapping of option names to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _coerce(o: Opt, value: Any, where: str) -> Any:
    """Check a recipe value against the option's type (strings go through the argparse type)."""
    if value is None:
        return None
    if o.action in ("store_true", "store_false"):
        if not isinstance(value, bool):
            raise SplitserveError(f"{where}: '{o.dest}' must be true or false, got {value!r}")
        return value
    if o.action == "store_const":
        if value != o.const and value is not False:
            raise SplitserveError(f"{where}: '{o.dest}' must be {o.const!r}, got {value!r}")
        return value
    if o.type is parse_key_value and isinstance(value, dict):
        return [(str(k), v) for k, v in value.items()]
    if o.nargs in ("+", "*") or isinstance(o.nargs, int):
        items = value if isinstance(value, list) else [value]
        return [_coerce_scalar(o, v, where) for v in items]
    return _coerce_scalar(o, value, where)


def _coerce_scalar(o: Opt, value: Any, where: str) -> Any:
    conv = o.type
    try:
        if conv is None:
            out = value if isinstance(value, str) else str(value)
        elif conv is int:
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError
            out = int(value)
        elif conv is float:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError
            out = float(value)
        elif isinstance(value, str):
            out = conv(value)
        elif conv is Path:
            raise ValueError("expected a path")
        else:
            out = conv(str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        detail = f" ({e})" if str(e) else ""
        raise SplitserveError(f"{where}: bad value {value!r} for '{o.dest}'{detail}") from None
    if o.choices is not None and out not in o.choices:
        raise SplitserveError(f"{where}: '{o.dest}' must be one of {', '.join(map(str, o.choices))}, got {value!r}")
    return out


def resolve(args: argparse.Namespace, options: Sequence[Opt], command: str) -> SimpleNamespace:
    """Merge built-in defaults, the recipe (if any) and the flags the user typed."""
    by_dest: dict[str, Opt] = {}
    for o in options:
        by_dest.setdefault(o.dest, o)
    values: dict[str, Any] = {}
    for dest, o in by_dest.items():
        values[dest] = list(o.default) if isinstance(o.default, (list, tuple)) else o.default
        if o.action == "store_true" and o.default is None:
            values[dest] = False
    recipe_path = getattr(args, "recipe", None)
    from_recipe: dict[str, Any] = {}
    if recipe_path is not None:
        recipe = load_recipe(recipe_path)
        where = f"recipe {recipe_path}"
        for key, value in recipe.items():
            if key in RESERVED_RECIPE_KEYS:
                continue
            o = by_dest.get(key)
            if o is None or not o.recipe:
                known = ", ".join(sorted(d for d, x in by_dest.items() if x.recipe))
                raise SplitserveError(f"{where}: unknown key '{key}' for `platform {command}` (known: {known})")
            from_recipe[key] = _coerce(o, value, where)
        wanted = recipe.get("command")
        if wanted is not None and str(wanted) != command:
            raise SplitserveError(f"{where}: this recipe is for `platform {wanted}`, not `platform {command}`")
    values.update(from_recipe)
    for dest, o in by_dest.items():  # a typed flag takes the place of the options it replaces (--betas: --beta)
        if hasattr(args, dest):
            for other in (d for d in o.replaces if d in from_recipe and not hasattr(args, d)):
                values[other] = by_dest[other].default
                del from_recipe[other]
    for dest in by_dest:
        if hasattr(args, dest):
            values[dest] = getattr(args, dest)
    missing = [by_dest[d] for d in by_dest if by_dest[d].required and values.get(d) in (None, "")]
    if missing:
        flags = ", ".join(o.flags[0] for o in missing)
        raise SplitserveError(f"missing {flags} (give it on the command line or in --recipe)")
    ns = SimpleNamespace(**values)
    ns.given = sorted({*from_recipe, *(d for d in by_dest if hasattr(args, d))})  # set by the user, not defaults
    ns.recipe = str(recipe_path) if recipe_path is not None else None
    ns.command = command
    return ns


def command_line(cfg: SimpleNamespace, options: Sequence[Opt], command: str) -> str:
    """A command line that reproduces ``cfg`` (non-default values only), for provenance."""
    parts = [f"platform {command}"]
    seen = set()
    for o in options:
        if o.dest in seen or o.hidden:
            continue
        value = getattr(cfg, o.dest, None)
        default = list(o.default) if isinstance(o.default, tuple) else o.default
        if o.action == "store_const":
            if value == o.const:
                parts.append(o.flags[0])
                seen.add(o.dest)
            continue
        seen.add(o.dest)
        if value is None or value == default or (o.action == "store_true" and value is False):
            continue
        if o.action == "store_true":
            parts.append(o.flags[0])
        elif o.action == "store_false":
            if value is False:
                parts.append(o.flags[0])
        elif o.type is parse_key_value:  # pairs from the command line, or a mapping from a recipe
            pairs = value.items() if isinstance(value, dict) else value
            parts.append(o.flags[0] + " " + " ".join(_quote(f"{k}={_yaml_word(v)}") for k, v in pairs))
        elif o.type in (comma_floats, comma_words):
            parts.append(f"{o.flags[0]} {','.join(map(str, value))}")
        elif isinstance(value, (list, tuple)):
            parts.append(o.flags[0] + " " + " ".join(_quote(str(v)) for v in value))
        else:
            parts.append(f"{o.flags[0]} {_quote(str(value))}")
    return " ".join(parts)


def _yaml_word(value: Any) -> str:
    """``value`` as :func:`parse_key_value` reads it back: flow YAML (JSON) unless it is a plain
    string that YAML reads as itself."""
    import json

    import yaml

    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value, separators=(",", ":"))


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def parse_key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as YAML (numbers, booleans, lists) — for ``--option``."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, _, raw = text.partition("=")
    import yaml

    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def comma_floats(text: str) -> list[float]:
    """``0.02,0.04,0.08`` (``--betas``/``--lmbdas``; a recipe's list reads the same) as floats."""
    try:
        return [float(v) for v in str(text).strip("[]").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def comma_words(text: str) -> list[str]:
    """``cls,det,seg`` (``--tasks``; a recipe's list reads the same) as words."""
    words = [w.strip() for w in str(text).strip("[]").replace("'", "").split(",") if w.strip()]
    if not words:
        raise argparse.ArgumentTypeError(f"expected names separated by commas, got {text!r}")
    return words


def options_dict(values: Sequence[Any] | dict | None) -> dict[str, Any]:
    """``--option`` values (list of pairs from the CLI, or a mapping from a recipe) as a dict."""
    if not values:
        return {}
    if isinstance(values, dict):
        return dict(values)
    out: dict[str, Any] = {}
    for item in values:
        if isinstance(item, str):
            item = parse_key_value(item)
        key, value = item
        out[key] = value
    return out


def training_options(**defaults: Any) -> list[Opt]:
    """The options every training command shares; ``defaults`` sets the command's own defaults
    (the papers' recipes)."""
    d = {
        "epochs": 10,
        "batch_size": 64,
        "optimizer": "adam",
        "lr": 1e-3,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "scheduler": "multistep",
        "milestones": [5, 8],
        "gamma": 0.1,
        "step_size": 5,
        "min_lr_ratio": 0.01,
        "amp": "auto",
        **defaults,
    }
    return [
        opt("--epochs", type=int, default=d["epochs"], help="training epochs (0: only evaluate and save)"),
        opt("--batch-size", type=int, default=d["batch_size"], help="images per process and step (global batch = this x processes)"),
        opt("--val-batch-size", type=int, default=None, help="validation batch size (default: --batch-size)"),
        opt("--optimizer", default=d["optimizer"], choices=("sgd", "adam", "adamw"), help="optimizer"),
        opt("--lr", type=float, default=d["lr"], help="learning rate"),
        opt("--momentum", type=float, default=d["momentum"], help="SGD momentum"),
        opt("--weight-decay", type=float, default=d["weight_decay"], help="weight decay"),
        opt("--scheduler", default=d["scheduler"], choices=("multistep", "step", "cosine", "poly", "none"),
            help="learning-rate schedule: multistep (--milestones, per epoch), step (--step-size, per epoch), "
                 "cosine (per step, down to --min-lr-ratio x lr), poly (per step, lr x (1 - step/total)^--poly-power)"),
        opt("--milestones", type=int, nargs="+", default=d["milestones"], metavar="EPOCH", help="multistep: epochs where lr is multiplied by --gamma"),
        opt("--gamma", type=float, default=d["gamma"], help="lr factor at each milestone / step"),
        opt("--step-size", type=int, default=d["step_size"], help="step: epochs between lr drops"),
        opt("--min-lr-ratio", type=float, default=d["min_lr_ratio"], help="cosine: final lr as a fraction of --lr"),
        opt("--poly-power", type=float, default=0.9, help="poly: the schedule's power"),
        opt("--clip-grad", type=float, default=None,
            help="clip the norm of the main optimizer's gradients (and, apart, the --prior-lr optimizer's) to this "
                 "value (the prior's aux optimizer is never clipped)"),
        opt("--image-size", type=int, nargs="+", default=None, metavar="PX",
            help="fixed input size (images squashed to it): one side or H W; shorthand for --preprocessing fixed:HxW"),
        opt("--preprocessing", default=None, metavar="SPEC",
            help="how images become the model input, written into the bundle: fixed:H[xW], resize-crop:R:H[xW] "
                 "(ImageNet: resize-crop:256:224) or shorter-side:S:L (COCO detection: shorter-side:800:1333); "
                 "default: the teacher's (distill, train) or the bundle's (finetune)"),
        opt("--train-limit", type=int, default=None, metavar="N", help="use a fixed random subset of N training images"),
        opt("--val-limit", type=int, default=None, metavar="N", help="use a fixed random subset of N validation images"),
        opt("--num-workers", type=int, default=2, help="data-loading processes per training process"),
        opt("--seed", type=int, default=0, help="random seed (runs are reproducible on CPU)"),
        opt("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N"),
        opt("--amp", default=d["amp"], choices=("auto", "off", "bf16", "fp16"),
            help="mixed precision (CUDA auto: bf16 where supported, else fp16; CPU: bf16 only when asked, off otherwise)"),
        opt("--max-steps", type=int, default=None, metavar="N",
            help="stop after N optimizer steps in total (a checkpoint is kept, so --resume continues the run)"),
        opt("--checkpoint-every", type=int, default=500, metavar="N",
            help="also checkpoint every N steps (always at epoch ends and on SIGTERM/SIGINT; 0: never mid-epoch)"),
        opt("--resume", action="store_true", help="continue from the work dir's checkpoint (model, optimizers, schedule, data order, RNG)"),
        opt("--keep-checkpoint", action="store_true", help="keep the checkpoint after a finished run"),
        opt("--workdir", type=Path, default=None, metavar="DIR", help="logs and checkpoints (default depends on the command)"),
        opt("--log-every", type=int, default=10, metavar="N", help="log training metrics every N steps"),
        opt("--no-progress", dest="progress", action="store_false", default=True, help="no progress bars"),
        opt("--no-tensorboard", dest="tensorboard", action="store_false", default=True, help="do not write TensorBoard events"),
    ]
