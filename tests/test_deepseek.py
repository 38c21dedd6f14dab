"""DeepSeek checkpoint import/export against transformers' own DeepseekV3/V2ForCausalLM.

The fixtures (tests/fixtures/deepseek_*, made by make_deepseek_fixture.py) hold tiny fp32 models saved by
transformers and its logits, loss and gradients on a fixed input. Tolerance: every compared tensor
within 1e-5 of its largest magnitude. Both sides are fp32 on the same weights, but the order of operations
differs (SDPA against transformers' eager softmax, fused RoPE against complex multiplication, vocab-parallel
sums), which leaves ~1e-6 relative differences after two layers; a wrong RoPE layout, softmax scale or
YaRN factor moves logits by 1e-1 or more.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from dist_harness import grid, run_distributed
from safetensors.torch import load_file, save_file

from models.deepseek import config_from_hf, load_pretrained, rope_rows_to_interleaved, save_pretrained
from parallel import gather_tensor
from parallel.tensor import tp_dim

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ["v3_q_lora", "v3_yarn_sharded", "v2_tied_yarn"]
TOL = 1e-5


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    err = (actual - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 1e-12)
    assert err <= TOL * scale, f"{what}: max error {err:.3g} exceeds {TOL} x {scale:.3g}"


def _reference(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / f"deepseek_{name}" / "reference.safetensors"))


def _targets(ids: torch.Tensor) -> torch.Tensor:
    """transformers shifts `labels=input_ids` inside; ours takes the next token, -100 at the end."""
    return torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), -100)], dim=1)


def _check_against_reference(name: str, topology=None) -> None:
    folder = FIXTURES / f"deepseek_{name}"
    ref = _reference(name)
    config, interleaved = config_from_hf(json.loads((folder / "config.json").read_text()))
    model = load_pretrained(folder, topology)
    ids = ref["input_ids"]
    _close(model(ids, gather_output=True), ref["logits"], f"{name}: logits")
    loss = model.loss(ids, _targets(ids))
    _close(loss, ref["loss"], f"{name}: loss")
    loss.backward()
    group = model.group
    for pname, p in model.named_parameters():
        expected = ref[f"grad.{pname}"]
        if not interleaved:  # gradients permute like the weights they belong to
            expected = rope_rows_to_interleaved(pname, expected, config)
        dim = tp_dim(p)
        grad = p.grad if dim is None else gather_tensor(p.grad, dim, p.tp_full_size, group)
        _close(grad, expected, f"{name}: {pname}")


@pytest.mark.parametrize("name", NAMES)
def test_logits_loss_and_gradients_match_transformers(name):
    _check_against_reference(name)


def _check_tp(names: list[str]) -> None:
    with grid(tp=2) as topo:
        for name in names:
            _check_against_reference(name, topo)


def test_tensor_parallel_load_matches_transformers():
    run_distributed(2, _check_tp, NAMES)


def test_sharded_checkpoint_with_index_is_read():
    folder = FIXTURES / "deepseek_v3_yarn_sharded"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (folder / "model.safetensors").exists()
    ref = _reference("v3_yarn_sharded")
    _close(load_pretrained(folder)(ref["input_ids"]), ref["logits"], "sharded: logits")


def _legacy_config(hf: dict) -> dict:
    """The same config in the transformers 4.x style: top-level rope_theta, rope_scaling with `type`."""
    legacy = {k: v for k, v in hf.items() if k != "rope_parameters"}
    params = dict(hf["rope_parameters"])
    legacy["rope_theta"] = params.pop("rope_theta")
    kind = params.pop("rope_type")
    legacy["rope_scaling"] = None if kind == "default" else {"type": kind, **params}
    return legacy


@pytest.mark.parametrize("name", ["v3_q_lora", "v3_yarn_sharded"])
def test_transformers_4_and_5_style_configs_give_the_same_model(name, tmp_path):
    folder = FIXTURES / f"deepseek_{name}"
    hf = json.loads((folder / "config.json").read_text())
    assert "rope_parameters" in hf and "rope_scaling" not in hf  # written by transformers 5.x
    shutil.copytree(folder, tmp_path / "legacy")
    (tmp_path / "legacy" / "config.json").write_text(json.dumps(_legacy_config(hf)))
    new, _ = config_from_hf(hf)
    old, _ = config_from_hf(_legacy_config(hf))
    assert old == new
    ref = _reference(name)
    _close(load_pretrained(tmp_path / "legacy")(ref["input_ids"]), ref["logits"], "4.x config: logits")


@pytest.mark.parametrize("name", NAMES)
def test_save_pretrained_reloads_in_transformers_with_the_same_logits(name, tmp_path):
    import transformers  # a dev dependency: this test must run, not skip

    ref = _reference(name)
    save_pretrained(load_pretrained(FIXTURES / f"deepseek_{name}"), tmp_path)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True
    )
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        _close(model(ref["input_ids"]).logits, ref["logits"], f"{name}: transformers reload")


def _check_save_under_tp(folder: str, out: str) -> None:
    with grid(tp=2) as topo:
        save_pretrained(load_pretrained(folder, topo), out)


def test_save_pretrained_under_tp_writes_the_full_tensors(tmp_path):
    folder = FIXTURES / "deepseek_v3_q_lora"
    run_distributed(2, _check_save_under_tp, str(folder), str(tmp_path / "tp2"))
    save_pretrained(load_pretrained(folder), tmp_path / "tp1")
    tp1, tp2 = (
        load_file(tmp_path / "tp1" / "model.safetensors"),
        load_file(tmp_path / "tp2" / "model.safetensors"),
    )
    assert tp1.keys() == tp2.keys()
    for key in tp1:  # exact: gathering moves bytes, no arithmetic
        assert torch.equal(tp1[key], tp2[key]), key
    original = load_file(folder / "model.safetensors")
    assert all(torch.equal(original[k], tp1[k]) for k in original)  # interleaved layout: saved unchanged


def _hf_config(**overrides) -> dict:
    hf = json.loads((FIXTURES / "deepseek_v3_q_lora" / "config.json").read_text())
    hf.update(overrides)
    return hf


def test_expert_weights_of_a_dense_config_are_unexpected_tensors(tmp_path):
    shutil.copytree(FIXTURES / "deepseek_v3_q_lora", tmp_path / "moe")
    weights = load_file(tmp_path / "moe" / "model.safetensors")
    weights["model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.zeros(4, 32)
    save_file(weights, str(tmp_path / "moe" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected tensors.*layers\.0\.mlp\.experts\.0\.gate_proj"):
        load_pretrained(tmp_path / "moe")
    config, _ = config_from_hf(_hf_config(first_k_dense_replace=1, n_routed_experts=None))
    assert not config.is_moe  # no experts: dense


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"model_type='llama'"):
        config_from_hf(_hf_config(model_type="llama"))
    with pytest.raises(ValueError, match=r"rope type 'dynamic' is not supported"):
        config_from_hf(_hf_config(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}))
    with pytest.raises(ValueError, match=r"num_key_value_heads=2"):
        config_from_hf(_hf_config(num_key_value_heads=2))

    shutil.copytree(FIXTURES / "deepseek_v3_q_lora", tmp_path / "bad")
    weights = load_file(tmp_path / "bad" / "model.safetensors")
    del weights["model.layers.1.self_attn.kv_b_proj.weight"]
    weights["model.norm.weight"] = torch.ones(33)
    save_file(weights, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"missing from the checkpoint: \['model.layers.1.self_attn.kv_b_proj"
    ):
        load_pretrained(tmp_path / "bad")
    weights["model.layers.1.self_attn.kv_b_proj.weight"] = torch.zeros(80, 16)
    save_file(weights, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.norm.weight: checkpoint shape \[33\] does not match"):
        load_pretrained(tmp_path / "bad")


def test_pipeline_stages_read_only_their_layers():
    from models.transformer import split_layers

    folder = FIXTURES / "deepseek_v3_q_lora"
    ref = _reference("v3_q_lora")
    first, last = (load_pretrained(folder, stage=spec) for spec in split_layers(2, 2))
    assert all(
        ".layers.1." not in n and not n.startswith(("lm_head", "model.norm"))
        for n, _ in first.named_parameters()
    )
    assert all(".layers.0." not in n and "embed_tokens" not in n for n, _ in last.named_parameters())
    _close(last(first(ref["input_ids"])), ref["logits"], "two stages: logits")
