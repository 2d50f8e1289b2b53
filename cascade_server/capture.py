"""Captured items (the flywheel data): the shard format, its atomic writer and its reader.

The gateway (gateway/capture.py) writes delegated items and shadow samples here, off the
response path; training (`cascade-train distill --capture DIR`) reads them back. numpy and the
standard library only, so a training environment needs none of the web stack.

A shard is one `np.savez`-format archive, `DIR/<cascade>/capture-<unix_ms>-<pid>-<seq>.npz`, written
under a `*.tmp` name and renamed into place, so a reader never sees a partial file under the
final name. Its arrays: the preprocessed model inputs by their canonical names (`input` float32
(n, C, H, W) for images; `input_ids` and `attention_mask` int64 (n, L) for texts),
`teacher_probs` and `student_probs` float32 (n, classes), `margins` float32 (n,), `source` uint8
(n,) (0 delegated, 1 shadow sample) and `meta`, a 0-d unicode array of JSON. Nothing is pickled:
shards are read with `allow_pickle=False`, so a shard is data, never code. `prune` keeps a
directory within its age and size bounds, oldest shards first.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

log = logging.getLogger(__name__)

FORMAT = 1
SOURCES = ("delegated", "shadow")  # the `source` codes, by index
# The preprocessed inputs by modality: canonical name -> (dtype, dimensions).
INPUTS: dict[str, dict[str, tuple[type, int]]] = {
    "image": {"input": (np.float32, 4)},
    "text": {"input_ids": (np.int64, 2), "attention_mask": (np.int64, 2)},
}
_ROWS = ("teacher_probs", "student_probs", "margins", "source")
_NAME = re.compile(r"^capture-(\d+)-(\d+)-(\d+)\.npz$")
_SEQ = itertools.count()  # per process: with the pid, names never collide across workers
_STALE_TMP_S = 3600.0  # a *.tmp this old is a crashed writer's: no live write takes that long


@dataclass(frozen=True)
class Shard:
    path: Path
    meta: dict[str, Any]
    inputs: dict[str, np.ndarray]
    teacher_probs: np.ndarray
    student_probs: np.ndarray
    margins: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return int(self.margins.shape[0])


def shard_paths(directory: Path) -> list[Path]:
    """The shards under `directory` (any depth), oldest first by the time in their names."""

    def key(path: Path) -> tuple[int, int, int, str]:
        m = _NAME.match(path.name)
        assert m is not None
        return int(m[1]), int(m[2]), int(m[3]), str(path)

    return sorted((p for p in directory.rglob("capture-*.npz") if _NAME.match(p.name)), key=key)


@dataclass(frozen=True)
class Pruned:
    retention: int  # shards deleted for their age
    size_cap: int  # shards deleted to fit the size bound
    bytes: int  # the size of the shards left


def prune(directory: Path, max_bytes: int, retention_s: float | None) -> Pruned:
    """Deletes the shards in `directory` older than `retention_s`, then the oldest until the
    rest fit `max_bytes`, and stale `*.tmp` files. Several gateway workers prune the same
    directory: each sees the same files and makes the same decisions, and a file another one
    deleted first is neither an error nor counted twice."""
    now = time.time()
    for tmp in directory.glob("capture-*.tmp"):
        if now - _stat(tmp)[1] > _STALE_TMP_S:
            _delete(tmp)
    shards = [(p, _stat(p)[0]) for p in shard_paths(directory)]
    total = sum(size for _, size in shards)
    deleted = {"retention": 0, "size_cap": 0}
    for path, size in shards:  # oldest first
        m = _NAME.match(path.name)
        assert m is not None
        if retention_s is not None and now - int(m[1]) / 1000 > retention_s:
            why = "retention"
        elif total > max_bytes:
            why = "size_cap"
        else:
            break
        total -= size
        deleted[why] += _delete(path)
    return Pruned(deleted["retention"], deleted["size_cap"], total)


def _stat(path: Path) -> tuple[int, float]:
    """(size, mtime); (0, now) for a file deleted meanwhile."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return 0, time.time()
    return st.st_size, st.st_mtime


def _delete(path: Path) -> int:
    """1 if this call deleted the file, 0 if someone else did first."""
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    return 1


def problem(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> str | None:
    """Why these arrays are not a valid shard (None: they are)."""
    if meta.get("format") != FORMAT:
        return f"unknown format {meta.get('format')!r} (this reader knows {FORMAT})"
    classes, modality = meta.get("classes"), meta.get("modality")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        return "meta.classes is not a list of names"
    for key in ("cascade", "student_version", "teacher_version"):
        if not isinstance(meta.get(key), str):
            return f"meta.{key} is not a string"
    if not isinstance(meta.get("created"), int | float) or modality not in INPUTS:
        return "meta.created is not a number, or meta.modality is not image or text"
    spec = {**INPUTS[modality], "teacher_probs": (np.float32, 2), "student_probs": (np.float32, 2)}
    spec.update(margins=(np.float32, 1), source=(np.uint8, 1))
    if set(arrays) != set(spec):
        return f"arrays {sorted(arrays)}, expected {sorted(spec)}"
    for name, (dtype, ndim) in spec.items():
        a = arrays[name]
        if a.dtype != dtype or a.ndim != ndim:
            return f"{name} is {a.dtype} {a.shape}, expected {np.dtype(dtype)} with {ndim} dims"
    rows = {k: len(a) for k, a in arrays.items()}
    if min(rows.values()) == 0 or len(set(rows.values())) > 1:
        return f"no rows, or rows that disagree: {rows}"
    for name in ("teacher_probs", "student_probs"):
        p = arrays[name]
        if p.shape[1] != len(classes):
            return f"{name} has {p.shape[1]} columns for {len(classes)} classes"
        if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(1), 1, atol=1e-3):
            return f"{name} are not finite probabilities summing to 1"
    if not np.isfinite(arrays["margins"]).all() or (arrays["source"] >= len(SOURCES)).any():
        return "margins not finite, or a source code unknown"
    if modality == "image" and not np.isfinite(arrays["input"]).all():
        return "input is not finite"
    if modality == "text" and arrays["input_ids"].shape != arrays["attention_mask"].shape:
        return "input_ids and attention_mask differ in shape"
    return None


def write_shard(
    directory: Path,
    *,
    cascade: str,
    modality: str,
    classes: Sequence[str],
    inputs: Mapping[str, np.ndarray],
    teacher_probs: np.ndarray,
    student_probs: np.ndarray,
    margins: np.ndarray,
    source: np.ndarray,
    student_version: str,
    teacher_version: str,
    created: float | None = None,
) -> Path:
    """Writes one shard into `directory` (which must exist) atomically and returns its path.
    Raises ValueError for arrays that are not a valid shard (nothing is written) and OSError
    for a failed write (no partial file is left under either name)."""
    created = time.time() if created is None else created
    meta = dict(format=FORMAT, cascade=cascade, modality=modality, classes=list(classes))
    meta.update(student_version=student_version, teacher_version=teacher_version)
    meta["created"] = created
    arrays = {**inputs, "teacher_probs": teacher_probs, "student_probs": student_probs}
    arrays.update(margins=margins, source=source)
    reason = problem(meta, arrays)
    if reason is not None:
        raise ValueError(f"not a valid capture shard: {reason}")
    path = directory / f"capture-{int(created * 1000)}-{os.getpid()}-{next(_SEQ)}.npz"
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            _savez(f, {"meta": np.array(json.dumps(meta)), **arrays})
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the write's own error is the one to report
            tmp.unlink(missing_ok=True)
        raise
    return path


def _savez(f: BinaryIO, arrays: Mapping[str, np.ndarray]) -> None:
    """What `np.savez` writes (a zip of `.npy` members), but closed on failure too: np.savez
    leaves its zip open when a write fails (a full disk), to fail again when collected."""
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, array in arrays.items():
            with z.open(name + ".npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(  # type: ignore[no-untyped-call]
                    member, np.asanyarray(array), allow_pickle=False
                )


def read_shard(path: Path) -> Shard:
    """One shard; raises ValueError (or OSError, zipfile's errors) when it is not valid."""
    with open(path, "rb") as f:  # ours to close, whatever np.load makes of the bytes
        archive = np.load(f, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with archive:
            arrays = {name: archive[name] for name in archive.files}
    raw = arrays.pop("meta", None)
    if raw is None or raw.ndim != 0 or raw.dtype.kind != "U":
        raise ValueError("no meta string")
    meta = json.loads(str(raw[()]))
    if not isinstance(meta, dict):
        raise ValueError("meta is not a JSON object")
    reason = problem(meta, arrays)
    if reason is not None:
        raise ValueError(reason)
    inputs = {k: arrays[k] for k in INPUTS[meta["modality"]]}
    return Shard(path, meta, inputs, *(arrays[k] for k in _ROWS))


def iter_shards(directory: Path, cascade: str | None = None) -> Iterator[Shard]:
    """Every valid shard under `directory` (or `directory/<cascade>`), oldest first. A shard
    that cannot be read or is not valid is skipped with a warning naming it and why: a capture
    directory is written by running gateways, and one bad file must not stop a training run.
    A directory that does not exist raises FileNotFoundError (a mistyped path is no capture)."""
    root = directory if cascade is None else directory / cascade
    if not root.is_dir():
        raise FileNotFoundError(f"no capture directory {root}")
    for path in shard_paths(root):
        try:
            yield read_shard(path)
        except Exception as exc:  # any file can be anything: truncated, foreign, hand-edited
            log.warning("capture shard %s skipped: %s", path, exc or type(exc).__name__)


def read_capture(directory: Path, cascade: str | None = None) -> list[Shard]:
    return list(iter_shards(directory, cascade))


def concat(shards: Sequence[Shard]) -> Shard:
    """The shards' rows as one Shard, in order. Shards that do not match the first (another
    cascade, other classes, other inputs or input shapes) are skipped with a warning. The merged
    meta lists `student_versions`, `teacher_versions` and `shards` instead of one version; its
    path is the first shard's directory. Raises ValueError for no shards."""
    if not shards:
        raise ValueError("no capture shards to concatenate")
    first = shards[0]

    def signature(s: Shard) -> tuple[object, ...]:
        shapes = sorted((k, v.shape[1:]) for k, v in s.inputs.items())
        return s.meta["cascade"], s.meta["modality"], s.meta["classes"], shapes

    keep = [first]
    for s in shards[1:]:
        if signature(s) == signature(first):
            keep.append(s)
        else:
            log.warning("capture shard %s skipped: it does not match %s", s.path, first.path)
    meta = {k: first.meta[k] for k in ("format", "cascade", "modality", "classes")}
    meta["created"] = min(s.meta["created"] for s in keep)
    meta["shards"] = len(keep)
    for key in ("student_version", "teacher_version"):
        meta[key + "s"] = sorted({s.meta[key] for s in keep})
    inputs = {k: np.concatenate([s.inputs[k] for s in keep]) for k in first.inputs}
    rows = (np.concatenate([getattr(s, k) for s in keep]) for k in _ROWS)
    return Shard(first.path.parent, meta, inputs, *rows)
