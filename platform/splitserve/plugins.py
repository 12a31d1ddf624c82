"""Task plugin interface and discovery.

A task plugin turns the decoded feature ``h`` into an answer. It says what it consumes
(:class:`FeatureSpec`), builds its head ``nn.Module`` for a backbone, predicts in batches, and
supplies the hooks the shared ``platform teacher/distill/finetune`` commands need (dataset,
loss, metric). Plugins are found through the ``splitserve.tasks`` entry-point group; the
built-in ones register through it too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel
from torch import Tensor, nn
from torch.utils.data import Dataset

from .errors import PluginError
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


FeatureFn = Callable[[Tensor], Tensor]
"""Maps normalised images to h: the codec (decoder output) or a teacher's stem."""


class TaskPlugin(ABC):
    """Base class for task plugins. Subclass it, set the class attributes, implement the
    abstract methods; training hooks are optional (``finetune`` refuses a plugin without them)."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    response_model: ClassVar[type[BaseModel]]
    metric_name: ClassVar[str] = "metric"  # primary validation metric, higher is better

    # -- serving -------------------------------------------------------------------------
    def feature_spec(self, backbone: str) -> FeatureSpec:
        """What the head consumes; checked against the bundle's codec at server start-up."""
        return feature_spec(backbone)

    def default_config(self, backbone: str) -> dict:
        """Head hyperparameters stored in the bundle manifest (e.g. num_classes, labels)."""
        return {}

    @abstractmethod
    def build_head(self, backbone: str, config: Mapping[str, Any]) -> nn.Module:
        """A freshly initialised head for ``backbone``; the bundle then loads its weights.

        The head must expose ``tail`` (a :class:`ResNetTail`): its layer2..4 outputs are what
        stage-1 distillation matches against the teacher.
        """

    @abstractmethod
    def predict(
        self,
        head: nn.Module,
        features: Tensor,
        metas: Sequence[ImageMeta],
        options: Mapping[str, Any],
    ) -> list[BaseModel]:
        """One ``response_model`` per image, for a batch of decoded features (B, C, H/4, W/4)."""

    # -- training hooks -------------------------------------------------------------------
    def build_teacher(
        self, backbone: str, config: Mapping[str, Any], weights: str | None = None
    ) -> tuple[nn.Module, nn.Module]:
        """(stem, head) of the uncompressed model: stem maps images to h, head is as above.

        ``weights`` names torchvision weights for the whole model (plugins override this to
        load task weights; the default only loads ImageNet weights into the ResNet).
        """
        resnet, head = self.resnet_teacher(backbone, config, weights)
        return resnet_stem(resnet), head

    def resnet_teacher(
        self, backbone: str, config: Mapping[str, Any], weights: str | None = None, **resnet_kwargs: Any
    ) -> tuple[nn.Module, nn.Module]:
        """(torchvision ResNet, head whose ``tail`` holds the ResNet's layer2..4): the building
        block of :meth:`build_teacher`; ``resnet_kwargs`` go to :func:`build_resnet`."""
        resnet = build_resnet(backbone, weights=weights, **resnet_kwargs)
        head = self.build_head(backbone, config)
        head.tail.load_state_dict(ResNetTail.from_resnet(resnet).state_dict())
        return resnet, head

    def build_dataset(self, root: Path, split: str, *, train: bool, preprocessing: Preprocessing) -> Dataset:
        """Dataset whose items :meth:`collate` turns into a :class:`TaskBatch`; evaluation items are
        made by ``preprocessing`` (the bundle's declared policy), as the edge makes them."""
        raise PluginError(f"task {self.name!r} does not provide a dataset for training")

    def dataset_config(self, dataset: Dataset) -> dict:
        """Head config learned from the data (e.g. labels), merged into :meth:`default_config`."""
        return {}

    def collate(self, items: list) -> TaskBatch:
        raise PluginError(f"task {self.name!r} does not provide a collate function")

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
        raise PluginError(f"task {self.name!r} does not provide a training loss")

    def head_output(self, head: nn.Module, features: Tensor, batch: TaskBatch) -> Any:
        """Raw head output used as ``teacher_output`` (e.g. logits); None if the loss needs none."""
        return None

    def evaluate(
        self,
        head: nn.Module,
        features_fn: FeatureFn,
        batches: Iterable[TaskBatch],
        *,
        dataset: Dataset | None = None,
    ) -> dict[str, float]:
        """Validation metrics; must include ``metric_name``.

        ``dataset`` is the dataset the batches come from (default: ``batches.dataset`` when
        ``batches`` is a DataLoader); metrics such as COCO mAP need its ground-truth index.
        """
        raise PluginError(f"task {self.name!r} does not provide an evaluation metric")


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
            raise PluginError(f"unknown task {key!r}; available: {self.describe_available()}") from None

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
