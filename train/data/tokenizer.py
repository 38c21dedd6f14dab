"""The tokenizer: a byte-level BPE (Hugging Face ``tokenizers``) trained on the corpus, or a given one.

A trained tokenizer has ``<|endoftext|>`` (``EOT``), which separates documents in the token stream. A
given ``tokenizer.json`` may be any; its end-of-document and begin-of-document tokens come from the
``tokenizer_config.json`` beside it (`special_tokens`): the end token is ``data.eos_token`` when set, else
the config's ``eos_token``, else the pretrained model's ``eos_token_id``, else ``<|endoftext|>``; a begin
token is put before every document when the config says ``add_bos_token: true`` (DeepSeek's do).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class SpecialTokens:
    """The token closing every document and, when the tokenizer adds one, the token opening it."""

    eos: str
    eos_id: int
    bos: str | None = None
    bos_id: int | None = None


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
    """A user-given ``tokenizer.json``; errors name ``data.tokenizer`` (missing, malformed)."""
    if not Path(path).is_file():
        raise ValueError(f"data.tokenizer={path!r}: no such file (expected a tokenizer.json)")
    try:
        return tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise ValueError(f"data.tokenizer={path!r}: not a valid tokenizer.json ({e})") from e


def resolve_tokenizer(tokenizer: str | None, pretrained: str | None) -> str | None:
    """The tokenizer.json a run uses: `data.tokenizer`, else the pretrained folder's own, else None (a
    trained BPE). A pretrained folder without one is an error: fresh token ids would not match its
    embeddings."""
    if tokenizer is not None or pretrained is None:
        return tokenizer
    own = Path(pretrained) / "tokenizer.json"
    if own.is_file():
        return str(own)
    raise ValueError(
        f"data.tokenizer=null: model.pretrained={pretrained!r} has no tokenizer.json; set data.tokenizer to "
        f"the tokenizer.json the model was trained with (a fresh tokenizer would not match its embeddings)"
    )


def tokenizer_config(tokenizer: str | None) -> dict:
    """The ``tokenizer_config.json`` beside a ``tokenizer.json`` ({} when there is none)."""
    path = None if tokenizer is None else Path(tokenizer).parent / "tokenizer_config.json"
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def _text(token: str | dict | None) -> str | None:
    """A token as ``tokenizer_config.json`` writes it: a string or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def special_tokens(
    tok: tokenizers.Tokenizer,
    tokenizer: str | None,
    eos_token: str | None = None,
    model_eos_id: int | None = None,
) -> SpecialTokens:
    """The end (and begin) tokens of documents; see the module docstring for the order of sources."""
    config = tokenizer_config(tokenizer)
    key = "data.eos_token" if eos_token is not None else f"data.tokenizer={tokenizer!r}: eos_token"
    eos = eos_token or _text(config.get("eos_token"))
    if eos is None and model_eos_id is not None:
        eos = tok.id_to_token(model_eos_id)
    eos = eos or EOT
    eos_id = tok.token_to_id(eos)
    if eos_id is None:
        raise ValueError(
            f"{key}={eos!r}: not a token of the tokenizer; set data.eos_token to its end-of-document token"
        )
    if not config.get("add_bos_token"):
        return SpecialTokens(eos, eos_id)
    bos = _text(config.get("bos_token"))
    bos_id = None if bos is None else tok.token_to_id(bos)
    if bos_id is None:
        raise ValueError(
            f"data.tokenizer={tokenizer!r}: add_bos_token is true but bos_token={bos!r} is not a token"
        )
    return SpecialTokens(eos, eos_id, bos, bos_id)


def pretrained_eos_id(pretrained: str | None) -> int | None:
    """The ``eos_token_id`` of a pretrained folder's ``config.json`` (the first, when it lists several)."""
    path = None if pretrained is None else Path(pretrained) / "config.json"
    if path is None or not path.is_file():
        return None
    value = json.loads(path.read_text()).get("eos_token_id")
    return value[0] if isinstance(value, list) and value else value if isinstance(value, int) else None
