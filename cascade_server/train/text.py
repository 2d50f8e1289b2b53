"""Tokenizers for text students: trained on the training texts with Hugging Face `tokenizers`
and saved as tokenizer.json in the bundle, where the gateway loads it with the same library."""

from __future__ import annotations

from typing import Any

SPECIALS = ["[PAD]", "[UNK]"]  # [PAD] must be id 0: models treat id 0 as padding


def train_tokenizer(texts, vocab_size: int, model: str = "wordpiece", lowercase: bool = True):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    trainer: Any
    if model == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False
        )
        tok.decoder = decoders.WordPiece()
    elif model == "bpe":
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False
        )
    else:
        raise ValueError(f"tokenizer model must be wordpiece or bpe, not {model!r}")
    steps: list[Any] = [normalizers.NFD()]
    if lowercase:
        steps.append(normalizers.Lowercase())
    steps.append(normalizers.StripAccents())
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(texts), trainer)
    if tok.token_to_id("[PAD]") != 0:
        raise RuntimeError("[PAD] did not get id 0")
    return tok


def normalization_label(lowercase: bool) -> str:
    return "NFD, lowercase, strip accents" if lowercase else "NFD, strip accents"
