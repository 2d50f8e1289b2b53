"""Prepare: the experiment's data loaded, split deterministically by seed and normalised
(images) or tokenised (texts) once; the run directory started (config + provenance)."""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ...bundle import ImagePreprocess, TextPreprocess
from ...preprocess import normalize
from ..config import ExperimentConfig, Recipe, dump_config
from ..data import ImageData, TextData, load, split
from ..engine import FitConfig, distributed
from ..records import RunDir


@dataclass
class Prepared:
    config: ExperimentConfig
    spec: ImagePreprocess | TextPreprocess
    # Per split: float32 NCHW normalised images, or int64 (N, max_length) token ids.
    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    classes: tuple[str, ...]
    fingerprint: str
    tokenizer: Any = None  # text: the trained tokenizers.Tokenizer

    @property
    def modality(self) -> Literal["image", "text"]:
        return self.spec.kind

    @property
    def in_shape(self) -> tuple[int, ...]:
        """(C, H, W) for images; (vocab size, max length) for texts."""
        if isinstance(self.spec, TextPreprocess):
            return (self.tokenizer.get_vocab_size(), self.spec.max_length)
        return (self.spec.channels, self.spec.height, self.spec.width)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fit_config(self, section: Recipe | None = None, *, progress: bool = True) -> FitConfig:
        s = section or self.config.fit
        recipe = {f: getattr(s, f) for f in Recipe.model_fields}
        return FitConfig(
            **recipe, seed=self.config.seed, device=self.config.device, progress=progress
        )


def prepare(config: ExperimentConfig, run_dir: Path | None = None) -> Prepared:
    """Loads the data, splits it deterministically by seed, and normalises (images) or
    tokenises (texts) it once. A text run's tokenizer is trained on the training split and kept
    in the run directory, so every later stage encodes with the very same one."""
    data = load(config.data.name, **config.data.params)
    if isinstance(data, TextData):
        return _prepare_text(config, data, run_dir)
    splits = _splits(config, data)
    h, w, c = splits["train"].x.shape[1:]
    if config.preprocess.mean is not None and config.preprocess.std is not None:
        mean, std = tuple(config.preprocess.mean), tuple(config.preprocess.std)
    else:  # measured on the training split only
        pixels = splits["train"].x.reshape(-1, c).astype(np.float64) / 255.0
        mean = tuple(round(float(v), 4) for v in pixels.mean(0))
        std = tuple(round(float(v), 4) for v in np.maximum(pixels.std(0), 1e-3))
    spec = ImagePreprocess(height=h, width=w, channels=c, mean=mean, std=std)
    fp = hashlib.sha256("".join(s.fingerprint() for s in splits.values()).encode()).hexdigest()
    return Prepared(
        config=config,
        spec=spec,
        x={k: normalize(v.x, spec) for k, v in splits.items()},
        y={k: v.y for k, v in splits.items()},
        classes=data.classes,
        fingerprint=fp[:16],
    )


def _splits(config: ExperimentConfig, data: ImageData | TextData) -> dict:
    """train/val/test by seed. With `data.test_params`, the test split is that separate set and
    the carved-out test part goes back to training."""
    parts = split(data, seed=config.seed, val=config.split.val, test=config.split.test)
    if config.data.test_params is None:
        return {"train": parts.train, "val": parts.val, "test": parts.test}
    test = load(config.data.name, **{**config.data.params, **config.data.test_params})
    # train and test parts are of one type (the dataset's), which the union hides.
    train = parts.train.concat(parts.test)  # type: ignore[arg-type]
    return {"train": train, "val": parts.val, "test": test}


def _prepare_text(config: ExperimentConfig, data: TextData, run_dir: Path | None) -> Prepared:
    from ...preprocess import encode_texts, load_tokenizer
    from ..text import normalization_label, train_tokenizer

    splits = _splits(config, data)
    fp = hashlib.sha256("".join(s.fingerprint() for s in splits.values()).encode()).hexdigest()[:16]
    t = config.text
    spec = TextPreprocess(
        max_length=t.max_length,
        lowercase=t.lowercase,
        model=t.model,
        normalization=normalization_label(t.lowercase),
    )
    key = json.dumps([fp, t.model_dump(mode="json")], sort_keys=True)
    saved = run_dir / spec.tokenizer_file if run_dir is not None else None
    key_file = run_dir / RunDir.TOKENIZER_KEY if run_dir is not None else None
    if (
        saved is not None
        and key_file is not None
        and saved.is_file()
        and key_file.is_file()
        and key_file.read_text() == key
    ):
        tokenizer = load_tokenizer(saved, spec)
    else:
        if t.tokenizer is not None:
            tokenizer = load_tokenizer(t.tokenizer, spec)
        else:
            tokenizer = train_tokenizer(splits["train"].texts, t.vocab_size, t.model, t.lowercase)
        if saved is not None and key_file is not None and distributed()[0] == 0:
            saved.parent.mkdir(parents=True, exist_ok=True)
            tokenizer.save(str(saved))
            key_file.write_text(key)
        tokenizer = (
            load_tokenizer(saved, spec)
            if saved is not None and saved.is_file()
            else _configured(tokenizer, spec)
        )
    x = {k: encode_texts(tokenizer, list(v.texts))[0] for k, v in splits.items()}
    return Prepared(
        config=config,
        spec=spec,
        x=x,
        y={k: v.y for k, v in splits.items()},
        classes=data.classes,
        fingerprint=fp,
        tokenizer=tokenizer,
    )


def _configured(tokenizer: Any, spec: TextPreprocess) -> Any:
    tokenizer.enable_truncation(spec.max_length)
    tokenizer.enable_padding(length=spec.max_length, pad_id=spec.pad_id, pad_token="[PAD]")
    return tokenizer


def config_key(config: ExperimentConfig, stage: str) -> str:
    """Checkpoints resume only under the configuration that wrote them (for the teacher: the
    sections that shape it)."""
    if stage == "teacher":
        text = json.dumps(
            config.model_dump(
                mode="json", include={"seed", "device", "data", "split", "preprocess", "teacher"}
            ),
            sort_keys=True,
        )
    else:
        text = dump_config(config)
    return hashlib.sha256((text + stage).encode()).hexdigest()[:16]


def start_run(run_dir: Path, config: ExperimentConfig, prep: Prepared) -> None:
    """The run directory with the config as run and its provenance (rank 0 only)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RunDir.CONFIG).write_text(dump_config(config))
    RunDir(run_dir).update_record(
        name=config.name,
        seed=config.seed,
        data_fingerprint=prep.fingerprint,
        preprocess=prep.spec.model_dump(),
        torch=torch.__version__,
        python=platform.python_version(),
        world_size=distributed()[1],
    )
