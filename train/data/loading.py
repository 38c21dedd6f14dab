"""The data of a run: its sources prepared (tokenized and cached), the batch sampler and the validation
batch, from the `data` section of the config.

A single plain-text corpus without document masking keeps the original random-window `BatchSampler`
(so the default run's batches are those of earlier versions, to the bit). Anything else (record formats,
document masking, no packing, a mixture) uses `DocumentSampler`, whose batches carry ignored targets and
document ids. Every source after the first reuses the first one's tokenizer, so token ids agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from train.config import Config
from train.data.batch import TokenBatch
from train.data.dataset import Dataset, prepare_dataset
from train.data.formats import FormatSpec
from train.data.packing import DocumentSampler, Source, label_windows
from train.data.sampler import BatchSampler, validation_windows
from train.data.tokenizer import pretrained_eos_id


@dataclass
class TrainingData:
    """The first source's dataset (tokenizer, end-of-text id), the sampler and the validation batch."""

    dataset: Dataset
    sampler: BatchSampler | DocumentSampler
    validation: np.ndarray | TokenBatch
    document_masking: bool


def _sources(config: Config) -> list[tuple[str, str, float]]:
    dc = config.data
    if dc.mixture is None:
        return [(dc.corpus, dc.format, 1.0)]
    return [(e["corpus"], e.get("format", dc.format), float(e.get("weight", 1.0))) for e in dc.mixture]


def prepare_sources(
    config: Config, is_builder: bool, barrier: Callable[[], None], log: Callable[[str], None]
) -> tuple[list[Dataset], list[float], Dataset | None]:
    """Tokenize (or find in the cache) every source and `data.val_corpus`: (datasets, weights, val set).

    Every rank calls this (the `is_builder` rank writes); sources after the first use its tokenizer."""
    dc = config.data
    tokenizer = dc.tokenizer
    model_eos_id = pretrained_eos_id(config.model.get("pretrained"))
    datasets, weights = [], []
    for corpus, fmt, weight in [
        *_sources(config),
        *([(dc.val_corpus, dc.format, 0.0)] * bool(dc.val_corpus)),
    ]:
        spec = FormatSpec(fmt, dc.text_field, dc.prompt_field, dc.completion_field, dc.on_bad_record)
        ds = prepare_dataset(
            corpus,
            tokenizer=tokenizer,
            vocab_size=dc.vocab_size,
            cache_dir=dc.cache_dir,
            max_corpus_mb=dc.max_corpus_mb,
            val_fraction=dc.val_fraction,
            encoding_errors=dc.encoding_errors,
            is_builder=is_builder,
            barrier=barrier,
            log=log,
            eos_token=dc.eos_token,
            model_eos_id=model_eos_id,
            spec=spec,
            chat_template=dc.chat_template,
            workers=dc.num_workers,
        )
        if tokenizer is None:
            tokenizer = str(ds.folder / "tokenizer.json")
        datasets.append(ds)
        weights.append(weight)
    val_set = datasets.pop() if dc.val_corpus else None
    return datasets, weights[: len(datasets)], val_set


def load_training_data(
    config: Config, is_builder: bool, barrier: Callable[[], None], log: Callable[[str], None]
) -> TrainingData:
    """Prepare every source (and `data.val_corpus`) and build the sampler and validation batch."""
    dc, tc = config.data, config.train
    datasets, weights, val_set = prepare_sources(config, is_builder, barrier, log)
    first = datasets[0]
    masking = dc.document_masking
    if masking is None:
        masking = dc.mixture is not None or any(d.records for d in datasets)
    max_windows = tc.eval_batches * tc.global_batch_size
    if dc.mixture is None and not masking and dc.packing and first.train_mask is None and val_set is None:
        sampler = BatchSampler(first.train_tokens, dc.seq_len, tc.global_batch_size, tc.seed)
        return TrainingData(
            first, sampler, validation_windows(first.val_tokens, dc.seq_len, max_windows), False
        )
    sources = [Source(d.train_tokens, d.train_mask, w) for d, w in zip(datasets, weights, strict=True)]
    sampler = DocumentSampler(
        sources, dc.seq_len, tc.global_batch_size, tc.seed, first.eot_id, dc.packing, masking
    )
    held = [val_set] if val_set is not None else datasets
    if val_set is not None:  # the whole validation corpus: its own hold-out too
        held_tokens = [np.concatenate([val_set.train_tokens, val_set.val_tokens])]
        held_masks = [_concat_masks(val_set)]
    else:
        held_tokens = [d.val_tokens for d in held]
        held_masks = [d.val_mask for d in held]
    per_source = max(max_windows // len(held_tokens), 1)
    windows, masks = [], []
    for tokens, mask in zip(held_tokens, held_masks, strict=True):
        windows.append(validation_windows(tokens, dc.seq_len, per_source))
        ones = np.ones(len(tokens), dtype=np.uint8) if mask is None else mask
        masks.append(validation_windows(ones, dc.seq_len, per_source))
    validation = label_windows(np.concatenate(windows), np.concatenate(masks), first.eot_id, masking)
    return TrainingData(first, sampler, validation, masking)


def _concat_masks(ds: Dataset) -> np.ndarray | None:
    if ds.train_mask is None and ds.val_mask is None:
        return None
    parts = [
        np.ones(len(t), dtype=np.uint8) if m is None else m
        for t, m in ((ds.train_tokens, ds.train_mask), (ds.val_tokens, ds.val_mask))
    ]
    return np.concatenate(parts)
