"""Sharded, atomic, layout-independent checkpoints: per-rank safetensors shards plus a JSON manifest.

    step-00000010/                 one checkpoint (`save(dir, ...)` writes `dir`)
      shard-RRRRR.safetensors      what rank R alone holds: slices of named global tensors, its RNG
      rank-RRRRR.json              rank R's records, Python/NumPy RNG and the caller's per-rank state
      manifest.json                written last: everything needed to read any slice back
    latest                         the name of the newest checkpoint, updated after the rename

Tensors are named by what they are (`param/<name>`, `optim/<name>/exp_avg`, ...; see
parallel/checkpoint/slices.py for the names and for who writes which slice), so a checkpoint written under one
(dp, tp, pp, zero_stage) loads under any other, optimizer state included: each rank reads only the
regions it needs (`safe_open(...).get_slice`) and re-cuts them for its layout. The manifest holds, for
every tensor, its global shape, dtype and each piece (file, key, region, flat range); the 8-bit AdamW
units; the per-parameter optimizer steps; the SHA-256 and size of every file; the layout; the step;
the tokens consumed; the caller's resolved config and state (e.g. the loss scaler).

Atomic: every rank writes into `step-N.tmp/`; after a barrier rank 0 writes the manifest, renames the
folder to `step-N/` and then rewrites `latest`. A folder without a manifest, or whose files do not match
their sizes and SHA-256 sums, is incomplete or corrupted: `verify` says which and why, `find_latest`
skips it. A crash at any point leaves the previous checkpoints intact. Ranks share one filesystem.

RNG states (Python, NumPy, torch CPU and the current CUDA device) are saved per rank and restored by
`load` when the checkpoint's (world size, dp, tp, pp) equal the current ones; under another layout
there is no rank-to-rank correspondence and they are left alone. Buffers are not saved: the model's are
derived (RoPE tables) or, for NF4 bases, rebuilt from the frozen source weights when the model is built.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as serialize
from torch import nn

from parallel.checkpoint.collect import collect
from parallel.checkpoint.reshard import SliceReader, restore
from parallel.data import ZeroOptimizer
from parallel.pipeline import ModelParts
from parallel.topology import ParallelDims, Topology

MANIFEST, LATEST, FORMAT = "manifest.json", "latest", "mla-parallel-checkpoint/1"
STEP_DIR = re.compile(r"step-(\d+)(\.tmp)?")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    _write(tmp, data)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state(device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(device)
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(words), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}
    return tensors, meta


def _set_rng_state(reader: SliceReader, rank: int, meta: dict, device: torch.device) -> None:
    version, words, gauss = meta["python"]
    random.setstate((version, tuple(words), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    shard = reader.manifest["ranks"][rank]["shard"]
    torch.set_rng_state(reader.get(shard, "rng/torch"))
    if device.type == "cuda" and reader.has_key(shard, "rng/cuda"):
        torch.cuda.set_rng_state(reader.get(shard, "rng/cuda"), device)


def _layout(topology: Topology, chunks: list[nn.Module], optimizer) -> dict:
    zero = optimizer if isinstance(optimizer, ZeroOptimizer) else None
    inner = zero.inner if zero is not None else optimizer
    return {
        "world_size": topology.world_size,
        "dp": topology.dp_size,
        "cp": topology.cp_size,
        "tp": topology.tp_size,
        "pp": topology.pp_size,
        "ep": topology.ep_size,
        "model_chunks": len(chunks),
        "zero_stage": zero.stage if zero is not None else None,
        "optimizer": type(inner).__name__ if inner is not None else None,
    }


def save(
    directory: str | Path,
    model: nn.Module | Sequence[nn.Module] | Mapping[int, nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    topology: Topology | None = None,
    step: int = 0,
    tokens: int = 0,
    config: dict | None = None,
    state: dict | None = None,
    rank_state: dict | None = None,
    on_written: Callable[[], None] | None = None,
) -> Path:
    """Write a checkpoint of this rank's model chunks and optimizer into `directory`, atomically.

    Collective: every rank calls it. `state` (JSON-able, the same on every rank; rank 0's is kept) and
    `rank_state` (JSON-able, per rank) are returned by `load`. `on_written` runs after this rank's files
    are written and before the commit (fault-injection tests kill the process there). An existing
    `directory` is replaced. Returns `directory`. (`prepare_save(...).write()` is the same in two halves:
    parallel/checkpoint/background.py runs the second in a thread.)
    """
    job = prepare_save(
        directory, model, optimizer, topology=topology, step=step, tokens=tokens, config=config, state=state
    )
    return job.write(rank_state=rank_state, on_written=on_written)


@dataclass
class SaveJob:
    """A checkpoint whose state is already copied to host memory (`prepare_save`); `write` puts it on disk.

    `write` needs no device and no model: it may run in another thread while training goes on. Its two
    barriers use `barrier` (default: the world's), so that a background writer does not share a process
    group with the training loop."""

    directory: Path
    topology: Topology
    tensors: dict[str, torch.Tensor]
    record: dict
    manifest_head: dict

    def write(
        self,
        *,
        rank_state: dict | None = None,
        on_written: Callable[[], None] | None = None,
        barrier: Callable[[], None] | None = None,
    ) -> Path:
        barrier = barrier or self.topology.barrier
        directory, rank = self.directory, self.topology.rank
        tmp = directory.with_name(directory.name + ".tmp")
        data = serialize(self.tensors, metadata={"format": "pt"})
        shard = self.record["shard"]
        _write(tmp / shard, data)
        files = {shard: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
        head, tail = ("rank", "coords", "shard"), ("pieces", "units", "steps", "rng")
        record = {
            **{k: self.record[k] for k in head},
            "files": files,
            **{k: self.record[k] for k in tail},
            "state": rank_state,
        }
        _write(tmp / f"rank-{rank:05d}.json", json.dumps(record).encode())
        if on_written is not None:
            on_written()
        barrier()
        if rank == 0:
            manifest = _manifest(tmp, self.topology.world_size, self.manifest_head)
            _write(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
            _fsync_dir(tmp)
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
            _fsync_dir(directory.parent)
            _write_atomic(directory.parent / LATEST, (directory.name + "\n").encode())
        barrier()
        return directory


def prepare_save(
    directory: str | Path,
    model: nn.Module | Sequence[nn.Module] | Mapping[int, nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    topology: Topology | None = None,
    step: int = 0,
    tokens: int = 0,
    config: dict | None = None,
    state: dict | None = None,
) -> SaveJob:
    """The first half of `save`: clear `directory`.tmp (rank 0, then a barrier of the world) and copy
    this rank's tensors and RNG states to host memory. Collective."""
    topology = topology or Topology(ParallelDims())
    directory, chunks = Path(directory), ModelParts.of(model).chunks
    tmp, rank = directory.with_name(directory.name + ".tmp"), topology.rank
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    topology.barrier()
    # the first replica writes what replicas share (dense: dp x cp ranks; experts: the edp ranks)
    written = collect(chunks, optimizer, topology.tp_rank, topology.dp_cp_rank, topology.edp_rank)
    rng_tensors, rng_meta = _rng_state(topology.device)
    record = {
        "rank": rank,
        "coords": list(topology.dims.coords_of(rank)),
        "shard": f"shard-{rank:05d}.safetensors",
        "pieces": written.pieces,
        "units": written.units,
        "steps": written.steps,
        "rng": rng_meta,
    }
    head = {
        "format": FORMAT,
        "step": step,
        "tokens": tokens,
        "layout": _layout(topology, chunks, optimizer),
        "config": copy.deepcopy(config),
        "state": copy.deepcopy(state),
    }
    return SaveJob(directory, topology, {**written.tensors, **rng_tensors}, record, head)


def _manifest(tmp: Path, world_size: int, head: dict) -> dict:
    tensors: dict[str, dict] = {}
    units, steps, files, ranks = [], {}, {}, []

    def add(name: str, shape: list[int], dtype: str, piece: dict) -> None:
        entry = tensors.setdefault(name, {"shape": shape, "dtype": dtype, "pieces": []})
        if (entry["shape"], entry["dtype"]) != (shape, dtype):
            raise ValueError(
                f"checkpoint: ranks disagree on {name}: {entry['shape']} {entry['dtype']} vs {shape} {dtype}"
            )
        entry["pieces"].append(piece)

    for rank in range(world_size):
        meta_file = f"rank-{rank:05d}.json"
        raw = (tmp / meta_file).read_bytes()
        record = json.loads(raw)
        shard = record["shard"]
        files.update(record["files"])
        files[meta_file] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        ranks.append({"rank": rank, "coords": record["coords"], "shard": shard, "meta": meta_file})
        steps.update(record["steps"])
        for p in record["pieces"]:
            piece = {"file": shard, "key": p["key"], "index": p["index"], "flat": p.get("flat")}
            add(p["name"], p["shape"], p["dtype"], piece)
        for unit in record["units"]:
            uid = len(units)
            units.append({"file": shard, **unit})
            for seg in (seg for seg in unit["segments"] if not seg.get("replica")):
                for moment, key in ((1, "exp_avg"), (2, "exp_avg_sq")):
                    piece = {"file": shard, "unit": uid, "moment": moment, "offset": seg["offset"]}
                    add(
                        f"optim/{seg['name']}/{key}",
                        seg["shape"],
                        "float32",
                        {**piece, "index": seg["index"], "flat": seg["flat"]},
                    )
    return {
        **head,
        "tensors": tensors,
        "units": units,
        "optimizer_steps": steps,
        "ranks": ranks,
        "files": files,
    }


def read_manifest(directory: str | Path) -> dict:
    manifest = json.loads((Path(directory) / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{directory}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def read_full(directory: str | Path, name: str) -> torch.Tensor:
    """The whole global tensor `name` of a checkpoint (for tests, export and inspection)."""
    reader = SliceReader(Path(directory), read_manifest(directory))
    return reader.read(name, [[0, n] for n in reader.shape(name)])


def load(
    directory: str | Path,
    model: nn.Module | Sequence[nn.Module] | Mapping[int, nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    topology: Topology | None = None,
    restore_rng: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Load a checkpoint written under any layout into this rank's model chunks (and optimizer).

    Parameters take the fp32 master weights when the checkpoint has them. The optimizer gets its state
    re-cut for this layout (left fresh when the checkpoint has none). Not collective. Does not check the
    SHA-256 sums (`verify` does); `progress(done, total)` follows the tensors read. Returns {"step",
    "tokens", "config", "state", "layout", "rank_state" (this rank's, or None under another layout),
    "same_layout"}; RNG states are restored when `restore_rng` and the layout is the same.
    """
    topology = topology or Topology(ParallelDims())
    reader = SliceReader(Path(directory), read_manifest(directory))
    chunks = ModelParts.of(model).chunks
    manifest = reader.manifest
    restore(reader, chunks, optimizer, topology.tp_rank, progress)
    saved = manifest["layout"]
    current = _layout(topology, chunks, optimizer)
    same = all(saved.get(k, 1) == current[k] for k in ("world_size", "dp", "cp", "tp", "pp", "ep"))
    rank_state = None
    if same:
        record = json.loads((reader.directory / manifest["ranks"][topology.rank]["meta"]).read_text())
        rank_state = record["state"]
        if restore_rng:
            _set_rng_state(reader, topology.rank, record["rng"], topology.device)
    keys = ("step", "tokens", "config", "state", "layout")
    return {**{k: manifest[k] for k in keys}, "rank_state": rank_state, "same_layout": same}


def verify(directory: str | Path) -> str | None:
    """None when `directory` is a complete checkpoint whose files match their sizes and SHA-256 sums;
    otherwise why not, in a few words."""
    directory = Path(directory)
    if directory.name.endswith(".tmp"):
        return "incomplete: the save did not finish (never renamed)"
    if not (directory / MANIFEST).is_file():
        return f"incomplete: no {MANIFEST}"
    try:
        files = read_manifest(directory)["files"]
        for name, info in sorted(files.items()):
            path = directory / name
            if not path.is_file():
                return f"{name} is missing"
            size = path.stat().st_size
            if size != info["bytes"]:
                return f"{name} has {size} bytes, the manifest says {info['bytes']} (truncated?)"
            if _sha256(path) != info["sha256"]:
                return f"{name} does not match its SHA-256 sum (corrupted)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable {MANIFEST} ({type(error).__name__}: {error})"
    return None


def find_latest(root: str | Path) -> tuple[Path | None, list[str]]:
    """The newest valid checkpoint under `root` (a `checkpoints/` folder), and one note per newer folder
    that was skipped, saying why. (None, notes) when there is none."""
    root, candidates = Path(root), []
    if root.is_dir():
        for path in root.iterdir():
            match = STEP_DIR.fullmatch(path.name)
            if match and path.is_dir():
                candidates.append((int(match[1]), match[2] is None, path))
    notes = []
    for _, _, path in sorted(candidates, reverse=True):
        reason = verify(path)
        if reason is None:
            return path, notes
        notes.append(f"skipping checkpoint {path}: {reason}")
    return None, notes


def prune(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints under `root`, and leftover `.tmp` folders (call
    right after a save, when no other save is in flight). Returns what was deleted."""
    complete, stale = [], []
    for path in Path(root).iterdir():
        match = STEP_DIR.fullmatch(path.name)
        if match and path.is_dir():
            (stale if match[2] else complete).append((int(match[1]), path))
    doomed = [p for _, p in sorted(complete)[: max(0, len(complete) - keep_last)]] + [p for _, p in stale]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
