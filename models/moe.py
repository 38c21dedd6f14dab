"""DeepSeekMoE: a router, shared experts and routed experts computed by grouping tokens by expert.

For a token x (one row of the flattened batch) with E routed experts and k chosen per token:

    s = score(x W_router^T)                 softmax (DeepSeek-V2) or sigmoid (V3), in fp32
    c = s + b                               selection scores; b = e_score_correction_bias (noaux_tc only)
    groups                                  E experts in n_group groups; keep the topk_group best groups,
                                            a group scored by its best expert (group_limited_greedy) or
                                            by the sum of its best two (noaux_tc), mask the rest
    I = top-k of c over the kept experts    (greedy: every group kept)
    w_j = s_{I_j}  (/ sum_j s_{I_j} when norm_topk_prob)  * routed_scaling_factor
    y = sum_j w_j Expert_{I_j}(x) + Shared(x)

as transformers' DeepseekV2TopkRouter / DeepseekV3TopkRouter compute it (V2's group_limited_greedy masks
with 0, so a masked expert keeps weight 0 if chosen; noaux_tc masks with -inf, and the bias only chooses,
never weighs). Every expert is a SwiGLU `MLP` of width `moe_intermediate_size`; the shared experts are
one MLP of width n_shared * moe_intermediate_size.

Routed experts (`run_experts`) are dropless: the (token, choice) pairs are sorted by expert and each
expert runs one matmul chain on its contiguous block, then the weighted outputs are added back to their
tokens (index_add). The function takes "the experts held here and the first one's global index", so an
expert-parallel layer can give each rank a slice of the experts and the tokens routed to them.

Expert parallelism (`ep_group` of P ranks): the layer holds only its E/P experts, keyed by global index
(`experts.{j}`, so names, initialisation, checkpoints and export are those of ep = 1); each rank routes
its own tokens, sends every (token, expert) row to the expert's owner and gets the outputs back by
all-to-all (parallel/experts/token_dispatch.py), then weighs and adds them as above.

Tensor parallelism: each expert (and the shared MLP) is split like the dense MLP (gate/up by columns,
down by rows, one all-reduce per expert); the router is replicated and reads the input before
`copy_to_group`, so its (complete, identical) contribution to the input gradient is not summed twice.

Balancing, training only: the sequence-level auxiliary loss of DeepSeek-V2/V3
    L_aux = alpha * mean_b sum_i f_{b,i} P_{b,i},  f_{b,i} = E/(k T) * #{tokens of sequence b choosing i},
    P_{b,i} = mean over the tokens of b of s_i (normalised to sum 1 when scores are sigmoids)
(`aux_loss` after each forward, added by `MLATransformer.loss`), and V3's aux-loss-free bias update
b_i += rate * sign(mean load - load_i) after each optimizer step (`update_router_bias`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.config import MLAConfig
from models.mlp import MLP
from parallel.collectives import copy_to_group, group_size
from parallel.experts import combine, dispatch, local_expert_range, mark_expert_module


@dataclass
class Routing:
    """Per token: the chosen experts (T, k), their weights (T, k) and every expert's score (T, E)."""

    indices: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor


def route(logits: torch.Tensor, config: MLAConfig, bias: torch.Tensor | None = None) -> Routing:
    """DeepSeek routing of fp32 router logits (T, E); see the module docstring."""
    n, k = config.n_routed_experts, config.num_experts_per_tok
    scores = logits.softmax(dim=-1) if config.scoring_func == "softmax" else logits.sigmoid()
    method, groups = config.topk_method, config.n_group or 1
    choice = scores + bias if method == "noaux_tc" and bias is not None else scores
    if method != "greedy" and groups > 1:
        grouped = choice.view(-1, groups, n // groups)
        if method == "group_limited_greedy":
            group_scores = grouped.max(dim=-1).values
        else:
            group_scores = grouped.topk(min(2, n // groups), dim=-1)[0].sum(dim=-1)
        kept = torch.topk(group_scores, k=config.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, kept, 1.0).bool()
        mask = mask.unsqueeze(-1).expand(-1, groups, n // groups).reshape(-1, n)
        choice = choice.masked_fill(~mask, 0.0 if method == "group_limited_greedy" else float("-inf"))
    if method == "noaux_tc":
        indices = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, indices)
    else:
        weights, indices = torch.topk(choice, k=k, dim=-1, sorted=False)
    if config.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return Routing(indices, weights * config.routed_scaling_factor, scores)


def run_experts(
    experts: Sequence[MLP],
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    first_expert: int = 0,
) -> torch.Tensor:
    """y[t] = sum over j with indices[t, j] held here of weights[t, j] * experts[indices[t, j] - first](x[t]).

    `x` (T, h) is behind `copy_to_group`; the experts held here are global indices [first_expert,
    first_expert + len(experts)); pairs routed elsewhere are skipped. Every expert runs (possibly on zero
    tokens), so each has a gradient and every TP rank makes the same collectives.
    """
    k = indices.shape[1]
    flat = indices.reshape(-1) - first_expert
    here = (flat >= 0) & (flat < len(experts))
    pairs = torch.nonzero(here).squeeze(1)
    order = pairs[torch.argsort(flat[pairs], stable=True)]
    counts = torch.bincount(flat[order], minlength=len(experts)).tolist()
    tokens = order // k
    blocks = torch.split(x[tokens], counts)
    out = torch.cat([expert.compute(block) for expert, block in zip(experts, blocks, strict=True)])
    out = out * weights.reshape(-1)[order].unsqueeze(1)
    return torch.zeros_like(x).index_add(0, tokens, out.to(x.dtype))


class Router(nn.Module):
    """The replicated gate: `weight` (E, h), computed in fp32, and V3's `e_score_correction_bias`.

    The bias is a frozen parameter (requires_grad=False, starts at zero), not a buffer, so that
    checkpoints, re-sharding and export carry it like every weight; no optimizer sees it, only
    `update_router_bias` moves it."""

    def __init__(self, config: MLAConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(config.n_routed_experts, config.hidden_size))
        if config.topk_method == "noaux_tc":
            bias = torch.zeros(config.n_routed_experts)
            self.e_score_correction_bias = nn.Parameter(bias, requires_grad=False)
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> Routing:
        with torch.autocast(x.device.type, enabled=False):  # routing in fp32 under bf16/fp16 autocast too
            logits = F.linear(x.float(), self.weight.float())
        return route(logits, self.config, self.e_score_correction_bias)


class MoE(nn.Module):
    """A DeepSeekMoE layer: `gate` (router), `experts.{j}`, `shared_experts` (Hugging Face names).

    After each forward: `aux_loss` (the weighted sequence-level loss, training with aux_loss_alpha > 0,
    else None). Training forwards accumulate (token, expert) counts in `tokens_per_expert` and the aux
    loss in `aux_loss_sum` / `forwards` until `reset_statistics` (logging), and in `step_load` until
    `update_router_bias` (each step).
    """

    def __init__(self, config: MLAConfig, group=None, ep_group=None) -> None:
        super().__init__()
        self.config, self.group, self.ep_group = config, group, ep_group
        width = config.moe_intermediate_size
        self.gate = Router(config)
        self.expert_range = local_expert_range(config.n_routed_experts, ep_group)
        # Keyed by global index, so names, initialisation, checkpoints and export do not depend on ep.
        self.experts = nn.ModuleDict({str(j): MLP(config, group, width) for j in self.expert_range})
        for expert in self.experts.values():
            mark_expert_module(expert)
        shared = config.n_shared_experts or 0
        self.shared_experts = MLP(config, group, width * shared) if shared else None
        self.aux_loss: torch.Tensor | None = None
        for name in ("tokens_per_expert", "step_load"):
            self.register_buffer(name, torch.zeros(config.n_routed_experts), persistent=False)
        self.register_buffer("aux_loss_sum", torch.zeros(()), persistent=False)
        self.register_buffer("forwards", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = self.gate(flat)
        y = self._routed(copy_to_group(flat, self.group), routing).view(shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        alpha = self.config.aux_loss_alpha
        self.aux_loss = None
        if alpha and self.training:
            self.aux_loss = alpha * sequence_aux_loss(routing, shape[0], self.config)
        # Count training forwards once: not the recomputation of a checkpointed layer (run in backward).
        if self.training and torch._C._current_graph_task_id() == -1:
            self._count(routing)
        return y

    def _routed(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The routed experts' weighted sum: here, or (ep > 1) on the ranks owning the experts."""
        experts = list(self.experts.values())
        if group_size(self.ep_group) == 1:
            return run_experts(experts, x, routing.indices, routing.weights)
        rows, plan = dispatch(x, routing.indices, self.config.n_routed_experts, self.ep_group)
        blocks = torch.split(rows, plan.counts)
        out = torch.cat([expert.compute(b) for expert, b in zip(experts, blocks, strict=True)])
        out = combine(out, plan, self.ep_group)
        out = out * routing.weights.reshape(-1)[plan.order].unsqueeze(1)
        tokens = plan.order // routing.indices.shape[1]
        return torch.zeros_like(x).index_add(0, tokens, out.to(x.dtype))

    @torch.no_grad()
    def _count(self, routing: Routing) -> None:
        counts = torch.bincount(routing.indices.reshape(-1), minlength=self.config.n_routed_experts)
        self.tokens_per_expert += counts.to(self.tokens_per_expert)
        self.step_load += counts.to(self.step_load)
        if self.aux_loss is not None:
            self.aux_loss_sum += self.aux_loss.detach().float()
            self.forwards += 1

    def reset_statistics(self) -> None:
        for buffer in (self.tokens_per_expert, self.aux_loss_sum, self.forwards):
            buffer.zero_()


def sequence_aux_loss(routing: Routing, batch: int, config: MLAConfig) -> torch.Tensor:
    """DeepSeek's sequence-level balance loss (without alpha): mean_b sum_i f_{b,i} P_{b,i}."""
    n, k = config.n_routed_experts, config.num_experts_per_tok
    scores = routing.scores
    if config.scoring_func == "sigmoid":
        scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    scores = scores.view(batch, -1, n)
    seq = scores.shape[1]
    chosen = routing.indices.view(batch, seq * k)
    load = torch.zeros(batch, n, device=scores.device).scatter_add_(
        1, chosen, torch.ones_like(chosen, dtype=scores.dtype)
    )
    load = load / (seq * k / n)
    return (load * scores.mean(dim=1)).sum(dim=1).mean()


def moe_layers(model: nn.Module | Sequence[nn.Module]) -> list[tuple[str, MoE]]:
    """(name, layer) of every MoE layer of a model or of this rank's pipeline chunks."""
    chunks = [model] if isinstance(model, nn.Module) else list(model)
    return [(name, m) for chunk in chunks for name, m in chunk.named_modules() if isinstance(m, MoE)]


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of the auxiliary losses of the last forward (None when none was computed)."""
    losses = [m.aux_loss for _, m in moe_layers(model) if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


@torch.no_grad()
def routing_statistics(model, dp_group=None, pp_group=None) -> dict:
    """The routing record since the last call, then reset: `moe_tokens_per_expert` {layer: counts summed
    over the data-parallel ranks}, `moe_load_imbalance` (max/mean tokens per expert, worst layer) and
    `moe_aux_loss` (mean over forwards, summed over layers; with aux_loss_alpha > 0). Every pipeline
    stage's layers when `pp_group` is given. Collective over both groups ({} for a dense model)."""
    layers = moe_layers(model)
    record: dict = {}
    if layers:
        counts = torch.stack([m.tokens_per_expert for _, m in layers])
        aux = torch.stack([torch.stack([m.aux_loss_sum, m.forwards]) for _, m in layers])
        if group_size(dp_group) > 1:
            dist.all_reduce(counts, group=dp_group)
            dist.all_reduce(aux, group=dp_group)
        record = {"counts": {name: c.long().tolist() for (name, _), c in zip(layers, counts, strict=True)}}
        record["aux"] = [(float(s), float(n)) for s, n in aux.tolist()]
        for _, m in layers:
            m.reset_statistics()
    parts = [record]
    if group_size(pp_group) > 1:
        parts = [None] * group_size(pp_group)
        dist.all_gather_object(parts, record, group=pp_group)
    counts = {name: c for part in parts if part for name, c in part["counts"].items()}
    if not counts:
        return {}
    imbalance = max(max(c) / max(sum(c) / len(c), 1e-12) for c in counts.values())
    out = {"moe_load_imbalance": imbalance, "moe_tokens_per_expert": counts}
    aux = [pair for part in parts if part for pair in part["aux"] if pair[1]]
    if aux:
        out["moe_aux_loss"] = sum(total / n for total, n in aux)
    return out


@torch.no_grad()
def update_router_bias(model, rate: float, group: dist.ProcessGroup | None = None) -> None:
    """V3's aux-loss-free balancing: b_i += rate * sign(mean load - load_i), the load of the training
    forwards since the last update summed over `group` (so every replica makes the same update), then
    reset. Collective when group has > 1 rank."""
    for _, layer in moe_layers(model):
        load = layer.step_load.clone()
        layer.step_load.zero_()
        if group_size(group) > 1:
            dist.all_reduce(load, group=group)
        bias = layer.gate.e_score_correction_bias
        bias += rate * torch.sign(load.mean() - load).to(bias)
