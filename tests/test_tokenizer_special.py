"""The end and begin tokens of documents: where they come from (tokenizer config, model config, the
default, `data.eos_token`), and the errors that name what is wrong. Exact: token ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from train.data import prepare_dataset
from train.data.tokenizer import EOT, pretrained_eos_id, resolve_tokenizer, special_tokens

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


def _tokenizer(folder: Path, config: dict | None) -> str:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[BOS, EOS, EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["some text to learn a few merges from"], trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder / "tokenizer.json")


def test_end_token_precedence(tmp_path):
    plain = _tokenizer(tmp_path / "plain", None)
    tok = tokenizers.Tokenizer.from_file(plain)
    assert special_tokens(tok, plain).eos_id == 2  # nothing said: <|endoftext|>
    assert special_tokens(tok, plain, model_eos_id=1).eos == EOS  # the model's eos_token_id
    assert special_tokens(tok, plain, eos_token=BOS, model_eos_id=1).eos == BOS  # data.eos_token wins
    configured = _tokenizer(
        tmp_path / "ds", {"eos_token": {"content": EOS}, "add_bos_token": True, "bos_token": BOS}
    )
    found = special_tokens(tok, configured, model_eos_id=2)  # the tokenizer config beats the model's id
    assert (found.eos_id, found.bos_id) == (1, 0)


def test_unknown_end_token_names_the_key(tmp_path):
    path = _tokenizer(tmp_path / "t", None)
    tok = tokenizers.Tokenizer.from_file(path)
    with pytest.raises(ValueError, match=r"data.eos_token='</s>': not a token of the tokenizer"):
        special_tokens(tok, path, eos_token="</s>")


def test_documents_start_with_bos_and_end_with_eos(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text(f"document number {i}")
    path = _tokenizer(tmp_path / "ds", {"eos_token": EOS, "add_bos_token": True, "bos_token": BOS})
    ds = prepare_dataset(
        str(corpus),
        tokenizer=path,
        vocab_size=300,
        cache_dir=str(tmp_path / "cache"),
        max_corpus_mb=None,
        val_fraction=0.34,
        is_builder=True,
        barrier=lambda: None,
    )
    tokens = np.asarray(ds.train_tokens)
    assert (ds.eot_id, ds.bos_id) == (1, 0)
    assert tokens[0] == 0 and tokens[-1] == 1 and (tokens == 0).sum() == (tokens == 1).sum() == 2


def test_pretrained_folder_brings_its_tokenizer_or_the_run_stops(tmp_path):
    folder = tmp_path / "base"
    own = _tokenizer(folder, None)
    assert resolve_tokenizer(None, str(folder)) == own
    assert resolve_tokenizer("other.json", str(folder)) == "other.json"
    assert resolve_tokenizer(None, None) is None  # no pretrained model: a trained BPE
    Path(own).unlink()
    with pytest.raises(ValueError, match=r"data.tokenizer=null: model.pretrained=.* has no tokenizer.json"):
        resolve_tokenizer(None, str(folder))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": [7, 8]}))
    assert pretrained_eos_id(str(folder)) == 7
