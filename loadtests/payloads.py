"""Labelled payloads for the load tests, by the names users type (`--image-data`, `--text-data`).

Each source gives (payload JSON, true label name) pairs; the label is compared with the
gateway's answer, so accuracy is measured under load. Data comes from ../shared/data
(Fashion-MNIST, Banking77: their test splits) or is generated (digits, intents: the demo's).
Loaded through cascade-train's dataset registry (numpy only, no torch), so class names are the
ones the bundles were trained with.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from cascade_server.train.data import load

SHARED = Path(
    os.environ.get("CASCADE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
Labelled = list[tuple[dict[str, str], str]]


def _images(data, limit: int) -> Labelled:
    out = []
    for x, y in zip(data.x[:limit], data.y[:limit], strict=True):
        buf = io.BytesIO()
        Image.fromarray(x.squeeze(-1) if x.shape[-1] == 1 else x).save(buf, "PNG")
        out.append(({"image": base64.b64encode(buf.getvalue()).decode()}, data.classes[int(y)]))
    return out


def _texts(data, limit: int) -> Labelled:
    return [
        ({"text": t}, data.classes[int(y)])
        for t, y in zip(data.texts[:limit], data.y[:limit], strict=True)
    ]


def _shuffled(data, seed: int = 0):
    """The same data in a fixed random order, so a prefix covers every class."""
    order = np.random.default_rng(seed).permutation(len(data.y))
    if hasattr(data, "texts"):
        return type(data)(tuple(data.texts[i] for i in order), data.y[order], data.classes)
    return type(data)(data.x[order], data.y[order], data.classes)


SOURCES: dict[str, Callable[[int], Labelled]] = {
    "fashion_mnist": lambda n: _images(
        _shuffled(load("idx", path=str(SHARED / "fashion_mnist"), split="test")), n
    ),
    "digits": lambda n: _images(_shuffled(load("digits")), n),
    "banking77": lambda n: _texts(
        _shuffled(
            load(
                "csv",
                path=str(SHARED / "banking77" / "test.csv"),
                classes=str(SHARED / "banking77" / "categories.json"),
            )
        ),
        n,
    ),
    "intents": lambda n: _texts(_shuffled(load("intents", n=2400, seed=1)), n),
}


def labelled(name: str, limit: int = 1000) -> Labelled:
    try:
        source = SOURCES[name]
    except KeyError:
        raise ValueError(f"no payload source {name!r}; sources: {', '.join(SOURCES)}") from None
    return source(limit)
