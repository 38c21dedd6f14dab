"""Hugging Face round trip through the command line: `final/` and `python -m train.export` are DeepSeek
folders that transformers loads, and peft loads `adapter/`, whatever the layout of the run.

The base is a tiny all-dense DeepseekV3ForCausalLM saved by transformers with a DeepSeek-style tokenizer
(`<｜begin▁of▁sentence｜>` added before, `<｜end▁of▁sentence｜>` after each document, read from its
`tokenizer_config.json`); no `data.tokenizer` is given, so the runs use the folder's own. Its shapes split
on NF4 blocks at tp=2 (o_proj: 128 input columns, 64 per rank).

Tolerances: logits of two implementations of the same fp32 weights agree to 1e-5 of their largest
magnitude (different operation order; see tests/test_deepseek.py). QLoRA at tp=2 against tp=1: 1e-5
relative per logged loss (the same NF4 codes by construction; only reduction order differs).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
TOL = 1e-5
QLORA = [
    "lora.enabled=true",
    "lora.quantize_base=nf4",
    "lora.r=4",
    "lora.targets=[q_b_proj,kv_b_proj,o_proj]",
]
LORA = ["lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.targets=[q_b_proj,kv_b_proj,o_proj]"]
RUN = [
    "data.seq_len=32",
    "data.max_corpus_mb=0.2",
    "train.global_batch_size=4",
    "train.log_every=1",
    "train.eval_every=0",
    "train.sample_tokens=0",
    "optim.warmup_steps=0",
    "optim.lr=3e-3",
]


def _deepseek_tokenizer(folder: Path) -> int:
    """A byte-level BPE with DeepSeek's special tokens and tokenizer_config.json; returns its size."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([(ROOT / "README.md").read_text()], trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    token = lambda text: {"content": text, "special": True, "__type": "AddedToken"}  # noqa: E731
    config = {"add_bos_token": True, "bos_token": token(BOS), "eos_token": token(EOS)}
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


def _base(folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    folder.mkdir(parents=True)
    vocab = _deepseek_tokenizer(folder)
    config = transformers.DeepseekV3Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=32,
        first_k_dense_replace=2,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config)
    with torch.no_grad():  # O(1) activations, so that a wrong weight shows in the logits
        for p in model.parameters():
            p.copy_(
                1 + 0.1 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) / p.shape[-1] ** 0.5
            )
    model.to(dtype).save_pretrained(folder)
    return folder


def _cli(args: list[str], nproc: int = 1, module: str | None = None) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    target = ["-m", module] if module else [str(ROOT / "examples" / "train_mla.py")]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*launcher, *target, *args], capture_output=True, text=True, timeout=400, env=env, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _train(tmp: Path, base: Path, name: str, extra: list[str], tp: int = 1, steps: int = 2) -> Path:
    out = tmp / name
    args = [*RUN, f"data.cache_dir={tmp / 'cache'}", f"model.pretrained={base}", f"train.out_dir={out}"]
    _cli([*args, f"train.steps={steps}", f"distributed.tp={tp}", *extra], nproc=tp)
    return out


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("split") != "val"]


def _ids() -> torch.Tensor:
    return torch.randint(2, 300, (2, 12), generator=torch.Generator().manual_seed(1))


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert err <= TOL * scale, f"{what}: max error {err:.3g} exceeds {TOL} x {scale:.3g}"


def _hf_logits(folder: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(_ids()).logits


def _our_logits(folder: Path) -> torch.Tensor:
    from models.deepseek import load_pretrained

    with torch.no_grad():
        return load_pretrained(folder)(_ids(), gather_output=True)


def _check_folder(folder: Path, dtype: str = "F32") -> None:
    """A DeepSeek folder transformers loads, computing what our model computes, with the run's tokens."""
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("deepseek_v3", ["DeepseekV3ForCausalLM"])
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 1
    assert json.loads((folder / "mla_run.json").read_text())["bos_token"] == BOS
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {dtype}  # noqa: SIM118
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token == EOS and tokenizer.bos_token == BOS
    _close(_hf_logits(folder), _our_logits(folder), f"{folder}: transformers against ours")


def test_qlora_is_layout_independent_and_final_and_export_are_the_runs_model(tmp_path):
    base = _base(tmp_path / "base")
    tp1 = _train(tmp_path, base, "tp1", QLORA, tp=1, steps=10)
    tp2 = _train(tmp_path, base, "tp2", QLORA, tp=2, steps=10)
    torch.testing.assert_close(torch.tensor(_losses(tp2)), torch.tensor(_losses(tp1)), rtol=TOL, atol=0)
    for run in (tp1, tp2):
        _check_folder(run / "final")
    _close(_our_logits(tp2 / "final"), _our_logits(tp1 / "final"), "final/ at tp=2 against tp=1")
    _cli([str(tp2), str(tmp_path / "export")], module="train.export")
    _check_folder(tmp_path / "export")
    _close(_our_logits(tmp_path / "export"), _our_logits(tp2 / "final"), "export of the tp=2 run")
    # the documents of the run: BOS, text, EOS (the DeepSeek-style tokenizer's own tokens)
    cache = next((tmp_path / "cache").iterdir())
    sidecar = json.loads((cache / "train.json").read_text())
    assert (sidecar["bos_id"], sidecar["eot_id"]) == (0, 1)


def test_lora_final_matches_peft_on_the_original_base_and_greedy_decoding_matches(tmp_path):
    import peft

    base = _base(tmp_path / "base")
    run = _train(tmp_path, base, "lora", LORA, tp=2, steps=3)
    _check_folder(run / "final")
    _cli([str(run), str(tmp_path / "export")], module="train.export")  # rebuilt at tp=1, adapters merged
    _check_folder(tmp_path / "export")
    _close(_our_logits(tmp_path / "export"), _our_logits(run / "final"), "export of the LoRA run")
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base)
    model = peft.AutoPeftModelForCausalLM.from_pretrained(run / "adapter", dtype=torch.float32).eval()
    with torch.no_grad():  # plain LoRA: the merged final/ is the original base plus the adapter
        _close(model(_ids()).logits, _our_logits(run / "final"), "peft on adapter/ against final/")

    sys.path.insert(0, str(ROOT / "examples"))
    import generate as example

    text = example.main(
        ["--checkpoint", str(run), "--prompt", "the model", "--greedy", "--max-new-tokens", "8"]
    )
    tok = __import__("tokenizers").Tokenizer.from_file(str(run / "final" / "tokenizer.json"))
    prompt = example.prompt_ids(tok, "the model", *example.special_ids(run / "final", tok))
    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32).eval()
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8)[0, len(prompt) :].tolist()
    out = out[: out.index(1)] if 1 in out else out
    assert text == "the model" + tok.decode(out)


def test_full_fine_tuning_of_a_bf16_base_exports_bf16(tmp_path):
    base = _base(tmp_path / "base", torch.bfloat16)
    run = _train(tmp_path, base, "full", [], tp=2, steps=2)
    _check_folder(run / "final", dtype="BF16")
    assert json.loads((run / "final" / "config.json").read_text())["dtype"] == "bfloat16"


def test_lora_and_full_fine_tuning_at_tp1_write_folders_transformers_computes_like_ours(tmp_path):
    """The one-process write path (no TP gather) for plain LoRA and full fine-tuning, fp32 (1e-5)."""
    base = _base(tmp_path / "base")
    for name, extra in (("lora-tp1", LORA), ("full-tp1", [])):
        run = _train(tmp_path, base, name, extra, tp=1, steps=2)
        _check_folder(run / "final")


def test_a_pretrained_folder_without_tokenizer_is_a_one_line_error(tmp_path):
    base = _base(tmp_path / "base")
    (base / "tokenizer.json").unlink()
    args = [
        *RUN,
        f"data.cache_dir={tmp_path / 'cache'}",
        f"model.pretrained={base}",
        f"train.out_dir={tmp_path}/r",
    ]
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_mla.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert "data.tokenizer=null: model.pretrained=" in lines[0] and "has no tokenizer.json" in lines[0]
    assert not (tmp_path / "cache").exists()  # stopped before any work
