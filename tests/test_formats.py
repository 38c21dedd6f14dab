"""Record formats: JSONL, instruction and chat files into token files with loss masks.

Exact checks (no floating point): every malformed record kind raises an error naming file and line, or
is skipped and counted; the mask marks exactly the completion / assistant tokens; a mixture's source
proportions over 1,000 batches are within 3 sigma of its weights.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from train.data.chat import ChatTemplate
from train.data.dataset import prepare_dataset
from train.data.formats import BadRecord, FormatSpec, RecordStats, read_documents
from train.data.packing import DocumentSampler, Source

GOOD_INSTRUCTION = {"prompt": "What is two plus two?", "completion": " Four."}
BAD_LINES = {
    "json": '{"prompt": "x", ',
    "not_object": '["prompt", "completion"]',
    "missing_field": '{"prompt": "only a prompt"}',
    "wrong_type": '{"prompt": "x", "completion": 4}',
    "empty": "   ",
}
BAD_CHATS = {
    "missing_field": {"conversation": []},
    "wrong_type": {"messages": [{"role": "user", "content": 3}]},
    "no_assistant": {"messages": [{"role": "user", "content": "hi"}]},
}


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _read(path: Path, fmt: str, on_bad_record: str = "error") -> tuple[list, RecordStats]:
    stats = RecordStats()
    spec = FormatSpec(fmt, on_bad_record=on_bad_record)
    return list(read_documents(path, fmt, spec, ChatTemplate(), stats)), stats


@pytest.mark.parametrize("kind", BAD_LINES)
def test_each_malformed_instruction_line_names_file_and_line(tmp_path, kind):
    path = _write(tmp_path / "data.jsonl", [GOOD_INSTRUCTION, BAD_LINES[kind]])
    with pytest.raises(BadRecord, match=r"data.jsonl:2: ") as info:
        _read(path, "instruction")
    assert info.value.kind == kind


@pytest.mark.parametrize("kind", BAD_CHATS)
def test_each_malformed_chat_record_names_file_and_line(tmp_path, kind):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = _write(tmp_path / "chat.jsonl", [good, good, BAD_CHATS[kind]])
    with pytest.raises(BadRecord, match=r"chat.jsonl:3: ") as info:
        _read(path, "chat")
    assert info.value.kind == kind


def test_skip_counts_bad_records_by_kind(tmp_path):
    path = _write(tmp_path / "data.jsonl", [GOOD_INSTRUCTION, *BAD_LINES.values(), GOOD_INSTRUCTION])
    docs, stats = _read(path, "instruction", on_bad_record="skip")
    assert [line for line, _ in docs] == [1, 7]
    assert stats.skipped == {kind: 1 for kind in BAD_LINES}


def test_builtin_chat_template_trains_assistant_turns_only():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    segments = ChatTemplate().segments(messages)
    assert "".join(t for t, _ in segments) == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello.\n"
    assert [t for t, trained in segments if trained] == ["Hello.\n"]


def test_jinja_chat_template_spans_by_prefix():
    source = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    template = ChatTemplate(source, eos_token="</s>")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    segments = template.segments(messages)
    assert [t for t, trained in segments if trained] == ["Hello.</s>\n"]
    assert "".join(t for t, _ in segments) == "[user] Hi</s>\n[assistant] Hello.</s>\n"


def test_instruction_mask_marks_completion_tokens(tmp_path):
    records = [{"prompt": f"Question {i}: what is {i} + {i}?", "completion": f" {2 * i}"} for i in range(40)]
    path = _write(tmp_path / "train.jsonl", records)
    ds = prepare_dataset(
        str(path),
        tokenizer=None,
        vocab_size=300,
        cache_dir=str(tmp_path / "cache"),
        max_corpus_mb=None,
        val_fraction=0.1,
        is_builder=True,
        barrier=lambda: None,
        log=lambda s: None,
        spec=FormatSpec("instruction"),
    )
    assert ds.records and ds.train_mask is not None and ds.val_mask is not None
    ends = np.flatnonzero(np.asarray(ds.train_tokens) == ds.eot_id)
    start = 0
    for end in ends[:5]:
        doc, mask = np.asarray(ds.train_tokens[start : end + 1]), np.asarray(ds.train_mask[start : end + 1])
        trained = ds.tokenizer.decode(doc[mask == 1].tolist(), skip_special_tokens=False)
        untrained = ds.tokenizer.decode(doc[mask == 0].tolist())
        assert trained.endswith("<|endoftext|>") and trained.startswith(" ")
        assert untrained.startswith("Question") and untrained.endswith("?")
        start = end + 1
    assert int(ds.train_mask.sum()) < len(ds.train_mask) / 2


def test_jsonl_text_field_and_cache_reuse(tmp_path):
    path = _write(tmp_path / "docs.jsonl", [{"body": f"document number {i} " * 5} for i in range(30)])
    kwargs = dict(
        tokenizer=None,
        vocab_size=300,
        cache_dir=str(tmp_path / "cache"),
        max_corpus_mb=None,
        val_fraction=0.1,
        is_builder=True,
        barrier=lambda: None,
        spec=FormatSpec("auto", text_field="body"),
    )
    lines = []
    ds = prepare_dataset(str(path), log=lines.append, **kwargs)
    assert ds.records and ds.train_mask is None  # every token trained
    again = prepare_dataset(str(path), log=lines.append, **kwargs)
    assert again.folder == ds.folder and any("cache hit" in line for line in lines)
    _write(path, [{"body": f"changed document {i} " * 5} for i in range(30)])
    changed = prepare_dataset(str(path), log=lines.append, **kwargs)
    assert changed.folder != ds.folder  # a content change rebuilds


def test_mixture_proportions_within_three_sigma():
    weights = [0.6, 0.3, 0.1]
    sources = [Source(np.arange(1, 200) % 50 + 1, weight=w) for w in weights]
    sampler = DocumentSampler(sources, seq_len=8, global_batch_size=16, seed=11, eot_id=0)
    counts = np.zeros(3)
    for step in range(1000):
        source, _ = sampler.choices(step, 8, 16)
        counts += np.bincount(source, minlength=3)
    n = counts.sum()
    for count, w in zip(counts, weights, strict=True):
        sigma = np.sqrt(n * w * (1 - w))
        assert abs(count - n * w) < 3 * sigma, (count, n * w, sigma)
    # a pure function of (seed, step): the same batch twice, and a different one at another step
    a, b = sampler.global_batch(5), sampler.global_batch(5)
    assert np.array_equal(a.inputs, b.inputs)
    assert not np.array_equal(a.inputs, sampler.global_batch(6).inputs)


def test_no_packing_pads_one_document_per_row():
    stream = np.array([5, 6, 0, 7, 8, 9, 10, 11, 12, 13, 0, 14, 0])
    sampler = DocumentSampler(
        [Source(stream)], seq_len=6, global_batch_size=8, seed=1, eot_id=0, packing=False
    )
    batch = sampler.global_batch(0)
    for r in range(batch.rows):
        first = int(batch.inputs[r, 0])
        assert first in (5, 7, 14)  # every row starts a document
        if first == 5:
            assert batch.targets[r].tolist() == [6, 0, -100, -100, -100, -100]
        if first == 7:  # truncated to seq_len + 1 tokens
            assert batch.targets[r].tolist() == [8, 9, 10, 11, 12, 13]


def test_unsupported_data_combinations_are_rejected_up_front():
    from models import MLAConfig
    from train.config import load_config
    from train.layout import unsupported

    both = load_config(None, ["data.corpus=a.jsonl", "data.mixture=[{corpus: b.jsonl, weight: 1}]"])
    assert "give the corpora in data.mixture only" in unsupported(both, MLAConfig())
    template = load_config(None, ["data.format=instruction", "data.chat_template=builtin"])
    assert "no source has data.format chat" in unsupported(template, MLAConfig())
    bad_weight = ["data.mixture=[{corpus: b.jsonl, weight: 0}]"]
    with pytest.raises(ValueError, match="data.mixture="):
        load_config(None, bad_weight)


def test_worker_processes_write_the_same_token_files(tmp_path):
    records = [{"prompt": f"Say {i} twice.", "completion": f" {i} {i}"} for i in range(300)]
    path = _write(tmp_path / "train.jsonl", records)
    folders = []
    for workers in (0, 1):
        ds = prepare_dataset(
            str(path),
            tokenizer=None,
            vocab_size=300,
            cache_dir=str(tmp_path / f"cache{workers}"),
            max_corpus_mb=None,
            val_fraction=0.1,
            is_builder=True,
            barrier=lambda: None,
            log=lambda s: None,
            spec=FormatSpec("instruction"),
            workers=workers,
        )
        folders.append(ds.folder)
    names = sorted(p.name for p in folders[0].glob("*.bin"))
    assert names == ["train-00000.bin", "train-00000.mask.bin", "val-00000.bin", "val-00000.mask.bin"]
    for name in names:
        assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name


def test_prepare_data_cli_builds_then_hits_the_cache(tmp_path, capsys):
    from train.prepare_data import main

    records = [
        {"prompt": f"Count to {i}.", "completion": " " + " ".join(map(str, range(i)))} for i in range(1, 61)
    ]
    path = _write(tmp_path / "sft.jsonl", records)
    args = [
        f"data.corpus={path}",
        "data.format=instruction",
        "data.vocab_size=300",
        f"data.cache_dir={tmp_path}",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "building token cache" in first and "masked: True" in first
    assert main(args) == 0
    assert "cache hit" in capsys.readouterr().out
    assert main([*args[:-1], "data.format=nonsense"]) == 1
    assert "data.format='nonsense'" in capsys.readouterr().err


def test_sharded_token_files_read_as_one_stream(tmp_path, monkeypatch):
    from train.data import shards

    records = [{"prompt": f"Repeat {i}.", "completion": f" {i} {i} {i}"} for i in range(1, 80)]
    path = _write(tmp_path / "sft.jsonl", records)
    kwargs = dict(
        tokenizer=None,
        vocab_size=300,
        max_corpus_mb=None,
        val_fraction=0.1,
        is_builder=True,
        barrier=lambda: None,
        log=lambda s: None,
        spec=FormatSpec("instruction"),
    )
    whole = prepare_dataset(str(path), cache_dir=str(tmp_path / "one"), **kwargs)
    monkeypatch.setattr(shards, "SHARD_TOKENS", 97)  # documents straddle shard boundaries
    sharded = prepare_dataset(str(path), cache_dir=str(tmp_path / "many"), **kwargs)
    assert len(list(sharded.folder.glob("train-*.mask.bin"))) > 3
    assert isinstance(sharded.train_tokens, shards.ShardedArray)
    assert np.array_equal(np.asarray(sharded.train_tokens), np.asarray(whole.train_tokens))
    assert np.array_equal(np.asarray(sharded.train_mask), np.asarray(whole.train_mask))
    index = np.random.default_rng(0).integers(0, len(whole.train_tokens), size=(7, 13))
    assert np.array_equal(sharded.train_tokens[index], np.asarray(whole.train_tokens)[index])
    assert np.array_equal(sharded.train_mask[90:200], np.asarray(whole.train_mask)[90:200])
