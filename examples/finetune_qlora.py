"""Fine-tune a DeepSeek-format model with QLoRA: frozen 4-bit NF4 base weights, trainable LoRA adapters.

    python examples/finetune_qlora.py                  # makes a small base model first (a few minutes)
    python examples/finetune_qlora.py --pretrained DIR [section.key=value ...]
    torchrun --standalone --nproc-per-node 2 examples/finetune_qlora.py --pretrained DIR distributed.tp=2

Step 1 (only without --pretrained, in one process) makes a stand-in for a downloaded checkpoint: a tiny MLA
model trained briefly on the start of the built-in corpus (the Python standard library); the run's
`final/` is already a Hugging Face DeepSeek-V3 folder (config.json, model.safetensors, tokenizer files).
Any DeepSeek-V2/V3 folder (dense or MoE) works the same way.

Step 2 fine-tunes it on another text (the standard library's `email` package) and is exactly the command

    python examples/train_mla.py model.pretrained=DIR \\
        lora.enabled=true lora.quantize_base=nf4 lora.r=8 lora.alpha=16 data.corpus=... train.steps=...

The targeted linears (here every linear of the decoder layers, as in the QLoRA paper) have their weights
quantized to NF4, each rank its own tensor-parallel shard (in blocks of the full weight, so the codes do
not depend on tp), and frozen; only the adapters train. The run writes `adapter/` in PEFT's layout
(`peft.AutoPeftModelForCausalLM.from_pretrained(DIR/adapter)` reads it), `final/` (the NF4-rounded base
with the adapters merged in) and the usual `metrics.jsonl`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sysconfig
from pathlib import Path

from train.config import load_config
from train.trainer import train_once

OUT = Path("runs/qlora")
BASE = [  # a ~1.3M-parameter MLA model, trained for a couple of minutes
    "model.hidden_size=128",
    "model.num_layers=4",
    "model.num_heads=4",
    "model.q_lora_rank=64",
    "model.kv_lora_rank=64",
    "model.qk_nope_head_dim=32",
    "model.qk_rope_head_dim=16",
    "model.v_head_dim=32",
    "model.intermediate_size=384",  # down_proj: 192 input columns per rank at tp=2, whole NF4 blocks
    "model.max_seq_len=128",
    "data.vocab_size=2048",
    "data.max_corpus_mb=1",
    "train.steps=150",
    "train.eval_every=0",
    "train.sample_tokens=0",
]
FINETUNE = [
    "lora.enabled=true",
    "lora.quantize_base=nf4",
    "lora.r=8",
    "lora.alpha=16",
    "lora.targets=[q_a_proj,q_b_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj,gate_proj,up_proj,down_proj]",
    f"data.corpus={Path(sysconfig.get_paths()['stdlib']) / 'email'}",
    "optim.lr=5e-3",
    "optim.warmup_steps=5",
    "train.steps=60",
    "train.eval_every=20",
    "train.sample_tokens=0",
]


def make_base_model(folder: Path) -> Path:
    """Train a tiny model with the library's trainer; its `final/` is a DeepSeek folder with its tokenizer."""
    result = train_once(load_config(None, [*BASE, f"train.out_dir={folder / 'training'}"]))
    shutil.copytree(Path(result["out_dir"]) / "final", folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pretrained", type=Path, help="a DeepSeek-format folder (default: make one)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the fine-tuning job")
    args = parser.parse_args()

    pretrained = args.pretrained
    if pretrained is None:
        pretrained = OUT / "base"
        if not (pretrained / "config.json").exists():
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise SystemExit("make the base model in one process first, or pass --pretrained DIR")
            make_base_model(pretrained)
    settings = [  # the tokenizer is the pretrained folder's own
        f"model.pretrained={pretrained}",
        *FINETUNE,
        f"train.out_dir={OUT / 'finetune'}",
        *args.overrides,
    ]
    result = train_once(load_config(None, settings))
    if int(os.environ.get("RANK", "0")) == 0:
        out = Path(result["out_dir"])
        adapter_files = sorted(p.name for p in (out / "adapter").iterdir())
        print(
            f"validation loss on the new text: {result['first_val_loss']:.3f} before fine-tuning, "
            f"{result['val_loss']:.3f} after\n"
            f"adapter (PEFT layout): {out / 'adapter'} {adapter_files}\n"
            f"merged weights: {out / 'final'}"
        )


if __name__ == "__main__":
    main()
