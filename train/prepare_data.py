"""Tokenize a run's corpora ahead of training: `python -m train.prepare_data --config FILE [key=value ...]`.

It prepares exactly what the trainer would on first use (every `data.mixture` source, or `data.corpus`,
and `data.val_corpus`) into `data.cache_dir`: record files are streamed line by line and encoded by
`data.num_workers` processes, progress is printed every 10 seconds, and a re-run with the same inputs
(the files' contents, the format settings, the tokenizer) is a cache hit. Prints one line per source:
its cache folder, tokens and documents.
"""

from __future__ import annotations

import argparse
import json
import sys

from train.config import ConfigError, load_config
from train.data.loading import prepare_sources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="a run's YAML config (its data section is used)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        datasets, _, val_set = prepare_sources(
            config, True, lambda: None, lambda line: print(line, flush=True)
        )
    except (ConfigError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for ds in [*datasets, *([val_set] if val_set is not None else [])]:
        train = json.loads((ds.folder / "train.json").read_text())
        print(
            f"{ds.folder}: {len(ds.train_tokens)} train + {len(ds.val_tokens)} val tokens, "
            f"{train.get('num_documents')} train documents, masked: {ds.train_mask is not None}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
