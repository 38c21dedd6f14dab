"""MLATransformer: a decoder-only language model with MLA attention and SwiGLU MLPs.

    x_0 = E[ids]                                          vocab-parallel embedding
    x'  = x + Attn(RMSNorm(x));  x_next = x' + MLP(RMSNorm(x'))   for each layer
    logits = RMSNorm(x_L) W_head^T                        vocab-parallel head (or tied to E)
    MLP(x) = (silu(x W_gate^T) * (x W_up^T)) W_down^T     gate/up column-parallel, down row-parallel

Module and parameter names follow the Hugging Face DeepSeek layout (`model.embed_tokens`,
`model.layers.{i}.self_attn.*`, `model.layers.{i}.mlp.*`, `model.norm`, `lm_head`), so checkpoint import,
export and LoRA targets need no renaming.

Initialisation is layout-independent: every parameter is drawn in full from a generator seeded by
(seed, parameter name) and each TP rank keeps its shard, so one seed gives the same full weights for any
(dp, tp). Norm weights start at one; everything else ~ N(0, init_std^2).

Sequence parallelism (`set_sequence_parallel(True)`, tp > 1, training mode): between the TP regions the
residual stream x is split along the sequence, rank r holding tokens [r s/tp, (r + 1) s/tp):

    x_r = ReduceScatter(E[ids])                                   embedding: reduce-scatter, not all-reduce
    h   = AllGather(RMSNorm(x_r))    backward: keep own chunk     attention sees the whole sequence
    x_r = x_r + ReduceScatter(Attn_partial(h))                    o_proj: reduce-scatter, not all-reduce
    h   = AllGather(RMSNorm(x_r))    backward: reduce-scatter     MLP input
    x_r = x_r + ReduceScatter(MLP_partial(h))                     down_proj: reduce-scatter
    logits = AllGather(RMSNorm(x_r)) W_head^T  backward: reduce-scatter

so norms, residuals and dropout hold s/tp tokens per rank. The attention's input gradient is already
complete on every rank (its replicated down-projections sit behind `copy_to_group`, as without SP), so its
gather keeps the own chunk in backward; the MLP's and the head's inputs feed only sharded layers, so
their gathers reduce-scatter the partial gradients. The replicated parameters used on sequence slices
(the norm weights) sum their gradients over the group (`RMSNorm.sequence_parallel_group`). Everything
else is the plain TP computation on the same numbers: the results equal tp without SP. In eval mode the
plain TP path runs (nothing is kept for backward, and any sequence length works).

Activation recompute (`set_recompute`): "full" keeps only each decoder layer's input and
recomputes the layer in backward; "selective" recomputes only the attention core (RoPE, scores, softmax,
weighted sum; see `MultiHeadLatentAttention._core`); "none" keeps everything.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.config import MLAConfig
from models.mla import LayerCache, MultiHeadLatentAttention, RMSNorm, document_attention
from models.mlp import MLP
from models.moe import MoE, aux_loss
from parallel.collectives import (
    copy_to_group,
    gather_from_group,
    gather_from_sequence_parallel,
    group_rank,
    group_size,
)
from parallel.context import ContextShard, context_shard
from parallel.tensor import (
    SEQUENCE_DIM,
    ColumnParallelLinear,
    VocabParallelEmbedding,
    shard_size,
    shard_tensor,
    tp_dim,
    vocab_parallel_cross_entropy,
)
from parallel.topology import Topology

RECOMPUTE_MODES = ("none", "full", "selective")


class DecoderLayer(nn.Module):
    def __init__(self, config: MLAConfig, group=None, index: int = 0, ep_group=None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MultiHeadLatentAttention(config, group)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config, group, ep_group) if config.is_moe_layer(index) else MLP(config, group)
        self.dropout = nn.Dropout(config.dropout)
        self.group = group
        self.sequence_parallel = False  # x arrives split along the sequence (see the module docstring)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        context: ContextShard | None = None,
    ) -> torch.Tensor:
        h = self.input_layernorm(x)
        if self.sequence_parallel:
            h = gather_from_group(h, SEQUENCE_DIM, self.group)
        x = x + self._dropout(self.self_attn(h, positions, attn_mask, context))
        return x + self._dropout(self.mlp(self.post_attention_layernorm(x)))

    def _dropout(self, y: torch.Tensor) -> torch.Tensor:
        p = self.dropout.p
        if not (self.sequence_parallel and self.training and p > 0):
            return self.dropout(y)
        # Every TP rank draws the mask of the whole sequence from its (shared) RNG state and keeps its own
        # slice, so that the masks of different slices are independent, as without SP.
        tp = group_size(self.group)
        full = (y.shape[0], y.shape[1] * tp, *y.shape[2:])
        keep = torch.empty(full, device=y.device).bernoulli_(1 - p).chunk(tp, dim=1)[group_rank(self.group)]
        return y * keep.to(y.dtype) / (1 - p)

    def forward_cached(self, x: torch.Tensor, start: int, cache: LayerCache) -> torch.Tensor:
        """The layer for new tokens at positions [start, start + s), attending through the latent cache
        (inference; see `MultiHeadLatentAttention.forward_cached`)."""
        x = x + self.self_attn.forward_cached(self.input_layernorm(x), start, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass(frozen=True)
class StageSpec:
    """Which part of the model a pipeline stage holds: layers [layer_start, layer_end), plus the
    embedding on the first stage and the final norm + LM head on the last."""

    layer_start: int
    layer_end: int
    is_first: bool = True
    is_last: bool = True


def split_layers(num_layers: int, num_stages: int, sizes: list[int] | None = None) -> list[StageSpec]:
    """Contiguous split of the layers over `num_stages` stages, as even as possible (or the given
    `sizes`). Leftover layers go to the middle stages first, then the first stage, and to the last
    stage (which also computes the LM head and the loss) only when nothing else is left."""
    if sizes is None:
        if num_stages > num_layers:
            raise ValueError(
                f"model.num_layers={num_layers} is too few for {num_stages} pipeline stages "
                "(pp x virtual_stages): every stage needs at least one layer"
            )
        base, extra = divmod(num_layers, num_stages)
        order = list(range(1, num_stages - 1)) + [0, num_stages - 1]
        sizes = [base] * num_stages
        for stage in order[:extra]:
            sizes[stage] += 1
    if len(sizes) != num_stages or sum(sizes) != num_layers or min(sizes) < 1:
        raise ValueError(
            f"distributed.pp_layers={sizes}: expected {num_stages} positive sizes summing to {num_layers}"
        )
    specs, start = [], 0
    for stage, size in enumerate(sizes):
        specs.append(StageSpec(start, start + size, stage == 0, stage == num_stages - 1))
        start += size
    return specs


class MLABackbone(nn.Module):
    """Embedding (first stage), decoder layers keyed by their global index, final norm (last stage)."""

    def __init__(self, config: MLAConfig, group=None, stage: StageSpec | None = None, ep_group=None) -> None:
        super().__init__()
        stage = stage or StageSpec(0, config.num_layers)
        self.stage = stage
        if stage.is_first:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, group)
        self.layers = nn.ModuleDict(
            {
                str(i): DecoderLayer(config, group, i, ep_group)
                for i in range(stage.layer_start, stage.layer_end)
            }
        )
        if stage.is_last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.group = group
        self.recompute = "none"  # none | full | selective
        self.sequence_parallel = False  # hidden states between layers are split along the sequence
        self.cp_group = None  # the sequence is split over this context-parallel group (None: not split)
        self.cp_ring = True  # latents passed round a ring (else all-gathered): parallel/context/

    def forward(self, inputs: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (batch, seq) on the first stage, hidden states (batch, seq, hidden) elsewhere (under
        sequence parallelism: this rank's slice of the sequence, and so is the output). `document_ids`
        (batch, seq), always the whole sequence, switch on document masking (`document_attention`).
        Under context parallelism (`cp_group`) "the sequence" is this rank's zigzag pieces of it, and so
        are `document_ids` (parallel/context/)."""
        tp = group_size(self.group) if self.sequence_parallel else 1
        seq = inputs.shape[1] * (1 if self.stage.is_first else tp)
        if seq % tp:
            raise ValueError(
                f"sequence length {seq} is not divisible by tp={tp} (distributed.sequence_parallel=true)"
            )
        x = self.embed_tokens(inputs) if self.stage.is_first else inputs
        positions, mask, context = torch.arange(seq, device=x.device), None, None
        if self.cp_group is not None:
            context = context_shard(seq, self.cp_group, document_ids, x.device, self.cp_ring)
            positions, document_ids = context.positions, None
        if document_ids is not None:
            if document_ids.shape != (x.shape[0], seq):
                raise ValueError(
                    f"document_ids of shape {tuple(document_ids.shape)}: expected (batch, seq) = "
                    f"{(x.shape[0], seq)}"
                )
            positions, mask = document_attention(document_ids.to(x.device))
        for layer in self.layers.values():
            if self.recompute == "full" and self.training:
                x = checkpoint(layer, x, positions, mask, context, use_reentrant=False)
            else:
                x = layer(x, positions, mask, context)
        return self.norm(x) if self.stage.is_last else x


class MLATransformer(nn.Module):
    """The model, or one pipeline stage of it (`stage`), sharded over `topology.tp_group`.

    With `stage=None` it holds everything. A stage that is not the last returns hidden states from
    `forward`; only the last stage has the head and `loss`. With `topology.cp_size` > 1 the model runs on
    this rank's zigzag pieces of each sequence (`set_context_parallel`, parallel/context/).
    """

    def __init__(
        self, config: MLAConfig, topology: Topology | None = None, stage: StageSpec | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.group = topology.tp_group if topology is not None else None
        tp = topology.tp_size if topology is not None else 1
        if config.num_heads % tp:
            raise ValueError(f"model.num_heads={config.num_heads} is not divisible by tp={tp}")
        self.stage = stage or StageSpec(0, config.num_layers)
        if config.tie_embeddings and not (self.stage.is_first and self.stage.is_last):
            raise ValueError("model.tie_embeddings=true is not supported with pipeline parallelism (pp > 1)")
        ep_group = topology.ep_group if topology is not None else None
        self.model = MLABackbone(config, self.group, self.stage, ep_group)
        self.lm_head = None
        if self.stage.is_last and not config.tie_embeddings:
            self.lm_head = ColumnParallelLinear(config.hidden_size, config.vocab_size, group=self.group)
        local_vocab = shard_size(config.vocab_size, tp)
        tp_rank = topology.tp_rank if topology is not None else 0
        self.vocab_valid_local = max(0, min(local_vocab, config.vocab_size - tp_rank * local_vocab))
        self.tp_rank, self.tp_size = tp_rank, tp
        self.sequence_parallel = False
        self.cp_size = 1
        self.set_context_parallel(topology.cp_group if topology is not None else None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Draw every parameter in full from (seed, name) and keep this rank's shard.

        `seed=None` uses `torch.initial_seed()`, i.e. the value given to `torch.manual_seed`.
        """
        seed = torch.initial_seed() if seed is None else seed
        tp_rank, tp_size = self.tp_rank, self.tp_size
        for name, param in self.named_parameters():
            dim = tp_dim(param)
            full_shape = list(param.shape)
            if dim is not None:
                full_shape[dim] = param.tp_full_size
            if name.endswith("norm.weight"):
                full = torch.ones(full_shape)
            elif name.endswith("e_score_correction_bias"):  # MoE routing bias: starts neutral
                full = torch.zeros(full_shape)
            else:
                generator = torch.Generator().manual_seed(
                    (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63
                )
                full = torch.randn(full_shape, generator=generator) * self.config.init_std
            local = full if dim is None else shard_tensor(full, dim, tp_rank, tp_size)
            param.copy_(local)

    def set_recompute(self, mode: str | bool) -> None:
        """Activation recompute in backward: "none", "full" (each decoder layer) or "selective" (the
        attention core only); `True` and `False` mean "full" and "none"."""
        if isinstance(mode, bool):
            mode = "full" if mode else "none"
        if mode not in RECOMPUTE_MODES:
            raise ValueError(f"distributed.recompute={mode!r}: expected one of {', '.join(RECOMPUTE_MODES)}")
        self.model.recompute = mode
        for layer in self.model.layers.values():
            layer.self_attn.recompute_core = mode == "selective"

    def set_context_parallel(self, group, ring: bool = True) -> None:
        """Split every sequence over the context-parallel `group` (None: whole sequences, as for
        generation): inputs, targets and document ids are then this rank's zigzag pieces. The latents
        travel round a ring (`ring`, the faster measured; docs/long-context.md) or are all-gathered."""
        cp = group_size(group)
        if cp > 1 and self.config.is_moe:
            raise ValueError(
                f"distributed.cp={cp} with mixture-of-experts layers is not supported: the router's "
                "sequence-level balance loss needs the whole sequence"
            )
        self.model.cp_group = group if cp > 1 else None
        self.model.cp_ring = ring
        self.cp_size = cp

    def set_sequence_parallel(self, enabled: bool) -> None:
        """Split norms, residuals and dropout along the sequence inside TP regions (module docstring).

        Applies in training mode only; call before `apply_lora` or after, either works."""
        self.sequence_parallel = enabled and self.tp_size > 1
        self.train(self.training)

    def train(self, mode: bool = True) -> MLATransformer:
        super().train(mode)
        active = self.sequence_parallel and mode
        group = self.group if active else None
        backbone = self.model
        backbone.sequence_parallel = active
        if self.stage.is_first:
            backbone.embed_tokens.sequence_parallel = active
        for layer in backbone.layers.values():
            if isinstance(layer.mlp, MoE):
                if active:
                    raise ValueError(
                        "distributed.sequence_parallel=true is not supported with mixture-of-experts layers"
                    )
            else:
                layer.mlp.sequence_parallel = layer.mlp.down_proj.sequence_parallel = active
            layer.sequence_parallel = layer.self_attn.o_proj.sequence_parallel = active
            layer.input_layernorm.sequence_parallel_group = group
            layer.post_attention_layernorm.sequence_parallel_group = group
        if self.stage.is_last:
            backbone.norm.sequence_parallel_group = group
            if self.lm_head is not None:
                self.lm_head.sequence_parallel = active
        return self

    def forward(
        self,
        inputs: torch.Tensor,
        gather_output: bool = False,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab / tp) on this rank's vocabulary slice, or the full vocabulary if
        gathered. `inputs` are token ids (batch, seq) on the first stage, hidden states elsewhere; a stage
        that is not the last returns hidden states. `document_ids` (batch, seq): packed documents that
        attend only within themselves, with RoPE positions restarting at each (`document_attention`)."""
        expected_dim = 2 if self.stage.is_first else 3
        if inputs.dim() != expected_dim:
            what = "input_ids (batch, seq)" if self.stage.is_first else "hidden states (batch, seq, hidden)"
            raise ValueError(f"expected {what}, got shape {tuple(inputs.shape)}")
        seq = inputs.shape[1] * self.cp_size
        if seq > self.config.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds model.max_seq_len={self.config.max_seq_len}")
        hidden = self.model(inputs, document_ids)
        if not self.stage.is_last:
            return hidden
        return self.head(hidden, gather_output)

    def head(self, hidden: torch.Tensor, gather_output: bool = False) -> torch.Tensor:
        """Logits from the final-normed hidden states (last stage): this rank's vocabulary slice with
        padding masked to -inf, or the full vocabulary if gathered."""
        if self.lm_head is not None:
            logits = self.lm_head(hidden)
        elif self.model.sequence_parallel:
            hidden = gather_from_sequence_parallel(hidden, SEQUENCE_DIM, self.group)
            logits = F.linear(hidden, self.model.embed_tokens.weight)
        else:
            logits = F.linear(copy_to_group(hidden, self.group), self.model.embed_tokens.weight)
        if self.vocab_valid_local < logits.shape[-1]:
            padding = torch.arange(logits.shape[-1], device=logits.device) >= self.vocab_valid_local
            logits = logits.masked_fill(padding, float("-inf"))
        if gather_output and self.tp_size > 1:
            logits = gather_from_group(logits, -1, self.group).narrow(-1, 0, self.config.vocab_size)
        return logits

    def loss(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        reduction: str = "mean",
        document_ids: torch.Tensor | None = None,
        balance_weight: float = 1.0,
    ) -> torch.Tensor:
        """Next-token cross-entropy: targets[b, t] is the token after input_ids[b, t]; -100 is ignored.
        "mean" is over the counted targets (0 when there are none). (Last stage only; `inputs` and
        `document_ids` as for `forward`.) Plus `balance_weight` times the MoE layers' auxiliary balance
        loss (a mean over the rows) when training with `aux_loss_alpha` > 0 (whole model on one stage)."""
        if not self.stage.is_last:
            raise RuntimeError("loss() is only defined on the last pipeline stage")
        logits = self(inputs, document_ids=document_ids)
        loss = vocab_parallel_cross_entropy(logits, targets, self.group, reduction=reduction)
        balance = aux_loss(self)  # MoE balance loss of this forward (training with aux_loss_alpha > 0)
        return loss if balance is None else loss + balance_weight * balance
