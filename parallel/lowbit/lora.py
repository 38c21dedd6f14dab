r"""LoRA adapters (Hu et al. 2021) on plain and tensor-parallel linears, with frozen NF4 bases (QLoRA).

A target linear y = x W^T (+ b), W frozen, gains a trainable low-rank update

    y = x W^T + s * dropout(x) A^T B^T,     A: r x in,   B: out x r,   s = alpha / r

A ~ Kaiming-uniform(a = sqrt 5) = U(-1/sqrt(in), 1/sqrt(in)) as in PEFT, B = 0: the model is unchanged at
init. Only A and B are trainable. `merge_lora` folds s B A into W, `unmerge_lora` takes it out again.
A is drawn in full from a generator seeded by (seed, module name) and then sharded, so one seed gives the
same full adapters whatever the TP size.

Tensor parallelism: the adapter is split like its base, so each rank adds exactly its share of the
single-process result.

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
an `NF4Linear`: packed 4-bit codes and block scales only, decoded in forward and again in backward for the
input gradient, so no full-precision weight is kept or saved for backward.

Targets follow PEFT: a list of names matches every module whose name equals one of them or ends with
"." + one of them (`"q_b_proj"`, `"self_attn.o_proj"`); a single string is a regular expression that must
match the whole module name (`r".*\.(q_b_proj|o_proj)"`). Only linear modules may match.

`save_adapter` writes PEFT's layout: `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (full, TP-gathered) and
`adapter_config.json` (`peft_type: LORA`, `r`, `lora_alpha`, `lora_dropout`, `target_modules`, ...).
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from parallel.collectives import (
    _all_reduce,
    copy_to_group,
    gather_from_group,
    gather_from_sequence_parallel,
    group_rank,
    group_size,
    reduce_from_group,
    reduce_scatter_to_group,
    split_to_group,
)
from parallel.data import DataParallel
from parallel.lowbit.quant import NF4Tensor, dequantize_nf4, quantize_nf4
from parallel.tensor import (
    SEQUENCE_DIM,
    ColumnParallelLinear,
    RowParallelLinear,
    gather_tensor,
    mark_sharded,
    shard_tensor,
    tp_dim,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
NF4_FIELDS = ("packed", "absmax", "absmax_codes", "absmax_scale", "absmax_offset")


def _compute_dtype(x: torch.Tensor, *others: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: autocast's when it is on, else the promoted dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    dtype = x.dtype
    for t in others:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class _NF4Matmul(torch.autograd.Function):
    """x W^T, W decoded from NF4 in forward and again in backward (nothing saved but the codes)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer, ctx.input_dtype, ctx.dtype = layer, x.dtype, _compute_dtype(x)
        return F.linear(x.to(ctx.dtype), layer.dequantize(ctx.dtype))

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.layer.dequantize(ctx.dtype)
        return (grad.to(ctx.dtype) @ weight).to(ctx.input_dtype), None


class NF4Linear(nn.Module):
    """y = x W^T (+ b) with W frozen in 4-bit NormalFloat (block-wise absmax, optionally double-quantized).

    Built from a float weight, which it quantizes and does not keep. Forward decodes W in the input's
    compute dtype (autocast's when on), backward decodes it again for the input gradient: W never has a
    gradient, and the autograd graph holds no full-precision copy of it. The codes and scales are buffers
    (they move with `.to()` and are in the state dict). `bias`, if any, is kept as given, frozen.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: nn.Parameter | None = None,
        block_size: int = 64,
        double_quant: bool = True,
    ) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"NF4Linear: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        q = quantize_nf4(weight.detach(), block_size=block_size, double_quant=double_quant)
        self.block_size, self.double_quant, self.weight_dtype = q.block_size, q.double_quant, q.dtype
        for field in NF4_FIELDS:
            self.register_buffer(field, getattr(q, field))
        if bias is not None:
            bias.requires_grad_(False)
        self.bias = bias

    def _apply(self, fn, recurse=True):
        """Casting the module (`.to(torch.bfloat16)`, `.half()`) leaves the codes and scales as they are:
        only their device follows. The weight is decoded in whatever dtype each use needs."""
        kept = {name: self._buffers.pop(name) for name in NF4_FIELDS}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in kept.items():
                self._buffers[name] = None if t is None else t.to(fn(t.new_empty(0)).device)
        return self

    @property
    def quantized(self) -> NF4Tensor:
        return NF4Tensor(
            *(getattr(self, field) for field in NF4_FIELDS),
            shape=torch.Size((self.out_features, self.in_features)),
            block_size=self.block_size,
            dtype=self.weight_dtype,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self.quantized, dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T without the bias."""
        return _NF4Matmul.apply(x, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, block_size={self.block_size}, "
            f"double_quant={self.double_quant}, {self.quantized.bits_per_parameter():.3f} bits/param"
        )


class _ReplicatedDown(torch.autograd.Function):
    """u = x A^T for a replicated A whose output feeds a column-sharded B (see the module docstring).

    Backward: du is all-reduced over the group before dA = du^T x (complete, identical on every rank);
    the input gradient is this rank's share du_local A, to be summed by an enclosing copy_to_group.
    """

    @staticmethod
    def forward(ctx, x, a, group):
        dtype = _compute_dtype(x, a)
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
        self.kind, self.r, self.lora_alpha, self.scaling = kind, r, alpha, alpha / r
        self.in_features, self.out_features = base.in_features, base.out_features
        self.group = getattr(base, "group", None)
        # The TP behaviour of the base, kept here: an NF4 base is a plain local matmul.
        self.sequence_parallel = getattr(base, "sequence_parallel", False)
        self.reduce_input_grad = getattr(base, "reduce_input_grad", True)
        self.gather_output = getattr(base, "gather_output", False)
        self.input_is_parallel = getattr(base, "input_is_parallel", True)
        self.weight_tp_dim = {"column": 0, "row": 1, "linear": None}[kind]
        self.weight_full_size = {"column": self.out_features, "row": self.in_features, "linear": None}[kind]

        tp, rank = group_size(self.group), group_rank(self.group)
        weight = base.weight
        generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        full_a = torch.empty(r, self.in_features)
        nn.init.kaiming_uniform_(full_a, a=math.sqrt(5), generator=generator)
        full_b = torch.zeros(self.out_features, r)
        like = dict(device=weight.device, dtype=weight.dtype)
        if kind == "row":
            a = mark_sharded(nn.Parameter(shard_tensor(full_a, 1, rank, tp).to(**like)), 1, self.in_features)
            b = nn.Parameter(full_b.to(**like))
        elif kind == "column":
            a = nn.Parameter(full_a.to(**like))
            b = mark_sharded(nn.Parameter(shard_tensor(full_b, 0, rank, tp).to(**like)), 0, self.out_features)
        else:
            a, b = nn.Parameter(full_a.to(**like)), nn.Parameter(full_b.to(**like))
        self.lora_A, self.lora_B = _Factor(a), _Factor(b)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        base.requires_grad_(False)
        if quantize_base == "nf4":
            base = NF4Linear(weight, base.bias)
        elif quantize_base is not None:
            raise ValueError(f"quantize_base={quantize_base!r}: expected None or 'nf4'")
        self.base_layer = base
        self.merged = False
        self.register_buffer("merged_base", None, persistent=False)  # W + sBA while merged on NF4

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group, bias = self.group, self.bias
        if self.kind == "row":
            if not self.input_is_parallel:
                x = split_to_group(x, -1, group)
            y = self._matmul(x)
            if not self.merged:
                u = F.linear(self.lora_dropout(x), self.lora_A.weight)
                y = y + self.scaling * F.linear(u, copy_to_group(self.lora_B.weight, group))
            if self.sequence_parallel:
                y = reduce_scatter_to_group(y, SEQUENCE_DIM, group)
            else:
                y = reduce_from_group(y, group)
            return y if bias is None else y + bias.to(y.dtype)
        if self.kind == "column":
            if self.sequence_parallel:
                x = gather_from_sequence_parallel(x, SEQUENCE_DIM, group)
            elif self.reduce_input_grad:
                x = copy_to_group(x, group)
        y = self._matmul(x)
        if bias is not None:
            y = y + bias.to(y.dtype)
        if not self.merged:
            dropped = self.lora_dropout(x)
            if group_size(group) > 1:
                u = _ReplicatedDown.apply(dropped, self.lora_A.weight, group)
            else:
                u = F.linear(dropped, self.lora_A.weight)
            y = y + self.scaling * F.linear(u, self.lora_B.weight)
        if self.kind == "column" and self.gather_output:
            y = gather_from_group(y, -1, group).narrow(-1, 0, self.out_features)
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


def target_matches(name: str, targets: Sequence[str] | str) -> bool:
    """PEFT's rule: a string is a regex over the whole name; a list matches names equal or ending in .t"""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DataParallel) else model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA-wrapped linears by module name."""
    return {name: m for name, m in _unwrap(model).named_modules() if isinstance(m, LoRALinear)}


def apply_lora(
    model: nn.Module,
    targets: Sequence[str] | str,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    quantize_base: str | None = None,
    seed: int | None = None,
    require_match: bool = True,
) -> list[str]:
    """Wrap every target linear in a `LoRALinear` and freeze everything but the adapters.

    `quantize_base="nf4"` also replaces each target's weight by NF4 codes (of this rank's shard). `seed`
    (default `torch.initial_seed()`) draws A; the same seed gives the same full adapters for any tp.
    Apply before `DataParallel` and before building the optimizer. Returns the adapted module names;
    matching nothing is an error unless `require_match=False` (a pipeline stage may hold no target).
    """
    if isinstance(model, DataParallel):
        raise ValueError("apply_lora: apply LoRA to the model before wrapping it in DataParallel")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"lora.r={r!r}: expected a positive integer")
    if not alpha > 0:
        raise ValueError(f"lora.alpha={alpha!r}: expected a positive number")
    if not 0 <= dropout < 1:
        raise ValueError(f"lora.dropout={dropout!r}: expected a value in [0, 1)")
    if quantize_base not in (None, "nf4"):
        raise ValueError(f"lora.quantize_base={quantize_base!r}: expected null or 'nf4'")
    if not isinstance(targets, str):
        targets = list(targets)
        if not targets:
            raise ValueError("lora.targets: expected at least one module name")
    seed = torch.initial_seed() if seed is None else seed
    names = [name for name, _ in model.named_modules() if name and target_matches(name, targets)]
    if not names and require_match:
        raise ValueError(f"lora.targets={targets!r}: no module of the model matches")
    modules = dict(model.named_modules())
    for name in names:
        if isinstance(modules[name], LoRALinear) or any(n.startswith(name + ".") for n in names):
            raise ValueError(f"lora.targets: {name} already has a LoRA adapter or contains another target")
        if _kind(modules[name]) is None:
            raise ValueError(
                f"lora.targets: {name} is a {type(modules[name]).__name__}, not a linear layer (nn.Linear, "
                f"ColumnParallelLinear or RowParallelLinear)"
            )
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        wrapped = LoRALinear(
            modules[name], r, alpha, dropout, name=name, seed=seed, quantize_base=quantize_base
        )
        setattr(parent, child, wrapped)
    model.lora_settings = LoraSettings(targets, r, float(alpha), float(dropout), quantize_base)
    return names


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight; forward then costs what the base model costs."""
    for module in lora_modules(model).values():
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every merged adapter out of its base weight again."""
    for module in lora_modules(model).values():
        module.unmerge()


def _full(param: torch.Tensor, group) -> torch.Tensor:
    dim = tp_dim(param)
    return param.detach() if dim is None else gather_tensor(param.detach(), dim, param.tp_full_size, group)


def _is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def adapter_config(settings: LoraSettings) -> dict:
    """The `adapter_config.json` content (PEFT's LoraConfig fields) for adapters made with `settings`."""
    targets = settings.targets
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": settings.r,
        "lora_alpha": int(settings.alpha) if float(settings.alpha).is_integer() else settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(
    model: nn.Module | Sequence[nn.Module], directory: str | Path, pp_group: dist.ProcessGroup | None = None
) -> Path:
    """Write the adapters (full: TP-gathered, and from every pipeline stage when `pp_group` is given) in
    PEFT's layout. `model` is a model or this rank's pipeline chunks. Collective; global rank 0 writes."""
    chunks = [_unwrap(m) for m in ([model] if isinstance(model, nn.Module) else model)]
    settings = getattr(chunks[0], "lora_settings", None)
    if settings is None:
        raise ValueError("save_adapter: the model has no LoRA adapters (call apply_lora first)")
    tensors = {}
    for chunk in chunks:
        for name, module in lora_modules(chunk).items():
            for factor in ("lora_A", "lora_B"):
                weight = getattr(module, factor).weight
                tensors[f"{PEFT_PREFIX}{name}.{factor}.weight"] = (
                    _full(weight, module.group).cpu().contiguous()
                )
    if group_size(pp_group) > 1:
        parts: list[dict | None] = [None] * group_size(pp_group)
        dist.all_gather_object(parts, tensors, group=pp_group)
        tensors = {name: t for part in parts for name, t in part.items()}
    directory = Path(directory)
    if _is_writer():
        directory.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (directory / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(settings), indent=2) + "\n")
    if dist.is_initialized():
        dist.barrier()
    return directory


UNSUPPORTED_PEFT = {
    "use_rslora": False,
    "use_dora": False,
    "fan_in_fan_out": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "lora_bias": False,
    "modules_to_save": None,
}


def load_adapter(model: nn.Module, directory: str | Path) -> list[str]:
    """Load PEFT-layout adapters into the model (each rank reads its shard); returns the module names.

    A model without adapters gets them first (`apply_lora` with the file's r, lora_alpha, lora_dropout
    and target_modules, unquantized base); to load onto an NF4 base, call `apply_lora(...,
    quantize_base="nf4")` yourself first. Features of PEFT that this LoRA lacks (rsLoRA, DoRA, per-module
    ranks, trained biases, extra saved modules), mismatched r or alpha, and missing or unexpected
    tensors are errors.
    """
    directory = Path(directory)
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    where = directory / ADAPTER_CONFIG
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type={config.get('peft_type')!r}: expected 'LORA'")
    for key, plain in UNSUPPORTED_PEFT.items():
        if config.get(key) is not None and config[key] != plain:
            raise ValueError(f"{where}: {key}={config[key]!r} is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias={config['bias']!r} is not supported (only 'none')")
    modules = lora_modules(model)
    if not modules:
        settings = (
            config["target_modules"],
            config["r"],
            config["lora_alpha"],
            config.get("lora_dropout", 0.0),
        )
        apply_lora(_unwrap(model), *settings)
        modules = lora_modules(model)
    for name, module in modules.items():
        if module.r != config["r"] or module.lora_alpha != config["lora_alpha"]:
            raise ValueError(
                f"{where}: r={config['r']}, lora_alpha={config['lora_alpha']} but {name} has "
                f"r={module.r}, alpha={module.lora_alpha}"
            )
    expected = {
        f"{PEFT_PREFIX}{name}.{factor}.weight": getattr(m, factor).weight
        for name, m in modules.items()
        for factor in ("lora_A", "lora_B")
    }
    with safe_open(str(directory / ADAPTER_WEIGHTS), framework="pt") as f:
        keys = {k.replace(".default.weight", ".weight"): k for k in f.keys()}  # noqa: SIM118
        missing = sorted(set(expected) - set(keys))
        extra = sorted(set(keys) - set(expected))
        if missing or extra:
            raise ValueError(f"{directory / ADAPTER_WEIGHTS}: missing tensors {missing}, unexpected {extra}")
        with torch.no_grad():
            for key, param in expected.items():
                full = f.get_tensor(keys[key])
                dim = tp_dim(param)
                want = list(param.shape)
                if dim is not None:
                    want[dim] = param.tp_full_size
                if list(full.shape) != want:
                    raise ValueError(f"{key}: shape {list(full.shape)} in the file, expected {want}")
                group = modules[key[len(PEFT_PREFIX) :].rsplit(".", 2)[0]].group
                local = full if dim is None else shard_tensor(full, dim, group_rank(group), group_size(group))
                param.copy_(local.to(param.dtype))
    return list(modules)
