"""The tokenizer: a byte-level BPE (Hugging Face ``tokenizers``) trained on the corpus, or a given one.

Either way it has ``<|endoftext|>`` (``EOT``), which separates documents in the token stream.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer with ``<|endoftext|>`` trained on ``texts``; decode(encode(s)) == s."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer_file(path: str) -> tokenizers.Tokenizer:
    """A user-given ``tokenizer.json``; errors name ``data.tokenizer`` (missing, malformed, no EOT)."""
    if not Path(path).is_file():
        raise ValueError(f"data.tokenizer={path!r}: no such file (expected a tokenizer.json)")
    try:
        tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise ValueError(f"data.tokenizer={path!r}: not a valid tokenizer.json ({e})") from e
    if tok.token_to_id(EOT) is None:
        raise ValueError(f"data.tokenizer={path!r}: has no {EOT} token to separate documents")
    return tok
