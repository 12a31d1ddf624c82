"""The embedding plugin: a :class:`~splitserve.plugins.TaskPlugin` (serving) that also implements
:class:`~splitserve.plugins.TrainingHooks` (training) and :class:`~splitserve.plugins.EvaluationHooks`
(rate–accuracy studies).

Serving needs four members: ``name``, ``response_model``, ``build_head``, ``predict`` (one
:class:`EmbeddingResult` per image, computed for the whole batch at once); ``aliases``,
``description`` and ``resolve_config`` are optional extras used here. A serve-only plugin stops
there. Training adds an ImageFolder dataset (the data hooks of
:class:`~splitserve.plugins.ImageFolderData`), a supervised contrastive loss with optional
relational distillation, and leave-one-out recall@k.
Evaluation scores served answers with the same recall@k (:class:`RecallScorer`), so
``platform evaluate`` can compare this task's rate–accuracy curves with JPEG and WebP.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from splitserve.errors import PluginError
from splitserve.models.backbone import check_arch
from splitserve.plugins import (EvaluationHooks, FeatureFn, ImageFolderData, ImageMeta, Scorer, TaskBatch, TaskPlugin,
                                TrainingHooks, evaluating)

from .head import EmbeddingHead
from .schema import EmbeddingResult

DEFAULT_DIM = 128
MAX_DIM = 4096


def supervised_contrastive_loss(z: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """Supervised contrastive loss (Khosla et al., 2020) over one batch of unit vectors ``z`` (B, D).

    Every other image with the same label is a positive, every image with another label a
    negative. Anchors without a positive in the batch are skipped; a batch with none gives 0
    (still connected to the graph, so ``backward`` works).
    """
    z = z.float()
    b = z.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
    positives = (labels[:, None] == labels[None, :]) & ~eye
    counts = positives.sum(dim=1)
    anchors = counts > 0
    if not bool(anchors.any()):
        return z.sum() * 0.0
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    mean_pos = log_prob.masked_fill(~positives, 0.0).sum(dim=1)[anchors] / counts[anchors]
    return -mean_pos.mean()


def recall_at_k(z: Tensor, y: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Leave-one-out retrieval over unit vectors ``z`` (N, D) with labels ``y`` (N,), in percent:
    recall@k is the share of images whose k nearest other images (cosine similarity) include one of
    the same class."""
    n = len(z)
    if n < 2:
        raise PluginError("embedding: evaluation needs at least two images")
    hits = dict.fromkeys(ks, 0)
    kmax = min(max(ks), n - 1)
    for start in range(0, n, 1024):  # (1024, n) similarities at a time
        stop = min(start + 1024, n)
        sim = z[start:stop] @ z.T
        rows = torch.arange(stop - start)
        sim[rows, rows + start] = float("-inf")  # an image is not its own neighbour
        match = y[sim.topk(kmax, dim=1).indices] == y[start:stop, None]
        for k in ks:
            hits[k] += int(match[:, : min(k, kmax)].any(dim=1).sum())
    return {f"recall@{k}": 100.0 * h / n for k, h in hits.items()}


class RecallScorer(Scorer):
    """Recall@1/@5 of served answers: their vectors, retrieved among each other (targets: class
    indices of an ImageFolder tree)."""

    def __init__(self) -> None:
        self.vectors: list[list[float]] = []
        self.labels: list[int] = []

    def update(self, predictions: Sequence[EmbeddingResult], targets: Sequence[int]) -> None:
        for answer, label in zip(predictions, targets, strict=True):
            self.vectors.append(answer.vector)
            self.labels.append(int(label))

    def result(self) -> dict[str, float]:
        return recall_at_k(torch.tensor(self.vectors), torch.tensor(self.labels))


class EmbeddingPlugin(ImageFolderData, EvaluationHooks, TrainingHooks, TaskPlugin):
    """Global image embeddings for retrieval and deduplication (unit vectors, cosine similarity).

    The data is an ImageFolder tree ``root/<split>/<class>/<image>`` (same-class images are
    positives), so :class:`~splitserve.plugins.ImageFolderData` supplies the data hooks:
    ``data_layout``, ``build_dataset``, ``collate`` (targets: class indices) and ``eval_samples``
    (every image with its class index: the positives :class:`RecallScorer` looks for).
    """

    name = "embedding"
    aliases = ("embed",)
    description = "Global image embedding for retrieval: an L2-normalised vector per image."
    response_model = EmbeddingResult
    metric_name = "recall@1"  # training hooks from here on
    metric_label = "recall@1 (%)"  # evaluation hooks

    # -- serving -------------------------------------------------------------------------
    # feature_spec() is inherited: the head consumes h of the bundle's backbone (64 channels for
    # resnet18/34, 256 for resnet50/101) at stride 4, which is what every splitserve codec rebuilds.

    def resolve_config(self, backbone: str, stored: Mapping[str, Any]) -> dict:
        """Optional: defaults merged with what the bundle stored (``tasks.embedding.config``), checked
        once; build_head and predict receive the result."""
        check_arch(backbone)
        cfg = {"dim": DEFAULT_DIM, **stored}
        dim = cfg["dim"]
        if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= MAX_DIM:
            raise PluginError(f"embedding: dim must be an integer in 1..{MAX_DIM}, got {dim!r}")
        return cfg

    def build_head(self, backbone: str, config: Mapping[str, Any]) -> EmbeddingHead:
        return EmbeddingHead(backbone, config["dim"])

    @torch.no_grad()
    def predict(self, head: nn.Module, features: Tensor, metas: Sequence[ImageMeta],
                config: Mapping[str, Any]) -> list[EmbeddingResult]:
        """One forward pass for the whole batch; an embedding does not depend on the image's
        original size, so ``metas`` only fixes how many answers to return."""
        vectors = head(features).float().cpu()
        space = head.space_id()
        return [EmbeddingResult(space=space, dim=head.dim, vector=v) for v in vectors.tolist()]

    # -- training hooks -------------------------------------------------------------------
    # build_teacher() is inherited: ImageNet weights (``weights="DEFAULT"``) go into head.tail;
    # GeM and the projection start fresh and are learned by the contrastive loss. build_dataset() and
    # collate() come from ImageFolderData.

    def head_output(self, head: nn.Module, features: Tensor, batch: TaskBatch) -> Tensor:
        return head(features)

    def loss(self, head: nn.Module, features: Tensor, batch: TaskBatch, *, teacher_output: Any = None,
             options: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
        """``supcon``: supervised contrastive loss (option ``contrastive_temperature``, default 0.1).
        With a teacher, ``(1-kd_alpha)*supcon + kd_alpha*kd`` where ``kd`` is the mean squared
        difference between the batch's cosine-similarity matrices of student and teacher
        (relational distillation: it does not need the two projections to agree)."""
        options = options or {}
        temperature = float(options.get("contrastive_temperature", 0.1))
        alpha = float(options.get("kd_alpha", 0.5))
        if temperature <= 0 or not 0.0 <= alpha <= 1.0:
            raise PluginError(
                f"embedding: need contrastive_temperature > 0 and 0 <= kd_alpha <= 1, got {temperature}, {alpha}"
            )
        z = head(features)
        targets = batch.targets.to(z.device)
        supcon = supervised_contrastive_loss(z, targets, temperature)
        if teacher_output is None:
            return {"supcon": supcon}
        t = teacher_output.detach().to(z.device).float()
        kd = F.mse_loss(z.float() @ z.float().T, t @ t.T)
        return {"supcon": (1.0 - alpha) * supcon, "kd": alpha * kd}

    @torch.no_grad()
    def evaluate(self, head: nn.Module, features_fn: FeatureFn, batches: Iterable[TaskBatch], *,
                 dataset: Dataset | None = None) -> dict[str, float]:
        """Leave-one-out retrieval over the evaluation set, in percent: recall@k is the share of
        images whose k nearest other images (cosine similarity) include one of the same class."""
        vectors, labels = [], []
        with evaluating(head) as device:  # eval mode here, the caller's mode back after
            for batch in batches:
                vectors.append(head(features_fn(batch.images.to(device))).float().cpu())
                labels.append(torch.as_tensor(batch.targets).cpu())
        if not vectors:
            raise PluginError("embedding: evaluate needs at least two images")
        return recall_at_k(torch.cat(vectors), torch.cat(labels))

    # -- evaluation hooks (platform evaluate, platform bundle measure) --------------------
    # eval_samples() comes from ImageFolderData: every image of the split with its class index.

    def make_scorer(self, dataset: Dataset, config: Mapping[str, Any]) -> RecallScorer:
        return RecallScorer()
