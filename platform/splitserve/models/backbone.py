"""ResNet backbones split at layer1: the teacher keeps its stem, the student's tail consumes h.

Real users start from torchvision weights (``weights="DEFAULT"`` or an enum name); where the
download is impossible, :func:`build_resnet` says so in one line.

The *shared trunk* lives here too, all of it: one layer2..4 that several heads use, so the gateway
runs it once per batch. A head joins it with :func:`attach_trunk`; a bundle stores the trunk once
and each head without it (:func:`stored_state`), and loads a head back onto it
(:func:`load_on_trunk`); ``finetune`` starts a trunk from the first shared head
(:meth:`SharedTrunk.from_head`) and starts other heads from one on the trunk (:func:`own_state`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torchvision
from torch import Tensor, nn

from ..errors import PluginError, SplitserveError

FEATURE_CHANNELS = {"resnet18": 64, "resnet34": 64, "resnet50": 256, "resnet101": 256}
"""Channels of layer1's output, the feature h every codec rebuilds."""

TAIL_CHANNELS = {
    "resnet18": (128, 256, 512),
    "resnet34": (128, 256, 512),
    "resnet50": (512, 1024, 2048),
    "resnet101": (512, 1024, 2048),
}
"""Output channels of layer2, layer3, layer4."""


@dataclass(frozen=True)
class FeatureSpec:
    """What a head consumes: channel count and stride (relative to the input) of h."""

    channels: int
    stride: int = 4

    def describe(self) -> str:
        return f"{self.channels} channels at stride {self.stride}"

    def require(self, task: str, channels: int, stride: int) -> None:
        """Refuse a codec whose feature is not what ``task``'s head consumes (it would run, wrongly)."""
        if (self.channels, self.stride) != (channels, stride):
            raise PluginError(f"task {task!r} consumes {self.describe()}, but the bundle's codec produces "
                              f"{channels} channels at stride {stride}")


def check_arch(arch: str) -> str:
    if arch not in FEATURE_CHANNELS:
        raise SplitserveError(f"unsupported backbone {arch!r}; choose one of {', '.join(FEATURE_CHANNELS)}")
    return arch


def feature_spec(arch: str) -> FeatureSpec:
    return FeatureSpec(FEATURE_CHANNELS[check_arch(arch)], 4)


def resolve_weights(arch: str, weights: str | None):
    """Map ``"DEFAULT"`` / an enum member name to a torchvision ``WeightsEnum`` (or None)."""
    if weights is None:
        return None
    enum = torchvision.models.get_model_weights(arch)
    try:
        return enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except KeyError:
        names = ", ".join(["DEFAULT", *enum.__members__])
        raise SplitserveError(f"unknown weights {weights!r} for {arch}; choose one of {names}") from None


def has_basic_blocks(arch: str) -> bool:
    """ResNet-18/34 (BasicBlock, 64-channel layer1), as opposed to the Bottleneck ResNet-50/101."""
    return FEATURE_CHANNELS[arch] == 64


def build_resnet(
    arch: str,
    *,
    num_classes: int = 1000,
    weights: str | None = None,
    dilation: tuple[bool, bool, bool] | None = None,
    norm_layer: Callable[..., nn.Module] | None = None,
) -> torchvision.models.ResNet:
    """A torchvision ResNet, optionally pretrained through the weights API.

    ``norm_layer`` replaces BatchNorm2d (detection uses ``FrozenBatchNorm2d`` like torchvision).
    """
    check_arch(arch)
    w = resolve_weights(arch, weights)
    basic = has_basic_blocks(arch)  # torchvision refuses to dilate these
    kwargs: dict = {} if dilation is None or basic else {"replace_stride_with_dilation": list(dilation)}
    if norm_layer is not None:
        kwargs["norm_layer"] = norm_layer
    if w is not None:
        kwargs["num_classes"] = len(w.meta["categories"])
    else:
        kwargs["num_classes"] = num_classes
    try:
        resnet = torchvision.models.get_model(arch, weights=w, **kwargs)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        if w is None:
            raise
        raise SplitserveError(
            f"could not download {arch} weights {w} ({type(e).__name__}); "
            "pass a local checkpoint instead"
        ) from None
    if dilation is not None and basic:
        dilate_basic_blocks(resnet, dilation)
    return resnet


def dilate_basic_blocks(resnet: torchvision.models.ResNet, dilation: Sequence[bool]) -> None:
    """Trade stride for dilation in layer2..4 of a BasicBlock ResNet, in place, by torchvision's
    rule for Bottleneck ResNets (``replace_stride_with_dilation``): a dilated layer keeps its
    input's resolution; its first block's 3×3 convolutions use the previous dilation, the others
    twice that. Only strides, paddings and dilations change, so the weights of the undilated
    network fit as they are (DeepLabv3 on ResNet-18/34 at output stride 8 or 16)."""
    rate = 1
    for layer, dilate in zip((resnet.layer2, resnet.layer3, resnet.layer4), dilation, strict=True):
        if not dilate:
            continue
        previous, rate = rate, rate * 2
        for i, block in enumerate(layer):
            r = previous if i == 0 else rate
            for conv in (block.conv1, block.conv2):
                conv.stride, conv.padding, conv.dilation = (1, 1), (r, r), (r, r)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)


def resnet_stem(resnet: torchvision.models.ResNet) -> nn.Sequential:
    """conv1 → bn1 → relu → maxpool → layer1: the part the codec replaces; its output is h."""
    return nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1)


class ResNetTail(nn.Module):
    """layer2..4 of a ResNet applied to h; returns every stage (FPN and distillation need them)."""

    def __init__(self, layer2: nn.Module, layer3: nn.Module, layer4: nn.Module):
        super().__init__()
        self.layer2, self.layer3, self.layer4 = layer2, layer3, layer4

    @classmethod
    def from_resnet(cls, resnet: torchvision.models.ResNet) -> "ResNetTail":
        return cls(resnet.layer2, resnet.layer3, resnet.layer4)

    def forward(self, h: Tensor) -> "OrderedDict[str, Tensor]":
        out = OrderedDict()
        out["layer2"] = x = self.layer2(h)
        out["layer3"] = x = self.layer3(x)
        out["layer4"] = self.layer4(x)
        return out


# -- the shared trunk ------------------------------------------------------------------------------
class SharedTrunk(nn.Module):
    """One layer2..4 that several heads use as their ``tail``, so a batch runs it once.

    The gateway computes the trunk's outputs once per batch and, while a head predicts, lends
    them through :meth:`reuse`: when the head calls ``self.tail(h)`` with that very tensor it gets
    the stored outputs instead of a second forward. Any other input is computed normally, so a
    head that transforms ``h`` first is merely slower, never wrong. The stored outputs are
    per-thread (the gateway may run batches on several worker threads).
    """

    def __init__(self, tail: ResNetTail):
        super().__init__()
        self.tail = tail
        self._local = threading.local()

    @classmethod
    def build(cls, arch: str) -> "SharedTrunk":
        """A freshly initialised trunk for ``arch`` (a bundle then loads its trunk file into ``.tail``)."""
        return cls(ResNetTail.from_resnet(build_resnet(arch))).eval()

    @classmethod
    def from_head(cls, head: nn.Module, arch: str) -> "SharedTrunk":
        """A new trunk holding ``head``'s layer2..4 (the first head trained on a shared trunk gives it).
        Not strict: a detection head's FrozenBatchNorm2d has no ``num_batches_tracked``."""
        trunk = cls.build(arch)
        trunk.tail.load_state_dict(head.get_submodule(tail_path(head)).state_dict(), strict=False)
        return trunk

    def forward(self, h: Tensor) -> "OrderedDict[str, Tensor]":
        lent = getattr(self._local, "lent", None)
        if lent is not None and lent[0] is h:
            return lent[1]
        return self.tail(h)

    @contextmanager
    def reuse(self, h: Tensor, outputs: "OrderedDict[str, Tensor]") -> Iterator[None]:
        """While the block runs, ``self(h)`` returns ``outputs`` (for exactly this tensor)."""
        previous = getattr(self._local, "lent", None)
        self._local.lent = (h, outputs)
        try:
            yield
        finally:
            self._local.lent = previous


def tie_tail(tail: ResNetTail, trunk: ResNetTail) -> None:
    """Make ``tail`` use ``trunk``'s parameters and buffers (same tensors, not copies).

    For heads whose layer3/4 run dilated (DeepLabv3 on ResNet-50): dilation changes strides and
    padding, not parameter shapes, so the dilated tail shares the trunk's weights — stored once —
    while computing its own, denser outputs.
    """
    for (name, p), (tname, tp) in zip(tail.named_parameters(), trunk.named_parameters(), strict=True):
        if name != tname or p.shape != tp.shape:
            raise SplitserveError(f"cannot tie tail parameter {name} to the trunk's {tname}")
    for module_name, module in tail.named_modules():
        source = trunk.get_submodule(module_name)
        for pname, _ in list(module.named_parameters(recurse=False)):
            setattr(module, pname, getattr(source, pname))
        for bname, _ in list(module.named_buffers(recurse=False)):
            module.register_buffer(bname, getattr(source, bname))


def tail_path(head: nn.Module) -> str:
    """Where ``head.tail`` lives in the head's module tree (its state-dict prefix, without the dot)."""
    tail = head.tail
    for name, module in head.named_modules():
        if module is tail and name:
            return name
    raise SplitserveError(f"{type(head).__name__}.tail is not a submodule of the head")


def _geometry(tail: nn.Module) -> list[tuple]:
    return [(m.stride, m.padding, m.dilation) for m in tail.modules() if isinstance(m, nn.Conv2d)]


def trunk_of(head: nn.Module) -> SharedTrunk | None:
    """The shared trunk ``head`` runs as its layer2..4, or None (its own, or only tied weights)."""
    tail = head.get_submodule(tail_path(head))
    return tail if isinstance(tail, SharedTrunk) else None


def stored_state(head: nn.Module, shared: bool) -> dict[str, Tensor]:
    """What a bundle stores of ``head``: its state dict, without layer2..4 when the head is on the
    shared trunk (the trunk file holds them, once)."""
    state = head.state_dict()
    if not shared:
        return state
    prefix = tail_path(head) + "."
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


def own_state(head: nn.Module) -> dict[str, Tensor]:
    """``head``'s state dict with layer2..4 named as in a head that owns them, also when it runs
    on a shared trunk (which adds a level): what another head of the task can start from."""
    state = head.state_dict()
    if trunk_of(head) is None:
        return state
    prefix = tail_path(head) + "."
    nested = prefix + "tail."
    return {(prefix + k[len(nested):] if k.startswith(nested) else k): v for k, v in state.items()}


def load_on_trunk(head: nn.Module, state: Mapping[str, Tensor], trunk: SharedTrunk) -> None:
    """Load a head stored on the shared trunk (``state``: :func:`stored_state`'s entries, no more,
    no fewer) and make ``trunk`` its layer2..4."""
    odd = sorted(set(state) ^ set(stored_state(head, shared=True)))
    if odd:
        raise SplitserveError(f"mismatched keys: {', '.join(odd[:3])}")
    head.load_state_dict(dict(state), strict=False)
    attach_trunk(head, trunk)


def attach_trunk(head: nn.Module, trunk: SharedTrunk) -> None:
    """Make ``head`` use the shared ``trunk`` as its layer2..4.

    A head whose tail has the trunk's geometry *becomes* a user of the trunk module (its outputs
    are computed once per batch); a dilated tail keeps its own geometry but ties its weights to
    the trunk's (see :func:`tie_tail`).
    """
    path = tail_path(head)
    own = head.get_submodule(path)
    if _geometry(own) == _geometry(trunk.tail):
        parent, _, attr = path.rpartition(".")
        setattr(head.get_submodule(parent) if parent else head, attr, trunk)
    else:
        tie_tail(own, trunk.tail)
