"""Response model of the embedding task: FastAPI publishes it in ``/openapi.json``, the gateway in
``GET /v1/tasks`` (``response_schema``)."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator


class EmbeddingResult(BaseModel):
    """A unit-length embedding of one image; the cosine similarity of two is their dot product."""

    space: str = Field(
        description="Identifier of the embedding space (16 hex digits of a SHA-256 over the head's "
        "weights). Vectors are comparable only when their spaces are equal: re-index after a new "
        "head is deployed.",
        pattern=r"^[0-9a-f]{16}$",
    )
    dim: int = Field(description="Number of components of `vector`.", ge=1)
    vector: list[float] = Field(
        description="The embedding, L2-normalised (unit length): cosine similarity = dot product."
    )

    @model_validator(mode="after")
    def _dim_matches(self) -> "EmbeddingResult":
        if len(self.vector) != self.dim:
            raise ValueError(f"vector has {len(self.vector)} components, dim says {self.dim}")
        return self
