r"""LoRA adapters (Hu et al. 2021) on plain and tensor-parallel linears, with frozen NF4 bases (QLoRA).

A target linear y = x W^T (+ b), W frozen, gains a trainable low-rank update

    y = x W^T + s * dropout(x) A^T B^T,     A: r x in,   B: out x r,   s = alpha / r

A ~ Kaiming-uniform(a = sqrt 5) = U(-1/sqrt(in), 1/sqrt(in)) as in PEFT, B = 0: the model is unchanged at
init. Only A and B are trainable. `merge_lora` folds s B A into W, `unmerge_lora` takes it out again.
A is drawn in full from a generator seeded by (seed, module name) and then sharded, so one seed gives the
same full adapters whatever the TP size.

Tensor parallelism: the adapter is split like its base and added to the base's local product, between
the base layer's own communication steps (`local_input`, `combine_output`, see parallel.tensor.linear):

    y = combine_output( local_input(x) W_i^T + s * dropout(local_input(x)) A_i^T B_i^T )

so each rank adds exactly its share of the single-process result.

  column-parallel base (W_i = rows of W, x replicated): A replicated, B_i = rows of B.
      y_i = x W_i^T + s u B_i^T,   u = x A^T.
      dB_i = s dy_i^T u is complete. du = sum_i s dy_i B_i is a sum over ranks, so the down-projection
      all-reduces du (tokens x r numbers) in backward: dA = du^T x is then complete and identical on every
      rank. The input gradient it returns is this rank's share s dy_i B_i A, which the base's
      copy_to_group (or the caller's, when `reduce_input_grad=False`) sums with the base's share.
  row-parallel base (W_i = columns of W, x_i = columns of x): A_i = columns of A, B replicated.
      y = sum_i (x_i W_i^T + s u_i B^T),   u_i = x_i A_i^T      (the sum is the base's own all-reduce)
      dy is replicated, so du_i = s dy B and dA_i = du_i^T x_i are complete. dB = s dy^T sum_i u_i is a sum
      over ranks: B enters through copy_to_group (identity forward, all-reduce of its gradient backward),
      so dB is complete and identical on every rank.

With dropout the column case needs the same mask on every TP rank (A's input is replicated), which holds
when the ranks share their RNG state, as the model's own dropout already requires.

NF4 bases (`quantize_base="nf4"`): each rank's shard of W is quantized (shard first, then quantize) into
an `NF4Linear` (parallel.lowbit.nf4_linear), so no full-precision weight is kept or saved for backward.
Blocks are those of the full W (parallel.lowbit.nf4): the shard's codes and scales are exactly its slice
of the full weight's, so a QLoRA model computes the same thing at any tp.

Targets follow PEFT: a list of names matches every module whose name equals one of them or ends with
"." + one of them (`"q_b_proj"`, `"self_attn.o_proj"`); a single string is a regular expression that must
match the whole module name (`r".*\.(q_b_proj|o_proj)"`). Only linear modules may match. The adapters'
file format (PEFT's) is in parallel.lowbit.peft_io; `save_adapter` and `load_adapter` are re-exported here.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from parallel.collectives import _all_reduce, copy_to_group, group_rank, group_size
from parallel.lowbit.lora_targets import target_matches
from parallel.lowbit.nf4_linear import NF4Linear, compute_dtype, nf4_layout_of_shard
from parallel.pipeline import ModelParts
from parallel.tensor import ColumnParallelLinear, RowParallelLinear, mark_sharded, shard_tensor

ModelLike = nn.Module | Sequence[nn.Module] | Mapping[int, nn.Module]


class _ReplicatedDown(torch.autograd.Function):
    """u = x A^T for a replicated A whose output feeds a column-sharded B (see the module docstring).

    Backward: du is all-reduced over the group before dA = du^T x (complete, identical on every rank);
    the input gradient is this rank's share du_local A, to be summed by an enclosing copy_to_group.
    """

    @staticmethod
    def forward(ctx, x, a, group):
        dtype = compute_dtype(x, a)
        ctx.group, ctx.x_dtype, ctx.a_dtype = group, x.dtype, a.dtype
        x, a = x.to(dtype), a.to(dtype)
        ctx.save_for_backward(x, a)
        return F.linear(x, a)

    @staticmethod
    def backward(ctx, du):
        x, a = ctx.saved_tensors
        du = du.to(x.dtype)
        dx = (du @ a).to(ctx.x_dtype)
        du_full = _all_reduce(du.clone(), ctx.group)
        da = du_full.reshape(-1, du.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return dx, da.to(ctx.a_dtype), None


class _Factor(nn.Module):
    """Holds one LoRA matrix as `weight`, so its state-dict key is `lora_A.weight` as in PEFT."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}"


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


class LoRALinear(nn.Module):
    """A frozen linear (`base_layer`: nn.Linear, Column/RowParallelLinear, or the NF4Linear of its shard)
    plus `lora_A`, `lora_B`; computes what its base computes plus (alpha / r) B A x, TP-sharded as the base.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        name: str = "",
        seed: int = 0,
        quantize_base: str | None = None,
    ) -> None:
        super().__init__()
        kind = _kind(base)
        if kind is None:
            raise TypeError(f"{name or 'module'}: LoRA needs a linear layer, got {type(base).__name__}")
        if quantize_base not in (None, "nf4"):
            raise ValueError(f"quantize_base={quantize_base!r}: expected None or 'nf4'")
        self.kind, self.r, self.lora_alpha, self.scaling = kind, r, alpha, alpha / r
        self.in_features, self.out_features = base.in_features, base.out_features
        self.group = getattr(base, "group", None)
        self.weight_tp_dim = {"column": 0, "row": 1, "linear": None}[kind]
        self.weight_full_size = {"column": self.out_features, "row": self.in_features, "linear": None}[kind]
        a, b = self._initial_factors(base.weight, name, seed)
        self.lora_A, self.lora_B = _Factor(a), _Factor(b)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        base.requires_grad_(False)
        # The TP layer whose communication steps the adapter shares. Not a submodule: under NF4 its
        # weight moves (quantized) into `base_layer`, and the state dict must keep PEFT's key layout.
        object.__setattr__(self, "parallel", None if kind == "linear" else base)
        if quantize_base == "nf4":
            where = nf4_layout_of_shard(
                base.weight.shape, self.weight_tp_dim, self.weight_full_size, self.group, name
            )
            quantized = NF4Linear(base.weight, base.bias, layout=where, group=self.group)
            if kind != "linear":
                base.weight = base.bias = None  # the TP layer keeps no full-precision copy
            base = quantized
        self.base_layer = base
        self.merged = False
        self.register_buffer("merged_base", None, persistent=False)  # W + sBA while merged on NF4

    def _initial_factors(
        self, weight: torch.Tensor, name: str, seed: int
    ) -> tuple[nn.Parameter, nn.Parameter]:
        """A and B drawn in full from (seed, name), then sharded as the base: A by columns under a row
        base, B by rows under a column base."""
        tp, rank = group_size(self.group), group_rank(self.group)
        generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        full_a = torch.empty(self.r, self.in_features)
        nn.init.kaiming_uniform_(full_a, a=math.sqrt(5), generator=generator)
        full_b = torch.zeros(self.out_features, self.r)
        like = dict(device=weight.device, dtype=weight.dtype)
        if self.kind == "row":
            a = mark_sharded(nn.Parameter(shard_tensor(full_a, 1, rank, tp).to(**like)), 1, self.in_features)
            return a, nn.Parameter(full_b.to(**like))
        if self.kind == "column":
            b = mark_sharded(nn.Parameter(shard_tensor(full_b, 0, rank, tp).to(**like)), 0, self.out_features)
            return nn.Parameter(full_a.to(**like)), b
        return nn.Parameter(full_a.to(**like)), nn.Parameter(full_b.to(**like))

    @property
    def sequence_parallel(self) -> bool:
        return self.parallel is not None and self.parallel.sequence_parallel

    @sequence_parallel.setter
    def sequence_parallel(self, enabled: bool) -> None:
        """The model switches sequence parallelism on and off after the adapters are in place."""
        if self.parallel is not None:
            self.parallel.sequence_parallel = enabled
        elif enabled:
            raise ValueError("LoRALinear: sequence parallelism needs a tensor-parallel base layer")

    @property
    def quantized(self) -> bool:
        return isinstance(self.base_layer, NF4Linear)

    @property
    def bias(self) -> nn.Parameter | None:
        return self.base_layer.bias

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T on this rank's shard of the (possibly merged) base weight, no bias."""
        if self.merged_base is not None:
            return F.linear(x, self.merged_base)
        if self.quantized:
            return self.base_layer.matmul(x)
        return F.linear(x, self.base_layer.weight)

    def _adapter(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of B A dropout(x), from the base's local input x."""
        x, down, up = self.lora_dropout(x), self.lora_A.weight, self.lora_B.weight
        if self.kind == "column" and group_size(self.group) > 1:
            u = _ReplicatedDown.apply(x, down, self.group)
        else:
            u = F.linear(x, down)
        if self.kind == "row":
            up = copy_to_group(up, self.group)
        return F.linear(u, up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parallel, bias = self.parallel, self.bias
        if parallel is not None:
            x = parallel.local_input(x)
        y = self._matmul(x)
        if bias is not None and self.kind != "row":  # a row base adds its bias once, after the sum
            y = y + bias.to(y.dtype)
        if not self.merged:
            y = y + self.scaling * self._adapter(x)
        if parallel is not None:
            y = parallel.combine_output(y)
        if bias is not None and self.kind == "row":
            y = y + bias.to(y.dtype)
        return y

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """This rank's shard of s B A (shaped like its shard of W)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """This rank's shard of W + s B A (W decoded when NF4), whether or not the adapter is merged."""
        if self.merged_base is not None:
            return self.merged_base.clone()
        base = (
            self.base_layer.dequantize(self.lora_A.weight.dtype) if self.quantized else self.base_layer.weight
        )
        return base.detach().clone() if self.merged else base + self.delta()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s B A into the base. An NF4 base keeps its codes and gains a dense merged copy instead."""
        if self.merged:
            return
        if self.quantized:
            self.merged_base = self.merged_weight()
        else:
            self.base_layer.weight.add_(self.delta().to(self.base_layer.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (exact for NF4 bases; W + d - d in floating point otherwise)."""
        if not self.merged:
            return
        if self.quantized:
            self.merged_base = None
        else:
            self.base_layer.weight.sub_(self.delta().to(self.base_layer.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"kind={self.kind}, r={self.r}, alpha={self.lora_alpha}, merged={self.merged}"


@dataclass
class LoraSettings:
    """What `apply_lora` was asked for; recorded on the model for `save_adapter`."""

    targets: list[str] | str
    r: int
    alpha: float
    dropout: float
    quantize_base: str | None


def lora_modules(model: ModelLike) -> dict[str, LoRALinear]:
    """The LoRA-wrapped linears of a model (or of this rank's pipeline chunks) by module name."""
    return {
        name: m
        for chunk in ModelParts.of(model).chunks
        for name, m in chunk.named_modules()
        if isinstance(m, LoRALinear)
    }


def _is_wrapped(model: ModelLike) -> bool:
    """Whether the model, or one of its chunks, is inside a wrapper that holds it as `.module`."""
    if isinstance(model, nn.Module):
        model = [model]
    chunks = model.values() if isinstance(model, Mapping) else model
    return any(isinstance(getattr(chunk, "module", None), nn.Module) for chunk in chunks)


def _check_settings(r: int, alpha: float, dropout: float, quantize_base: str | None) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"lora.r={r!r}: expected a positive integer")
    if not alpha > 0:
        raise ValueError(f"lora.alpha={alpha!r}: expected a positive number")
    if not 0 <= dropout < 1:
        raise ValueError(f"lora.dropout={dropout!r}: expected a value in [0, 1)")
    if quantize_base not in (None, "nf4"):
        raise ValueError(f"lora.quantize_base={quantize_base!r}: expected null or 'nf4'")


def _targets_in(model: nn.Module, targets: list[str] | str) -> list[str]:
    """The names of `model`'s modules that `targets` selects, each checked to be a bare linear."""
    modules = dict(model.named_modules())
    names = [name for name in modules if name and target_matches(name, targets)]
    for name in names:
        if isinstance(modules[name], LoRALinear) or any(n.startswith(name + ".") for n in names):
            raise ValueError(f"lora.targets: {name} already has a LoRA adapter or contains another target")
        if _kind(modules[name]) is None:
            raise ValueError(
                f"lora.targets: {name} is a {type(modules[name]).__name__}, not a linear layer (nn.Linear, "
                f"ColumnParallelLinear or RowParallelLinear)"
            )
    return names


def apply_lora(
    model: ModelLike,
    targets: Sequence[str] | str,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    quantize_base: str | None = None,
    seed: int | None = None,
    require_match: bool = True,
) -> list[str]:
    """Wrap every target linear in a `LoRALinear` and freeze everything but the adapters.

    `model` is a model or this rank's pipeline chunks. `quantize_base="nf4"` also replaces each target's
    weight by NF4 codes (of this rank's shard). `seed` (default `torch.initial_seed()`) draws A; the same
    seed gives the same full adapters for any tp. Apply before `DataParallel` and before building the
    optimizer. Returns the adapted module names; matching nothing is an error unless
    `require_match=False` (a pipeline stage may hold no target).
    """
    if _is_wrapped(model):
        raise ValueError("apply_lora: apply LoRA to the model before wrapping it in DataParallel")
    _check_settings(r, alpha, dropout, quantize_base)
    if not isinstance(targets, str):
        targets = list(targets)
        if not targets:
            raise ValueError("lora.targets: expected at least one module name")
    seed = torch.initial_seed() if seed is None else seed
    found = [(chunk, _targets_in(chunk, targets)) for chunk in ModelParts.of(model).chunks]
    if require_match and not any(names for _, names in found):
        raise ValueError(f"lora.targets={targets!r}: no module of the model matches")
    settings = LoraSettings(targets, r, float(alpha), float(dropout), quantize_base)
    for chunk, names in found:
        chunk.requires_grad_(False)
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = chunk.get_submodule(parent_name)
            base = getattr(parent, child)
            setattr(parent, child, LoRALinear(base, r, alpha, dropout, name, seed, quantize_base))
        chunk.lora_settings = settings
    return [name for _, names in found for name in names]


def merge_lora(model: ModelLike) -> None:
    """Fold every adapter into its base weight; forward then costs what the base model costs."""
    for module in lora_modules(model).values():
        module.merge()


def unmerge_lora(model: ModelLike) -> None:
    """Take every merged adapter out of its base weight again."""
    for module in lora_modules(model).values():
        module.unmerge()


# peft_io imports this module: its functions join this module's public names once all above is defined.
from parallel.lowbit.peft_io import load_adapter, save_adapter  # noqa: E402

__all__ = [
    "LoRALinear",
    "LoraSettings",
    "apply_lora",
    "load_adapter",
    "lora_modules",
    "merge_lora",
    "save_adapter",
    "target_matches",
    "unmerge_lora",
]
