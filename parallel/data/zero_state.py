"""Whole-parameter optimizer state of a ZeroOptimizer, for any dp (and ep) size.

`consolidated_state` gathers each bucket's chunks over the ranks that share the bucket (the dp group,
or the expert-data-parallel group for expert buckets) and cuts the flat state into per-parameter
tensors; `load_consolidated_state` is its inverse: each rank keeps its chunk of every bucket.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist


def consolidated_state(zero) -> dict[int, dict[str, torch.Tensor]]:
    """Per parameter (by position in `param_groups`), its full optimizer state tensors, gathered from
    every rank: {index: {state name: tensor shaped like the parameter}}; returned on every rank."""
    full: dict[int, dict[str, torch.Tensor]] = {}
    index_of = {p: i for i, p in enumerate(p for g in zero.param_groups for p in g["params"])}
    for bucket, master in zip(zero.buckets, zero.masters, strict=True):
        state = zero.inner.state.get(master, {})
        for name, value in state.items():
            if not torch.is_tensor(value) or not value.is_floating_point() or value.shape != master.shape:
                continue
            flat = torch.empty(bucket.padded, dtype=value.dtype, device=bucket.device)
            mine = value.to(bucket.device)
            if bucket.shards > 1:
                dist.all_gather(list(flat.chunk(bucket.shards)), mine.contiguous(), group=bucket.group)
            else:
                flat.copy_(mine)
            for p in bucket.params:
                full.setdefault(index_of[p], {})[name] = bucket.view(flat, p).clone()
    return full


@torch.no_grad()
def load_consolidated_state(zero, full: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
    """Inverse of `consolidated_state_dict`, for any dp size: `full[i]` holds, for parameter i (by
    position in `param_groups`), tensors shaped like it: the inner optimizer's state (`exp_avg`, ...),
    optionally `master` (the fp32 weights; the parameters are set from them too), and optionally a
    scalar `step`. Each rank keeps its chunk of every bucket. `full[i]` is read once (it may be a lazy
    mapping that loads one parameter at a time); a parameter missing from `full` is an error."""
    params = [p for g in zero.param_groups for p in g["params"]]
    index_of = {p: i for i, p in enumerate(params)}
    inner_index = {m: i for i, m in enumerate(m for g in zero.inner.param_groups for m in g["params"])}
    inner_state = {}
    for bucket, master in zip(zero.buckets, zero.masters, strict=True):
        flats: dict[str, torch.Tensor] = {}
        step, names = None, None
        for p in bucket.params:
            if index_of[p] not in full:
                raise KeyError(f"load_consolidated_state_dict: no state for parameter {index_of[p]}")
            entry, shape = full[index_of[p]], bucket.shapes[p]
            step = entry.get("step", step)
            tensors = {k: v for k, v in entry.items() if k != "step"}
            if names is not None and set(tensors) != names:
                raise ValueError(
                    f"parameter {index_of[p]}: state {sorted(tensors)} differs from its bucket's "
                    f"{sorted(names)}"
                )
            names = set(tensors)
            for name, value in tensors.items():
                if tuple(value.shape) != tuple(shape):
                    raise ValueError(
                        f"parameter {index_of[p]}: {name} has shape {tuple(value.shape)}, expected "
                        f"{tuple(shape)}"
                    )
                if name not in flats:
                    flats[name] = torch.zeros(bucket.padded, dtype=master.dtype, device=master.device)
                bucket.view(flats[name], p).copy_(value.reshape(shape))
                if name == "master" and zero.sharding is None:
                    p.copy_(value.view_as(p))
        chunks = {name: f[bucket.start : bucket.start + bucket.chunk] for name, f in flats.items()}
        if "master" in chunks:
            master.copy_(chunks.pop("master"))
            if zero.sharding is not None:
                bucket.param_chunk.copy_(master.to(bucket.device))
        if chunks:
            state = {name: chunk.clone() for name, chunk in chunks.items()}
            if step is not None:
                state["step"] = torch.as_tensor(step, dtype=torch.float32).clone()
            inner_state[inner_index[master]] = state
    if inner_state:
        groups = zero.inner.state_dict()["param_groups"]
        zero.inner.load_state_dict({"state": inner_state, "param_groups": groups})
