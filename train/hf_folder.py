"""A run's model as one Hugging Face DeepSeek folder: what `final/` and `python -m train.export` write.

    config.json              transformers' DeepseekV3 config (model_type, architectures, dtype, bos/eos ids)
    generation_config.json   bos/eos ids (greedy `generate` stops at the run's end-of-document token)
    model.safetensors        every weight in full, LoRA adapters merged, in the export dtype
    tokenizer.json           the run's tokenizer
    tokenizer_config.json    (+ special_tokens_map.json) copied from the tokenizer's folder when it has
                             them, else written with the run's eos (and bos) token
    mla_run.json             ours: the run's resolved config, its layout and the export dtype

The export dtype is that of the pretrained folder's weights when the run started from one (a bf16 base
exports as bf16), else `train.precision`'s. The folder is the same whichever layout wrote it: weights
are gathered in full, and NF4 bases are quantized in blocks of the full tensor at any tp.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import tokenizers
import torch
import torch.distributed as dist

from models.deepseek import checkpoint_dtype, save_pretrained
from parallel.pipeline import ModelParts
from train.config import Config, config_to_dict
from train.data.tokenizer import CONFIG_FILES, SpecialTokens, pretrained_eos_id, special_tokens

RUN_METADATA = "mla_run.json"
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_dtype(config: Config) -> torch.dtype:
    """The dtype of the exported weights: the pretrained base's, else (no base, or its folder is gone)
    `train.precision`'s."""
    pretrained = config.model.get("pretrained")
    if pretrained is not None and Path(pretrained).is_dir():
        return checkpoint_dtype(pretrained)
    return PRECISION_DTYPES[config.train.precision]


def run_special_tokens(config: Config, tokenizer_file: str | Path) -> SpecialTokens:
    """The run's end (and begin) tokens, resolved as the data pipeline resolved them."""
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    pretrained = config.model.get("pretrained")
    return special_tokens(tok, config.data.tokenizer, config.data.eos_token, pretrained_eos_id(pretrained))


def _base_token_ids(config: Config) -> dict:
    """bos/eos/pad ids of the pretrained folder's config.json, which the export keeps."""
    pretrained = config.model.get("pretrained")
    path = None if pretrained is None else Path(pretrained) / "config.json"
    if path is None or not path.is_file():
        return {}
    raw = json.loads(path.read_text())
    return {k: raw[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if raw.get(k) is not None}


def _write_tokenizer(folder: Path, config: Config, tokenizer_file: Path, special: SpecialTokens) -> None:
    shutil.copyfile(tokenizer_file, folder / "tokenizer.json")
    source = Path(config.data.tokenizer).parent if config.data.tokenizer else None
    copied = [name for name in CONFIG_FILES if source is not None and (source / name).is_file()]
    for name in copied:
        shutil.copyfile(source / name, folder / name)
    if "tokenizer_config.json" not in copied:
        own = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": special.eos}
        if special.bos is not None:
            own.update(bos_token=special.bos, add_bos_token=True)
        (folder / "tokenizer_config.json").write_text(json.dumps(own, indent=2) + "\n")


def write_hf_folder(
    parts: ModelParts,
    folder: str | Path,
    config: Config,
    tokenizer_file: str | Path | None,
    pp_group: dist.ProcessGroup | None = None,
    ep_group: dist.ProcessGroup | None = None,
) -> Path:
    """Write the folder described in the module docstring. Collective over every rank (weights are
    gathered); global rank 0 writes. `config` is the run's resolved config."""
    folder = Path(folder)
    special = None if tokenizer_file is None else run_special_tokens(config, tokenizer_file)
    ids = _base_token_ids(config)
    if special is not None:
        ids["eos_token_id"] = special.eos_id
        if special.bos_id is not None:
            ids["bos_token_id"] = special.bos_id
    dtype = export_dtype(config)
    save_pretrained(parts.chunks, folder, pp_group, dtype=dtype, token_ids=ids, ep_group=ep_group)
    if not dist.is_initialized() or dist.get_rank() == 0:
        if tokenizer_file is not None:
            _write_tokenizer(folder, config, Path(tokenizer_file), special)
        metadata = {
            "dtype": str(dtype).removeprefix("torch."),
            "eos_token": None if special is None else special.eos,
            "bos_token": None if special is None else special.bos,
            "layout": {k: getattr(config.distributed, k) for k in ("dp", "tp", "pp", "zero_stage")},
            "config": config_to_dict(config),
        }
        (folder / RUN_METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    if dist.is_initialized():
        dist.barrier()
    return folder
