"""`python -m train.export CHECKPOINT OUT`: a training checkpoint as one Hugging Face DeepSeek folder.

CHECKPOINT is a checkpoint folder (`RUN/checkpoints/step-NNNNNNNN`), or a run's `out_dir` or its
`checkpoints/` folder (then its newest valid checkpoint). It is checked against its SHA-256 sums, read
under whatever layout wrote it, and the whole model is rebuilt in this one process from the checkpoint's
resolved config: weights from the fp32 master copies where the run had them (ZeRO, 16-bit training),
LoRA adapters merged into their base weights. OUT gets `config.json` + `model.safetensors` through
train/hf_folder.py: the same folder as the run's `final/` (transformers' DeepseekV3ForCausalLM loads it;
dtype, bos/eos ids, generation config, tokenizer files; the tokenizer is `data.tokenizer` or the run's
`final/tokenizer.json`).

NF4 (QLoRA) bases are not in checkpoints (they are frozen and rebuilt from their source): they are
re-quantized here from `model.pretrained` (or the seed) in one piece. NF4 blocks are those of the full
tensor at any tp, so this gives exactly the codes the run's tp shards held: the export is the run's model.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from models.config import MLAConfig
from parallel import checkpoint
from parallel.topology import ParallelDims, Topology
from train.build import build_model
from train.checkpointing import choose_checkpoint
from train.config import ConfigError, DistributedConfig, config_from_dict
from train.context import fail
from train.hf_folder import write_hf_folder
from train.progress import Progress


def resolve(path: str | Path) -> Path:
    """The checkpoint folder that `path` names (see the module docstring); errors say why not."""
    found, notes, error = choose_checkpoint(str(path), Path(path))
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    if error:
        raise ValueError(error)
    return found


def export(path: str | Path, out: str | Path) -> Path:
    """Write the model of checkpoint `path` as a Hugging Face DeepSeek folder `out`; returns `out`."""
    path = resolve(path)
    saved = checkpoint.read_manifest(path)["config"]
    if saved is None:
        raise ValueError(f"{path}: the checkpoint has no config; export needs the run's resolved config")
    original = config_from_dict(saved)
    nf4 = original.lora.enabled and original.lora.quantize_base == "nf4"
    model = {k: v for k, v in original.model.items() if k != "pretrained"}
    config = replace(
        original,
        # the checkpoint holds every weight except NF4 bases, which are rebuilt from their source
        model={**model, "pretrained": original.model.get("pretrained") if nf4 else None},
        distributed=DistributedConfig(),
        train=replace(original.train, precision="fp32"),
    )
    topology = Topology(ParallelDims())
    parts = build_model(config, MLAConfig(**model), topology)
    progress = Progress(f"loading {path}", 1, "tensors")
    checkpoint.load(path, parts, topology=topology, restore_rng=False, progress=progress.track)
    progress.close()
    run_dir = path.parent.parent
    tokenizer = next(
        (
            t
            for t in (original.data.tokenizer, run_dir / "final" / "tokenizer.json")
            if t and Path(t).is_file()
        ),
        None,
    )
    write_hf_folder(parts, out, original, tokenizer)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m train.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a checkpoint folder, or a run's out_dir / checkpoints folder")
    parser.add_argument("out", help="the Hugging Face folder to write")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        fail(str(error).splitlines()[0] if str(error) else repr(error))
    print(f"exported {args.checkpoint} to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
