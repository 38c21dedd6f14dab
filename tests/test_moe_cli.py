"""Mixture-of-experts through the command line: layout-independent loss curves, fine-tuning and QLoRA
from a folder transformers saved, export back to transformers.

Loss parity: as for the dense model (tests/test_cli.py), the losses of the first steps agree to 1e-5
relative in fp32 across (dp, tp, pp, zero) layouts: the routing of every token is the same (the router
is replicated and reads the same fp32 numbers up to last-bit sums, far from any tie at this size), the
bias update sums the expert loads over the data-parallel ranks, and the rest differs only in the order
of floating-point sums.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli import TINY, read_metrics, run_cli

from models.deepseek import load_pretrained
from train.data.sources import corpus_files
from train.data.tokenizer import train_tokenizer

MOE = [
    "model.num_layers=3",
    "model.n_routed_experts=8",
    "model.num_experts_per_tok=2",
    "model.moe_intermediate_size=32",
    "model.n_shared_experts=1",
    "model.first_k_dense_replace=1",
    "model.scoring_func=sigmoid",
    "model.topk_method=noaux_tc",
    "model.n_group=4",
    "model.topk_group=2",
    "model.norm_topk_prob=true",
    "model.routed_scaling_factor=2.5",
    "model.router_bias_update_rate=0.01",
]
ARGS = [a for a in TINY if not a.startswith("model.num_layers")] + MOE


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("moe-token-cache"))


@pytest.fixture(scope="module")
def moe_reference(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe-reference")
    result = run_cli([*ARGS, f"data.cache_dir={cache_dir}", f"train.out_dir={out}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return out


LAYOUTS = [  # (dp, tp, pp, extra overrides)
    (2, 2, 1, ["distributed.zero_stage=1"]),
    (1, 2, 2, ["distributed.pp_schedule=1f1b", "train.micro_batch_size=2", "distributed.zero_stage=2"]),
    (2, 1, 1, ["distributed.zero_stage=3", "distributed.recompute=full", "train.micro_batch_size=2"]),
    # expert parallelism (experts split over ep of the dp ranks): x tp with recompute, x pp, x ZeRO-2
    (2, 2, 1, ["distributed.ep=2", "distributed.recompute=full"]),
    (2, 1, 2, ["distributed.ep=2", "distributed.pp_schedule=1f1b", "train.micro_batch_size=2"]),
    (4, 1, 1, ["distributed.ep=2", "distributed.zero_stage=2", "train.micro_batch_size=1"]),
]


@pytest.mark.parametrize("dp,tp,pp,extra", LAYOUTS, ids=lambda x: str(x))
def test_moe_loss_curve_does_not_depend_on_layout(dp, tp, pp, extra, cache_dir, moe_reference, tmp_path):
    run_dir = tmp_path / "run"
    args = [*ARGS, f"data.cache_dir={cache_dir}", f"train.out_dir={run_dir}", *extra]
    run = run_cli(
        [*args, f"distributed.dp={dp}", f"distributed.tp={tp}", f"distributed.pp={pp}"], dp * tp * pp
    )
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    expected = [m for m in read_metrics(moe_reference) if "split" not in m]
    got = [m for m in read_metrics(run_dir) if "split" not in m]
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for a, b in zip(got, expected, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
        # the same tokens go to the same experts, whatever the layout (counts summed over dp)
        assert a["moe_tokens_per_expert"] == b["moe_tokens_per_expert"]
    total = sum(sum(c) for c in expected[0]["moe_tokens_per_expert"].values())
    assert total == 2 * 8 * 32 * 2  # MoE layers x sequences x tokens x experts per token
    if any(e.startswith("distributed.ep=") for e in extra):  # final/ holds every expert, once gathered
        final, reference = (
            load_file(str(d / "final" / "model.safetensors")) for d in (run_dir, moe_reference)
        )
        assert final.keys() == reference.keys()
        for name in (n for n in reference if ".experts." in n):
            assert torch.allclose(final[name], reference[name], rtol=0, atol=1e-6), name


def _hf_moe_folder(path) -> str:
    """A tiny random DeepseekV3ForCausalLM MoE saved by transformers, with a non-zero correction bias."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV3Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        n_shared_experts=1,
        first_k_dense_replace=1,
        max_position_embeddings=64,
    )
    model = DeepseekV3ForCausalLM(config)
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias.copy_(torch.tensor([0.1, -0.1, 0.05, 0.0]))
    model.save_pretrained(path)
    # a downloaded folder ships its tokenizer (a fresh one against pretrained weights is refused)
    texts = (p.read_text(errors="replace") for p in corpus_files("stdlib", max_corpus_mb=0.3))
    train_tokenizer(texts, vocab_size=512).save(str(Path(path) / "tokenizer.json"))
    return str(path)


FINE_TUNE = [
    "data.seq_len=32",
    "data.max_corpus_mb=0.3",
    "train.global_batch_size=4",
    "train.steps=2",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "optim.warmup_steps=0",
]


def _export_matches_transformers(run_dir, out) -> dict[str, torch.Tensor]:
    import transformers

    from train.export import export

    export(run_dir, out)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = theirs(ids).logits, load_pretrained(out)(ids)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    return load_file(out / "model.safetensors")


def test_cli_fine_tunes_a_transformers_moe_folder_under_tp_and_exports_it(tmp_path):
    base = _hf_moe_folder(tmp_path / "base")
    run_dir = tmp_path / "run"
    args = [*FINE_TUNE, f"model.pretrained={base}", f"data.cache_dir={tmp_path / 'cache'}"]
    args += ["model.router_bias_update_rate=0.01", "distributed.tp=2", f"train.out_dir={run_dir}"]
    result = run_cli(args, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    record = [m for m in read_metrics(run_dir) if "split" not in m][-1]
    assert record["moe_load_imbalance"] >= 1.0 and list(record["moe_tokens_per_expert"]) == [
        "model.layers.1.mlp"
    ]
    exported = _export_matches_transformers(run_dir, tmp_path / "export")
    original = load_file(tmp_path / "base" / "model.safetensors")
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    moved = exported[bias] - original[bias]  # two bias updates of +-0.01 each (or 0 for an exact mean)
    assert moved.abs().max() > 0 and torch.all(moved.abs() <= 0.02 + 1e-6)
    assert not torch.equal(
        exported["model.layers.1.mlp.experts.0.up_proj.weight"],
        original["model.layers.1.mlp.experts.0.up_proj.weight"],
    )


def test_cli_qlora_on_moe_targets_expert_projections(tmp_path):
    base = _hf_moe_folder(tmp_path / "base")
    run_dir = tmp_path / "run"
    targets = "[experts.*.gate_proj,experts.*.up_proj,experts.*.down_proj,shared_experts.down_proj,o_proj]"
    args = [*FINE_TUNE, f"model.pretrained={base}", f"data.cache_dir={tmp_path / 'cache'}"]
    args += ["lora.enabled=true", "lora.quantize_base=nf4", "lora.r=4", f"lora.targets={targets}"]
    result = run_cli([*args, f"train.out_dir={run_dir}"], nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    names = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in adapter}
    assert (
        "model.layers.1.mlp.experts.3.down_proj" in names
        and "model.layers.1.mlp.shared_experts.down_proj" in names
    )
    assert not any(
        n.endswith(("mlp.gate", "shared_experts.gate_proj")) for n in names
    )  # router: full precision
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], str)  # `*` targets are written as one PEFT regex
    exported = _export_matches_transformers(run_dir, tmp_path / "export")
    original = load_file(tmp_path / "base" / "model.safetensors")
    router = "model.layers.1.mlp.gate.weight"
    assert torch.equal(exported[router], original[router])  # frozen, never quantized
