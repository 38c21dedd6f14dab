"""Token files: the corpus tokenized once into ``train.bin`` / ``val.bin`` and memory-mapped by every rank.

Each document is followed by ``<|endoftext|>``; the files are uint16 (uint32 above 65,536 tokens) with a
JSON sidecar each (dtype, vocabulary, counts), in ``cache_dir/<key>/`` with the tokenizer. The key is a
SHA-256 over what determines the tokens, so a changed corpus or setting builds a new folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers

from train.data.sources import MIB, byte_limits, corpus_files, read_text
from train.data.tokenizer import EOT, load_tokenizer_file, train_tokenizer

FORMAT_VERSION = 3  # 3: the corpus cap applies to the bytes read; validation split bounds
_ENCODE_BATCH = 64


@dataclass
class Dataset:
    """A tokenizer and its memory-mapped, read-only train and held-out validation token streams."""

    tokenizer: tokenizers.Tokenizer
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    vocab_size: int
    eot_id: int
    max_token_id: int


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


def _encode_documents(
    tok: tokenizers.Tokenizer, files: list[Path], eot_id: int, read: Callable[[Path], str] = read_text
) -> Iterator[np.ndarray]:
    """Each document's token ids followed by ``eot_id``; ``<|endoftext|>`` inside a text is plain text."""
    for i in range(0, len(files), _ENCODE_BATCH):
        texts = [read(p) for p in files[i : i + _ENCODE_BATCH]]
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            yield np.array([*enc.ids, eot_id], dtype=np.int64)


def _val_documents(files: list[Path], val_fraction: float, limits: dict[Path, int]) -> set[int] | None:
    """The held-out documents, spread evenly over the corpus so validation sees every kind of text; None
    when they would not hold between half and twice `val_fraction` of the bytes (one document, or too few
    or too uneven ones): the split then takes the tail of the tokens, `val_fraction` of them."""
    n = len(files)
    if n == 1:
        return None
    k = min(max(round(n * val_fraction), 1), n - 1)
    index = {int((j + 0.5) * n / k) for j in range(k)}
    sizes = [limits.get(p, p.stat().st_size) for p in files]
    share = sum(sizes[i] for i in index) / max(1, sum(sizes))
    return index if val_fraction / 2 <= share <= 2 * val_fraction else None


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
    encoding_errors: str = "strict",
    limits: dict[Path, int] | None = None,
) -> None:
    """Build the cache in a temporary folder next to ``folder`` and rename it into place."""
    start, limits, replaced = time.perf_counter(), limits or {}, set()

    def read(path: Path) -> str:
        text = read_text(path, encoding_errors, limits.get(path))
        if encoding_errors == "replace" and "\ufffd" in text:
            replaced.add(path)
        return text

    mib = sum(limits.get(p, p.stat().st_size) for p in files) / MIB
    log(f"data: building token cache {folder} from {len(files)} files ({mib:.2f} MiB)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        if given is None:
            log(f"data: training byte-level BPE tokenizer (vocab_size={vocab_size})")
            tok = train_tokenizer((read(p) for p in files), vocab_size)
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
        val_index = _val_documents(files, val_fraction, limits)
        if val_index is None:  # one document, or too few or too uneven ones: the tail of the tokens
            ids = np.concatenate(list(_encode_documents(tok, files, eot_id, read)))
            cut = min(max(int(len(ids) * (1 - val_fraction)), 1), len(ids) - 1)
            n_train = _write_split(tmp, "train", [ids[:cut]], {**info, "num_documents": n_docs})
            n_val = _write_split(tmp, "val", [ids[cut:]], {**info, "num_documents": n_docs})
            how = "the last tokens of the corpus"
        else:
            head = [p for i, p in enumerate(files) if i not in val_index]
            tail = [p for i, p in enumerate(files) if i in val_index]
            n_train = _write_split(
                tmp, "train", _encode_documents(tok, head, eot_id, read), {**info, "num_documents": len(head)}
            )
            n_val = _write_split(
                tmp, "val", _encode_documents(tok, tail, eot_id, read), {**info, "num_documents": len(tail)}
            )
            how = f"{len(tail)} of {n_docs} documents"
        log(f"data: validation split: {how}, {n_val / (n_train + n_val):.1%} of the tokens")
        if replaced:
            log(
                f"data: {len(replaced)} files had bytes that are not UTF-8, read as U+FFFD "
                "(data.encoding_errors=replace)"
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
    encoding_errors: str = "strict",
) -> Dataset:
    """Tokenize ``corpus`` once into ``cache_dir`` and memory-map it; every rank of a job calls this.

    The cache folder is named by a SHA-256 key over the corpus files (paths, sizes, mtimes), vocab_size,
    the tokenizer file's content, max_corpus_mb, val_fraction and the format version. If it is missing,
    the ``is_builder`` rank builds it (atomically: temporary folder, then rename). Then every rank calls
    ``barrier()`` exactly once, also when this call fails, so ranks never diverge; then every rank loads
    it. The validation split is ``val_fraction`` of the documents, spread evenly over the corpus (at
    least one each side), or the tail of the tokens when that would hold less than half or more than twice
    ``val_fraction`` of the corpus (see ``_val_documents``). ``max_corpus_mb`` caps the bytes read, the
    last file cut short if needed; ``encoding_errors`` (``strict``, ``replace``) is for bytes that are
    not UTF-8.
    """
    try:
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction={val_fraction}: must be strictly between 0 and 1")
        given = None if tokenizer is None else load_tokenizer_file(tokenizer)
        if given is None and vocab_size < 256 + 1:
            raise ValueError(f"data.vocab_size={vocab_size}: must be >= 257 (256 byte tokens + {EOT})")
        files = corpus_files(corpus, max_corpus_mb)
        tok_sha = None if tokenizer is None else hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest()
        key = _cache_key(files, vocab_size, tok_sha, max_corpus_mb, val_fraction)
        folder = Path(cache_dir) / key[:16]
        if _is_complete(folder):
            log(f"data: cache hit {folder}")
        elif is_builder:
            limits = byte_limits(files, max_corpus_mb)
            _build(
                folder, key, files, given, tokenizer, vocab_size, val_fraction, log, encoding_errors, limits
            )
    finally:
        barrier()
    if not _is_complete(folder):
        raise RuntimeError(
            f"data: token cache {folder} is still missing after the barrier; the builder rank did not "
            f"write it (is data.cache_dir={cache_dir!r} shared by all ranks?)"
        )
    return _load(folder)
