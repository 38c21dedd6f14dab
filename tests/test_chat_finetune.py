"""The chat fine-tuning example runs end to end: a pretrained DeepSeek folder, QLoRA, the shipped chat
JSONL with loss on assistant turns only, packed with document masking (a few steps of a tiny model)."""

import json
from pathlib import Path

import torch

from models import MLAConfig, MLATransformer
from models.deepseek import save_pretrained
from train.config import load_config
from train.data.tokenizer import train_tokenizer
from train.trainer import train_once

ROOT = Path(__file__).resolve().parents[1]


def test_chat_qlora_example_config_runs(tmp_path):
    torch.manual_seed(0)
    base = MLAConfig(
        vocab_size=320,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        intermediate_size=64,
        max_seq_len=64,
    )
    save_pretrained(MLATransformer(base), tmp_path / "base")
    # the base folder ships its tokenizer, as a downloaded one does (<= 300 tokens, within the 320 rows)
    chat = ROOT / "examples" / "data" / "chat.jsonl"
    texts = (m["content"] for line in chat.read_text().splitlines() for m in json.loads(line)["messages"])
    train_tokenizer(texts, vocab_size=300).save(str(tmp_path / "base" / "tokenizer.json"))
    config = load_config(
        str(ROOT / "examples" / "configs" / "chat-qlora.yaml"),
        [
            f"model.pretrained={tmp_path / 'base'}",
            "data.tokenizer=null",  # the pretrained folder's own
            f"data.corpus={ROOT / 'examples' / 'data' / 'chat.jsonl'}",
            "data.seq_len=32",
            f"data.cache_dir={tmp_path / 'cache'}",
            "train.global_batch_size=4",
            "train.steps=3",
            "train.log_every=1",
            "train.eval_every=0",
            "train.eval_batches=1",
            f"train.out_dir={tmp_path / 'run'}",
        ],
    )
    result = train_once(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("split") != "val"]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses)
    assert (Path(result["out_dir"]) / "adapter" / "adapter_model.safetensors").is_file()
