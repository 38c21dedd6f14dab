"""Tests for train/data/: corpus selection, tokenizer, token cache, builder protocol and sampling.

All comparisons are exact: tokens are integers and sampling is a pure function of (seed, step).
"""

import sysconfig
from pathlib import Path

import numpy as np
import pytest

import train.data.dataset as dataset_module
from train.data import (
    EOT,
    BatchSampler,
    Dataset,
    corpus_files,
    prepare_dataset,
    validation_windows,
)

VOCAB = 320


def _document(i: int) -> str:
    words = " ".join(f"word{(i * 7 + k) % 23}" for k in range(120))
    return f"# document {i} unique_marker_{i}\ndef f{i}(x):\n    return x * {i}  # héllo wörld\n{words}\n"


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Six documents, two of them in a subfolder, plus a hidden file and a binary that must be skipped."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(6):
        folder = root / "sub" if i >= 4 else root
        (folder / f"doc{i}.txt").write_text(_document(i), encoding="utf-8")
    (root / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (root / ".hidden.txt").write_text("hidden text", encoding="utf-8")
    return root


class Calls:
    """A barrier and a log that record how they were called."""

    def __init__(self) -> None:
        self.barriers = 0
        self.lines: list[str] = []

    def barrier(self) -> None:
        self.barriers += 1

    def log(self, line: str) -> None:
        self.lines.append(line)


def _prepare(corpus: Path | str, cache: Path, calls: Calls, **overrides) -> Dataset:
    kwargs = dict(
        tokenizer=None,
        vocab_size=VOCAB,
        cache_dir=str(cache),
        max_corpus_mb=None,
        val_fraction=0.34,
        is_builder=True,
        barrier=calls.barrier,
        log=calls.log,
    )
    return prepare_dataset(str(corpus), **{**kwargs, **overrides})


def _documents(ds: Dataset, tokens: np.ndarray) -> list[str]:
    """The documents of a token stream, decoded and split at the separators (all end with one)."""
    text = ds.tokenizer.decode(tokens.tolist(), skip_special_tokens=False)
    assert text.endswith(EOT)
    return text.split(EOT)[:-1]


# ------------------------------------------------------------------------------------------- corpus


def test_corpus_files_are_sorted_text_files_without_binaries_or_hidden(corpus: Path) -> None:
    names = [p.relative_to(corpus).as_posix() for p in corpus_files(str(corpus))]
    assert names == [f"doc{i}.txt" for i in range(4)] + ["sub/doc4.txt", "sub/doc5.txt"]


def test_corpus_cap_stops_once_reached(corpus: Path) -> None:
    size = (corpus / "doc0.txt").stat().st_size
    files = corpus_files(str(corpus), max_corpus_mb=1.5 * size / 2**20)
    assert [p.name for p in files] == ["doc0.txt", "doc1.txt"]


def test_stdlib_corpus_is_capped_sorted_and_excludes_tests_and_packages() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = corpus_files("stdlib", max_corpus_mb=0.3)
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel)
    assert all(r.endswith(".py") for r in rel)
    for r in rel:
        folders = r.split("/")[:-1]
        assert not any("test" in d or d in ("site-packages", "dist-packages", "__pycache__") for d in folders)
    sizes = [p.stat().st_size for p in files]
    assert sum(sizes[:-1]) < 0.3 * 2**20 <= sum(sizes)


def test_stdlib_dataset_builds_with_tiny_cap(tmp_path: Path) -> None:
    ds = _prepare("stdlib", tmp_path / "cache", Calls(), max_corpus_mb=0.3, val_fraction=0.1)
    n_docs = len(corpus_files("stdlib", max_corpus_mb=0.3))
    n_val = max(1, round(0.1 * n_docs))
    assert np.count_nonzero(ds.val_tokens == ds.eot_id) == n_val
    assert np.count_nonzero(ds.train_tokens == ds.eot_id) == n_docs - n_val
    assert ds.vocab_size == VOCAB


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.corpus=.*no such file or folder"):
        corpus_files(str(tmp_path / "nope"))


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.corpus=.*no usable text"):
        corpus_files(str(tmp_path))


def test_all_blank_files_are_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("  \n\t\n")
    with pytest.raises(ValueError, match=r"data\.corpus=.*no usable text"):
        corpus_files(str(tmp_path))


# ---------------------------------------------------------------------------------------- tokenizer


def test_decode_encode_round_trips(corpus: Path, tmp_path: Path) -> None:
    ds = _prepare(corpus, tmp_path / "cache", Calls())
    text = "  leading spaces\n\tdef g():  return 'ünïcödé 日本語 🙂'\r\n\n"
    assert ds.tokenizer.decode(ds.tokenizer.encode(text).ids) == text


def test_vocab_too_small_is_an_error(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.vocab_size=256"):
        _prepare(corpus, tmp_path / "cache", Calls(), vocab_size=256)


def test_missing_tokenizer_file_is_an_error(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data\.tokenizer=.*no such file"):
        _prepare(corpus, tmp_path / "cache", Calls(), tokenizer=str(tmp_path / "tokenizer.json"))


def test_given_tokenizer_file_is_used(corpus: Path, tmp_path: Path) -> None:
    first = _prepare(corpus, tmp_path / "a", Calls())
    path = tmp_path / "tokenizer.json"
    first.tokenizer.save(str(path))
    # A different vocab_size proves the file, not a freshly trained tokenizer, defines the ids.
    second = _prepare(corpus, tmp_path / "b", Calls(), tokenizer=str(path), vocab_size=1000)
    assert second.vocab_size == first.vocab_size
    np.testing.assert_array_equal(second.train_tokens, first.train_tokens)


# -------------------------------------------------------------------------------------- token files


def test_dataset_fields_describe_the_token_files(corpus: Path, tmp_path: Path) -> None:
    ds = _prepare(corpus, tmp_path / "cache", Calls())
    assert isinstance(ds.train_tokens, np.memmap) and ds.train_tokens.dtype == np.uint16
    assert not ds.train_tokens.flags.writeable and not ds.val_tokens.flags.writeable
    assert ds.eot_id == ds.tokenizer.token_to_id(EOT)
    assert ds.max_token_id == max(ds.train_tokens.max(), ds.val_tokens.max())


def test_val_documents_are_spread_and_never_in_train(corpus: Path, tmp_path: Path) -> None:
    ds = _prepare(corpus, tmp_path / "cache", Calls())  # 0.34 of 6 documents -> 2 held out: #1 and #4
    texts = [p.read_text(encoding="utf-8") for p in corpus_files(str(corpus))]
    assert _documents(ds, ds.train_tokens) == [texts[i] for i in (0, 2, 3, 5)]
    assert _documents(ds, ds.val_tokens) == [texts[1], texts[4]]


def test_single_document_is_split_by_tokens(tmp_path: Path) -> None:
    text = _document(0) * 20
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    ds = _prepare(tmp_path / "one.txt", tmp_path / "cache", Calls(), val_fraction=0.25)
    whole = np.concatenate([ds.train_tokens, ds.val_tokens])
    np.testing.assert_array_equal(whole, [*ds.tokenizer.encode(text).ids, ds.eot_id])
    assert len(ds.val_tokens) == len(whole) - int(len(whole) * 0.75)


def test_second_call_reuses_the_cache(corpus: Path, tmp_path: Path) -> None:
    first, second = Calls(), Calls()
    ds = _prepare(corpus, tmp_path / "cache", first)
    folder = Path(ds.train_tokens.filename).parent
    mtime = (folder / "train.bin").stat().st_mtime_ns
    _prepare(corpus, tmp_path / "cache", second)
    assert any("building" in line for line in first.lines)
    assert second.lines == [f"data: cache hit {folder}"]
    assert (folder / "train.bin").stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]  # no temporary leftovers


def test_changed_corpus_gets_a_new_cache(corpus: Path, tmp_path: Path) -> None:
    a = _prepare(corpus, tmp_path / "cache", Calls())
    (corpus / "doc9.txt").write_text(_document(9), encoding="utf-8")
    b = _prepare(corpus, tmp_path / "cache", Calls())
    assert Path(a.train_tokens.filename).parent != Path(b.train_tokens.filename).parent


# --------------------------------------------------------------------------------- builder protocol


def test_barrier_called_once_when_building(corpus: Path, tmp_path: Path) -> None:
    calls = Calls()
    _prepare(corpus, tmp_path / "cache", calls)
    assert any("building" in line for line in calls.lines)
    assert calls.barriers == 1


@pytest.mark.parametrize("is_builder", [True, False])
def test_barrier_called_once_on_a_cache_hit(corpus: Path, tmp_path: Path, is_builder: bool) -> None:
    _prepare(corpus, tmp_path / "cache", Calls())
    calls = Calls()
    _prepare(corpus, tmp_path / "cache", calls, is_builder=is_builder)
    assert calls.barriers == 1


def test_barrier_called_once_even_when_corpus_is_invalid(tmp_path: Path) -> None:
    calls = Calls()
    with pytest.raises(ValueError, match=r"data\.corpus="):
        _prepare(tmp_path / "nope", tmp_path / "cache", calls)
    assert calls.barriers == 1


def test_non_builder_without_cache_raises_after_barrier(corpus: Path, tmp_path: Path) -> None:
    calls = Calls()
    with pytest.raises(RuntimeError, match="still missing after the barrier"):
        _prepare(corpus, tmp_path / "cache", calls, is_builder=False)
    assert calls.barriers == 1


def test_non_builder_loads_what_the_builder_wrote_before_the_barrier(corpus: Path, tmp_path: Path) -> None:
    builder = Calls()

    def barrier() -> None:  # the builder rank builds while this rank waits in the barrier
        _prepare(corpus, tmp_path / "cache", builder, is_builder=True)

    ds = _prepare(corpus, tmp_path / "cache", Calls(), is_builder=False, barrier=barrier)
    assert any("building" in line for line in builder.lines)
    assert len(ds.train_tokens) > 0


def test_builder_that_loses_the_rename_race_uses_the_winners_cache(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train_tokenizer = dataset_module.train_tokenizer

    def train_while_another_builder_finishes(texts, vocab_size):
        monkeypatch.setattr(dataset_module, "train_tokenizer", train_tokenizer)
        _prepare(corpus, tmp_path / "cache", Calls())  # the other builder wins the rename
        return train_tokenizer(texts, vocab_size)

    monkeypatch.setattr(dataset_module, "train_tokenizer", train_while_another_builder_finishes)
    calls = Calls()
    ds = _prepare(corpus, tmp_path / "cache", calls)
    assert any("another builder already wrote" in line for line in calls.lines)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the loser's temporary folder is gone
    assert len(ds.val_tokens) > 0


# ----------------------------------------------------------------------------------------- sampling

TOKENS = np.arange(1000, dtype=np.uint16)  # every window of consecutive ids is recognisable


def test_same_seed_and_step_give_the_same_batch() -> None:
    a = BatchSampler(TOKENS, seq_len=16, global_batch_size=8, seed=3)
    b = BatchSampler(TOKENS, seq_len=16, global_batch_size=8, seed=3)
    np.testing.assert_array_equal(a.global_batch(5), b.global_batch(5))


def test_different_step_or_seed_give_different_batches() -> None:
    sampler = BatchSampler(TOKENS, seq_len=16, global_batch_size=8, seed=3)
    other_seed = BatchSampler(TOKENS, seq_len=16, global_batch_size=8, seed=4)
    assert not np.array_equal(sampler.global_batch(5), sampler.global_batch(6))
    assert not np.array_equal(sampler.global_batch(5), other_seed.global_batch(5))


def test_rows_are_int64_windows_of_seq_len_plus_one_tokens() -> None:
    batch = BatchSampler(TOKENS, seq_len=16, global_batch_size=64, seed=0).global_batch(0)
    assert batch.dtype == np.int64 and batch.shape == (64, 17)
    np.testing.assert_array_equal(batch - batch[:, :1], np.broadcast_to(np.arange(17), batch.shape))
    assert batch.min() >= 0 and batch.max() <= len(TOKENS) - 1


def test_shortest_possible_split_gives_the_whole_split_as_each_row() -> None:
    batch = BatchSampler(TOKENS[:17], seq_len=16, global_batch_size=4, seed=0).global_batch(0)
    np.testing.assert_array_equal(batch, np.tile(np.arange(17), (4, 1)))


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_local_batches_concatenate_to_the_global_batch(dp_size: int) -> None:
    sampler = BatchSampler(TOKENS, seq_len=16, global_batch_size=8, seed=1)
    local = [sampler.local_batch(7, rank, dp_size) for rank in range(dp_size)]
    np.testing.assert_array_equal(np.concatenate(local), sampler.global_batch(7))


def test_indivisible_batch_is_an_error() -> None:
    sampler = BatchSampler(TOKENS, seq_len=16, global_batch_size=6, seed=1)
    with pytest.raises(ValueError, match=r"global_batch_size=6 is not divisible by dp_size=4"):
        sampler.local_batch(0, 0, 4)


def test_seq_len_longer_than_tokens_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"data\.seq_len=1000: .* only 1000 are available"):
        BatchSampler(TOKENS, seq_len=1000, global_batch_size=8, seed=0)


def test_validation_windows_are_consecutive_and_capped() -> None:
    windows = validation_windows(TOKENS, seq_len=100, max_windows=5)
    starts = np.arange(5)[:, None] * 100
    np.testing.assert_array_equal(windows, starts + np.arange(101))
    assert windows.dtype == np.int64
    assert len(validation_windows(TOKENS, seq_len=100, max_windows=50)) == 9  # (1000 - 1) // 100


def test_validation_split_shorter_than_a_window_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"data\.seq_len=1000: the validation split has only 1000 tokens"):
        validation_windows(TOKENS, seq_len=1000, max_windows=4)
