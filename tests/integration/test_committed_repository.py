"""The committed model_repository is exactly what the demo build writes, byte for byte: `make
serve` on a fresh clone builds the demo into it, and must leave the working tree clean."""

from __future__ import annotations

from pathlib import Path

import pytest

COMMITTED = Path(__file__).resolve().parents[2] / "model_repository"
MODELS = sorted(p.parent.name for p in COMMITTED.glob("*/config.pbtxt"))


def test_the_demo_build_writes_a_config_for_every_committed_model_and_no_other(text_demo):
    generated = sorted(p.parent.name for p in text_demo.repository.glob("*/config.pbtxt"))
    assert generated == MODELS == ["digits_teacher", "intents_teacher"]


@pytest.mark.parametrize("model", MODELS)
def test_the_demo_build_writes_the_committed_config_byte_for_byte(text_demo, model):
    # text_demo builds intents into the repository the digits demo was built in.
    generated = (text_demo.repository / model / "config.pbtxt").read_bytes()
    assert generated == (COMMITTED / model / "config.pbtxt").read_bytes()
