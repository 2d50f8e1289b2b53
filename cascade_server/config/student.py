"""Where the student runs (gateway/student.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StudentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    # One intra-op thread suits a tiny model on a loaded event loop.
    threads: int = Field(default=1, gt=0)
