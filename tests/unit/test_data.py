import gzip
import json
import struct

import numpy as np
import pytest
from PIL import Image

from cascade_server.train.data import DATASETS, ImageData, TextData, load, split


def write_idx(path, array: np.ndarray) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_registry_names_and_unknown_key():
    assert {"digits", "idx", "imagefolder", "npz", "csv", "jsonl"} <= set(DATASETS.names())
    with pytest.raises(KeyError, match="choose one of"):
        load("cifar1000")


def test_digits_are_uint8_images_with_ten_classes():
    d = load("digits")
    assert d.x.shape == (1797, 8, 8, 1) and d.x.dtype == np.uint8 and d.x.max() == 255
    assert d.classes == tuple(str(i) for i in range(10))


def test_idx_roundtrip_with_limit(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 5, 4), dtype=np.uint8)
    y = rng.integers(0, 3, 30).astype(np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", x)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", y)
    d = load("idx", path=str(tmp_path), split="test", limit=20)
    np.testing.assert_array_equal(d.x[..., 0], x[:20])
    np.testing.assert_array_equal(d.y, y[:20])
    with pytest.raises(FileNotFoundError, match="train-images-idx3"):
        load("idx", path=str(tmp_path), split="train")


def test_npz_and_imagefolder(tmp_path):
    x = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([1, 0]), classes=np.array(["a", "b"]))
    d = load("npz", path=str(tmp_path / "d.npz"))
    assert d.x.shape == (2, 3, 3, 1) and d.classes == ("a", "b")
    for name, value in (("cat", 10), ("dog", 200)):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 10), (value,) * 3).save(tmp_path / "imgs" / name / f"{i}.png")
    f = load("imagefolder", path=str(tmp_path / "imgs"), size=8, channels=1)
    assert f.x.shape == (4, 8, 8, 1) and f.classes == ("cat", "dog")
    assert f.y.tolist() == [0, 0, 1, 1] and f.x[3].min() == 200


def test_text_csv_and_jsonl_with_a_fixed_class_list(tmp_path):
    (tmp_path / "t.csv").write_text('text,category\n"hello, there",greet\nbye,leave\n')
    (tmp_path / "classes.json").write_text(json.dumps(["leave", "greet"]))
    d = load("csv", path=str(tmp_path / "t.csv"), classes=str(tmp_path / "classes.json"))
    assert isinstance(d, TextData)
    assert d.texts == ("hello, there", "bye") and d.y.tolist() == [1, 0]
    (tmp_path / "t.jsonl").write_text(
        '{"text": "héllo", "label": "x"}\n\n{"text": "b", "label": "y"}\n'
    )
    j = load("jsonl", path=str(tmp_path / "t.jsonl"))
    assert j.texts == ("héllo", "b") and j.classes == ("x", "y")
    with pytest.raises(ValueError, match="not in the class list"):
        load("jsonl", path=str(tmp_path / "t.jsonl"), classes=["x"])


def test_split_is_deterministic_stratified_and_disjoint():
    d = load("digits")
    a, b, c = split(d, seed=3), split(d, seed=3), split(d, seed=4)
    assert a.train.fingerprint() == b.train.fingerprint() != c.train.fingerprint()
    assert len(a.train) + len(a.val) + len(a.test) == len(d)
    for part in (a.val, a.test):
        counts = np.bincount(part.y, minlength=10)
        assert counts.min() >= 0.8 * counts.max()
    # Images that encode their own index: the three parts share none.
    n = 300
    ids = np.arange(n)
    x = np.stack([ids // 256, ids % 256], axis=1).astype(np.uint8).reshape(n, 1, 2, 1)
    parts = split(ImageData(x, ids % 3, ("a", "b", "c")), seed=0)
    seen = [
        {(int(v[0, 0, 0]), int(v[0, 1, 0])) for v in p.x}
        for p in (parts.train, parts.val, parts.test)
    ]
    assert sum(map(len, seen)) == n and len(set.union(*seen)) == n


def test_image_data_validates():
    with pytest.raises(ValueError, match="uint8"):
        ImageData(np.zeros((2, 3, 3, 1), np.float32), np.zeros(2, np.int64), ("a", "b"))


def test_imagefolder_splits_and_decodes_once(tmp_path, monkeypatch):
    import PIL.Image

    monkeypatch.setenv("CASCADE_DATA_CACHE", str(tmp_path / "cache"))
    for part in ("train", "test"):
        for label, name in enumerate(("a", "b")):
            (tmp_path / "data" / part / name).mkdir(parents=True)
            for i in range(3):
                Image.new("L", (12, 12), 40 * label + i).save(
                    tmp_path / "data" / part / name / f"{i}.png"
                )
    train = load("imagefolder", path=str(tmp_path / "data"), split="train", size=4, channels=1,
                 progress=False)  # fmt: skip
    assert train.x.shape == (6, 4, 4, 1) and train.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

    def no_decoding(*_a, **_k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(PIL.Image, "open", no_decoding)
    again = load("imagefolder", path=str(tmp_path / "data"), split="train", size=4, channels=1,
                 progress=False)  # fmt: skip
    np.testing.assert_array_equal(again.x, train.x)
    monkeypatch.undo()
    monkeypatch.setenv("CASCADE_DATA_CACHE", str(tmp_path / "cache"))
    Image.new("L", (12, 12), 255).save(tmp_path / "data" / "train" / "a" / "0.png")  # changed
    changed = load("imagefolder", path=str(tmp_path / "data"), split="train", size=4, channels=1,
                   progress=False)  # fmt: skip
    assert changed.x[0].min() == 255
    test = load("imagefolder", path=str(tmp_path / "data"), split="test", size=4, channels=1,
                progress=False)  # fmt: skip
    assert test.x.shape == (6, 4, 4, 1)
