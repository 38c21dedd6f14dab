"""The MoE layer itself: grouped expert computation, balance loss, bias update, tensor parallelism.

Tolerances: the grouped computation and the per-token reference do the same fp32 products in another
order (1e-6 relative); TP against one process differs by the order of the all-reduce sums (1e-5, as the
dense TP tests).
"""

import pytest
import torch
from dist_harness import grid, run_distributed

from models.config import MLAConfig
from models.moe import MoE, run_experts, sequence_aux_loss, update_router_bias
from models.transformer import MLATransformer
from parallel import gather_tensor
from parallel.lowbit.lora_targets import peft_target_modules, target_matches
from parallel.tensor import tp_dim
from train.config import load_config
from train.layout import unsupported

SMALL = dict(
    vocab_size=96,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    intermediate_size=48,
    max_seq_len=32,
    init_std=0.2,  # O(1) router logits: a routing mistake changes the output visibly
)
MOE = dict(
    n_routed_experts=8,
    num_experts_per_tok=3,
    moe_intermediate_size=16,
    n_shared_experts=1,
    first_k_dense_replace=1,
    scoring_func="sigmoid",
    topk_method="noaux_tc",
    n_group=4,
    topk_group=2,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    aux_loss_alpha=0.1,
)


def test_dense_model_is_unchanged_bit_for_bit_with_zero_experts():
    torch.manual_seed(0)
    dense = MLATransformer(MLAConfig(**SMALL))
    torch.manual_seed(0)
    zero = MLATransformer(MLAConfig(**SMALL, n_routed_experts=0, num_experts_per_tok=5))
    assert dense.state_dict().keys() == zero.state_dict().keys()
    assert all(
        torch.equal(a, b)
        for a, b in zip(dense.state_dict().values(), zero.state_dict().values(), strict=True)
    )
    ids = torch.randint(0, 96, (2, 10))
    assert torch.equal(dense(ids), zero(ids))


def test_grouped_experts_equal_a_per_token_loop_and_shard_by_expert_range():
    torch.manual_seed(0)
    layer = MoE(MLAConfig(**SMALL, **MOE))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(20, 32)
    routing = layer.gate(x)
    experts = list(layer.experts.values())  # keyed by global index (str)
    grouped = run_experts(experts, x, routing.indices, routing.weights)
    loop = torch.zeros_like(x)
    for t in range(20):
        for j, w in zip(routing.indices[t].tolist(), routing.weights[t], strict=True):
            loop[t] += w * layer.experts[str(j)].compute(x[t : t + 1])[0]
    assert torch.allclose(grouped, loop, rtol=1e-5, atol=1e-6)
    # an expert-parallel rank holding experts [4, 8) computes exactly their share
    halves = run_experts(experts[:4], x, routing.indices, routing.weights) + run_experts(
        experts[4:], x, routing.indices, routing.weights, first_expert=4
    )
    assert torch.allclose(halves, grouped, rtol=1e-5, atol=1e-6)


def test_sequence_aux_loss_by_hand():
    config = MLAConfig(**SMALL, n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=8)
    from models.moe import Routing

    scores = torch.tensor([[0.75, 0.25], [0.5, 0.5]])  # one sequence of two tokens, softmax scores
    routing = Routing(torch.tensor([[0], [0]]), torch.ones(2, 1), scores)
    # f = E/(k T) * counts = 2/2 * [2, 0] = [2, 0]; P = mean scores = [0.625, 0.375]; sum f P = 1.25
    assert sequence_aux_loss(routing, 1, config).item() == pytest.approx(1.25)


def test_bias_update_moves_towards_the_under_loaded_experts():
    layer = MoE(MLAConfig(**SMALL, **MOE, router_bias_update_rate=0.5))
    layer.step_load.copy_(torch.tensor([5.0, 1, 3, 3, 3, 3, 3, 3]))
    update_router_bias([layer], 0.5)
    assert layer.gate.e_score_correction_bias.tolist() == [-0.5, 0.5, 0, 0, 0, 0, 0, 0]
    assert layer.step_load.sum() == 0


def _tp_matches_one_process() -> None:
    torch.manual_seed(1)
    config = MLAConfig(**SMALL, **MOE)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    results = []
    for make in (lambda: None, lambda: topo):
        with grid(tp=2) as topo:
            model = MLATransformer(config, make())
            model.reset_parameters(seed=7)
            with torch.no_grad():
                model.model.layers["1"].mlp.gate.e_score_correction_bias.copy_(torch.linspace(-0.2, 0.2, 8))
            loss = model.loss(ids, torch.roll(ids, -1, 1))
            assert model.model.layers["1"].mlp.aux_loss > 0
            loss.backward()
            grads = {}
            for name, p in model.named_parameters():
                if p.grad is not None:
                    dim = tp_dim(p)
                    grads[name] = (
                        p.grad if dim is None else gather_tensor(p.grad, dim, p.tp_full_size, model.group)
                    )
            results.append((loss.detach(), grads))
    (loss1, grads1), (loss2, grads2) = results
    assert torch.allclose(loss1, loss2, rtol=1e-5)
    for name, g in grads1.items():
        scale = g.abs().max()
        assert (grads2[name] - g).abs().max() <= 1e-5 * scale + 1e-9, name


def test_moe_with_aux_loss_under_tp2_equals_one_process():
    run_distributed(2, _tp_matches_one_process)


def test_unsupported_moe_combinations_are_named():
    moe = [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in MOE.items()]
    base = [f"model.{k}={v}" for k, v in SMALL.items()] + moe + ["data.seq_len=16"]
    config = load_config(None, [*base, "distributed.tp=2", "distributed.sequence_parallel=true"])
    assert "sequence_parallel=true with mixture-of-experts" in unsupported(config, MLAConfig(**config.model))
    config = load_config(None, [*base, "distributed.pp=2"])
    assert "model.aux_loss_alpha=0.1 with distributed.pp=2" in unsupported(config, MLAConfig(**config.model))


def test_lora_targets_with_a_star_name_one_component_and_stay_peft_loadable():
    import re

    targets = ["experts.*.gate_proj", "o_proj"]
    names = {
        "model.layers.1.mlp.experts.3.gate_proj": True,
        "model.layers.1.mlp.shared_experts.gate_proj": False,
        "model.layers.0.mlp.gate_proj": False,
        "model.layers.0.self_attn.o_proj": True,
    }
    pattern = peft_target_modules(targets)
    for name, selected in names.items():
        assert target_matches(name, targets) == selected == (re.fullmatch(pattern, name) is not None), name
    assert peft_target_modules(["o_proj", "q_proj"]) == ["o_proj", "q_proj"]


def test_routing_statistics_record_loads_imbalance_and_aux_loss():
    from models.moe import routing_statistics

    torch.manual_seed(3)
    model = MLATransformer(MLAConfig(**SMALL, **MOE)).train()
    ids = torch.randint(0, 96, (2, 12))
    model.loss(ids, ids)
    aux = model.model.layers["1"].mlp.aux_loss.item()
    record = routing_statistics(model)
    counts = record["moe_tokens_per_expert"]["model.layers.1.mlp"]
    assert sum(counts) == 2 * 12 * 3 and record["moe_load_imbalance"] == max(counts) / (sum(counts) / 8)
    assert record["moe_aux_loss"] == pytest.approx(aux)
    model.eval()(ids)  # evaluation is not counted
    assert routing_statistics(model)["moe_tokens_per_expert"]["model.layers.1.mlp"] == [0] * 8
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the router stays fp32 under autocast
        assert model.model.layers["1"].mlp.gate(torch.randn(4, 32)).scores.dtype == torch.float32
