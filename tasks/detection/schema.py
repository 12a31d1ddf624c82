"""Response models of the detection task (FastAPI publishes them in the OpenAPI schema)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Detection(BaseModel):
    """One detected object."""

    box: list[float] = Field(
        description="Bounding box [x1, y1, x2, y2] in pixels of the original image (before the edge resized it).",
        min_length=4,
        max_length=4,
    )
    score: float = Field(description="Confidence (sigmoid of the class logit).", ge=0.0, le=1.0)
    index: int = Field(description="Class index of the head's output.", ge=0)
    label: str = Field(description="Human-readable class name.")


class DetectionResult(BaseModel):
    """Detections of one image after score thresholding and non-maximum suppression, best first."""

    detections: list[Detection] = Field(description="Detected objects in decreasing score.")
