"""The memory estimator (train/memory.py) against torch.cuda's peak allocation, on one GPU.

    python benchmarks/memory_gpu_check.py [--out benchmarks/results/memory.json]

For each case, a model is built and trained for two steps through the trainer's own code (build_model,
build_optimizer, ModelRunner) on random tokens. Measured: the bytes allocated between steps (model state)
and the peak of step 2 (`torch.cuda.max_memory_allocated`); the step's own share is peak - resting.
Estimated: `estimate_rank(...)`: its resting model state, and its device subtotal without the margin
(the margin covers what torch's allocator does not count). The goal is the peak within 10%.
Needs CUDA; on a machine without it the script says so and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.config import MLAConfig  # noqa: E402
from parallel import ParallelDims, init_distributed  # noqa: E402
from parallel.data import ZeroOptimizer  # noqa: E402
from train.build import build_model, build_optimizer  # noqa: E402
from train.config import load_config  # noqa: E402
from train.memory import GIB, estimate_rank  # noqa: E402
from train.runner import ModelRunner  # noqa: E402

MODEL = [  # examples/configs/small.yaml's shape, with a 32k vocabulary
    "model.vocab_size=32768",
    "model.hidden_size=768",
    "model.num_layers=12",
    "model.num_heads=12",
    "model.q_lora_rank=384",
    "model.kv_lora_rank=256",
    "model.qk_nope_head_dim=64",
    "model.qk_rope_head_dim=32",
    "model.v_head_dim=64",
    "model.intermediate_size=2048",
    "model.max_seq_len=2048",
    "data.seq_len=2048",
    "train.global_batch_size=8",
]
CASES = {
    "bf16 adamw, no recompute, mbs 4": ["train.precision=bf16", "train.micro_batch_size=4"],
    "bf16 adamw, selective, mbs 4": [
        "train.precision=bf16",
        "train.micro_batch_size=4",
        "distributed.recompute=selective",
    ],
    "bf16 adamw8bit, full, mbs 8": [
        "train.precision=bf16",
        "train.micro_batch_size=8",
        "optim.name=adamw8bit",
        "distributed.recompute=full",
    ],
    "fp32 adamw, no recompute, mbs 2": ["train.micro_batch_size=2"],
    "bf16 qlora, selective, mbs 4": [
        "train.precision=bf16",
        "train.micro_batch_size=4",
        "distributed.recompute=selective",
        "lora.enabled=true",
        "lora.quantize_base=nf4",
        "lora.targets=[q_a_proj,q_b_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj,gate_proj,up_proj,down_proj]",
    ],
}


def measure(overrides: list[str]) -> dict:
    config = load_config(None, MODEL + overrides)
    config = replace(config, distributed=replace(config.distributed, dp=1, tp=1))
    mcfg = MLAConfig(**config.model)
    topo = init_distributed(ParallelDims())
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    parts = build_model(config, mcfg, topo)
    optimizer = build_optimizer(parts, config, topo)
    zero = optimizer if isinstance(optimizer, ZeroOptimizer) else None
    mbs = config.train.micro_batch_size
    runner = ModelRunner(
        parts,
        topo,
        micro_batch_size=mbs,
        num_microbatches=config.train.global_batch_size // mbs,
        seq_len=config.data.seq_len,
        precision=config.train.precision,
        grad_sync=zero,
    )
    batch = torch.randint(0, mcfg.vocab_size, (config.train.global_batch_size, config.data.seq_len + 1))
    batch = batch.to(topo.device)
    peak = resting = 0
    for _ in range(2):
        resting = torch.cuda.memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        runner.train_step(batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        peak = torch.cuda.max_memory_allocated() - base
    est = estimate_rank(config, mcfg, 0)
    del parts, optimizer, zero, runner, batch
    return {
        "resting_measured": resting,
        "resting_estimated": est.resting_state - sum(est.host.values()),
        "peak_measured": peak,
        "peak_estimated": est.subtotal,
        "breakdown": est.device,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/memory.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("memory_gpu_check: needs a CUDA GPU (torch.cuda.max_memory_allocated); nothing measured")
        return
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": {}}
    print(f"{'case':<36}{'resting GiB':>22}{'peak GiB':>22}{'peak est/meas':>15}")
    for name, overrides in CASES.items():
        r = measure(overrides)
        results["cases"][name] = r
        print(
            f"{name:<36}{r['resting_measured'] / GIB:>10.3f} / {r['resting_estimated'] / GIB:<9.3f}"
            f"{r['peak_measured'] / GIB:>10.3f} / {r['peak_estimated'] / GIB:<9.3f}"
            f"{r['peak_estimated'] / r['peak_measured']:>15.3f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
