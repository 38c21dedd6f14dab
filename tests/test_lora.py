"""LoRA on plain and tensor-parallel linears, NF4 frozen bases (QLoRA), merge, and PEFT-format adapters.

Tolerances, each stated with its test: exact where LoRA adds an exact zero (B = 0 at init) or where only
bytes move (save/load, gathering, frozen weights); rtol 1e-5 / atol 1e-6 for fp32 comparisons whose
summation order differs (TP sums over ranks, a merged W + sBA against W x + s B A x).
"""

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_harness import grid, run_distributed
from safetensors.torch import load_file

from models import MLAConfig, MLATransformer
from parallel import gather_tensor, shard_tensor
from parallel.collectives import group_rank, group_size
from parallel.lowbit.lora import (
    apply_lora,
    load_adapter,
    lora_modules,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from parallel.lowbit.nf4_linear import NF4Linear
from parallel.lowbit.peft_io import PEFT_PREFIX
from parallel.lowbit.quant import dequantize_nf4, quantize_nf4
from parallel.tensor import tp_dim

ALL_LINEARS = [
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "lm_head",
]
TOL = dict(rtol=1e-5, atol=1e-6)


def _config(**overrides) -> MLAConfig:
    base = dict(
        vocab_size=131,  # not divisible by tp: padded vocabulary shards
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        q_lora_rank=24,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        intermediate_size=128,
        max_seq_len=32,
    )
    base.update(overrides)
    return MLAConfig(**base)


def _batch(config: MLAConfig, seed: int = 5, batch: int = 2, seq: int = 12):
    ids = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


def _lora_model(config, topology=None, targets=ALL_LINEARS, **lora):
    torch.manual_seed(1234)
    model = MLATransformer(config, topology)
    apply_lora(model, targets, r=4, alpha=8, seed=99, **lora)
    return model


@torch.no_grad()
def _randomize_b(model) -> None:
    """B = 0 at init makes every A gradient zero: give each B full random values (seeded by name), sharded."""
    for name, module in lora_modules(model).items():
        b = module.lora_B.weight
        dim = tp_dim(b)
        shape = list(b.shape)
        if dim is not None:
            shape[dim] = b.tp_full_size
        full = 0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
        if dim is not None:
            full = shard_tensor(full, dim, group_rank(module.group), group_size(module.group))
        b.copy_(full)


def _full(param, group):
    dim = tp_dim(param)
    return param.detach() if dim is None else gather_tensor(param.detach(), dim, param.tp_full_size, group)


def _full_grad(param, group):
    dim = tp_dim(param)
    return param.grad if dim is None else gather_tensor(param.grad, dim, param.tp_full_size, group)


# ------------------------------------------------------------------------------------------ single process


def test_identity_at_init_and_only_adapters_trainable():
    config = _config()
    inputs, _ = _batch(config)
    torch.manual_seed(1234)
    plain = MLATransformer(config)
    model = _lora_model(config)
    # exact: B = 0, so the adapter adds s * (u @ 0^T) = 0 exactly
    assert torch.equal(model(inputs), plain(inputs))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert trainable == adapters and len(adapters) == 2 * (8 * 2 + 1)  # A and B; 8 per layer, lm_head
    a = model.model.layers["0"].self_attn.o_proj.lora_A.weight
    bound = 48**-0.5  # Kaiming-uniform(a = sqrt 5) on in_features = 4 heads x 12
    assert 0.5 * bound < a.abs().max() <= bound


def test_targets_follow_peft_suffix_and_regex_rules():
    config = _config()
    names = apply_lora(MLATransformer(config), ["self_attn.o_proj", "up_proj"])
    assert names == [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.o_proj", "mlp.up_proj")]
    regex = apply_lora(MLATransformer(config), r"model\.layers\.1\..*_b_proj")
    assert regex == ["model.layers.1.self_attn.q_b_proj", "model.layers.1.self_attn.kv_b_proj"]
    with pytest.raises(ValueError, match=r"no module of the model matches"):
        apply_lora(MLATransformer(config), ["proj"])  # suffixes are whole name components
    with pytest.raises(ValueError, match=r"model.layers.0.mlp is a MLP, not a linear layer"):
        apply_lora(MLATransformer(config), ["mlp"])


def test_merge_equals_unmerged_and_unmerge_restores():
    config = _config()
    inputs, _ = _batch(config)
    for quantize in (None, "nf4"):
        model = _lora_model(config, quantize_base=quantize)
        _randomize_b(model)
        before = {n: t.clone() for n, t in model.state_dict().items()}
        unmerged = model(inputs)
        merge_lora(model)
        # rtol 1e-5: (W + sBA) x sums in another order than W x + s B (A x)
        torch.testing.assert_close(model(inputs), unmerged, **TOL)
        unmerge_lora(model)
        torch.testing.assert_close(model(inputs), unmerged, **TOL)
        for name, value in model.state_dict().items():
            # NF4 bases are never touched (exact); float bases get W + d - d (one rounding each way)
            torch.testing.assert_close(value, before[name], rtol=0, atol=1e-7 if quantize is None else 0)


def test_nf4_linear_equals_a_linear_on_the_dequantized_weight():
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 128) * 0.05, torch.nn.Parameter(torch.randn(96))
    layer = NF4Linear(weight, bias)
    dense = dequantize_nf4(quantize_nf4(weight))
    assert torch.equal(layer.dequantize(), dense)
    assert layer.quantized.bits_per_parameter() < 4.2  # 4.127 + 32/n: no fp32 copy kept
    assert not any(p.requires_grad for p in layer.parameters())

    x = torch.randn(3, 5, 128, requires_grad=True)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(x)
    assert (96, 128) not in shapes and (128, 96) not in shapes, "a full-precision weight was saved"
    grad = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, grad)
    x_ref = x.detach().requires_grad_()
    y_ref = F.linear(x_ref, dense, bias)
    (dx_ref,) = torch.autograd.grad(y_ref, x_ref, grad)
    assert torch.equal(y, y_ref)  # exact: the same F.linear on the same decoded weight
    torch.testing.assert_close(dx, dx_ref, rtol=1e-6, atol=1e-7)  # grad @ W vs autograd's own matmul

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y_ref, rtol=2e-2, atol=2e-2)  # bf16 ladder rung
    layer.to(torch.bfloat16)  # a 16-bit model: the scales must not be rounded to bf16
    assert layer.absmax_scale.dtype == torch.float32 and torch.equal(layer.dequantize(torch.float32), dense)
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_adapter_round_trip_and_peft_layout(tmp_path):
    config = _config()
    inputs, _ = _batch(config)
    model = _lora_model(config, targets=["q_b_proj", "kv_b_proj", "o_proj", "down_proj"])
    _randomize_b(model)
    save_adapter(model, tmp_path)

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_b_proj.lora_A.weight" in tensors
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 4)
    assert all(
        k.startswith(PEFT_PREFIX) and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors
    )
    config_json = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config_json["peft_type"] == "LORA" and config_json["task_type"] == "CAUSAL_LM"
    assert (config_json["r"], config_json["lora_alpha"], config_json["bias"]) == (4, 8, "none")
    assert config_json["target_modules"] == ["down_proj", "kv_b_proj", "o_proj", "q_b_proj"]

    torch.manual_seed(1234)
    fresh = MLATransformer(config)
    load_adapter(fresh, tmp_path)  # applies LoRA from adapter_config.json, then loads
    for (name, a), (other, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert name == other and torch.equal(a, b), name  # exact: bytes moved
    assert torch.equal(fresh(inputs), model(inputs))

    wrong_rank = _lora_model(config)
    apply_args = json.loads((tmp_path / "adapter_config.json").read_text())
    apply_args["r"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(apply_args))
    with pytest.raises(ValueError, match=r"r=8, lora_alpha=8 but model.layers.0.self_attn.q_a_proj has r=4"):
        load_adapter(wrong_rank, tmp_path)


def test_peft_reads_our_adapter_onto_the_transformers_model(tmp_path):
    import peft  # dev dependencies: this test must run, not skip
    import transformers

    from models.deepseek import load_pretrained

    folder = Path(__file__).parent / "fixtures" / "deepseek_v3_q_lora"
    ours = load_pretrained(folder)
    # Attention and head only: peft 0.21 with transformers 5 maps mlp.{gate,up,down}_proj targets of
    # deepseek models onto MoE expert parameters, so it cannot place adapters on a dense MLP.
    apply_lora(
        ours, ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "lm_head"], r=4, alpha=8
    )
    _randomize_b(ours)
    save_adapter(ours, tmp_path)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path)
    ids = load_file(folder / "reference.safetensors")["input_ids"]
    with torch.no_grad():
        # rtol 1e-5: two fp32 implementations of the same model (see test_deepseek.py)
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
        with theirs.disable_adapter():
            assert (theirs(ids).logits - ours(ids)).abs().max() > 1e-2  # the adapter matters


def test_qlora_loss_falls_while_base_weights_stay_bit_identical():
    config = _config()
    inputs, targets = _batch(config, batch=4, seq=16)
    targets_ = ["q_b_proj", "kv_b_proj", "o_proj", "gate_proj", "up_proj"]
    model = _lora_model(config, targets=targets_, quantize_base="nf4")
    frozen = {n: t.clone() for n, t in model.state_dict().items() if ".lora_" not in n}
    assert any(isinstance(m.base_layer, NF4Linear) for m in lora_modules(model).values())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model.loss(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses  # from ln(131) = 4.88 (near-uniform) by half a nat
    for name, value in model.state_dict().items():
        if name in frozen:
            assert torch.equal(value, frozen[name]), f"{name} changed"


# ---------------------------------------------------------------------------------------- tensor parallel


def _check_tp_lora(tmp_dir: str) -> None:
    """tp=2 LoRA against the same LoRA in one process (run on every rank of a tp=2 world)."""
    config = _config()
    inputs, targets = _batch(config)
    ref = _lora_model(config)
    _randomize_b(ref)
    ref_loss = ref.loss(inputs, targets)
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    with grid(tp=2) as topo:
        g = topo.tp_group
        model = _lora_model(config, topo)
        _randomize_b(model)
        torch.testing.assert_close(model(inputs, gather_output=True), ref(inputs), **TOL)  # TP sums
        loss = model.loss(inputs, targets)
        torch.testing.assert_close(loss, ref_loss, **TOL)
        loss.backward()
        for name, p in model.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, name
                continue
            assert torch.equal(_full(p, g), ref_params[name].detach()), (
                f"{name}: adapters differ"
            )  # same draw
            torch.testing.assert_close(_full_grad(p, g), ref_params[name].grad, **TOL, msg=name)
            if tp_dim(p) is None:  # replicated adapters: bit-identical gradients on every TP rank
                copies = [torch.empty_like(p.grad) for _ in range(2)]
                dist.all_gather(copies, p.grad, group=g)
                assert torch.equal(copies[0], copies[1]), f"{name}: replicated grad differs across TP"
        save_adapter(model, tmp_dir)  # collective: gathers the shards, rank 0 writes


def test_tensor_parallel_lora_equals_single_process_lora(tmp_path):
    run_distributed(2, _check_tp_lora, str(tmp_path / "tp2"))
    ref = _lora_model(_config())
    _randomize_b(ref)
    save_adapter(ref, tmp_path / "tp1")
    tp1 = load_file(tmp_path / "tp1" / "adapter_model.safetensors")
    tp2 = load_file(tmp_path / "tp2" / "adapter_model.safetensors")
    assert tp1.keys() == tp2.keys() and all(torch.equal(tp1[k], tp2[k]) for k in tp1)  # gathered: exact


def _check_tp_qlora() -> None:
    """NF4 bases under tp=2 (each rank quantizes its shard) against single-process LoRA on the same
    decoded weights, gathered: column- and row-parallel NF4 bases compute their share of that model.
    v_head_dim=32: o_proj's 128 input columns split into whole NF4 blocks of 64; vocab_size=132: an NF4
    lm_head must split evenly."""
    config = _config(v_head_dim=32, vocab_size=132)
    inputs, targets = _batch(config)
    with grid(tp=2) as topo:
        g = topo.tp_group
        model = _lora_model(config, topo, quantize_base="nf4")
        _randomize_b(model)
        decoded = {}
        for name, module in lora_modules(model).items():
            base = module.base_layer.dequantize()
            dim = module.weight_tp_dim
            decoded[f"{name}.weight"] = (
                base if dim is None else gather_tensor(base, dim, module.weight_full_size, g)
            )
        ref = MLATransformer(config)
        ref_state = ref.state_dict()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    ref_state[name].copy_(_full(p, g))
            for name, value in decoded.items():
                ref_state[name].copy_(value)
        apply_lora(ref, ALL_LINEARS, r=4, alpha=8, seed=99)
        _randomize_b(ref)
        ref_loss = ref.loss(inputs, targets)
        ref_loss.backward()
        loss = model.loss(inputs, targets)
        torch.testing.assert_close(loss, ref_loss, **TOL)  # TP sums
        loss.backward()
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(_full_grad(p, g), ref_params[name].grad, **TOL, msg=name)


def test_tensor_parallel_qlora_shards_then_quantizes():
    run_distributed(2, _check_tp_qlora)


# ------------------------------------------------------------------------------------------ command line

CLI_MODEL = dict(
    vocab_size=512,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=32,  # o_proj's 128 input columns split over tp=2 into whole NF4 blocks of 64
    intermediate_size=128,
    max_seq_len=64,
)
CLI_RUN = [
    "data.vocab_size=512",
    "data.seq_len=32",
    "data.max_corpus_mb=0.3",
    "train.global_batch_size=4",
    "train.steps=3",
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "optim.warmup_steps=0",
]


def _run_cli(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    launcher = (
        [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    )
    launcher += [] if nproc == 1 else [f"--nproc-per-node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, str(root / "examples" / "train_mla.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)


def test_cli_fine_tunes_a_pretrained_folder_with_qlora_under_tp(tmp_path):
    from models.deepseek import save_pretrained
    from train.data.tokenizer import train_tokenizer

    torch.manual_seed(3)
    save_pretrained(MLATransformer(MLAConfig(**CLI_MODEL)), tmp_path / "base")
    # a pretrained folder brings its tokenizer (the run uses it by default)
    train_tokenizer([(Path(__file__).parents[1] / "README.md").read_text()], 512).save(
        str(tmp_path / "base" / "tokenizer.json")
    )
    common = [*CLI_RUN, f"data.cache_dir={tmp_path / 'cache'}", f"model.pretrained={tmp_path / 'base'}"]
    lora = ["lora.enabled=true", "lora.quantize_base=nf4", "lora.r=4", "lora.targets=[q_b_proj,o_proj]"]
    out = tmp_path / "run"
    result = _run_cli([*common, *lora, "distributed.tp=2", f"train.out_dir={out}"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]

    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 2 * 2 and adapter[
        f"{PEFT_PREFIX}model.layers.1.self_attn.o_proj.lora_A.weight"
    ].shape == (4, 128)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"] == [
        "o_proj",
        "q_b_proj",
    ]
    base, final = (
        load_file(tmp_path / "base" / "model.safetensors"),
        load_file(out / "final" / "model.safetensors"),
    )
    assert base.keys() == final.keys()
    for name in base:  # frozen and untargeted: bit-identical; targeted: NF4-decoded base + trained s B A
        targeted = name.endswith(("q_b_proj.weight", "o_proj.weight"))
        assert torch.equal(base[name], final[name]) != targeted, name

    bad = _run_cli([*common, "model.hidden_size=32", f"train.out_dir={tmp_path / 'bad'}"], nproc=1)
    assert bad.returncode != 0
    assert "model.hidden_size=32: the pretrained model" in bad.stderr and "has hidden_size=64" in bad.stderr
