"""The embedding head: the ResNet tail, GeM pooling and an L2-normalised projection."""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splitserve.models.backbone import TAIL_CHANNELS, ResNetTail, build_resnet


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al., 2018) with a learnable exponent ``p``:
    p=1 is average pooling, large p approaches max pooling. The usual choice for retrieval."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        p = self.p.clamp(min=1.0)
        return x.clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class EmbeddingHead(nn.Module):
    """layer2..4 → GeM → linear → L2 normalisation: (B, C, H/4, W/4) → (B, dim) unit vectors.

    ``tail`` is the :class:`ResNetTail` every splitserve head exposes: the teacher's ImageNet
    weights are loaded into it, and stage-1 distillation matches its layer2..4 outputs.
    """

    def __init__(self, backbone: str, dim: int):
        super().__init__()
        self.tail = ResNetTail.from_resnet(build_resnet(backbone))
        self.pool = GeM()
        self.proj = nn.Linear(TAIL_CHANNELS[backbone][2], dim)
        self._space: str | None = None
        # new weights = new embedding space: forget the cached identifier
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_space", None))

    @property
    def dim(self) -> int:
        return self.proj.out_features

    def forward(self, h: Tensor) -> Tensor:
        x = self.pool(self.tail(h)["layer4"])
        return F.normalize(self.proj(x), dim=1)

    def space_id(self) -> str:
        """16 hex digits of a SHA-256 over the weights: vectors are comparable only within one
        space. Computed once after the weights are loaded (re-computed after ``load_state_dict``)."""
        if self._space is None:
            digest = hashlib.sha256()
            for name, t in sorted(self.state_dict().items()):
                t = t.detach().cpu().contiguous()
                digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            self._space = digest.hexdigest()[:16]
        return self._space
