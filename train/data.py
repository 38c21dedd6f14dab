"""Corpus, tokenizer, token files and a layout-independent batch sampler.

Pipeline: corpus files -> byte-level BPE tokenizer (HF ``tokenizers``) -> one token stream per split, each
document followed by ``<|endoftext|>`` -> ``train.bin`` / ``val.bin`` (uint16 or uint32) with JSON sidecars
in ``cache_dir/<key>/``, written once by the builder rank and memory-mapped read-only by every rank.

Sampling is stateless: the global batch at step k is a pure function of (seed, k, tokens, seq_len,
global_batch_size), and data-parallel rank r of d takes rows [r*B/d, (r+1)*B/d) of it, so the batch a step
trains on does not depend on the parallel layout.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
FORMAT_VERSION = 2
_SNIFF_BYTES = 8192
_ENCODE_BATCH = 64
_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_MIB = 1 << 20


@dataclass
class Dataset:
    """A tokenizer and its memory-mapped, read-only train and held-out validation token streams."""

    tokenizer: tokenizers.Tokenizer
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    vocab_size: int
    eot_id: int
    max_token_id: int


# ---------------------------------------------------------------------------------------------- corpus


def _stdlib_sources(root: Path) -> list[Path]:
    """The standard library's ``.py`` files under ``root``, without tests and installed packages."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_STDLIB_DIRS and "test" not in d.lower()]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _folder_files(root: Path) -> list[Path]:
    """Regular files under ``root``, recursively, sorted by relative path; hidden entries are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
    return sorted((p for p in found if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def _has_text(path: Path) -> bool:
    """True if the file has no NUL byte in its first 8 KiB (not a binary) and is not all whitespace."""
    with open(path, "rb") as f:
        chunk = f.read(_SNIFF_BYTES)
        if b"\0" in chunk:
            return False
        while chunk:
            if chunk.strip():
                return True
            chunk = f.read(_MIB)
    return False


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def corpus_files(corpus: str, max_corpus_mb: float | None = None) -> list[Path]:
    """The documents of ``corpus`` in a deterministic order, capped at about ``max_corpus_mb`` MiB.

    ``"stdlib"`` is the running Python's standard-library ``.py`` sources (no tests, no installed
    packages); anything else is a text file or a folder of text files (recursive). Files are taken in
    sorted relative-path order until their total size reaches the cap; binaries (a NUL byte in the first
    8 KiB) and empty or whitespace-only files are skipped. Raises ``ValueError`` naming ``data.corpus``
    when nothing usable is found.
    """
    if max_corpus_mb is not None and not max_corpus_mb > 0:
        raise ValueError(f"data.max_corpus_mb={max_corpus_mb}: expected a positive number of MiB or None")
    if corpus == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        candidates = _stdlib_sources(root)
        where = f"the Python standard library's .py sources under {root}"
    else:
        path = Path(corpus).resolve()
        if path.is_file():
            candidates = [path]
        elif path.is_dir():
            candidates = _folder_files(path)
        else:
            raise ValueError(
                f"data.corpus={corpus!r}: no such file or folder (expected 'stdlib' or a path to text)"
            )
        where = str(path)
    cap = math.inf if max_corpus_mb is None else max_corpus_mb * _MIB
    chosen, total = [], 0
    for p in candidates:
        if total >= cap:
            break
        if _has_text(p):
            chosen.append(p)
            total += p.stat().st_size
    if not chosen:
        raise ValueError(
            f"data.corpus={corpus!r}: no usable text in {where} ({len(candidates)} files; expected UTF-8 "
            "text, and binary, empty or whitespace-only files are skipped)"
        )
    return chosen


# ------------------------------------------------------------------------------------------- tokenizer


def _train_tokenizer(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
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


def _load_tokenizer_file(path: str) -> tokenizers.Tokenizer:
    if not Path(path).is_file():
        raise ValueError(f"data.tokenizer={path!r}: no such file (expected a tokenizer.json)")
    try:
        tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise ValueError(f"data.tokenizer={path!r}: not a valid tokenizer.json ({e})") from e
    if tok.token_to_id(EOT) is None:
        raise ValueError(f"data.tokenizer={path!r}: has no {EOT} token to separate documents")
    return tok


# ------------------------------------------------------------------------------------------ token files


def _cache_key(
    files: list[Path],
    vocab_size: int,
    tokenizer_sha256: str | None,
    max_corpus_mb: float | None,
    val_fraction: float,
) -> str:
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    spec = {
        "format_version": FORMAT_VERSION,
        "files": stats,
        "vocab_size": vocab_size,
        "tokenizer_sha256": tokenizer_sha256,
        "max_corpus_mb": max_corpus_mb,
        "val_fraction": val_fraction,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _is_complete(folder: Path) -> bool:
    return (folder / "train.json").is_file() and (folder / "val.json").is_file()


def _encode_documents(tok: tokenizers.Tokenizer, files: list[Path], eot_id: int) -> Iterator[np.ndarray]:
    """Each document's token ids followed by ``eot_id``; ``<|endoftext|>`` inside a text is plain text."""
    for i in range(0, len(files), _ENCODE_BATCH):
        texts = [_read_text(p) for p in files[i : i + _ENCODE_BATCH]]
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            yield np.array([*enc.ids, eot_id], dtype=np.int64)


def _write_split(folder: Path, split: str, docs: Iterable[np.ndarray], info: dict) -> int:
    """Write ``{split}.bin`` and its ``{split}.json`` sidecar; returns the number of tokens written."""
    num_tokens, max_token_id = 0, 0
    with open(folder / f"{split}.bin", "wb") as f:
        for ids in docs:
            f.write(ids.astype(info["dtype"]).tobytes())
            num_tokens += len(ids)
            max_token_id = max(max_token_id, int(ids.max()))
    sidecar = {**info, "split": split, "num_tokens": num_tokens, "max_token_id": max_token_id}
    (folder / f"{split}.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return num_tokens


def _build(
    folder: Path,
    key: str,
    files: list[Path],
    given: tokenizers.Tokenizer | None,
    given_path: str | None,
    vocab_size: int,
    val_fraction: float,
    log: Callable[[str], None],
) -> None:
    """Build the cache in a temporary folder next to ``folder`` and rename it into place."""
    start = time.perf_counter()
    mib = sum(p.stat().st_size for p in files) / _MIB
    log(f"data: building token cache {folder} from {len(files)} files ({mib:.2f} MiB)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        if given is None:
            log(f"data: training byte-level BPE tokenizer (vocab_size={vocab_size})")
            tok = _train_tokenizer((_read_text(p) for p in files), vocab_size)
            tok.save(str(tmp / "tokenizer.json"))
        else:
            tok = given
            shutil.copyfile(given_path, tmp / "tokenizer.json")
        tok.encode_special_tokens = True  # not saved; only the separators we insert are EOT tokens
        eot_id = tok.token_to_id(EOT)
        info = {
            "format_version": FORMAT_VERSION,
            "key": key,
            "dtype": "uint16" if tok.get_vocab_size() <= 65536 else "uint32",
            "vocab_size": tok.get_vocab_size(),
            "eot_id": eot_id,
        }
        n_docs = len(files)
        log(f"data: tokenizing {n_docs} documents (vocab {tok.get_vocab_size()})")
        if n_docs == 1:
            ids = next(_encode_documents(tok, files, eot_id))
            cut = min(max(int(len(ids) * (1 - val_fraction)), 1), len(ids) - 1)
            n_train = _write_split(tmp, "train", [ids[:cut]], {**info, "num_documents": 1})
            n_val = _write_split(tmp, "val", [ids[cut:]], {**info, "num_documents": 1})
        else:
            n_val_docs = min(max(round(n_docs * val_fraction), 1), n_docs - 1)
            # Spread the held-out documents evenly over the corpus so validation sees every kind of text.
            val_index = {int((j + 0.5) * n_docs / n_val_docs) for j in range(n_val_docs)}
            head = [p for i, p in enumerate(files) if i not in val_index]
            tail = [p for i, p in enumerate(files) if i in val_index]
            n_train = _write_split(
                tmp, "train", _encode_documents(tok, head, eot_id), {**info, "num_documents": len(head)}
            )
            n_val = _write_split(
                tmp, "val", _encode_documents(tok, tail, eot_id), {**info, "num_documents": len(tail)}
            )
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by every rank
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _is_complete(folder):
                raise
            log(f"data: another builder already wrote {folder}; keeping that one")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    seconds = time.perf_counter() - start
    log(f"data: wrote {n_train} train + {n_val} val tokens ({info['dtype']}) in {seconds:.1f}s")


def _load(folder: Path) -> Dataset:
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    splits, sidecars = [], []
    for split in ("train", "val"):
        sidecar = json.loads((folder / f"{split}.json").read_text())
        shape = (sidecar["num_tokens"],)
        splits.append(np.memmap(folder / f"{split}.bin", dtype=sidecar["dtype"], mode="r", shape=shape))
        sidecars.append(sidecar)
    return Dataset(
        tokenizer=tok,
        train_tokens=splits[0],
        val_tokens=splits[1],
        vocab_size=tok.get_vocab_size(),
        eot_id=sidecars[0]["eot_id"],
        max_token_id=max(s["max_token_id"] for s in sidecars),
    )


def prepare_dataset(
    corpus: str,
    *,
    tokenizer: str | None,
    vocab_size: int,
    cache_dir: str,
    max_corpus_mb: float | None,
    val_fraction: float,
    is_builder: bool,
    barrier: Callable[[], None],
    log: Callable[[str], None] = print,
) -> Dataset:
    """Tokenize ``corpus`` once into ``cache_dir`` and memory-map it; every rank of a job calls this.

    The cache folder is named by a SHA-256 key over the corpus files (paths, sizes, mtimes), vocab_size,
    the tokenizer file's content, max_corpus_mb, val_fraction and the format version. If it is missing,
    the ``is_builder`` rank builds it (atomically: temporary folder, then rename). Then every rank calls
    ``barrier()`` exactly once, also when this call fails, so ranks never diverge; then every rank loads
    it. The validation split is ``val_fraction`` of the documents, spread evenly over the corpus (at
    least one each side), or the tail of the tokens when there is a single document.
    """
    try:
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction={val_fraction}: must be strictly between 0 and 1")
        given = None if tokenizer is None else _load_tokenizer_file(tokenizer)
        if given is None and vocab_size < 256 + 1:
            raise ValueError(f"data.vocab_size={vocab_size}: must be >= 257 (256 byte tokens + {EOT})")
        files = corpus_files(corpus, max_corpus_mb)
        tok_sha = None if tokenizer is None else hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest()
        key = _cache_key(files, vocab_size, tok_sha, max_corpus_mb, val_fraction)
        folder = Path(cache_dir) / key[:16]
        if _is_complete(folder):
            log(f"data: cache hit {folder}")
        elif is_builder:
            _build(folder, key, files, given, tokenizer, vocab_size, val_fraction, log)
    finally:
        barrier()
    if not _is_complete(folder):
        raise RuntimeError(
            f"data: token cache {folder} is still missing after the barrier; the builder rank did not "
            f"write it (is data.cache_dir={cache_dir!r} shared by all ranks?)"
        )
    return _load(folder)


# ------------------------------------------------------------------------------------------- sampling


class BatchSampler:
    """Random windows of ``seq_len + 1`` tokens; the batch at a step depends only on (seed, step).

    Row i of ``global_batch(step)`` is ``tokens[o_i : o_i + seq_len + 1]`` with offsets
    ``o ~ default_rng([seed, step]).integers(0, len(tokens) - seq_len, size=global_batch_size)``.
    A step may ask for another length and number of rows (a sequence-length curriculum): the same rule
    with those values, still a pure function of (seed, step, seq_len, batch_size).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch_size: int, seed: int):
        if seq_len < 1:
            raise ValueError(f"data.seq_len={seq_len}: must be >= 1")
        if global_batch_size < 1:
            raise ValueError(f"train.global_batch_size={global_batch_size}: must be >= 1")
        if seed < 0:
            raise ValueError(f"train.seed={seed}: must be >= 0")
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"data.seq_len={seq_len}: a window needs seq_len + 1 = {seq_len + 1} tokens but only "
                f"{len(tokens)} are available"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.seed = seed

    def _shape(self, seq_len: int | None, batch_size: int | None) -> tuple[int, int]:
        seq_len = self.seq_len if seq_len is None else seq_len
        batch_size = self.global_batch_size if batch_size is None else batch_size
        if not 1 <= seq_len < len(self.tokens):
            raise ValueError(f"seq_len={seq_len}: must be in [1, {len(self.tokens) - 1}] for these tokens")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        return seq_len, batch_size

    def _offsets(self, step: int, seq_len: int | None = None, batch_size: int | None = None) -> np.ndarray:
        if step < 0:
            raise ValueError(f"step={step}: must be >= 0")
        seq_len, batch_size = self._shape(seq_len, batch_size)
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - seq_len, size=batch_size)

    def _rows(self, offsets: np.ndarray, seq_len: int | None = None) -> np.ndarray:
        seq_len = self.seq_len if seq_len is None else seq_len
        index = offsets[:, None] + np.arange(seq_len + 1)
        return np.array(self.tokens[index], dtype=np.int64)

    def global_batch(
        self, step: int, seq_len: int | None = None, batch_size: int | None = None
    ) -> np.ndarray:
        """The ``(batch_size, seq_len + 1)`` int64 batch of ``step`` (defaults: the sampler's)."""
        return self._rows(self._offsets(step, seq_len, batch_size), seq_len)

    def local_batch(
        self,
        step: int,
        dp_rank: int,
        dp_size: int,
        seq_len: int | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Rows ``[dp_rank * B / dp_size, (dp_rank + 1) * B / dp_size)`` of ``global_batch(step)``, B the
        batch size."""
        rows_total = self.global_batch_size if batch_size is None else batch_size
        if dp_size < 1 or rows_total % dp_size:
            key = "train.global_batch_size" if batch_size is None else "batch_size"
            raise ValueError(f"{key}={rows_total} is not divisible by dp_size={dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank}: must be in [0, dp_size={dp_size})")
        rows = rows_total // dp_size
        offsets = self._offsets(step, seq_len, batch_size)
        return self._rows(offsets[dp_rank * rows : (dp_rank + 1) * rows], seq_len)


def validation_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> np.ndarray:
    """Consecutive windows ``tokens[i*seq_len : i*seq_len + seq_len + 1]`` from the start, at most
    ``max_windows`` of them, as an ``(n, seq_len + 1)`` int64 array with ``n >= 1``."""
    if seq_len < 1:
        raise ValueError(f"data.seq_len={seq_len}: must be >= 1")
    if max_windows < 1:
        raise ValueError(f"max_windows={max_windows}: must be >= 1")
    n = min((len(tokens) - 1) // seq_len, max_windows)
    if n < 1:
        raise ValueError(
            f"data.seq_len={seq_len}: the validation split has only {len(tokens)} tokens, fewer than one "
            f"window of seq_len + 1 = {seq_len + 1}"
        )
    index = (np.arange(n) * seq_len)[:, None] + np.arange(seq_len + 1)
    return np.array(tokens[index], dtype=np.int64)
