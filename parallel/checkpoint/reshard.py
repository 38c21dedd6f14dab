"""One rank's training state as named slices of global tensors, and back: the layout half of checkpoints.

Every tensor is named by what it is, never by where it lived (parameter names carry global layer
indices, so they do not depend on the pipeline split):

    param/<parameter>                  a weight; under ZeroOptimizer only the frozen ones (see master)
    optim/<parameter>/master           ZeroOptimizer's fp32 master weight; preferred over param/ on load
    optim/<parameter>/<state>          optimizer state shaped like the parameter (exp_avg, exp_avg_sq)
    optim steps                        the per-parameter step count (a number, in the manifest)

A rank's local tensor is a rectangular *region* of the global one: all of it when replicated over TP,
rows (or columns) [r*k, (r+1)*k) on TP rank r when sharded along that dimension (k = the local size; the
last rank's region may run past the global shape where `shard_tensor` zero-padded it). A rank records
what it writes as

    dense piece   {"index": region clipped to the global shape}    the slice itself
    flat piece    {"index": region, "flat": [lo, hi]}              elements lo..hi of the region, flattened
    8-bit unit    {"segments": [{name, shape, index, flat, offset}], "block_size", "numel"}

so that every element is written exactly once: replicated tensors by TP rank 0 only; parameters and
plain optimizer state by dp rank 0 only (dp replicas are identical); ZeroOptimizer state by every dp rank,
its own chunk of every bucket, as flat pieces per parameter (no gather at save time: a rank writes what it
holds, and the checkpoint costs each rank its 1/N share). On load (`SliceReader`), each rank reads the
region of each of its parameters from whichever pieces overlap it, re-cut for its own layout: a
ZeroOptimizer rebuilds its chunks with `load_consolidated_state_dict`, one parameter at a time.

AdamW8bit state is stored as it lives in memory: codes and absmax per block of one optimizer tensor (a
parameter's local shard, or a ZeRO chunk spanning several parameters), with the segments saying which
parameter elements the blocks cover, so the checkpoint costs 2.03 bytes per parameter, like the state.
Every TP rank writes its own units, replicated parameters included (a ZeRO chunk may mix them with
sharded ones, so the codes are that rank's; the dequantized pieces of replicated segments come from TP
rank 0 only).
The manifest also lists those segments as pieces of `optim/<parameter>/exp_avg` and `exp_avg_sq`, whose
values are the dequantized codes. On load, a tensor whose segments and block size equal a saved unit's
(same layout) takes its codes and absmax unchanged: the resume is exact. Otherwise (another dp, tp, pp or
ZeRO stage, other blocks) the dequantized fp32 moments are re-quantized in the new blocks: each value
moves by at most half a code step of its new block (<= 0.7% of the block's absmax). Moments saved by
AdamW and by AdamW8bit share the names, so either optimizer resumes the other's checkpoint.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from parallel.data import ZeroOptimizer
from parallel.lowbit.adamw8bit import SIGNED_MAP, UNSIGNED_MAP, AdamW8bit
from parallel.lowbit.quant import dequantize_blockwise, quantize_blockwise
from parallel.tensor import tp_dim

UNIT_FIELDS = ("state1", "absmax1", "state2", "absmax2")


def region(local_shape: Sequence[int], p: torch.Tensor, tp_rank: int) -> list[list[int]]:
    """[start, stop) per dimension of the global tensor covered by this rank's local tensor."""
    out = [[0, n] for n in local_shape]
    dim = tp_dim(p)
    if dim is not None:
        out[dim] = [tp_rank * local_shape[dim], (tp_rank + 1) * local_shape[dim]]
    return out


def global_shape(local_shape: Sequence[int], p: torch.Tensor) -> list[int]:
    out, dim = list(local_shape), tp_dim(p)
    if dim is not None:
        out[dim] = p.tp_full_size
    return out


def clip(index: list[list[int]], shape: Sequence[int]) -> list[list[int]]:
    return [[min(a, n), min(b, n)] for (a, b), n in zip(index, shape, strict=True)]


def named_parameters(chunks: Sequence[nn.Module]) -> dict[nn.Parameter, str]:
    return {p: name for chunk in chunks for name, p in chunk.named_parameters()}


class RankState:
    """What one rank writes: tensors by key (its shard file) and the records that name them."""

    def __init__(self, tp_rank: int) -> None:
        self.tp_rank = tp_rank
        self.tensors: dict[str, torch.Tensor] = {}
        self.pieces: list[dict] = []
        self.units: list[dict] = []
        self.steps: dict[str, float] = {}

    def _add(self, name: str, data: torch.Tensor, shape: list[int], piece: dict) -> None:
        if name in self.tensors:
            raise ValueError(f"checkpoint: {name} written twice by one rank")
        self.tensors[name] = data.detach().to("cpu", copy=True).contiguous()
        dtype = str(data.dtype).removeprefix("torch.")
        self.pieces.append({"name": name, "key": name, "shape": shape, "dtype": dtype, **piece})

    def dense(self, name: str, value: torch.Tensor, p: torch.Tensor) -> None:
        shape = global_shape(value.shape, p)
        index = clip(region(value.shape, p, self.tp_rank), shape)
        sizes = [b - a for a, b in index]
        if any(s <= 0 for s in sizes):
            return  # this rank holds only TP padding
        self._add(name, value[tuple(slice(0, s) for s in sizes)], shape, {"index": index})

    def flat(self, name: str, data: torch.Tensor, p: torch.Tensor, local_shape, lo: int, hi: int) -> None:
        index = region(local_shape, p, self.tp_rank)
        self._add(name, data, global_shape(local_shape, p), {"index": index, "flat": [lo, hi]})

    def unit(self, state: dict, block_size: int, numel: int, segments: list[dict]) -> None:
        keys = {}
        for field in UNIT_FIELDS:
            keys[field] = f"unit{len(self.units)}/{field}"
            self.tensors[keys[field]] = state[field].detach().to("cpu", copy=True)
        self.units.append({"keys": keys, "block_size": block_size, "numel": numel, "segments": segments})


def _segment(name: str, p: torch.Tensor, local_shape, lo: int, hi: int, offset: int, tp_rank: int) -> dict:
    return {
        "name": name,
        "shape": global_shape(local_shape, p),
        "index": region(local_shape, p, tp_rank),
        "flat": [lo, hi],
        "offset": offset,
    }


def _param_segment(name: str, p: torch.Tensor, tp_rank: int) -> dict:
    """All of a parameter's local elements, as the one segment of a plain optimizer's 8-bit unit."""
    segment = _segment(name, p, p.shape, 0, p.numel(), 0, tp_rank)
    segment["replica"] = tp_dim(p) is None and tp_rank != 0
    return segment


def _chunk_segments(bucket, names: dict, tp_rank: int) -> list[tuple[nn.Parameter, dict]]:
    """The parameters' elements inside this rank's chunk of a ZeRO bucket, in chunk order. A bucket may
    mix TP-sharded and replicated parameters; on TP ranks other than 0 the replicated ones are marked
    `replica` (TP rank 0 writes them)."""
    out = []
    for p in bucket.params:
        offset, n = bucket.offsets[p], bucket.shapes[p].numel()
        lo, hi = max(bucket.start, offset), min(bucket.start + bucket.chunk, offset + n)
        if lo < hi:
            segment = _segment(
                names[p], p, bucket.shapes[p], lo - offset, hi - offset, lo - bucket.start, tp_rank
            )
            segment["replica"] = tp_dim(p) is None and tp_rank != 0
            out.append((p, segment))
    return out


def _moments(state: dict, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """The floating-point state tensors shaped like the parameter (not the step, not 8-bit codes)."""
    return {
        k: v
        for k, v in state.items()
        if k != "step"
        and k not in UNIT_FIELDS
        and torch.is_tensor(v)
        and v.is_floating_point()
        and v.shape == like.shape
    }


def collect(
    chunks: Sequence[nn.Module], optimizer: torch.optim.Optimizer | None, tp_rank: int, dp_rank: int
) -> RankState:
    """Everything this rank alone must write (see the module docstring for who writes what)."""
    out, names = RankState(tp_rank), named_parameters(chunks)
    zero = optimizer if isinstance(optimizer, ZeroOptimizer) else None
    for p, name in names.items():
        if (
            (zero is None or p not in zero.bucket_of)
            and dp_rank == 0
            and (tp_dim(p) is not None or tp_rank == 0)
        ):
            out.dense(f"param/{name}", p.detach(), p)
    if zero is not None:
        group_of = {m: g for g in zero.inner.param_groups for m in g["params"]}
        replicated_over_dp = getattr(zero, "shards", zero.world) == 1  # stage 0 keeps buckets whole
        for bucket, master in zip(zero.buckets, zero.masters, strict=True):
            if replicated_over_dp and dp_rank != 0:
                continue
            state = zero.inner.state.get(master, {})
            segments = _chunk_segments(bucket, names, tp_rank)
            for key, value in {"master": master, **_moments(state, master)}.items():
                for p, seg in segments:
                    if not seg["replica"]:
                        piece = value[seg["offset"] : seg["offset"] + seg["flat"][1] - seg["flat"][0]]
                        out.flat(f"optim/{seg['name']}/{key}", piece, p, bucket.shapes[p], *seg["flat"])
            if "state1" in state:  # every rank its own blocks (they may span replicated parameters)
                out.unit(state, group_of[master]["block_size"], master.numel(), [s for _, s in segments])
            if "step" in state:
                out.steps.update({seg["name"]: float(state["step"]) for _, seg in segments})
    elif optimizer is not None and dp_rank == 0:
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p)
                if not state:
                    continue
                segment = _param_segment(names[p], p, tp_rank)
                if "state1" in state:  # every TP rank its own codes: each restores exactly what it had
                    out.unit(state, group["block_size"], p.numel(), [segment])
                if segment["replica"]:
                    continue
                for key, value in _moments(state, p).items():
                    out.dense(f"optim/{names[p]}/{key}", value, p)
                if "step" in state:
                    out.steps[names[p]] = float(state["step"])
    return out


# ---------------------------------------------------------------------------------------------- loading


class SliceReader:
    """Reads regions of the global tensors of a checkpoint `directory` (its parsed `manifest`), from
    whichever pieces hold them: dense slices, flat slices, or dequantized 8-bit units."""

    def __init__(self, directory: Path, manifest: dict) -> None:
        self.directory = directory
        self.manifest = manifest
        self.tensors, self.units = self.manifest["tensors"], self.manifest["units"]
        self._files: dict[str, object] = {}
        self._dequantized: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()
        self._states: dict[str, list[str]] = {}
        for name in self.tensors:
            if name.startswith("optim/"):
                param, _, key = name[len("optim/") :].rpartition("/")
                if key != "master":
                    self._states.setdefault(param, []).append(key)
        self._unit_of = {
            self._signature(u["block_size"], u["numel"], u["segments"]): i for i, u in enumerate(self.units)
        }

    @staticmethod
    def _signature(block_size: int, numel: int, segments: list[dict]) -> str:
        return json.dumps([block_size, numel, segments], sort_keys=True)

    def _open(self, file: str):
        if file not in self._files:
            self._files[file] = safe_open(str(self.directory / file), framework="pt")
        return self._files[file]

    def has(self, name: str) -> bool:
        return name in self.tensors

    def has_key(self, file: str, key: str) -> bool:
        return key in self._open(file).keys()  # noqa: SIM118 - safe_open has no __contains__

    def get(self, file: str, key: str) -> torch.Tensor:
        return self._open(file).get_tensor(key)

    def shape(self, name: str) -> list[int]:
        if name not in self.tensors:
            raise ValueError(f"checkpoint {self.directory} has no tensor {name!r}")
        return self.tensors[name]["shape"]

    def state_names(self, param: str) -> list[str]:
        return sorted(self._states.get(param, []))

    def step(self, param: str) -> float:
        steps = self.manifest["optimizer_steps"]
        if param not in steps:
            raise ValueError(f"checkpoint {self.directory}: optimizer state of {param!r} has no step count")
        return steps[param]

    def unit(self, block_size: int, numel: int, segments: list[dict]) -> dict[str, torch.Tensor] | None:
        """The saved 8-bit state with exactly these blocks and segments (same layout), or None."""
        uid = self._unit_of.get(self._signature(block_size, numel, segments))
        if uid is None:
            return None
        unit = self.units[uid]
        return {field: self.get(unit["file"], unit["keys"][field]) for field in UNIT_FIELDS}

    def _unit_values(self, uid: int, moment: int) -> torch.Tensor:
        if (uid, moment) not in self._dequantized:
            unit = self.units[uid]
            codes, absmax = (
                self.get(unit["file"], unit["keys"][f"{k}{moment}"]) for k in ("state", "absmax")
            )
            code = SIGNED_MAP if moment == 1 else UNSIGNED_MAP
            self._dequantized[(uid, moment)] = dequantize_blockwise(codes, absmax, code, unit["block_size"])
            if len(self._dequantized) > 4:
                self._dequantized.popitem(last=False)
        return self._dequantized[(uid, moment)]

    def _flat_data(self, piece: dict) -> torch.Tensor:
        lo, hi = piece["flat"]
        if "unit" in piece:
            return self._unit_values(piece["unit"], piece["moment"])[
                piece["offset"] : piece["offset"] + hi - lo
            ]
        return self._open(piece["file"]).get_slice(piece["key"])[0 : hi - lo]

    def read(self, name: str, want: list[list[int]]) -> torch.Tensor:
        """The region `want` ([start, stop) per dimension) of global tensor `name`."""
        entry = self.tensors[name]
        dtype = getattr(torch, entry["dtype"])
        out = torch.zeros([b - a for a, b in want], dtype=dtype)
        covered = torch.zeros(out.shape, dtype=torch.bool)
        for piece in entry["pieces"]:
            index = piece["index"]
            inter = [[max(a, c), min(b, d)] for (a, b), (c, d) in zip(index, want, strict=True)]
            if any(lo >= hi for lo, hi in inter):
                continue
            dst = tuple(slice(lo - c, hi - c) for (lo, hi), (c, _) in zip(inter, want, strict=True))
            src = tuple(slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(inter, index, strict=True))
            if piece.get("flat") is None:
                out[dst] = self._open(piece["file"]).get_slice(piece["key"])[src]
                covered[dst] = True
                continue
            lo, hi = piece["flat"]
            shape = [b - a for a, b in index]
            values = torch.zeros(shape, dtype=dtype)
            mask = torch.zeros(shape, dtype=torch.bool)
            values.view(-1)[lo:hi] = self._flat_data(piece).to(dtype)
            mask.view(-1)[lo:hi] = True
            out[dst] = torch.where(mask[src], values[src], out[dst])
            covered[dst] |= mask[src]
        if not bool(covered.all()):
            raise ValueError(f"checkpoint {self.directory}: no shard holds all of {name} region {want}")
        return out


def read_local(reader: SliceReader, name: str, p: torch.Tensor, local_shape, tp_rank: int) -> torch.Tensor:
    """This rank's local tensor of `name` for parameter `p` (zero where TP padded it)."""
    shape = global_shape(local_shape, p)
    saved = reader.shape(name)
    if saved != shape:
        raise ValueError(f"checkpoint tensor {name}: shape {saved}, but the model's is {shape}")
    data = reader.read(name, clip(region(local_shape, p, tp_rank), shape))
    if tuple(data.shape) == tuple(local_shape):
        return data
    out = data.new_zeros(local_shape)
    out[tuple(slice(0, s) for s in data.shape)] = data
    return out


def _weight_name(reader: SliceReader, name: str) -> str:
    return f"optim/{name}/master" if reader.has(f"optim/{name}/master") else f"param/{name}"


def _portable(reader, name: str, p, local_shape, tp_rank: int, with_master: bool) -> dict[str, torch.Tensor]:
    entry = {}
    if with_master:
        entry["master"] = read_local(reader, _weight_name(reader, name), p, local_shape, tp_rank)
    for key in reader.state_names(name):
        entry[key] = read_local(reader, f"optim/{name}/{key}", p, local_shape, tp_rank).float()
    if entry.keys() - {"master"}:
        entry["step"] = torch.tensor(reader.step(name), dtype=torch.float32)
    return entry


class _LazyZeroState(Mapping):
    """`full` for ZeroOptimizer.load_consolidated_state_dict, read one parameter at a time."""

    def __init__(self, reader, zero: ZeroOptimizer, names: dict, tp_rank: int) -> None:
        self.reader, self.zero, self.names, self.tp_rank = reader, zero, names, tp_rank
        self.params = [p for g in zero.param_groups for p in g["params"]]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        p = self.params[index]
        shape = self.zero.bucket_of[p].shapes[p]
        return _portable(self.reader, self.names[p], p, shape, self.tp_rank, with_master=True)

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and 0 <= index < len(self.params)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.params)))

    def __len__(self) -> int:
        return len(self.params)


def _requantize(reader: SliceReader, opt: AdamW8bit, layout: dict) -> None:
    """fp32 moments loaded into an AdamW8bit become its 8-bit state: the saved codes when a saved unit has
    the same segments and blocks (exact), else re-quantized in this layout's blocks."""
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p)
            if not state or "exp_avg" not in state or p.numel() < group["min_8bit_size"]:
                continue
            numel, segments = layout[p]
            raw = reader.unit(group["block_size"], numel, segments)
            if raw is None:
                raw = {}
                for moment, code, n in (("exp_avg", SIGNED_MAP, 1), ("exp_avg_sq", UNSIGNED_MAP, 2)):
                    raw[f"state{n}"], raw[f"absmax{n}"] = quantize_blockwise(
                        state[moment], code, group["block_size"]
                    )
            opt.state[p] = {"step": state["step"], **{k: v.to(p.device) for k, v in raw.items()}}


@torch.no_grad()
def restore(
    reader, chunks: Sequence[nn.Module], optimizer: torch.optim.Optimizer | None, tp_rank: int
) -> None:
    """Load this rank's parameters (and optimizer state, when the checkpoint has it) from `reader`."""
    names = named_parameters(chunks)
    zero = optimizer if isinstance(optimizer, ZeroOptimizer) else None
    for p, name in names.items():
        if zero is None or p not in zero.bucket_of:
            p.copy_(read_local(reader, _weight_name(reader, name), p, p.shape, tp_rank))
    if zero is not None:
        zero.load_consolidated_state_dict(_LazyZeroState(reader, zero, names, tp_rank))
        if isinstance(zero.inner, AdamW8bit):
            layout = {}
            for bucket, master in zip(zero.buckets, zero.masters, strict=True):
                layout[master] = (master.numel(), [s for _, s in _chunk_segments(bucket, names, tp_rank)])
            _requantize(reader, zero.inner, layout)
    elif optimizer is not None:
        state, index = {}, 0
        for group in optimizer.param_groups:
            for p in group["params"]:
                entry = _portable(reader, names[p], p, p.shape, tp_rank, with_master=False)
                if entry:
                    state[index] = entry
                index += 1
        if state:
            groups = optimizer.state_dict()["param_groups"]
            optimizer.load_state_dict({"state": state, "param_groups": groups})
        if isinstance(optimizer, AdamW8bit):
            layout = {p: (p.numel(), [_param_segment(names[p], p, tp_rank)]) for p in names}
            _requantize(reader, optimizer, layout)
