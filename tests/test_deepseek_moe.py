"""DeepSeekMoE checkpoints against transformers' own DeepseekV2/V3ForCausalLM (MoE fixtures).

The fixtures (tests/fixtures/deepseek_v2_moe_greedy, _v2_moe_group, _v3_moe_noaux, made by
make_deepseek_fixture.py) are tiny fp32 models saved by transformers: layer 0 dense, layer 1 MoE with 8
routed experts and shared experts, covering softmax + greedy, softmax + group_limited_greedy and sigmoid +
noaux_tc with a non-zero correction bias. Tolerance: 1e-5 of the largest magnitude, as for the dense
fixtures: the same fp32 weights with a different order of operations (experts grouped by sort against
transformers' per-expert loop, vocab-parallel sums) differ by ~1e-6; a wrong routing rule (group mask,
bias used in the weights, normalisation or scaling order) changes the chosen experts or their weights and
moves the logits by 1e-2 or more.
"""

import json

import pytest
import torch
from dist_harness import grid, run_distributed
from safetensors.torch import load_file
from test_deepseek import FIXTURES, _close, _reference, _targets  # noqa: E402  (shared helpers)

from models.config import MLAConfig
from models.deepseek import config_from_hf, load_pretrained, save_pretrained
from models.generate import generate
from models.moe import MoE, route
from parallel import gather_tensor
from parallel.tensor import tp_dim

NAMES = ["v2_moe_greedy", "v2_moe_group", "v3_moe_noaux"]


def _check_against_reference(name: str, topology=None) -> None:
    ref = _reference(name)
    model = load_pretrained(FIXTURES / f"deepseek_{name}", topology)
    assert isinstance(model.model.layers["1"].mlp, MoE) and not isinstance(model.model.layers["0"].mlp, MoE)
    ids = ref["input_ids"]
    _close(model(ids, gather_output=True), ref["logits"], f"{name}: logits")
    loss = model.loss(ids, _targets(ids))
    _close(loss, ref["loss"], f"{name}: loss")
    loss.backward()
    for pname, p in model.named_parameters():
        if not p.requires_grad:  # the correction bias: trained by no gradient
            assert p.grad is None and pname.endswith("e_score_correction_bias")
            continue
        dim = tp_dim(p)
        grad = p.grad if dim is None else gather_tensor(p.grad, dim, p.tp_full_size, model.group)
        _close(grad, ref[f"grad.{pname}"], f"{name}: {pname}")


@pytest.mark.parametrize("name", NAMES)
def test_moe_logits_loss_and_gradients_match_transformers(name):
    _check_against_reference(name)


def _check_tp() -> None:
    with grid(tp=2) as topo:
        for name in NAMES:
            _check_against_reference(name, topo)


def test_moe_under_tensor_parallelism_matches_transformers():
    run_distributed(2, _check_tp)


def test_correction_bias_is_loaded_and_chooses_experts():
    model = load_pretrained(FIXTURES / "deepseek_v3_moe_noaux")
    bias = model.model.layers["1"].mlp.gate.e_score_correction_bias
    saved = load_file(FIXTURES / "deepseek_v3_moe_noaux" / "model.safetensors")
    assert (
        torch.equal(bias, saved["model.layers.1.mlp.gate.e_score_correction_bias"]) and bias.abs().min() > 0
    )
    ref = _reference("v3_moe_noaux")
    bias.zero_()  # without the bias other experts are chosen: the fixture would catch a dropped bias
    assert (model(ref["input_ids"]) - ref["logits"]).abs().max() > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_moe_export_reloads_in_transformers_with_the_same_logits(name, tmp_path):
    import transformers  # a dev dependency: this test must run, not skip

    ref = _reference(name)
    save_pretrained(load_pretrained(FIXTURES / f"deepseek_{name}"), tmp_path)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, output_loading_info=True
    )
    expected_class = "DeepseekV3ForCausalLM" if name.startswith("v3") else "DeepseekV2ForCausalLM"
    assert type(model).__name__ == expected_class
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        _close(model(ref["input_ids"]).logits, ref["logits"], f"{name}: transformers reload")


@pytest.mark.parametrize("name", NAMES)
def test_greedy_decoding_with_the_latent_cache_gives_transformers_tokens(name):
    import transformers

    folder = FIXTURES / f"deepseek_{name}"
    prompt = _reference(name)["input_ids"][:1, :5]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = theirs.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    ours = generate(load_pretrained(folder).eval(), prompt, 10, greedy=True)
    assert torch.equal(ours, expected)


def test_dense_config_is_unchanged_by_moe_fields():
    dense = MLAConfig()
    assert not dense.is_moe and MLAConfig(n_routed_experts=0) == MLAConfig(n_routed_experts=0)
    assert dense.num_parameters() == dense.num_parameters(active_only=True)


def test_route_follows_deepseek_rules_on_a_hand_made_example():
    config = MLAConfig(
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.0,
    )
    logits = torch.tensor([[2.0, 1.0, 0.0, 3.0]])
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])  # the bias makes group {2, 3} win, but never weighs
    routing = route(logits, config, bias)
    assert sorted(routing.indices[0].tolist()) == [2, 3]
    s = logits.sigmoid()[0]
    expected = {2: s[2] / (s[2] + s[3]) * 2.0, 3: s[3] / (s[2] + s[3]) * 2.0}
    for j, w in zip(routing.indices[0].tolist(), routing.weights[0], strict=True):
        assert torch.isclose(w, expected[j])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(num_experts_per_tok=None), "num_experts_per_tok=None"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok=9"),
        (dict(scoring_func="relu"), "scoring_func='relu'"),
        (dict(topk_method="random"), "topk_method='random'"),
        (dict(n_group=3), "n_group=3"),
        (dict(n_group=4, topk_group=1, num_experts_per_tok=4), "topk_group=1"),
        (dict(router_bias_update_rate=0.1), "router_bias_update_rate=0.1"),
        (dict(aux_loss_alpha=-1.0), "aux_loss_alpha=-1.0"),
    ],
)
def test_bad_moe_config_is_an_error_naming_the_key(overrides, match):
    fields = {**dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=8), **overrides}
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        MLAConfig(**fields)


def test_hf_config_with_moe_reads_every_routing_key():
    hf = json.loads((FIXTURES / "deepseek_v2_moe_group" / "config.json").read_text())
    config, _ = config_from_hf(hf)
    assert (config.n_routed_experts, config.num_experts_per_tok, config.n_shared_experts) == (8, 3, 2)
    assert (config.topk_method, config.n_group, config.topk_group) == ("group_limited_greedy", 4, 2)
    assert (config.scoring_func, config.routed_scaling_factor, config.first_k_dense_replace) == (
        "softmax",
        4.0,
        1,
    )
