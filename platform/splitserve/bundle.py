"""Model bundles: a directory with ``manifest.json`` and safetensors weights.

The edge needs only ``encoder`` + ``prior``; the server adds ``decoder`` and one file per task
head. Every file's SHA-256 is in the manifest and the codec fingerprint is recomputed on load,
so a bundle whose weights disagree with its manifest is refused instead of serving garbage.
See ``docs/bundle.md``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, ValidationError, field_validator
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from . import __version__, int8
from .descriptor import read_descriptor
from .errors import BundleError, SplitserveError
from .models import FeatureCodec, build_codec
from .models.backbone import ResNetTail, SharedTrunk, check_arch, load_on_trunk, stored_state
from .preprocess import Preprocessing, PreprocessingError

FORMAT = "splitserve-bundle"
FORMAT_VERSION = 2  # 2: declared preprocessing; Entropic Student with simplified GDN (GDN1)
CODEC_PARTS = ("encoder", "prior", "decoder")
EDGE_PARTS = ("encoder", "prior")


class FileEntry(BaseModel):
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    parameters: int = Field(ge=0)
    storage: Literal["float", "int8"] = Field(
        "float", description="float: as the tensors are stored (float32 or float16); int8: conv/linear weights "
                             "in int8 with a float32 scale per output channel (bundle pack --int8)")


class CodecSpec(BaseModel):
    family: str
    config: dict[str, Any]


class TaskEntry(BaseModel):
    file: FileEntry
    trunk: Literal["own", "shared"] = Field(
        "own", description="own: the head file holds its layer2..4; shared: it uses the bundle's trunk file")
    config: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    provenance: dict[str, Any] = {}


class RateEntry(BaseModel):
    """One operating point of the codec: the rate-term weight it was trained at and what it costs."""

    beta: float | None = Field(None, description="distillation's rate weight β (or None)")
    lmbda: float | None = Field(None, description="joint training's rate weight λ (or None)")
    bytes_per_image: float | None = Field(None, ge=0, description="measured mean payload bytes per image")
    bpp: float | None = Field(None, ge=0, description="measured bits per pixel of the model input")


class Manifest(BaseModel):
    """``manifest.json``: what the bundle is, how to rebuild it, and proof of its weights."""

    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    codec: CodecSpec
    backbone: str
    input_size: tuple[int, int] = Field(description="nominal (height, width) of the model input: a square "
                                                    "image's input size under `preprocessing` (training size)")
    preprocessing: dict[str, Any] = Field(description="how an image becomes the model input (docs/bundle.md)")
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")
    files: dict[str, FileEntry]
    tasks: dict[str, TaskEntry] = {}
    metrics: dict[str, float] = {}
    provenance: dict[str, Any] = {}
    rates: list[RateEntry] = Field([], description="a variable-rate codec's rates, index 0 the smallest "
                                                   "payload (empty: single-rate)")
    default_rate: int = Field(0, ge=0, description="the rate a device codes at unless told otherwise")

    @field_validator("preprocessing")
    @classmethod
    def _valid_policy(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            return Preprocessing.from_dict(value).to_dict()
        except (PreprocessingError, TypeError) as e:
            raise ValueError(str(e)) from None

    @property
    def policy(self) -> Preprocessing:
        """The declared preprocessing as an object (validated when the manifest was read)."""
        return Preprocessing.from_dict(self.preprocessing)


# -- reading -------------------------------------------------------------------------------
def read_manifest(path: str | Path) -> Manifest:
    """Parse and validate ``DIR/manifest.json`` with one clear error for anything wrong."""
    root = Path(path)
    mpath = root / "manifest.json"
    raw = read_descriptor(root, "manifest.json", format=FORMAT, version=FORMAT_VERSION, kind="bundle",
                          error=BundleError, upgrade_hint=f"convert it with `platform bundle upgrade {root}`")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"{mpath}: invalid manifest at {where}: {first['msg']}") from None
    missing = [p for p in CODEC_PARTS if p not in manifest.files]
    if missing:
        raise BundleError(f"{mpath}: manifest lists no file for {', '.join(missing)}")
    count = int(manifest.codec.config.get("rates", 1))
    if manifest.rates and len(manifest.rates) != count:
        raise BundleError(f"{mpath}: the codec has {count} rates but the manifest describes {len(manifest.rates)}")
    if manifest.default_rate >= count:
        raise BundleError(f"{mpath}: default_rate {manifest.default_rate} is outside the codec's rates 0..{count - 1}")
    return manifest


def bundle_files(manifest: Manifest) -> set[str]:
    """What a bundle is, relative to its directory: ``manifest.json`` and every file it lists (a
    run's checkpoints or markers beside them are not part of it)."""
    return {"manifest.json", *(e.path for e in manifest.files.values()), *(t.file.path for t in manifest.tasks.values())}


def bundle_bytes(path: str | Path, manifest: Manifest | None = None) -> int:
    """Bytes on disk of :func:`bundle_files`, the size a deployment ships."""
    root = Path(path)
    total = 0
    for rel in bundle_files(manifest or read_manifest(root)):  # each file once, as it lies on disk
        fpath = (root / rel).resolve()
        if root.resolve() not in fpath.parents:
            raise BundleError(f"{root}: path {rel!r} escapes the bundle directory")
        if not fpath.is_file():
            raise BundleError(f"{root}: {rel} is missing")
        total += fpath.stat().st_size
    return total


def _read_tensors(root: Path, entry: FileEntry, what: str) -> dict[str, torch.Tensor]:
    fpath = (root / entry.path).resolve()
    if root.resolve() not in fpath.parents:
        raise BundleError(f"{root}: {what} path {entry.path!r} escapes the bundle directory")
    if not fpath.is_file():
        raise BundleError(f"{root}: {what} weights {entry.path} are missing")
    data = fpath.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise BundleError(
            f"{root}: {what} weights {entry.path} do not match the manifest "
            f"(sha256 {digest[:12]}…, manifest says {entry.sha256[:12]}…)"
        )
    try:
        tensors = load_safetensors(data)
    except Exception as e:  # SafetensorError, or a header that does not decode at all
        raise BundleError(f"{root}: {what} weights {entry.path} are not a valid safetensors file ({e})") from None
    if entry.storage == "int8":
        try:
            tensors = int8.dequantize(tensors)
        except ValueError as e:
            raise BundleError(f"{root}: {what} weights {entry.path} are not valid int8 storage: {e}") from None
    return tensors


def _load_into(module: nn.Module, tensors: Mapping[str, torch.Tensor], what: str, root: Path) -> None:
    try:
        module.load_state_dict(dict(tensors))
    except RuntimeError as e:
        msg = str(e).split("\n")[0:3]
        raise BundleError(f"{root}: {what} weights do not fit the manifest's architecture: {' '.join(msg)}") from None


def load_codec(path: str | Path, parts: Iterable[str] = CODEC_PARTS, manifest: Manifest | None = None) -> FeatureCodec:
    """Build the codec from the manifest and load its weights; verify the fingerprint.

    ``parts=EDGE_PARTS`` loads what a device needs and drops the decoder.
    """
    root = Path(path)
    manifest = manifest or read_manifest(root)
    parts = tuple(parts)
    try:
        codec = build_codec(manifest.codec.family, **manifest.codec.config)
    except SplitserveError as e:
        raise BundleError(f"{root}: {e}") from None
    codec.eval()
    _load_into(codec.encoder, _read_tensors(root, manifest.files["encoder"], "encoder"), "encoder", root)
    prior = _read_tensors(root, manifest.files["prior"], "prior")
    try:
        codec.load_prior_state(prior)
    except RuntimeError as e:
        raise BundleError(f"{root}: prior weights do not fit the manifest's codec: {str(e).splitlines()[0]}") from None
    if "decoder" in parts:
        _load_into(codec.decoder, _read_tensors(root, manifest.files["decoder"], "decoder"), "decoder", root)
    else:
        codec.decoder = None  # the device never decodes; don't hold the weights
    actual = codec.fingerprint()
    if actual != manifest.fingerprint:
        raise BundleError(
            f"{root}: encoder/prior weights have fingerprint {actual[:16]}… but the manifest says "
            f"{manifest.fingerprint[:16]}…; the bundle is corrupt or was edited"
        )
    return codec


def load_trunk(path: str | Path, manifest: Manifest | None = None) -> SharedTrunk | None:
    """The bundle's shared layer2..4 (the ``trunk`` file), or None when every head has its own."""
    root = Path(path)
    manifest = manifest or read_manifest(root)
    if "trunk" not in manifest.files:
        if any(t.trunk == "shared" for t in manifest.tasks.values()):
            raise BundleError(f"{root}: heads use a shared trunk but the manifest lists no trunk file")
        return None
    trunk = SharedTrunk.build(manifest.backbone)
    _load_into(trunk.tail, _read_tensors(root, manifest.files["trunk"], "trunk"), "trunk", root)
    return trunk


def load_head(path: str | Path, task: str, head: nn.Module, manifest: Manifest | None = None,
              trunk: SharedTrunk | None = None) -> nn.Module:
    """Load a task head's weights (built by its plugin) from the bundle. A head stored on the shared
    trunk gets ``trunk`` (see :func:`load_trunk`) as its layer2..4."""
    root = Path(path)
    manifest = manifest or read_manifest(root)
    if task not in manifest.tasks:
        have = ", ".join(manifest.tasks) or "none"
        raise BundleError(f"{root}: bundle has no {task!r} head (it has: {have})")
    entry = manifest.tasks[task]
    tensors = _read_tensors(root, entry.file, f"{task} head")
    if entry.trunk == "own":
        _load_into(head, tensors, f"{task} head", root)
        return head.eval()
    if trunk is None:
        raise BundleError(f"{root}: the {task} head uses the shared trunk; load it with load_trunk()")
    try:
        load_on_trunk(head, tensors, trunk)
    except (SplitserveError, RuntimeError) as e:
        raise BundleError(f"{root}: {task} head weights do not fit the manifest's architecture "
                          f"(shared-trunk head; {str(e).splitlines()[0]})") from None
    return head.eval()


# -- writing -------------------------------------------------------------------------------
def _write(root: Path, rel: str, module: nn.Module, state: Mapping[str, torch.Tensor] | None = None,
           parameters: int | None = None) -> FileEntry:
    """Write ``module``'s weights: its state dict, or the part of it given as ``state`` (then
    ``parameters`` counts them when the names are not ``module``'s own)."""
    target = root / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    state = module.state_dict() if state is None else state
    # clone: safetensors refuses tensors that share storage (e.g. weights tied across modules)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(target))
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if parameters is None:
        parameters = sum({id(p): p.numel() for name, p in module.named_parameters() if name in state}.values())
    return FileEntry(path=rel, sha256=digest, parameters=parameters)


def _check_shared(heads: Mapping[str, Any], trunk: Any, shared_tasks: Iterable[str]) -> set[str]:
    shared = set(shared_tasks)
    if shared and trunk is None:
        raise SplitserveError(f"heads {', '.join(sorted(shared))} use a shared trunk, but there is none")
    unknown = shared - set(heads)
    if unknown:
        raise SplitserveError(f"shared_tasks names {', '.join(sorted(unknown))}, which are not among the heads")
    return shared


def _head_entry(root: Path, name: str, module: nn.Module, cfg: Mapping[str, Any], shared: bool,
                metrics: Mapping[str, float] | None = None, provenance: Mapping[str, Any] | None = None) -> TaskEntry:
    """A head's file and manifest entry; a shared-trunk head's file leaves its layer2..4 out."""
    return TaskEntry(file=_write(root, f"heads/{name}.safetensors", module, stored_state(module, shared)),
                     trunk="shared" if shared else "own",
                     config=dict(cfg), metrics=dict(metrics or {}), provenance=dict(provenance or {}))


def default_provenance(**extra: Any) -> dict[str, Any]:
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "splitserve_version": __version__,
        "torch_version": torch.__version__,
        **extra,
    }


def save_bundle(
    path: str | Path,
    codec: FeatureCodec,
    *,
    backbone: str,
    input_size: tuple[int, int] | None = None,
    preprocessing: Preprocessing | None = None,
    heads: Mapping[str, tuple[nn.Module, Mapping[str, Any]]] | None = None,
    head_metrics: Mapping[str, Mapping[str, float]] | None = None,
    metrics: Mapping[str, float] | None = None,
    provenance: Mapping[str, Any] | None = None,
    trunk: ResNetTail | None = None,
    shared_tasks: Iterable[str] = (),
    rates: Iterable[RateEntry | Mapping[str, Any]] = (),
    default_rate: int = 0,
) -> Manifest:
    """Write a complete bundle atomically (to a temp dir, then renamed into place).

    ``heads`` maps task name → (head module, head config). ``preprocessing`` declares how images
    become the model input; without it, images are squashed to ``input_size``. A variable-rate
    codec's ``rates`` describe its operating points (one entry per rate). The prior's CDF
    tables are rebuilt first (``update()``), so the saved tables are exactly what the fingerprint
    covers.
    """
    check_arch(backbone)
    if preprocessing is None:
        if input_size is None:
            raise SplitserveError("save_bundle needs input_size or preprocessing")
        codec.check_input_size(*input_size)
        preprocessing = Preprocessing.fixed(*input_size, multiple=codec.input_multiple)
    if preprocessing.multiple % codec.input_multiple:
        raise SplitserveError(f"preprocessing rounds sides to multiples of {preprocessing.multiple}, but "
                              f"{codec.family} needs multiples of {codec.input_multiple}")
    input_size = preprocessing.nominal_size
    codec.check_input_size(*input_size)
    codec.update(force=True)
    root = Path(path)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        files = {
            "encoder": _write(tmp, "encoder.safetensors", codec.encoder),
            "prior": _write(tmp, "prior.safetensors", codec, codec.prior_state(),
                            codec.parameter_counts()["prior"]),
            "decoder": _write(tmp, "decoder.safetensors", codec.decoder),
        }
        shared = _check_shared(heads or {}, trunk, shared_tasks)
        if trunk is not None:
            files["trunk"] = _write(tmp, "trunk.safetensors", trunk)
        tasks = {
            name: _head_entry(tmp, name, module, cfg, name in shared, (head_metrics or {}).get(name))
            for name, (module, cfg) in (heads or {}).items()
        }
        manifest = Manifest(
            codec=CodecSpec(family=codec.family, config=codec.config),
            backbone=backbone,
            input_size=tuple(input_size),
            preprocessing=preprocessing.to_dict(),
            fingerprint=codec.fingerprint(),
            files=files,
            tasks=tasks,
            metrics=dict(metrics or {}),
            provenance=dict(provenance or default_provenance()),
            rates=[RateEntry.model_validate(r) if isinstance(r, Mapping) else r for r in rates],
            default_rate=default_rate,
        )
        if manifest.rates and len(manifest.rates) != codec.rates:
            raise SplitserveError(f"{len(manifest.rates)} rate entries for a codec with {codec.rates} rates")
        if not 0 <= default_rate < codec.rates:
            raise SplitserveError(f"default_rate {default_rate} is outside the codec's rates 0..{codec.rates - 1}")
        write_manifest(tmp, manifest)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def upgrade_bundle(path: str | Path) -> Manifest:
    """Convert a version-1 bundle in place to the current format.

    Version 1 had no preprocessing declaration (images were squashed to ``input_size``: that is
    now the ``fixed`` policy) and built Entropic Student with full GDN, whose weights mean
    something else under the simplified GDN the paper uses, so those bundles cannot be converted:
    retrain them. Everything else (weights, hashes, fingerprint) carries over unchanged.
    """
    root = Path(path)
    mpath = root / "manifest.json"
    try:
        raw = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{mpath}: cannot read the manifest ({type(e).__name__})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BundleError(f"{mpath}: not a splitserve bundle")
    version = raw.get("format_version")
    if version == FORMAT_VERSION:
        return read_manifest(root)
    if version != 1:
        raise BundleError(f"{mpath}: cannot convert format version {version!r} (only 1 → {FORMAT_VERSION})")
    family = (raw.get("codec") or {}).get("family")
    if family == "entropic_student":
        raise BundleError(f"{mpath}: a version-1 Entropic Student bundle used full GDN instead of the paper's "
                          "simplified GDN; its weights cannot be converted — retrain it with `platform distill`")
    try:
        codec = build_codec(family, **raw["codec"]["config"])
        size = tuple(int(v) for v in raw["input_size"])
    except (KeyError, TypeError, ValueError, SplitserveError) as e:
        raise BundleError(f"{mpath}: invalid version-1 manifest ({e})") from None
    raw["preprocessing"] = Preprocessing.fixed(*size, multiple=codec.input_multiple).to_dict()
    raw["format_version"] = FORMAT_VERSION
    write_manifest(root, raw)
    return read_manifest(root)


def pack_bundle(src: str | Path, dst: str | Path, *, half_encoder: bool = False, int8_server: bool = False,
                default_rate: int | None = None) -> Manifest:
    """Copy a bundle (the files its manifest lists, nothing else) with the server-side weights
    (decoder, trunk, heads) stored in float16.

    The encoder and prior stay float32, so the fingerprint and every bitstream are unchanged;
    loading casts the stored weights back to the modules' float32. Halves the bundle's size (a
    ResNet-18 trunk is 45 MB in float32) at a cost measured by re-evaluating the packed bundle.

    ``half_encoder`` stores the encoder in float16 too (it still computes in float32): half the
    download for a device, but a new encoder, so a new fingerprint, latents that differ in a few
    rounding-edge values, and metrics to measure again (``platform bundle measure``). The prior's
    coding tables always stay exact.

    ``int8_server`` stores the trunk's and heads' conv and linear weights in int8, one scale per
    output channel (:mod:`splitserve.int8`): a quarter of float32, for a bundle whose trunks and
    heads do not fit its budget in float16. The decoder, which every head reads through, stays
    float16. Measure the copy again.

    ``default_rate`` sets a variable-rate bundle's default rate: what is shipped is chosen after its
    rates are measured, not when training starts. The metrics measured at the old default go with it.
    """
    src, dst = Path(src), Path(dst)
    manifest = read_manifest(src)
    codec = load_codec(src, manifest=manifest)  # verify before copying
    if default_rate is not None and default_rate != manifest.default_rate:
        if not 0 <= default_rate < codec.rates:
            raise SplitserveError(f"--default-rate {default_rate} is outside the bundle's rates 0..{codec.rates - 1}")
        manifest.default_rate = default_rate
        manifest.metrics = {}  # they were measured at the old default rate
        for task in manifest.tasks.values():
            task.metrics = {}
    if half_encoder:
        with torch.no_grad():
            for t in codec.encoder.state_dict().values():
                if t.is_floating_point():
                    t.copy_(t.half().float())  # what loading the float16 file will give
        manifest.fingerprint = codec.fingerprint()
    # how each file the manifest lists is stored: "half", "int8", or None (copied byte for byte)
    server = "int8" if int8_server else "half"
    plan = [(entry, "half" if half_encoder and k == "encoder" else None) for k, entry in manifest.files.items()
            if k in EDGE_PARTS]
    plan += [(entry, server if k == "trunk" else "half") for k, entry in manifest.files.items() if k not in EDGE_PARTS]
    plan += [(t.file, server) for t in manifest.tasks.values()]
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent if dst.parent.exists() else None))
    try:
        for entry, how in plan:  # what the manifest lists, nothing else
            path = tmp / entry.path
            path.parent.mkdir(parents=True, exist_ok=True)
            if how is None:
                shutil.copyfile(src / entry.path, path)
                continue
            tensors = _read_tensors(src, entry, entry.path)  # verified, and float if it was stored in int8
            if how == "int8":
                tensors = int8.quantize(tensors)
            save_file({k: v.half() if v.is_floating_point() and not k.endswith(int8.SCALE_SUFFIX) else v
                       for k, v in tensors.items()}, str(path))
            entry.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
            entry.storage = "int8" if how == "int8" else "float"
        halved = ["encoder"] * half_encoder + ["decoder"] + ["trunk", "heads"] * (not int8_server)
        stored = " and ".join([", ".join(halved[:-1]), halved[-1]] if len(halved) > 1 else halved) + " in float16"
        stored += "; trunk and heads in int8" if int8_server else ""
        manifest.provenance = {**manifest.provenance, "packed": stored}
        write_manifest(tmp, manifest)
        load_codec(tmp)  # the packed bundle verifies: hashes and (new) fingerprint
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp and safetensors make owner-only files; a bundle is shared
            path.chmod(0o755 if path.is_dir() else 0o644)
        if dst.exists():
            shutil.rmtree(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_manifest(dst)


def update_heads(
    path: str | Path,
    heads: Mapping[str, tuple[nn.Module, Mapping[str, Any]]],
    *,
    head_metrics: Mapping[str, Mapping[str, float]] | None = None,
    head_provenance: Mapping[str, Mapping[str, Any]] | None = None,
    decoder: nn.Module | None = None,
    trunk: ResNetTail | None = None,
    shared_tasks: Iterable[str] = (),
) -> Manifest:
    """Add or replace task heads (and optionally the decoder or the shared trunk) in an existing bundle.

    The encoder and prior are untouched, so the fingerprint — and every deployed device —
    stays valid. Heads named in ``shared_tasks`` are stored without their layer2..4 and use the
    bundle's trunk (``trunk`` writes a new one; heads already on the old trunk must agree with it).
    """
    root = Path(path)
    manifest = read_manifest(root)
    shared = _check_shared(heads, trunk if trunk is not None else ("trunk" in manifest.files or None), shared_tasks)
    if trunk is not None:
        manifest.files["trunk"] = _write(root, "trunk.safetensors", trunk)
    for name, (module, cfg) in heads.items():
        manifest.tasks[name] = _head_entry(root, name, module, cfg, name in shared, (head_metrics or {}).get(name),
                                           (head_provenance or {}).get(name))
    if decoder is not None:
        manifest.files["decoder"] = _write(root, "decoder.safetensors", decoder)
    write_manifest(root, manifest)
    return manifest


def record_metrics(path: str | Path, task_metrics: Mapping[str, Mapping[str, float]],
                   metrics: Mapping[str, float], provenance: Mapping[str, Any]) -> Manifest:
    """Replace the metrics of a bundle's tasks (and its own) with newly measured ones.

    Only the manifest changes (weights, hashes and fingerprint stay), so a packed bundle can state
    what it scores itself rather than what the float32 weights it came from scored in training.
    """
    root = Path(path)
    manifest = read_manifest(root)
    unknown = sorted(set(task_metrics) - set(manifest.tasks))
    if unknown:
        raise BundleError(f"{root}: no head for {', '.join(unknown)}")
    for name, values in task_metrics.items():
        manifest.tasks[name].metrics = {k: float(v) for k, v in values.items()}
    manifest.metrics = {k: float(v) for k, v in metrics.items()}
    manifest.provenance = {**manifest.provenance, **provenance}
    write_manifest(root, manifest)
    return manifest


def write_manifest(root: Path, manifest: Manifest | dict[str, Any]) -> None:
    """Replace ``root/manifest.json`` atomically (a reader sees the old or the new one, whole)."""
    text = manifest.model_dump_json(indent=2) if isinstance(manifest, Manifest) else json.dumps(manifest, indent=2)
    tmp = root / "manifest.json.tmp"
    tmp.write_text(text + "\n")
    os.replace(tmp, root / "manifest.json")
