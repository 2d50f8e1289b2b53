"""Limits on what one request may cost: its body (gateway/parsing.py) and its decoding
(preprocess.py, through gateway/version.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class BodyLimits(BaseModel):
    """What the body parsers accept (gateway/parsing.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    # The whole body must arrive within this (408 otherwise), multipart included.
    body_timeout_s: float = Field(default=10.0, gt=0)
    max_batch: int = Field(default=64, gt=0)
    default_top_k: int = Field(default=5, gt=0)


class DecodeLimits(BaseModel):
    """How much decoding one request may cause (preprocess.py), and what runs off the loop."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_image_pixels: int = Field(default=4096 * 4096, gt=0)
    # Pixels across all images of one request.
    max_request_pixels: int = Field(default=2 * 4096 * 4096, gt=0)
    # A progressive JPEG costs pixels x scans to decode; encoders write about 10 scans.
    max_jpeg_scans: int = Field(default=64, ge=1)
    # A request over either bound is decoded on a thread (Pillow releases the GIL), so that it
    # does not stall the event loop and its probes; smaller ones inline, cheaper than a hop.
    decode_inline_bytes: int = Field(default=64 * 1024, ge=0)
    decode_inline_pixels: int = Field(default=256 * 256, ge=0)
    # Texts of a request longer than this in all are tokenised on a thread too.
    decode_inline_chars: int = Field(default=4096, ge=0)
    decode_threads: int = Field(default=2, ge=1)
    max_text_chars: int = Field(default=10_000, gt=0)
