"""Corpus, tokenizer, token files and a layout-independent batch sampler.

Pipeline: corpus files -> byte-level BPE tokenizer (HF ``tokenizers``) -> one token stream per split, each
document followed by ``<|endoftext|>`` -> ``train.bin`` / ``val.bin`` (uint16 or uint32) with JSON sidecars
in ``cache_dir/<key>/``, written once by the builder rank and memory-mapped read-only by every rank.

Sampling is stateless: the global batch at step k is a pure function of (seed, k, tokens, seq_len,
global_batch_size), and data-parallel rank r of d takes rows [r*B/d, (r+1)*B/d) of it, so the batch a step
trains on does not depend on the parallel layout.

Modules: ``sources`` (which files are documents), ``tokenizer`` (BPE training, a given tokenizer.json),
``formats`` (text, JSONL, chat and instruction records; malformed-record errors), ``chat`` (chat
templates), ``documents`` (documents to token ids and loss masks, worker processes, split writing),
``dataset`` (token files, their cache and ``prepare_dataset``), ``sampler`` (``BatchSampler``, validation
windows), ``packing`` (``DocumentSampler``: packed windows with document ids, one document per row,
mixtures), ``batch`` (``TokenBatch``: inputs, targets with ``-100``, document ids), ``loading`` (a run's
data from its config).
"""

from train.data.batch import IGNORE_INDEX, TokenBatch
from train.data.dataset import FORMAT_VERSION, Dataset, prepare_dataset
from train.data.formats import BadRecord, FormatSpec
from train.data.packing import DocumentSampler, Source, label_windows
from train.data.sampler import BatchSampler, validation_windows
from train.data.sources import corpus_files
from train.data.tokenizer import EOT

__all__ = [
    "EOT",
    "IGNORE_INDEX",
    "BadRecord",
    "DocumentSampler",
    "FormatSpec",
    "Source",
    "TokenBatch",
    "label_windows",
    "FORMAT_VERSION",
    "BatchSampler",
    "Dataset",
    "corpus_files",
    "prepare_dataset",
    "validation_windows",
]
