"""Example splitserve task plugin: a global image embedding for retrieval.

The gateway decodes the edge's latent once into the feature ``h``; this plugin turns ``h`` into a
unit-length vector (ResNet layer2..4 → GeM pooling → linear projection → L2 normalisation), so a
vector index can be built from the same payload the other tasks answer from.
"""

from .head import EmbeddingHead, GeM
from .plugin import EmbeddingPlugin, supervised_contrastive_loss
from .schema import EmbeddingResult

__all__ = ["EmbeddingHead", "EmbeddingPlugin", "EmbeddingResult", "GeM", "supervised_contrastive_loss"]
