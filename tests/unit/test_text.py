"""Tokenisation: the gateway encodes a text exactly as the trainer did."""

from pathlib import Path

import numpy as np
import pytest

from cascade_server.bundle import TextPreprocess
from cascade_server.errors import InvalidInput, PayloadTooLarge
from cascade_server.preprocess import TextPreprocessor, encode_texts, load_tokenizer
from cascade_server.train.config import ExperimentConfig
from cascade_server.train.corpus import generate
from cascade_server.train.text import train_tokenizer

SPEC = TextPreprocess(max_length=12)
TEXTS = [
    "My CARD was declined at the café!",
    "Zoë sent 100 euros to José 🙏",
    "   leading and trailing spaces   ",
    "ünïcödé ñ ß straße Ⅻ ﬁ",
    "a " * 200,
    "transfer £50 to my landlord, please, asap",
]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(generate(600, 1)[0], vocab_size=500).save(str(path))
    return path


def test_pad_is_id_zero_and_normalisation_is_recorded(tokenizer_file):
    tok = load_tokenizer(tokenizer_file, SPEC)
    assert tok.token_to_id("[PAD]") == 0
    assert tok.encode("CAFÉ").tokens == tok.encode("cafe").tokens  # lowercase, accents stripped


def test_gateway_ids_equal_the_trainers_including_unicode_and_long_texts(tokenizer_file, tmp_path):
    from cascade_server.train.stages import prepare

    # The trainer's path: prepare() on a jsonl dataset, with the tokenizer of a run directory.
    rows = "".join(
        f'{{"text": {__import__("json").dumps(t)}, "label": "x{i % 2}"}}\n'
        for i, t in enumerate(TEXTS * 5)
    )
    (tmp_path / "d.jsonl").write_text(rows)
    config = ExperimentConfig.model_validate(
        {
            "data": {"name": "jsonl", "params": {"path": str(tmp_path / "d.jsonl")}},
            "text": {"vocab_size": 300, "max_length": 12},
            "split": {"val": 0.2, "test": 0.2},
        }
    )
    prep = prepare(config, tmp_path / "run")
    gateway = TextPreprocessor(prep.spec, tmp_path / "run" / "tokenizer.json", max_chars=10_000)
    again = prepare(config, tmp_path / "run")  # a later stage re-reads the same tokenizer
    np.testing.assert_array_equal(again.x["train"], prep.x["train"])
    from cascade_server.train.data import load, split

    texts = list(
        split(load("jsonl", path=str(tmp_path / "d.jsonl")), seed=0, val=0.2, test=0.2).train.texts
    )
    batch = gateway.prepare(texts)
    np.testing.assert_array_equal(batch.tensors["input_ids"], prep.x["train"])
    np.testing.assert_array_equal(
        batch.tensors["attention_mask"], (prep.x["train"] != 0).astype(np.int64)
    )


def test_truncation_and_padding_to_max_length(tokenizer_file):
    ids, mask, truncated = encode_texts(load_tokenizer(tokenizer_file, SPEC), ["a " * 200, "hello"])
    assert ids.shape == (2, 12) and ids.dtype == np.int64
    assert truncated == [True, False]
    assert mask[0].all() and mask[1].sum() < 12
    assert (ids[1][mask[1] == 0] == 0).all()


@pytest.mark.parametrize(
    ("text", "error", "fragment"),
    [
        ("", InvalidInput, "empty"),
        (" \t\n ", InvalidInput, "whitespace"),
        ("x" * 101, PayloadTooLarge, "101 characters; the limit is 100"),
        (7, InvalidInput, "must be a string"),
    ],
)
def test_bad_texts(tokenizer_file, text, error, fragment):
    pre = TextPreprocessor(SPEC, tokenizer_file, max_chars=100)
    with pytest.raises(error, match=fragment):
        pre.prepare([text])
    with pytest.raises(error, match=r"inputs\[1\]"):
        pre.prepare(["fine", text])
