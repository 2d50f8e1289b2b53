"""Dataset registry. Images are uint8 (N, H, W, C): the same form the gateway decodes uploads
into, so `cascade_server.preprocess.normalize` is the one numeric path for both."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..registry import Registry


@dataclass(frozen=True)
class ImageData:
    x: np.ndarray  # uint8 (N, H, W, C)
    y: np.ndarray  # int64 (N,)
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.x.dtype != np.uint8 or self.x.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, H, W, C), got {self.x.dtype} {self.x.shape}"
            )
        if len(self.x) != len(self.y):
            raise ValueError("images and labels differ in length")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> ImageData:
        return ImageData(self.x[idx], self.y[idx], self.classes)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.x.tobytes())
        h.update(self.y.astype(np.int64).tobytes())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class Splits:
    train: ImageData
    val: ImageData  # held out: calibration of the threshold
    test: ImageData


def split(data: ImageData, *, seed: int, val: float = 0.2, test: float = 0.2) -> Splits:
    """Deterministic stratified split by seed."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(data))
    rest, test_idx = train_test_split(idx, test_size=test, random_state=seed, stratify=data.y)
    train_idx, val_idx = train_test_split(
        rest, test_size=val / (1 - test), random_state=seed, stratify=data.y[rest]
    )
    return Splits(data.subset(train_idx), data.subset(val_idx), data.subset(test_idx))


DATASETS: Registry = Registry("dataset")


@DATASETS.register("digits")
def digits() -> ImageData:
    """scikit-learn's bundled 8x8 digits (1797 images, no download). Pixel values 0..16 are
    scaled to 0..255, white ink on black, as a PNG of them would be."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = np.clip(np.round(raw.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    return ImageData(x, raw.target.astype(np.int64), tuple(str(c) for c in raw.target_names))
