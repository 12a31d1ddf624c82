"""Task plugin interface and discovery.

A task plugin turns the decoded feature ``h`` into an answer. Serving needs four members
(:class:`TaskPlugin`: name, response model, build_head, predict); training needs more
(:class:`TrainingHooks`: dataset, collate, loss, metric), and rate–accuracy studies more again
(:class:`EvaluationHooks`: evaluation images and a :class:`Scorer` of served answers), kept apart so
a serve-only plugin stays small. Plugins are found through the ``splitserve.tasks`` entry-point
group; the built-in ones register through it too.

Helpers for implementing the hooks: :class:`ImageFolderData` (the data hooks of a task on an
ImageFolder tree), :func:`evaluating` and :meth:`TaskBatch.to` (the loop of ``evaluate``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import Tensor, nn
from torch.utils.data import Dataset

from .errors import PluginError, excerpt
from .models.backbone import FeatureSpec, ResNetTail, build_resnet, feature_spec, resnet_stem
from .preprocess import Preprocessing

ENTRY_POINT_GROUP = "splitserve.tasks"


@dataclass(frozen=True)
class ImageMeta:
    """Per-image geometry: heads answer in the coordinates of the image the caller had."""

    original_size: tuple[int, int]  # (height, width) before the edge resized it
    input_size: tuple[int, int]  # (height, width) the encoder saw


@dataclass
class TaskBatch:
    """A training/eval batch: normalised images (B,3,H,W), task targets, per-image geometry."""

    images: Tensor
    targets: Any
    metas: list[ImageMeta] = field(default_factory=list)

    def to(self, device: torch.device | str) -> "TaskBatch":
        """This batch with its images and targets (a tensor, or a list of dicts of tensors) on ``device``."""
        targets = self.targets
        if isinstance(targets, Tensor):
            targets = targets.to(device, non_blocking=True)
        elif isinstance(targets, list):
            targets = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} if isinstance(t, dict)
                       else t for t in targets]
        return replace(self, images=self.images.to(device, non_blocking=True), targets=targets)


FeatureFn = Callable[[Tensor], Tensor]
"""Maps normalised images to h: the codec (decoder output) or a teacher's stem."""


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s parameters (else buffers) live; the CPU for a module without either."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


@contextmanager
def evaluating(module: nn.Module) -> Iterator[torch.device]:
    """Eval mode for the block, then the caller's mode back (``evaluate`` runs mid-training); yields
    the module's device::

        with evaluating(head) as device:
            for batch in batches:
                batch = batch.to(device)
                ...
    """
    was_training = module.training
    module.eval()
    try:
        yield module_device(module)
    finally:
        module.train(was_training)


class PluginContractError(RuntimeError):
    """A plugin broke its contract at run time (e.g. predict returned the wrong number of answers):
    a bug in the plugin, not in the request, so the gateway answers 500 and logs it."""


class TaskPlugin(ABC):
    """What a task needs to be *served*: four members.

    Required: ``name``, ``response_model``, :meth:`build_head`, :meth:`predict`. Optional:
    ``aliases``, ``description``, :meth:`resolve_config` (defaults and validation of the head
    config stored in a bundle), :meth:`feature_spec` (default: the ResNet layer1 feature) and
    :meth:`summarize` (one line for ``platform infer``). Training is a separate contract,
    :class:`TrainingHooks`, which ``platform teacher/distill/finetune/train`` require.
    """

    name: ClassVar[str]
    response_model: ClassVar[type[BaseModel]]
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    def resolve_config(self, backbone: str, stored: Mapping[str, Any]) -> dict[str, Any]:
        """The head config, complete and validated, from what a bundle/teacher stored (possibly
        partial, e.g. only ``{"num_classes": 10}``). Called once; build_head and predict get its
        result. Raise :class:`PluginError` for an invalid config."""
        return dict(stored)

    @abstractmethod
    def build_head(self, backbone: str, config: Mapping[str, Any]) -> nn.Module:
        """A freshly initialised head for ``backbone`` and a resolved ``config``; the bundle then
        loads its weights. Heads that build on the ResNet tail expose it as ``tail`` (a
        :class:`ResNetTail`): stage-1 distillation and shared trunks use it."""

    @abstractmethod
    def predict(
        self,
        head: nn.Module,
        features: Tensor,
        metas: Sequence[ImageMeta],
        config: Mapping[str, Any],
    ) -> list[BaseModel]:
        """One ``response_model`` per image (exactly ``len(metas)``) for a batch of decoded
        features (B, C, H/4, W/4); ``config`` is the resolved config (plus per-request options)."""

    def feature_spec(self, backbone: str) -> FeatureSpec:
        """What the head consumes; checked against the bundle's codec at server start-up."""
        return feature_spec(backbone)

    def summarize(self, answer: BaseModel) -> str:
        """A one-line human summary of one answer (``platform infer``)."""
        text = answer.model_dump_json()
        return text if len(text) <= 120 else text[:117] + "..."


@dataclass(frozen=True)
class ReferenceRecipe:
    """A task's reference stage 2 (the Entropic Student configs), which ``platform finetune
    --procedure reference`` follows: starting from the same-task teacher's head, first distil the
    head's own outputs of ``layers`` (of layer2..4) toward the teacher's (Adam at ``feature_lr``
    for ``feature_epochs``), then train with the task loss (``optimizer`` at ``lr`` for ``epochs``,
    ``scheduler`` as ``--scheduler`` names it)."""

    layers: tuple[str, ...]
    feature_epochs: int
    feature_lr: float
    epochs: int
    optimizer: str
    lr: float
    scheduler: str = "none"


class TrainingHooks(ABC):
    """What ``platform teacher``, ``distill``, ``finetune`` and ``train`` need from a task, on top
    of :class:`TaskPlugin`: data, loss, metric. A serve-only plugin leaves this out, and the
    training commands refuse it with a message naming this class.

    ``data_layout`` names the sub-folder of an fmnist-scenes tree (``imagefolder`` or ``coco``)
    the task's loader reads; ``metric_name`` is the primary validation metric (higher is better);
    ``reference_finetune`` is the task's :class:`ReferenceRecipe` for stage 2, if it has one.
    """

    metric_name: ClassVar[str] = "metric"
    data_layout: ClassVar[str | None] = None
    reference_finetune: ClassVar[ReferenceRecipe | None] = None  # the reference stage 2, where the task has one

    @abstractmethod
    def build_dataset(self, root: Path, split: str, *, train: bool, preprocessing: Preprocessing) -> Dataset:
        """Dataset whose items :meth:`collate` turns into a :class:`TaskBatch`; evaluation items are
        made by ``preprocessing`` (the bundle's declared policy), as the edge makes them."""

    def dataset_config(self, dataset: Dataset) -> dict:
        """Head config learned from the data (e.g. labels), passed through ``resolve_config``."""
        return {}

    def config_for_classes(self, names: Sequence[str]) -> dict:
        """Head config for a dataset whose object classes are ``names`` (no background): what
        :meth:`dataset_config` would give for it; ``{}`` for a head that has no classes."""
        return {}

    @abstractmethod
    def collate(self, items: list) -> TaskBatch:
        """A :class:`TaskBatch` from dataset items."""

    @abstractmethod
    def loss(
        self,
        head: nn.Module,
        features: Tensor,
        batch: TaskBatch,
        *,
        teacher_output: Any = None,
        options: Mapping[str, Any] | None = None,
    ) -> dict[str, Tensor]:
        """Named loss terms (summed by the trainer). ``teacher_output`` is ``head_output`` of
        the teacher on the same batch, for distillation losses such as KD."""

    def head_output(self, head: nn.Module, features: Tensor, batch: TaskBatch) -> Any:
        """Raw head output used as ``teacher_output`` (e.g. logits); None if the loss needs none."""
        return None

    @property
    def distills(self) -> bool:
        """Whether ``loss`` learns from a same-task teacher's output: the plugin defines ``head_output``.
        Trainers skip the teacher's forward pass for plugins that do not."""
        return type(self).head_output is not TrainingHooks.head_output

    @abstractmethod
    def evaluate(
        self,
        head: nn.Module,
        features_fn: FeatureFn,
        batches: Iterable[TaskBatch],
        *,
        dataset: Dataset | None = None,
    ) -> dict[str, float]:
        """Validation metrics; must include ``metric_name``. ``dataset`` is the dataset the batches
        come from (default: ``batches.dataset``); metrics such as COCO mAP need its ground truth."""

    def build_teacher(
        self, backbone: str, config: Mapping[str, Any], weights: str | None = None
    ) -> tuple[nn.Module, nn.Module]:
        """(stem, head) of the uncompressed model: stem maps images to h, head is as above.
        ``config`` is a stored (possibly partial) config: it is resolved here.

        ``weights`` names torchvision weights for the whole model (plugins override this to
        load task weights; the default only loads ImageNet weights into the ResNet).
        """
        resnet, head = self.resnet_teacher(backbone, self.resolve_config(backbone, config), weights)  # type: ignore[attr-defined]
        return resnet_stem(resnet), head

    def resnet_teacher(
        self, backbone: str, config: Mapping[str, Any], weights: str | None = None, **resnet_kwargs: Any
    ) -> tuple[nn.Module, nn.Module]:
        """(torchvision ResNet, head whose ``tail`` holds the ResNet's layer2..4): the building
        block of :meth:`build_teacher`; ``resnet_kwargs`` go to :func:`build_resnet`."""
        resnet = build_resnet(backbone, weights=weights, **resnet_kwargs)
        head = self.build_head(backbone, config)  # type: ignore[attr-defined]
        head.tail.load_state_dict(ResNetTail.from_resnet(resnet).state_dict())
        return resnet, head


class Scorer(ABC):
    """One task's metrics, accumulated from the plugin's own answers (``response_model`` objects,
    exactly as served) against ground truth. Studies score every method through it — our payloads
    through the gateway and input codecs through the uncompressed teacher — so all are scored alike."""

    @abstractmethod
    def update(self, predictions: Sequence[BaseModel], targets: Sequence[Any]) -> None:
        """Add the answers for images whose ground truth is ``targets`` (one each, in order)."""

    @abstractmethod
    def result(self) -> dict[str, float]:
        """Metrics over everything added so far; includes the plugin's ``metric_name``."""


@dataclass(frozen=True)
class EvalSample:
    """One evaluation image: its file, which is encoded as a device would, and the target the
    task's :class:`Scorer` reads (a class index, a COCO image id, …)."""

    path: Path
    target: Any


class EvaluationHooks(ABC):
    """What ``platform evaluate`` and ``platform bundle measure`` need to score a task from served
    answers, beside :class:`TrainingHooks` (which they need too: ``build_dataset`` gives the data,
    ``build_teacher`` the uncompressed reference, ``metric_name`` the headline metric)."""

    metric_label: ClassVar[str] = ""
    """How plots and reports name ``metric_name``, with its unit, e.g. ``"top-1 (%)"``; default
    ``metric_name``."""

    @abstractmethod
    def eval_samples(self, dataset: Dataset) -> list[EvalSample]:
        """Every image of ``dataset`` (from ``build_dataset(..., train=False)``) with its target, in
        a fixed order (studies take an evenly spaced subset of it)."""

    @abstractmethod
    def make_scorer(self, dataset: Dataset, config: Mapping[str, Any]) -> Scorer:
        """A fresh scorer for answers to ``dataset``'s images given by a head with ``config``."""

    def scoring_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The head config to answer with when scoring (e.g. a benchmark protocol's thresholds);
        default: as served."""
        return dict(config)


class ImageFolderData:
    """The data hooks of a task whose images are labelled by an ImageFolder tree
    ``root/<split>/<class>/<image>`` (classification, retrieval, …). Mix it in before the hooks,
    ``class MyPlugin(ImageFolderData, EvaluationHooks, TrainingHooks, TaskPlugin)``, and it supplies:

    - ``data_layout = "imagefolder"``;
    - :meth:`build_dataset`: :func:`splitserve.data.classification_dataset` (items: a normalised image
      and its class index);
    - :meth:`collate`: a :class:`TaskBatch` whose targets are the class indices (a long tensor) and
      whose metas give each image its input size (ImageFolder images keep no other geometry);
    - :meth:`eval_samples`: every image file of the split with its class index as the target.
    """

    data_layout: ClassVar[str | None] = "imagefolder"

    def build_dataset(self, root: Path, split: str, *, train: bool, preprocessing: Preprocessing) -> Dataset:
        from .data import classification_dataset

        return classification_dataset(root, split, train=train, preprocessing=preprocessing)

    def collate(self, items: list) -> TaskBatch:
        images = torch.stack([img for img, _ in items])
        targets = torch.as_tensor([int(label) for _, label in items], dtype=torch.long)
        size = (images.shape[-2], images.shape[-1])
        return TaskBatch(images, targets, [ImageMeta(original_size=size, input_size=size)] * len(items))

    def eval_samples(self, dataset: Dataset) -> list[EvalSample]:
        return [EvalSample(Path(path), int(label)) for path, label in dataset.samples]


def trainable(plugin: TaskPlugin, command: str) -> TrainingHooks:
    """``plugin`` as a :class:`TrainingHooks`, or one clear error naming what is missing."""
    if not isinstance(plugin, TrainingHooks):
        raise PluginError(f"task {plugin.name!r} can be served but not trained: `platform {command}` needs a plugin "
                          "that also implements splitserve.plugins.TrainingHooks (dataset, collate, loss, evaluate)")
    return plugin


def scorable(plugin: TaskPlugin) -> Any:
    """``plugin`` if studies can score it (:class:`TrainingHooks` and :class:`EvaluationHooks`), or
    one clear error naming what is missing."""
    missing = [hooks.__name__ for hooks in (TrainingHooks, EvaluationHooks) if not isinstance(plugin, hooks)]
    if missing:
        raise PluginError(f"task {plugin.name!r} cannot be scored: `platform evaluate` needs a plugin that also "
                          f"implements {' and '.join('splitserve.plugins.' + m for m in missing)}")
    return plugin


class PluginRegistry:
    """Installed plugins by canonical name, with alias resolution and conflict checks."""

    def __init__(self, plugins: Iterable[TaskPlugin]):
        self._by_name: dict[str, TaskPlugin] = {}
        self._lookup: dict[str, str] = {}
        for plugin in plugins:
            for key in (plugin.name, *plugin.aliases):
                if key in self._lookup:
                    raise PluginError(
                        f"task name {key!r} is claimed by both {self._lookup[key]!r} and {plugin.name!r}"
                    )
                self._lookup[key] = plugin.name
            self._by_name[plugin.name] = plugin

    @classmethod
    def discover(cls) -> "PluginRegistry":
        """Load every plugin registered under the ``splitserve.tasks`` entry-point group."""
        plugins = []
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
            except Exception as e:  # a broken third-party plugin must name itself
                raise PluginError(f"task plugin {ep.name!r} ({ep.value}) failed to import: {e}") from e
            plugin = obj() if isinstance(obj, type) else obj
            if not isinstance(plugin, TaskPlugin):
                raise PluginError(f"entry point {ep.name!r} ({ep.value}) is not a TaskPlugin")
            plugins.append(plugin)
        return cls(plugins)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def __iter__(self):
        return iter(self._by_name[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._by_name)

    def get(self, key: str) -> TaskPlugin:
        try:
            return self._by_name[self._lookup[key.strip().lower()]]
        except KeyError:
            raise PluginError(f"unknown task {excerpt(key)}; available: {self.describe_available()}") from None

    def resolve(self, spec: str | Sequence[str]) -> list[TaskPlugin]:
        """``"cls,det"`` → [classification, detection], de-duplicated, order kept."""
        keys = [k for k in (spec.split(",") if isinstance(spec, str) else spec) if k.strip()]
        if not keys:
            raise PluginError(f"no task requested; available: {self.describe_available()}")
        out: list[TaskPlugin] = []
        for k in keys:
            p = self.get(k)
            if p not in out:
                out.append(p)
        return out

    def describe_available(self) -> str:
        return ", ".join(
            f"{p.name} ({', '.join(p.aliases)})" if p.aliases else p.name for p in self
        )
