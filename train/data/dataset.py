"""Token files: the corpus tokenized once into ``train.bin`` / ``val.bin`` and memory-mapped by every rank.

Each document is followed by ``<|endoftext|>``; the files are uint16 (uint32 above 65,536 tokens) with a
JSON sidecar each (dtype, vocabulary, counts), in ``cache_dir/<key>/`` with the tokenizer. Record formats
(``train/data/formats.py``) are encoded by ``train/data/documents.py`` and may add ``{split}.mask.bin``
(1 where a token is a counted target). The key is a SHA-256 over what determines the tokens (the files'
contents, the format settings, the tokenizer), so a changed corpus or setting builds a new folder.
"""

from __future__ import annotations

import functools
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

from train.data.chat import ChatTemplate
from train.data.documents import encoded_documents, record_texts, write_record_splits
from train.data.formats import FormatSpec, resolve_format
from train.data.shards import open_split
from train.data.sources import MIB, byte_limits, corpus_files, read_text
from train.data.tokenizer import EOT, load_tokenizer_file, special_tokens, tokenizer_config, train_tokenizer
from train.progress import Progress

FORMAT_VERSION = 4  # 3: record formats, content hash; 4: the corpus cap on bytes read, val split bounds
STDLIB_DEFAULT_MB = 4.0  # the built-in corpus is capped even when data.max_corpus_mb is null
_ENCODE_BATCH = 64


@dataclass(frozen=True)
class RecordSetup:
    """How record corpora are read: the format settings, the chat template and the encoding workers."""

    spec: FormatSpec
    template: ChatTemplate
    workers: int = 0

    def key(self) -> dict:
        return {**self.spec.__dict__, "chat_template": self.template.source}


@dataclass
class Dataset:
    """A tokenizer and its memory-mapped, read-only train and held-out validation token streams."""

    tokenizer: tokenizers.Tokenizer
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    vocab_size: int
    eot_id: int
    max_token_id: int
    bos_id: int | None = None
    tokenizer_file: str | None = None  # the cached copy of the tokenizer.json
    train_mask: np.ndarray | None = None
    val_mask: np.ndarray | None = None
    folder: Path | None = None
    records: bool = False  # read as records (jsonl, chat, instruction): documents are records


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MIB):
            digest.update(block)
    return digest.hexdigest()


def _cache_key(
    files: list[Path],
    vocab_size: int,
    tokenizer_sha256: str | None,
    max_corpus_mb: float | None,
    val_fraction: float,
    records: dict | None = None,
) -> str:
    contents = [(str(p), _file_sha256(p)) for p in files]
    spec = {
        "format_version": FORMAT_VERSION,
        "records": records,
        "files": contents,
        "vocab_size": vocab_size,
        "tokenizer_sha256": tokenizer_sha256,
        "max_corpus_mb": max_corpus_mb,
        "val_fraction": val_fraction,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _is_complete(folder: Path) -> bool:
    return (folder / "train.json").is_file() and (folder / "val.json").is_file()


def _encode_documents(
    tok: tokenizers.Tokenizer,
    files: list[Path],
    eot_id: int,
    bos_id: int | None = None,
    read: Callable[[Path], str] = read_text,
    progress: Progress | None = None,
) -> Iterator[np.ndarray]:
    """Each document's token ids (after ``bos_id`` when given) followed by ``eot_id``; special tokens
    inside a text are plain text. ``read`` reads a file; ``progress`` advances by the bytes read."""
    head = [] if bos_id is None else [bos_id]
    for i in range(0, len(files), _ENCODE_BATCH):
        texts = [read(p) for p in files[i : i + _ENCODE_BATCH]]
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            yield np.array([*head, *enc.ids, eot_id], dtype=np.int64)
        if progress is not None:
            progress.update(sum(p.stat().st_size for p in files[i : i + _ENCODE_BATCH]))


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


def _tokenizer_into(
    tmp: Path,
    given: tokenizers.Tokenizer | None,
    given_path: str | None,
    texts: Iterable[str],
    vocab_size: int,
    log: Callable[[str], None],
) -> tokenizers.Tokenizer:
    """The given tokenizer (copied into the cache), or a byte-level BPE trained on ``texts`` (saved)."""
    if given is not None:
        shutil.copyfile(given_path, tmp / "tokenizer.json")
        return given
    log(f"data: training byte-level BPE tokenizer (vocab_size={vocab_size})")
    tok = train_tokenizer(texts, vocab_size)
    tok.save(str(tmp / "tokenizer.json"))
    return tok


def _build(
    folder: Path,
    key: str,
    files: list[Path],
    given: tokenizers.Tokenizer | None,
    given_path: str | None,
    vocab_size: int,
    val_fraction: float,
    log: Callable[[str], None],
    eos: tuple[str | None, int | None] = (None, None),
    records: RecordSetup | None = None,
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
        texts = (read(p) for p in files)
        if records is not None:
            texts = record_texts(files, records.spec, records.template)
        tok = _tokenizer_into(tmp, given, given_path, texts, vocab_size, log)
        tok.encode_special_tokens = True  # not saved; only the separators we insert are special tokens
        special = special_tokens(tok, given_path, *eos)
        eot_id, bos_id = special.eos_id, special.bos_id
        info = {
            "format_version": FORMAT_VERSION,
            "key": key,
            "dtype": "uint16" if tok.get_vocab_size() <= 65536 else "uint32",
            "vocab_size": tok.get_vocab_size(),
            "eot_id": eot_id,
            "bos_id": bos_id,
        }
        n_docs = len(files)
        log(f"data: tokenizing {n_docs} files (vocab {tok.get_vocab_size()})")
        if records is not None:
            docs, stats = encoded_documents(
                files,
                records.spec,
                records.template,
                str(tmp / "tokenizer.json"),
                (eot_id, bos_id),
                records.workers,
            )
            n_train, n_val = write_record_splits(tmp, docs, stats, info, val_fraction, log)
        else:
            progress = Progress("data: tokenizing", mib * MIB, "MiB", scale=MIB)
            encode = functools.partial(_encode_documents, tok, eot_id=eot_id, bos_id=bos_id, read=read)
            n_train, n_val = _write_text_splits(
                tmp, files, info, val_fraction, limits, functools.partial(encode, progress=progress), log
            )
            progress.close()
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


def _write_text_splits(
    tmp: Path,
    files: list[Path],
    info: dict,
    val_fraction: float,
    limits: dict[Path, int],
    encode: Callable[[list[Path]], Iterator[np.ndarray]],
    log: Callable[[str], None],
) -> tuple[int, int]:
    """Plain-text documents (one per file, ``encode``d) into the train and val token files: (train, val)
    tokens. The held-out documents of ``_val_documents``, or else the tail of the tokens."""
    n_docs = len(files)
    val_index = _val_documents(files, val_fraction, limits)
    if val_index is None:  # one document, or too few or too uneven ones: the tail of the tokens
        ids = np.concatenate(list(encode(files)))
        cut = min(max(int(len(ids) * (1 - val_fraction)), 1), len(ids) - 1)
        n_train = _write_split(tmp, "train", [ids[:cut]], {**info, "num_documents": n_docs})
        n_val = _write_split(tmp, "val", [ids[cut:]], {**info, "num_documents": n_docs})
        how = "the last tokens of the corpus"
    else:
        head = [p for i, p in enumerate(files) if i not in val_index]
        tail = [p for i, p in enumerate(files) if i in val_index]
        n_train = _write_split(tmp, "train", encode(head), {**info, "num_documents": len(head)})
        n_val = _write_split(tmp, "val", encode(tail), {**info, "num_documents": len(tail)})
        how = f"{len(tail)} of {n_docs} documents"
    log(f"data: validation split: {how}, {n_val / (n_train + n_val):.1%} of the tokens")
    return n_train, n_val


def _load(folder: Path) -> Dataset:
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    splits, masks, sidecars = [], [], []
    for split in ("train", "val"):
        sidecar = json.loads((folder / f"{split}.json").read_text())
        shape = (sidecar["num_tokens"],)
        if "shards" in sidecar:  # record corpora (train/data/documents.py)
            splits.append(open_split(folder, split, sidecar, mask=False))
            masks.append(open_split(folder, split, sidecar, mask=True))
        else:
            splits.append(np.memmap(folder / f"{split}.bin", dtype=sidecar["dtype"], mode="r", shape=shape))
            masks.append(None)
        sidecars.append(sidecar)
    return Dataset(
        tokenizer=tok,
        train_tokens=splits[0],
        val_tokens=splits[1],
        vocab_size=tok.get_vocab_size(),
        eot_id=sidecars[0]["eot_id"],
        max_token_id=max(s["max_token_id"] for s in sidecars),
        bos_id=sidecars[0].get("bos_id"),
        tokenizer_file=str(folder / "tokenizer.json"),
        train_mask=masks[0],
        val_mask=masks[1],
        folder=folder,
        records=bool(sidecars[0].get("records")),
    )


def _tokenizer_key(tokenizer: str | None, eos_token: str | None, model_eos_id: int | None) -> str | None:
    """What of the tokenizer enters the cache key: its file's SHA-256, plus the end/begin token choices
    when any is made (they change the token stream; without one, the key is as before)."""
    tok_sha = None if tokenizer is None else hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest()
    choices = [eos_token, model_eos_id, tokenizer_config(tokenizer)]
    return f"{tok_sha}:{json.dumps(choices, sort_keys=True)}" if any(choices) else tok_sha


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
    eos_token: str | None = None,
    model_eos_id: int | None = None,
    spec: FormatSpec | None = None,
    chat_template: str | None = None,
    workers: int = 0,
    encoding_errors: str = "strict",
) -> Dataset:
    """Tokenize ``corpus`` once into ``cache_dir`` and memory-map it; every rank of a job calls this.

    The cache folder is named by a SHA-256 key over the corpus files (paths, sizes, mtimes), vocab_size,
    the tokenizer file's content, max_corpus_mb, val_fraction and the format version. If it is missing,
    the ``is_builder`` rank builds it (atomically: temporary folder, then rename). Then every rank calls
    ``barrier()`` exactly once, also when this call fails, so ranks never diverge; then every rank loads
    it. Documents end with the end token and start with the begin token when the tokenizer adds one
    (`special_tokens`, from ``eos_token`` and ``model_eos_id`` too). The validation split is
    ``val_fraction`` of the documents, spread evenly over the corpus (at least one each side), or the
    tail of the tokens when that would hold less than half or more than twice ``val_fraction`` of the
    corpus (see ``_val_documents``). ``max_corpus_mb`` caps the bytes read, the last file cut short if
    needed (``None`` takes everything, except the built-in ``stdlib`` corpus: 4 MiB); ``encoding_errors``
    (``strict``, ``replace``) is for bytes that are not UTF-8.

    ``spec`` (default: ``auto`` format) says how files are read: when any file is a record format
    (``jsonl``, ``chat``, ``instruction``), every record is a document (``train/data/documents.py``),
    encoded by ``workers`` processes, and ``chat_template`` picks the chat template (``ChatTemplate``).
    """
    try:
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction={val_fraction}: must be strictly between 0 and 1")
        given = None if tokenizer is None else load_tokenizer_file(tokenizer)
        if given is not None:  # bad special tokens: fail on every rank
            special_tokens(given, tokenizer, eos_token, model_eos_id)
        if given is None and vocab_size < 256 + 1:
            raise ValueError(f"data.vocab_size={vocab_size}: must be >= 257 (256 byte tokens + {EOT})")
        if max_corpus_mb is None and corpus == "stdlib":
            max_corpus_mb = STDLIB_DEFAULT_MB
        files = corpus_files(corpus, max_corpus_mb)
        spec = spec or FormatSpec()
        records = None
        if any(resolve_format(p, spec.format) != "text" for p in files):
            records = RecordSetup(spec, ChatTemplate.resolve(chat_template, tokenizer), workers)
        tok_key = _tokenizer_key(tokenizer, eos_token, model_eos_id)
        rkey = None if records is None else records.key()
        key = _cache_key(files, vocab_size, tok_key, max_corpus_mb, val_fraction, rkey)
        folder = Path(cache_dir) / key[:16]
        if _is_complete(folder):
            log(f"data: cache hit {folder}")
        elif is_builder:
            _build(
                folder,
                key,
                files,
                given,
                tokenizer,
                vocab_size,
                val_fraction,
                log,
                (eos_token, model_eos_id),
                records,
                encoding_errors,
                byte_limits(files, max_corpus_mb),
            )
    finally:
        barrier()
    if not _is_complete(folder):
        raise RuntimeError(
            f"data: token cache {folder} is still missing after the barrier; the builder rank did not "
            f"write it (is data.cache_dir={cache_dir!r} shared by all ranks?)"
        )
    return _load(folder)
