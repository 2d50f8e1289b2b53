"""Capture of delegated items: the shard format and reader (cascade_server/capture.py) and the
gateway's writer (gateway/capture.py), on real files and a real writer thread."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cascade_server import capture as fmt
from cascade_server.capture import concat, read_capture, write_shard
from cascade_server.config.capture import CaptureConfig
from cascade_server.gateway.capture import Capture
from cascade_server.gateway.metrics import Metrics

CLASSES = ("a", "b", "c")


def rows(n: int, seed: int = 0, modality: str = "image") -> dict:
    rng = np.random.default_rng(seed)
    if modality == "image":
        inputs = {"input": rng.standard_normal((n, 1, 4, 4)).astype(np.float32)}
    else:
        ids = rng.integers(0, 50, (n, 6))
        inputs = {"input_ids": ids, "attention_mask": (ids > 5).astype(np.int64)}
    probs = rng.dirichlet(np.ones(len(CLASSES)), size=(2, n)).astype(np.float32)
    top = np.sort(probs[1], axis=1)
    return dict(
        tensors=inputs,
        teacher_probs=probs[0],
        student_probs=probs[1],
        margins=(top[:, -1] - top[:, -2]).astype(np.float32),
    )


def shard(directory: Path, n: int = 3, seed: int = 0, **kw) -> Path:
    modality = kw.pop("modality", "image")
    r = rows(n, seed, modality)
    fields = dict(cascade="c", modality=modality, classes=CLASSES, student_version="s1")
    fields.update(teacher_version="t1", source=np.zeros(n, np.uint8), inputs=r.pop("tensors"))
    return write_shard(directory, **{**fields, **r, **kw})


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics._registry.get_sample_value(name, labels) or 0.0  # type: ignore[union-attr]


def kept(metrics: Metrics) -> float:
    return value(metrics, "cascade_capture_items_total", cascade="c", result="kept", reason="")


def dropped(metrics: Metrics, reason: str) -> float:
    labels = dict(cascade="c", result="dropped", reason=reason)
    return value(metrics, "cascade_capture_items_total", **labels)


async def until(condition: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def capture(directory: Path, metrics: Metrics, **kw) -> Capture:
    config = CaptureConfig(directory=directory, **{"flush_s": 0.05, **kw})
    return Capture("c", config, metrics, "image", CLASSES, seed=0)


def offer(cap: Capture, n: int, seed: int = 0, source: str = "delegated", version: str = "s1"):
    cap.offer(**rows(n, seed), source=source, student_version=version, teacher_version="t1")


# The format.
@pytest.mark.parametrize("modality", ["image", "text"])
def test_shards_round_trip_exactly_and_oldest_first(tmp_path, modality):
    now = time.time()
    paths = [shard(tmp_path, 3, seed=i, modality=modality, created=now - 10 * i) for i in range(3)]
    got = read_capture(tmp_path)
    assert [s.path for s in got] == paths[::-1]  # oldest first
    r, s = rows(3, 0, modality), got[-1]
    assert s.inputs.keys() == r["tensors"].keys()
    for k, v in r["tensors"].items():
        np.testing.assert_array_equal(s.inputs[k], v)
        assert s.inputs[k].dtype == v.dtype
    for k in ("teacher_probs", "student_probs", "margins"):
        np.testing.assert_array_equal(getattr(s, k), r[k])
    assert s.source.dtype == np.uint8 and len(s) == 3
    assert s.meta == dict(
        format=1, cascade="c", modality=modality, classes=list(CLASSES),
        student_version="s1", teacher_version="t1", created=now,
    )  # fmt: skip
    merged = concat(got)
    assert len(merged) == 9 and merged.meta["shards"] == 3
    assert merged.meta["student_versions"] == ["s1"]
    np.testing.assert_array_equal(merged.margins[-3:], r["margins"])


def test_write_refuses_what_is_not_a_shard_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="probabilities"):
        shard(tmp_path, teacher_probs=np.full((3, 3), 2.0, np.float32))
    with pytest.raises(ValueError, match="float32"):
        shard(tmp_path, margins=np.zeros(3))
    assert list(tmp_path.iterdir()) == []


def test_the_reader_skips_bad_shards_with_a_warning_and_keeps_the_good(tmp_path, caplog):
    good = [shard(tmp_path, seed=i) for i in range(2)]
    arrays = dict(np.load(good[0]))
    meta = json.loads(str(arrays["meta"]))

    def bad(name: str, **changes: object) -> Path:
        path = tmp_path / f"capture-{int(time.time() * 1000)}-1-{name}.npz"
        kept = {k: v for k, v in {**arrays, **changes}.items() if v is not None}
        np.savez(path, **kept)
        return path

    truncated = bad("1")
    truncated.write_bytes(good[1].read_bytes()[:300])
    (tmp_path / "capture-2-1-2.npz").write_text("not a zip file")
    missing = bad("3", margins=None)
    mismatched = bad("4", margins=arrays["margins"][:2])
    pickled = bad("5", source=np.array([0, 0, {"x": 1}], dtype=object))
    bad_json = bad("6", meta=np.array("{not json"))
    future = bad("7", meta=np.array(json.dumps({**meta, "format": 2})))
    wrong_dtype = bad("8", input=arrays["input"].astype(np.float64))
    non_finite = bad("9", student_probs=np.full((3, 3), np.nan, np.float32))
    shutil.copy(good[0], tmp_path / (good[0].name + ".tmp"))  # a write in progress: ignored
    skipped = [truncated, tmp_path / "capture-2-1-2.npz", missing, mismatched, pickled]
    skipped += [bad_json, future, wrong_dtype, non_finite]
    with caplog.at_level(logging.WARNING, logger="cascade_server.capture"):
        got = read_capture(tmp_path)
    assert sorted(s.path for s in got) == sorted(good)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == len(skipped)
    for path in skipped:
        assert any(str(path) in w for w in warned), path
    assert any("pickle" in w for w in warned) and any("format 2" in w for w in warned)
    assert zipfile.is_zipfile(good[0])  # a shard is a plain npz archive
    with pytest.raises(FileNotFoundError):
        read_capture(tmp_path / "nowhere")


def test_concat_skips_shards_of_another_cascade_or_classes(tmp_path, caplog):
    a = shard(tmp_path)
    other = shard(tmp_path, classes=("x", "y", "z"))
    merged = concat(read_capture(tmp_path))
    assert len(merged) == 3 and str(other) in caplog.text and merged.path == a.parent
    with pytest.raises(ValueError):
        concat([])


# The gateway's writer.
def test_offer_returns_at_once_and_the_writer_thread_writes_within_flush_s(tmp_path, monkeypatch):
    metrics, writers = Metrics(), []
    real = fmt.write_shard

    def recorded(*args, **kwargs):
        writers.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(fmt, "write_shard", recorded)
    cap = capture(tmp_path / "cap", metrics, shard_items=4)
    assert cap.enabled

    async def main() -> None:
        cap.start()
        r = rows(10)
        started = time.monotonic()
        cap.offer(**r, source="delegated", student_version="s1", teacher_version="t1")
        assert time.monotonic() - started < 0.5
        r["tensors"]["input"][:] = 0  # the caller reuses its arrays
        r["teacher_probs"][:] = 0
        await until(lambda: kept(metrics) == 10)
        await cap.close()

    asyncio.run(main())
    got = read_capture(tmp_path / "cap", "c")
    assert [len(s) for s in got] == [4, 4, 2]  # shard_items, then the partial one after flush_s
    merged = concat(got)
    np.testing.assert_array_equal(merged.inputs["input"], rows(10)["tensors"]["input"])
    np.testing.assert_array_equal(merged.teacher_probs, rows(10)["teacher_probs"])
    assert threading.main_thread() not in writers and len(writers) == 3


def test_one_shard_holds_one_version_pair_and_sources_are_coded(tmp_path):
    metrics = Metrics()
    cap = capture(tmp_path, metrics, flush_s=10.0)
    for version in ("s1", "s2", "s1"):
        offer(cap, 2, version=version)
    offer(cap, 2, source="shadow")

    async def main() -> None:
        cap.start()
        await cap.close()  # writes what is queued

    asyncio.run(main())
    got = read_capture(tmp_path)
    assert [(s.meta["student_version"], len(s)) for s in got] == [("s1", 6), ("s2", 2)]
    assert got[0].source.tolist() == [0, 0, 0, 0, 1, 1]
    assert kept(metrics) == 8


def test_sampling_and_shadow_opt_out(tmp_path):
    metrics = Metrics()
    cap = capture(tmp_path, metrics, fraction=0.5, shadow=False, queue_items=10_000)
    offer(cap, 2000)
    offer(cap, 50, source="shadow")  # not kept: shadow=False
    assert 850 < cap._queued < 1150
    assert not capture(tmp_path, metrics, fraction=0).enabled
    assert not Capture("c", CaptureConfig(), metrics, "image", CLASSES).enabled


def test_a_full_queue_drops_new_rows_counted(tmp_path):
    metrics = Metrics()
    cap = capture(tmp_path, metrics, queue_items=5)
    offer(cap, 3)
    offer(cap, 3)  # two fit
    offer(cap, 2)
    assert dropped(metrics, "queue_full") == 3 and cap._queued == 5

    async def main() -> None:
        cap.start()
        await cap.close()

    asyncio.run(main())
    assert kept(metrics) == 5 and sum(len(s) for s in read_capture(tmp_path)) == 5


def test_items_the_format_refuses_are_counted_and_never_raise(tmp_path, caplog):
    metrics = Metrics()
    cap = capture(tmp_path, metrics)
    r = rows(3)
    tensors, teacher, student, margins = r.values()
    cap.offer(tensors, teacher[:2], student, margins, "delegated", "s", "t")  # rows disagree
    cap.offer({"pixels": tensors["input"]}, teacher, student, margins, "delegated", "s", "t")
    cap.offer(**r, source="elsewhere", student_version="s", teacher_version="t")
    assert dropped(metrics, "invalid") == 9 and "capture refused" in caplog.text
    logits = {**r, "teacher_probs": r["teacher_probs"] * 5}  # logits, not probabilities

    async def main() -> None:
        cap.start()
        cap.offer(**logits, source="delegated", student_version="s", teacher_version="t")
        await until(lambda: dropped(metrics, "invalid") == 12)
        await cap.close()

    asyncio.run(main())
    assert read_capture(tmp_path) == []


def test_an_unusable_directory_costs_the_rows_and_the_writer_recovers(tmp_path, caplog):
    metrics = Metrics()
    if os.geteuid() == 0:  # root writes through chmod: a path under a regular file fails for all
        blocker = tmp_path / "file"
        blocker.write_text("")
        root = blocker / "sub"

        def repair() -> None:
            blocker.unlink()
    else:
        blocker = tmp_path / "ro"
        blocker.mkdir(mode=0o500)
        root = blocker / "sub"

        def repair() -> None:
            blocker.chmod(0o700)

    cap = capture(root, metrics)

    async def main() -> None:
        cap.start()
        offer(cap, 3)
        await until(lambda: dropped(metrics, "write_error") == 3)
        repair()
        offer(cap, 2)
        await until(lambda: kept(metrics) == 2)
        await cap.close()

    asyncio.run(main())
    assert "capture directory" in caplog.text and "capture write failed" in caplog.text
    assert [len(s) for s in read_capture(root)] == [2]


def test_disk_full_drops_the_shard_and_the_next_one_is_written(tmp_path, monkeypatch):
    metrics, calls = Metrics(), []
    real = fmt.write_shard

    def full_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(fmt, "write_shard", full_once)
    cap = capture(tmp_path, metrics)

    async def main() -> None:
        cap.start()
        offer(cap, 4)
        await until(lambda: dropped(metrics, "write_error") == 4)
        offer(cap, 1)
        await until(lambda: kept(metrics) == 1)
        await cap.close()

    asyncio.run(main())
    assert [len(s) for s in read_capture(tmp_path)] == [1]


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 64 KiB filesystem (tmpfs), where root may mount one."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_filesystem_costs_rows_not_serving(tiny_fs):
    metrics = Metrics()
    cap = capture(tiny_fs, metrics, shard_items=512)  # a shard of 512 rows: about 50 KiB

    async def main() -> None:
        cap.start()
        for seed in range(3):
            offer(cap, 512, seed=seed)
        await until(lambda: kept(metrics) + dropped(metrics, "write_error") == 1536)
        assert kept(metrics) == 512 and dropped(metrics, "write_error") == 1024
        assert not list((tiny_fs / "c").glob("*.tmp"))  # a failed write leaves nothing behind
        for path in (tiny_fs / "c").iterdir():  # space again: the writer goes on
            path.unlink()
        offer(cap, 512, seed=3)
        await until(lambda: kept(metrics) == 1024)
        await cap.close()

    asyncio.run(main())
    assert [len(s) for s in read_capture(tiny_fs)] == [512]


def test_retention_and_the_size_cap_delete_the_oldest_shards(tmp_path):
    metrics, directory = Metrics(), tmp_path / "c"
    directory.mkdir()
    now = time.time()
    expired = [shard(directory, created=now - 8 * 86400 + i) for i in range(2)]
    recent = [shard(directory, created=now - 60 + i) for i in range(3)]
    size = recent[0].stat().st_size
    cap = capture(tmp_path, metrics, retention_s=86400.0, max_bytes=int(size * 2.5))

    async def main() -> None:
        cap.start()
        offer(cap, 3)
        await until(lambda: kept(metrics) == 3)
        await cap.close()

    asyncio.run(main())
    deleted = "cascade_capture_shards_deleted_total"
    assert value(metrics, deleted, cascade="c", why="retention") == 2
    assert value(metrics, deleted, cascade="c", why="size_cap") == 2
    left = sorted(directory.iterdir())
    assert not any(p.exists() for p in expired + recent[:2]) and recent[2] in left
    assert len(left) == 2
    assert value(metrics, "cascade_capture_bytes", cascade="c") == sum(
        p.stat().st_size for p in left
    )


def test_close_is_bounded_and_counts_what_it_left(tmp_path, monkeypatch):
    metrics, release = Metrics(), threading.Event()
    real = fmt.write_shard

    def slow(*args, **kwargs):
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(fmt, "write_shard", slow)
    cap = capture(tmp_path, metrics)

    async def main() -> None:
        cap.start()
        offer(cap, 2)
        await until(lambda: cap._queued == 0)  # being written
        offer(cap, 3)
        started = time.monotonic()
        await cap.close(timeout_s=0.2)
        assert time.monotonic() - started < 5

    try:
        asyncio.run(main())
        assert dropped(metrics, "shutdown") == 3
    finally:
        release.set()
    deadline = time.monotonic() + 10
    while kept(metrics) != 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_the_environment_turns_capture_on(monkeypatch, tmp_path):
    from cascade_server.settings import Settings

    assert Settings().cascade.capture.directory is None  # off by default
    monkeypatch.setenv("CASCADE_CAPTURE__DIRECTORY", str(tmp_path))
    monkeypatch.setenv("CASCADE_CAPTURE__FRACTION", "0.25")
    config = Settings().cascade.capture
    assert (config.directory, config.fraction) == (tmp_path, 0.25)
    monkeypatch.setenv("CASCADE_CAPTURE__DIRECTORY", "")
    assert Settings().cascade.capture.directory is None


def test_the_format_imports_with_numpy_and_the_standard_library_only():
    code = (
        "import sys, cascade_server.capture; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'fastapi', 'starlette', 'torch', 'pydantic', 'prometheus_client'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
