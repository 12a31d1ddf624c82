"""``platform teacher``: the uncompressed model (stem + task head) every student learns from.

A teacher is a directory::

    teacher.json        task, backbone, head config (labels …), preprocessing, metrics, provenance,
                        SHA-256 of both weight files
    stem.safetensors    conv1 … layer1 (produces h)
    head.safetensors    the task head (layer2..4 + task layers)

Only safetensors are written and read. A foreign torchvision checkpoint (``--checkpoint
model.pth``) is read with ``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import Tensor, nn

from ..descriptor import read_descriptor
from ..errors import SplitserveError
from ..models.backbone import check_arch, tail_path
from ..preprocess import Preprocessing, PreprocessingError
from ..plugins import TaskBatch, TaskPlugin
from . import common
from .objective import Objective
from .stage import Plan, Stage

TEACHER_FORMAT = "splitserve-teacher"
TEACHER_VERSION = 2  # 2: declared preprocessing instead of input_size


class TeacherError(SplitserveError):
    """A teacher directory is missing or corrupt."""


@dataclass
class Teacher:
    path: Path | None
    task: str
    arch: str
    config: dict[str, Any]
    preprocessing: Preprocessing  # how its training/validation images were made; distill inherits it
    stem: nn.Module
    head: nn.Module
    metrics: dict[str, float]
    provenance: dict[str, Any]


# -- files ---------------------------------------------------------------------------------------
def _state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def save_teacher(path: Path, teacher: Teacher) -> None:
    """Write the teacher directory atomically (temp dir, then rename)."""
    root = Path(path)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        files = {}
        for part, module in (("stem", teacher.stem), ("head", teacher.head)):
            rel = f"{part}.safetensors"
            save_file(_state(module), str(tmp / rel))
            files[part] = {
                "path": rel,
                "sha256": hashlib.sha256((tmp / rel).read_bytes()).hexdigest(),
                "parameters": sum(p.numel() for p in module.parameters()),
            }
        meta = {
            "format": TEACHER_FORMAT,
            "format_version": TEACHER_VERSION,
            "task": teacher.task,
            "arch": teacher.arch,
            "config": common.config_for_json(teacher.config),
            "preprocessing": teacher.preprocessing.to_dict(),
            "metrics": {k: float(v) for k, v in teacher.metrics.items()},
            "provenance": common.config_for_json(teacher.provenance),
            "files": files,
        }
        (tmp / "teacher.json").write_text(json.dumps(meta, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a teacher is an ordinary directory
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if root.exists():
            # keep the run's logs/checkpoint (they live in the same directory) across the swap
            for keep in ("metrics.jsonl", "train.csv", "val.csv", "checkpoint", "tensorboard"):
                if (root / keep).exists():
                    shutil.move(str(root / keep), str(tmp / keep))
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_teacher_meta(path: Path) -> dict[str, Any]:
    meta_path = Path(path) / "teacher.json"
    meta = read_descriptor(path, "teacher.json", format=TEACHER_FORMAT, version=TEACHER_VERSION, kind="teacher",
                           error=TeacherError, hint="; make one with `platform teacher`")
    for key in ("task", "arch", "config", "preprocessing", "files"):
        if key not in meta:
            raise TeacherError(f"{meta_path}: missing '{key}'")
    return meta


def load_teacher(path: Path, plugins) -> Teacher:
    """Rebuild stem and head through the task's plugin and load the verified weights."""
    root = Path(path)
    meta = read_teacher_meta(root)
    plugin = common.training_plugin(plugins, meta["task"], "distill")
    arch = check_arch(meta["arch"])
    stem, head = plugin.build_teacher(arch, plugin.resolve_config(arch, meta["config"]), None)
    for part, module in (("stem", stem), ("head", head)):
        entry = meta["files"].get(part)
        if not isinstance(entry, dict) or "path" not in entry:
            raise TeacherError(f"{root}: teacher.json lists no {part} weights")
        fpath = (root / entry["path"]).resolve()
        if root.resolve() not in fpath.parents or not fpath.is_file():
            raise TeacherError(f"{root}: {part} weights {entry['path']} are missing")
        data = fpath.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise TeacherError(f"{root}: {part} weights {entry['path']} do not match teacher.json (sha256)")
        try:
            module.load_state_dict(load_safetensors(data), strict=True)
        except Exception as e:  # noqa: BLE001 — SafetensorError or a shape mismatch, one line either way
            raise TeacherError(f"{root}: {part} weights do not fit {arch}/{meta['task']}: {str(e).splitlines()[0]}") from None
    try:
        policy = Preprocessing.from_dict(meta["preprocessing"])
    except (PreprocessingError, TypeError) as e:
        raise TeacherError(f"{root}: teacher.json: {e}") from None
    return Teacher(root, plugin.name, arch, dict(meta["config"]), policy, stem.eval(), head.eval(),
                   dict(meta.get("metrics", {})), dict(meta.get("provenance", {})))


# -- foreign checkpoints -------------------------------------------------------------------------
STEM_TO_TORCHVISION = {"0.": "conv1.", "1.": "bn1.", "4.": "layer1."}
"""Our stem (conv1, bn1, relu, maxpool, layer1 in a Sequential) by torchvision ResNet names."""


def teacher_specs(value: Any) -> list[tuple[str | None, Path]]:
    """``--teacher`` values as (task or None, directory): ``DIR`` or ``TASK=DIR`` (an existing
    directory, or a ``=`` after a path separator, is a plain ``DIR``)."""
    out = []
    for item in value if isinstance(value, (list, tuple)) else [value]:
        task, sep, path = str(item).partition("=")
        named = bool(sep and task.strip() and "/" not in task and not Path(str(item)).exists())
        out.append((task.strip(), Path(path)) if named else (None, Path(str(item))))
    return out


def load_teachers(value: Any, plugins) -> list[Teacher]:
    """The ``--teacher`` directories through their own plugins: one per task, one backbone."""
    teachers: list[Teacher] = []
    for task, path in teacher_specs(value):
        teacher = load_teacher(path, plugins)
        if task is not None and plugins.get(task).name != teacher.task:
            raise SplitserveError(f"--teacher {task}={path}: that directory holds a {teacher.task} teacher")
        if any(t.task == teacher.task for t in teachers):
            raise SplitserveError(f"--teacher {path}: a second {teacher.task} teacher; give one per task")
        if teachers and teacher.arch != teachers[0].arch:
            raise SplitserveError(f"--teacher {path}: backbone {teacher.arch}, but the first teacher's is "
                                  f"{teachers[0].arch}; all teachers must share one backbone")
        teachers.append(teacher)
    if not teachers:
        raise SplitserveError("missing --teacher")
    return teachers


def single_teacher(value: Any) -> Path | None:
    """The one ``--teacher`` of a single-task run (``DIR`` or ``TASK=DIR``), or None."""
    specs = teacher_specs(value) if value else []
    if len(specs) > 1:
        raise SplitserveError("--teacher: one teacher for --task (one per task with --tasks)")
    return specs[0][1] if specs else None


def teacher_as_torchvision(path: Path) -> dict[str, Tensor]:
    """A ``platform teacher`` directory as a torchvision ResNet state dict (conv1, bn1, layer1..4), so
    a detection or segmentation teacher can start from a classification teacher, as torchvision's
    detectors start from ImageNet backbones."""
    teacher = load_teacher(path, common.registry())
    sd = {STEM_TO_TORCHVISION[k[:2]] + k[2:]: v for k, v in teacher.stem.state_dict().items()
          if k[:2] in STEM_TO_TORCHVISION}
    sd.update(teacher.head.tail.state_dict())  # ResNetTail: layer2.*, layer3.*, layer4.*
    return sd


def read_foreign_checkpoint(path: Path) -> dict[str, Tensor]:
    """A torchvision-style state dict (bare, or under ``model``/``state_dict``), read safely; or the
    backbone of a teacher directory."""
    path = Path(path)
    if path.is_dir() and (path / "teacher.json").is_file():
        return teacher_as_torchvision(path)
    if not path.is_file():
        raise SplitserveError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(path.read_bytes())
        except Exception as e:  # noqa: BLE001
            raise SplitserveError(f"{path}: not a valid safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — includes refusals of pickled code
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SplitserveError(f"{path}: cannot load as a weights-only torch checkpoint ({first})") from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise SplitserveError(f"{path}: not a state dict (a mapping of names to tensors)")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def load_foreign_into(sd: Mapping[str, Tensor], stem: nn.Module, head: nn.Module, path: Path) -> list[str]:
    """Map a torchvision checkpoint (ResNet, RetinaNet, DeepLabV3, …) onto (stem, head) by name.

    The ResNet lives under some prefix P (``""``, ``backbone.``, ``backbone.body.``); the stem takes
    P+conv1/bn1/layer1; each head entry is looked up as-is, without ``retinanet.``, and, inside the
    head's ``tail`` (wherever the head keeps it), under P. Returns head entries left as initialised (e.g. an fc of another size).
    """
    prefixes = sorted({k[: -len("conv1.weight")] for k in sd if k.endswith("conv1.weight")
                       and f"{k[: -len('conv1.weight')]}layer1.0.conv1.weight" in sd}, key=len)
    if not prefixes:
        raise SplitserveError(f"{path}: no ResNet found in the checkpoint (no conv1/layer1 weights)")
    p = prefixes[0]
    stem_map = {ours: p + theirs for ours, theirs in STEM_TO_TORCHVISION.items()}
    stem_state = {}
    for key in stem.state_dict():
        for ours, theirs in stem_map.items():
            if key.startswith(ours):
                stem_state[key] = sd.get(theirs + key[len(ours):])
    missing = [k for k, v in stem_state.items() if v is None and not k.endswith("num_batches_tracked")]
    if missing:
        raise SplitserveError(f"{path}: the checkpoint lacks stem weights {common.describe_keys(missing)}")
    stem_state = {k: v for k, v in stem_state.items() if v is not None}
    try:
        stem.load_state_dict(stem_state, strict=False)
    except RuntimeError as e:
        raise SplitserveError(f"{path}: stem weights do not fit: {str(e).splitlines()[0]}") from None
    tail = tail_path(head) + "." if hasattr(head, "tail") else None  # e.g. retinanet.backbone.body.
    head_state = {}
    for key, value in head.state_dict().items():
        candidates = [key, key.removeprefix("retinanet.")]
        if tail and key.startswith(tail):  # layer2..4, wherever the head keeps them
            candidates += [p + key[len(tail):], key[len(tail):]]
        for c in candidates:
            if c in sd and tuple(sd[c].shape) == tuple(value.shape):
                head_state[key] = sd[c]
                break
    return common.load_matching(head, head_state)


# -- training ----------------------------------------------------------------------------------
class TeacherObjective(Objective):
    def __init__(self, plugin: TaskPlugin, stem: nn.Module, head: nn.Module, options: Mapping[str, Any]):
        super().__init__()
        self.plugin = plugin
        self.stem = stem
        self.head = head
        self.options = dict(options)

    def forward(self, batch: TaskBatch):
        return self.plugin.loss(self.head, self.stem(batch.images), batch, options=self.options), {}


def evaluate(plugin: TaskPlugin, stem: nn.Module, head: nn.Module, loader, dataset) -> dict[str, float]:
    stem_was, head_was = stem.training, head.training
    stem.eval()
    head.eval()
    try:
        with torch.no_grad():
            return {k: float(v) for k, v in plugin.evaluate(head, stem, loader, dataset=dataset).items()}
    finally:
        stem.train(stem_was)
        head.train(head_was)


class TeacherStage(Stage):
    def __init__(self, cfg: SimpleNamespace):
        super().__init__(cfg)
        self.plugin = common.training_plugin(common.registry(), cfg.task, "teacher")
        self.arch = check_arch(cfg.arch)
        if cfg.weights and cfg.checkpoint:
            raise SplitserveError("give --weights or --checkpoint, not both")

    def default_workdir(self) -> Path:
        return Path(self.cfg.out)  # the run's logs and checkpoint sit in the teacher directory

    def plan(self) -> Plan:
        cfg, plugin = self.cfg, self.plugin
        data = common.task_data(plugin, cfg, Preprocessing.fixed(224, 224))
        self.config = plugin.resolve_config(self.arch, {**data.config, **dict(cfg.head_config or {})})
        torch.manual_seed(cfg.seed)
        stem, head = plugin.build_teacher(self.arch, self.config, cfg.weights)
        source = f"torchvision weights {cfg.weights}" if cfg.weights else "random initialisation"
        if cfg.checkpoint:
            sd = read_foreign_checkpoint(cfg.checkpoint)
            fresh = load_foreign_into(sd, stem, head, cfg.checkpoint)
            source = f"checkpoint {cfg.checkpoint}"
            if fresh:
                self.note(f"note: {common.describe_keys(fresh)} not in {cfg.checkpoint} (or of another shape): "
                          "left freshly initialised")
        if cfg.epochs == 0 and not (cfg.weights or cfg.checkpoint):
            self.note("warning: --epochs 0 without --weights/--checkpoint saves an untrained teacher")
        objective = TeacherObjective(plugin, stem, head, common.options_of(cfg))
        val_loader = common.eval_loader(plugin, data.val_set, cfg)

        def validate() -> dict[str, float]:
            return evaluate(plugin, objective.stem, objective.head, val_loader, data.val_set)

        return Plan("teacher", "teacher", objective, {"main": list(objective.parameters())}, data, plugin.collate,
                    validate, provenance={"init": source})

    def write(self, plan, result, metrics, provenance) -> str:
        out, objective = Path(self.cfg.out), plan.objective.to("cpu")
        policy = plan.data.policy
        save_teacher(out, Teacher(out, self.plugin.name, self.arch, self.config, policy, objective.stem,
                                  objective.head, metrics, provenance))
        shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())
        return f"wrote teacher {out} ({self.plugin.name}, {self.arch}, {policy.describe()}): val {shown}"


def run_teacher(cfg: SimpleNamespace) -> int:
    return TeacherStage(cfg).run()
