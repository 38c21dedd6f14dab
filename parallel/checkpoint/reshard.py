"""Load side of re-sharding: each rank reads the regions of the global tensors its own layout needs.

`SliceReader` assembles any region of a saved tensor from whichever pieces overlap it (dense slices, flat
slices of ZeRO chunks, dequantized 8-bit units; see parallel/checkpoint/slices.py), so a checkpoint
written under one (dp, tp, pp, ZeRO stage) loads under any other. `restore` puts the regions in place:
parameters directly, a plain optimizer's state through `load_state_dict`, a ZeroOptimizer's through
`load_consolidated_state_dict`, one parameter at a time, which re-cuts them into this layout's chunks.

AdamW8bit state: when a tensor's segments and block size equal a saved unit's (same layout) its codes and
absmax are taken unchanged and the resume is exact; otherwise the dequantized fp32 moments are
re-quantized in the new blocks, each value moving by at most half a code step of its new block (<= 0.7%
of the block's absmax).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from parallel.checkpoint import slices
from parallel.data import ZeroOptimizer
from parallel.lowbit.adamw8bit import SIGNED_MAP, UNSIGNED_MAP, AdamW8bit
from parallel.lowbit.quant import dequantize_blockwise, quantize_blockwise


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
        return {field: self.get(unit["file"], unit["keys"][field]) for field in slices.UNIT_FIELDS}

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
    shape = slices.global_shape(local_shape, p)
    saved = reader.shape(name)
    if saved != shape:
        raise ValueError(f"checkpoint tensor {name}: shape {saved}, but the model's is {shape}")
    data = reader.read(name, slices.clip(slices.region(local_shape, p, tp_rank), shape))
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
    reader,
    chunks: Sequence[nn.Module],
    optimizer: torch.optim.Optimizer | None,
    tp_rank: int,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Load this rank's parameters (and optimizer state, when the checkpoint has it) from `reader`;
    `progress(done, total)` is called after each parameter (the optimizer state counts as one more)."""
    names = slices.named_parameters(chunks)
    zero = optimizer if isinstance(optimizer, ZeroOptimizer) else None
    for i, (p, name) in enumerate(names.items()):
        if zero is None or p not in zero.bucket_of:
            p.copy_(read_local(reader, _weight_name(reader, name), p, p.shape, tp_rank))
        if progress is not None:
            progress(i + 1, len(names) + 1)
    if zero is not None:
        zero.load_consolidated_state_dict(_LazyZeroState(reader, zero, names, tp_rank))
        if isinstance(zero.inner, AdamW8bit):
            layout = {}
            for bucket, master in zip(zero.buckets, zero.masters, strict=True):
                layout[master] = (
                    master.numel(),
                    [s for _, s in slices.chunk_segments(bucket, names, tp_rank)],
                )
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
            layout = {p: (p.numel(), [slices.param_segment(names[p], p, tp_rank)]) for p in names}
            _requantize(reader, optimizer, layout)
    if progress is not None:
        progress(len(names) + 1, len(names) + 1)
