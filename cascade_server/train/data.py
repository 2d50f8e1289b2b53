"""Dataset registry. Images are uint8 (N, H, W, C): the same form the gateway decodes uploads
into, so `cascade_server.preprocess.normalize` is the one numeric path for both."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..registry import Registry

log = logging.getLogger(__name__)


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

    def concat(self, other: ImageData) -> ImageData:
        return ImageData(
            np.concatenate([self.x, other.x]), np.concatenate([self.y, other.y]), self.classes
        )

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.x.tobytes())
        h.update(self.y.astype(np.int64).tobytes())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class Splits:
    train: ImageData | TextData
    val: ImageData | TextData  # held out: calibration of the threshold
    test: ImageData | TextData


def split(data, *, seed: int, val: float = 0.2, test: float = 0.2) -> Splits:
    """Deterministic stratified split by seed (images or texts)."""
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


def _read_idx(path: Path) -> np.ndarray:
    """IDX (MNIST format), optionally gzipped: big-endian header, then raw uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    zero, dtype, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype != 0x08:
        raise ValueError(f"{path}: not a uint8 IDX file")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(shape)


@DATASETS.register("idx")
def idx(
    path: str, split: str = "train", classes: list[str] | None = None, limit: int | None = None
) -> ImageData:
    """MNIST-format IDX files in `path`: `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`.
    `split` is train or test (t10k). `limit` keeps the first N (quick runs)."""
    root = Path(path)
    prefix = {"train": "train", "test": "t10k"}[split]

    def find(kind: str) -> Path:
        for name in (f"{prefix}-{kind}-ubyte.gz", f"{prefix}-{kind}-ubyte"):
            if (root / name).is_file():
                return root / name
        raise FileNotFoundError(f"no {prefix}-{kind}-ubyte[.gz] in {root}")

    x = _read_idx(find("images-idx3"))[..., None]
    y = _read_idx(find("labels-idx1")).astype(np.int64)
    if limit:
        x, y = x[:limit], y[:limit]
    n_classes = int(y.max()) + 1
    names = tuple(classes) if classes else _FASHION if "fashion" in str(root) else None
    return ImageData(np.ascontiguousarray(x), y, names or tuple(str(i) for i in range(n_classes)))


_FASHION = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _data_cache_dir() -> Path:
    return Path(os.environ.get("CASCADE_DATA_CACHE", "~/.cache/cascade-server")).expanduser()


@DATASETS.register("imagefolder")
def imagefolder(
    path: str,
    size: int = 32,
    channels: int = 3,
    split: str | None = None,
    cache: bool = True,
    progress: bool = True,
) -> ImageData:
    """One subfolder per class (sorted names = class ids), images resized to `size`. With
    `split` (e.g. train, test), the classes are under `path/split`. Decoded once: the arrays are
    cached as .npz (in $CASCADE_DATA_CACHE, default ~/.cache/cascade-server), keyed by the
    files' names, sizes and modification times, so a 50k-image folder is not decoded again."""
    root = Path(path) / split if split else Path(path)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{root} needs at least 2 class subfolders")
    files = [
        (label, file)
        for label, name in enumerate(classes)
        for file in sorted((root / name).iterdir())
        if file.suffix.lower() in _IMAGE_SUFFIXES
    ]
    key = hashlib.sha256(f"{size}:{channels}".encode())
    for label, file in files:
        st = file.stat()
        key.update(f"{label}/{file.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    cached = _data_cache_dir() / f"imagefolder-{key.hexdigest()[:20]}.npz"
    if cache and cached.is_file():
        with np.load(cached, allow_pickle=False) as f:
            return ImageData(f["x"], f["y"], tuple(classes))

    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image
    from tqdm.auto import tqdm

    def decode(file: Path) -> np.ndarray:
        with Image.open(file) as opened:
            img = opened.convert("L" if channels == 1 else "RGB").resize((size, size))
            arr = np.asarray(img, dtype=np.uint8)
        return arr[..., None] if arr.ndim == 2 else arr

    # Pillow releases the GIL while decoding: threads use every core.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        xs = list(
            tqdm(
                pool.map(decode, (f for _, f in files)),
                total=len(files),
                desc=f"decoding {root}",
                disable=not progress,
            )
        )
    x = np.stack(xs)
    y = np.asarray([label for label, _ in files], dtype=np.int64)
    if cache:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp.npz")
            np.savez(tmp, x=x, y=y)
            tmp.replace(cached)
        except OSError as exc:  # a read-only cache is a slower run, not a failure
            log.warning("could not cache %s: %s", cached, exc)
    return ImageData(x, y, tuple(classes))


@DATASETS.register("npz")
def npz(path: str, classes: list[str] | None = None) -> ImageData:
    """A numpy .npz with `x` (uint8 N,H,W[,C]) and `y` (int labels); optional `classes`."""
    with np.load(path, allow_pickle=False) as f:
        x, y = f["x"], f["y"].astype(np.int64)
        names = [str(c) for c in f["classes"]] if "classes" in f.files else None
    if x.ndim == 3:
        x = x[..., None]
    names = classes or names or [str(i) for i in range(int(y.max()) + 1)]
    return ImageData(np.ascontiguousarray(x.astype(np.uint8)), y, tuple(names))


@dataclass(frozen=True)
class TextData:
    texts: tuple[str, ...]
    y: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> TextData:
        return TextData(tuple(self.texts[i] for i in idx), self.y[idx], self.classes)

    def concat(self, other: TextData) -> TextData:
        return TextData(self.texts + other.texts, np.concatenate([self.y, other.y]), self.classes)

    def fingerprint(self) -> str:
        h = hashlib.sha256("\x1f".join(self.texts).encode())
        h.update(self.y.astype(np.int64).tobytes())
        return h.hexdigest()[:16]


def _text_rows(rows, text_field: str, label_field: str, classes: list[str] | None) -> TextData:
    texts, labels = [], []
    for row in rows:
        texts.append(str(row[text_field]))
        labels.append(str(row[label_field]))
    names = list(classes) if classes else sorted(set(labels))
    index = {c: i for i, c in enumerate(names)}
    unknown = sorted(set(labels) - index.keys())
    if unknown:
        raise ValueError(f"labels not in the class list: {unknown[:5]}")
    return TextData(tuple(texts), np.asarray([index[c] for c in labels], np.int64), tuple(names))


def _class_list(classes: list[str] | str | None) -> list[str] | None:
    if isinstance(classes, str):  # a JSON file with the names in class-id order
        return list(json.loads(Path(classes).read_text()))
    return classes


@DATASETS.register("csv")
def csv_text(
    path: str,
    text_field: str = "text",
    label_field: str = "category",
    classes: list[str] | str | None = None,
) -> TextData:
    """Text classification CSV (e.g. Banking77's `text,category`). `classes`: a list or a
    JSON file fixing class ids; default: sorted label names."""
    with open(path, newline="", encoding="utf-8") as fh:
        return _text_rows(csv.DictReader(fh), text_field, label_field, _class_list(classes))


@DATASETS.register("jsonl")
def jsonl_text(
    path: str,
    text_field: str = "text",
    label_field: str = "label",
    classes: list[str] | str | None = None,
) -> TextData:
    """One JSON object per line with a text and a label field."""
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return _text_rows(rows, text_field, label_field, _class_list(classes))


def load(name: str, **kwargs) -> ImageData | TextData:
    return DATASETS.get(name)(**kwargs)


@DATASETS.register("intents")
def intents(n: int = 2400, seed: int = 0) -> TextData:
    """A generated banking-intent corpus (8 intents; no download): the text demo's data."""
    from .corpus import generate

    texts, labels, names = generate(n, seed)
    return TextData(tuple(texts), np.asarray(labels, np.int64), tuple(names))
