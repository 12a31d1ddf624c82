"""Response models of the classification task (FastAPI publishes them in the OpenAPI schema)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ClassScore(BaseModel):
    """One of the most probable classes."""

    index: int = Field(description="Class index of the head's output.", ge=0)
    label: str = Field(description="Human-readable class name.")
    probability: float = Field(description="Softmax probability of this class.", ge=0.0, le=1.0)


class ClassificationResult(BaseModel):
    """The ``top_k`` most probable classes of one image, most probable first."""

    top: list[ClassScore] = Field(description="Most probable classes, in decreasing probability.")
