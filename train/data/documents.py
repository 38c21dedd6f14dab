"""Documents to token files: encode each document, split held-out documents off, write the streams.

``encode_documents`` is the one place a document (a list of ``(text, trained)`` segments) becomes token
ids and a loss mask: the segments' ids in order, then the end-of-text token, which is trained when the
last segment is. Record corpora (``jsonl``, ``chat``, ``instruction``) are streamed line by line and
encoded in batches by ``workers`` processes (at most ``2 * workers`` batches in flight, so memory does not
grow with the corpus); every ``period``-th document goes to validation, and the last one if none did.
The files are shards (``train/data/shards.py``); the mask shards ``{split}-NNNNN.mask.bin`` (uint8: 1
where the token is a counted target) are kept only when some token is not trained on.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import tokenizers

from train.data import shards
from train.data.formats import FormatSpec, RecordStats, Segment, read_documents, resolve_format
from train.data.shards import shard_name

_BATCH_DOCS = 256
_worker_tokenizer: tokenizers.Tokenizer | None = None


def encode_documents(
    tok: tokenizers.Tokenizer, docs: list[list[Segment]], eot_id: int, bos_id: int | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids, trained flags) of each document: ``bos_id`` (when the tokenizer adds one; never
    trained), its segments' ids, then ``eot_id``, trained when the last segment is. One tokenizer call
    for all the segments (the tokenizer parallelises it)."""
    encodings = iter(tok.encode_batch([text for doc in docs for text, _ in doc], add_special_tokens=False))
    out = []
    for doc in docs:
        ids, trained = ([], []) if bos_id is None else ([bos_id], [0])
        for (_, flag), enc in zip(doc, encodings, strict=False):
            ids += enc.ids
            trained += [flag] * len(enc.ids)
        ids.append(eot_id)
        trained.append(doc[-1][1])
        out.append((np.array(ids, dtype=np.int64), np.array(trained, dtype=np.uint8)))
    return out


def encode_document(
    tok: tokenizers.Tokenizer, segments: list[Segment], eot_id: int, bos_id: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``encode_documents`` of one document."""
    return encode_documents(tok, [segments], eot_id, bos_id)[0]


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizers.Tokenizer.from_file(tokenizer_path)
    _worker_tokenizer.encode_special_tokens = True


def _encode_batch(
    docs: list[list[Segment]], eot_id: int, bos_id: int | None
) -> list[tuple[np.ndarray, np.ndarray]]:
    return encode_documents(_worker_tokenizer, docs, eot_id, bos_id)


def record_texts(files: list[Path], spec: FormatSpec, template) -> Iterator[str]:
    """Each document's text (segments joined), for training a tokenizer."""
    stats = RecordStats()
    for path in files:
        for _, segments in read_documents(path, resolve_format(path, spec.format), spec, template, stats):
            yield "".join(text for text, _ in segments)


def _batches(files: list[Path], spec: FormatSpec, template, stats: RecordStats) -> Iterator[list]:
    batch = []
    for path in files:
        for _, segments in read_documents(path, resolve_format(path, spec.format), spec, template, stats):
            batch.append(segments)
            if len(batch) == _BATCH_DOCS:
                yield batch
                batch = []
    if batch:
        yield batch


def encoded_documents(
    files: list[Path],
    spec: FormatSpec,
    template,
    tokenizer_path: str,
    separators: tuple[int, int | None],
    workers: int,
) -> tuple[Iterator[tuple[np.ndarray, np.ndarray]], RecordStats]:
    """Every document's (ids, trained) in corpus order, encoded by ``workers`` processes (0: here);
    ``separators`` is (end-of-document id, begin-of-document id or None)."""
    eot_id, bos_id = separators
    stats = RecordStats()
    batches = _batches(files, spec, template, stats)
    if workers < 1:
        _init_worker(tokenizer_path)
        return (doc for batch in batches for doc in _encode_batch(batch, eot_id, bos_id)), stats

    def run() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        context = multiprocessing.get_context("spawn")  # no fork of a process with tokenizer threads
        with context.Pool(workers, _init_worker, (tokenizer_path,)) as pool:
            pending: deque = deque()
            for batch in batches:
                pending.append(pool.apply_async(_encode_batch, (batch, eot_id, bos_id)))
                if len(pending) >= 2 * workers:
                    yield from pending.popleft().get()
            while pending:
                yield from pending.popleft().get()

    return run(), stats


class SplitWriter:
    """Appends documents to shards ``{split}-NNNNN.bin`` (and ``.mask.bin``) of at most
    ``shards.SHARD_TOKENS`` tokens (a document may straddle two); ``close`` writes the sidecar, whose
    ``shards`` lists the shard sizes."""

    def __init__(self, folder: Path, split: str, info: dict) -> None:
        self.folder, self.split, self.info = folder, split, info
        self.shards: list[int] = []
        self.num_tokens = self.num_documents = self.max_token_id = self.untrained = 0
        self._open()

    def _open(self) -> None:
        self.tokens = open(self.folder / shard_name(self.split, len(self.shards)), "wb")
        self.mask = open(self.folder / shard_name(self.split, len(self.shards), mask=True), "wb")
        self.shards.append(0)

    def add(self, ids: np.ndarray, trained: np.ndarray) -> None:
        ids = ids.astype(self.info["dtype"])
        start = 0
        while start < len(ids):
            if self.shards[-1] == shards.SHARD_TOKENS:
                self.tokens.close()
                self.mask.close()
                self._open()
            stop = min(len(ids), start + shards.SHARD_TOKENS - self.shards[-1])
            self.tokens.write(ids[start:stop].tobytes())
            self.mask.write(trained[start:stop].tobytes())
            self.shards[-1] += stop - start
            start = stop
        self.num_tokens += len(ids)
        self.num_documents += 1
        self.max_token_id = max(self.max_token_id, int(ids.max()))
        self.untrained += int(len(trained) - trained.sum())

    def close(self, stats: RecordStats) -> int:
        self.tokens.close()
        self.mask.close()
        if not self.untrained:
            for i in range(len(self.shards)):
                (self.folder / shard_name(self.split, i, mask=True)).unlink()
        sidecar = {
            **self.info,
            "split": self.split,
            "num_tokens": self.num_tokens,
            "num_documents": self.num_documents,
            "max_token_id": self.max_token_id,
            "has_mask": bool(self.untrained),
            "shards": self.shards,
            "records": True,
            "skipped_records": stats.skipped,
        }
        (self.folder / f"{self.split}.json").write_text(json.dumps(sidecar, indent=2) + "\n")
        return self.num_tokens


def write_record_splits(
    folder: Path,
    docs: Iterable[tuple[np.ndarray, np.ndarray]],
    stats: RecordStats,
    info: dict,
    val_fraction: float,
    log: Callable[[str], None],
) -> tuple[int, int]:
    """Stream ``docs`` into the train and val files: every ``round(1 / val_fraction)``-th document (the
    last one if none) is held out. Logs progress every 10 seconds. Returns (train, val) tokens."""
    period = max(round(1 / val_fraction), 2)
    train, val = SplitWriter(folder, "train", info), SplitWriter(folder, "val", info)
    held = None  # one document kept back, so the last can go to validation if none has
    started = last_report = time.perf_counter()
    for j, doc in enumerate(docs):
        if held is not None:
            train.add(*held)
        held = None
        if j % period == period // 2:
            val.add(*doc)
        else:
            held = doc
        if time.perf_counter() - last_report > 10:
            last_report = time.perf_counter()
            rate = (train.num_tokens + val.num_tokens) / (last_report - started)
            log(f"data: {j + 1} documents, {train.num_tokens + val.num_tokens} tokens ({rate:,.0f} tokens/s)")
    if held is not None:
        (val if val.num_documents == 0 else train).add(*held)
    if train.num_documents == 0 or val.num_documents == 0:
        raise ValueError(
            f"data.corpus: {stats.documents} usable documents; need at least 2 (one trained on, one held "
            "out for validation)"
        )
    if stats.skipped:
        log(f"data: skipped {stats.skipped_total} malformed records ({stats.skipped})")
    return train.close(stats), val.close(stats)
