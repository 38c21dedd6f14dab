"""QLoRA: weight memory of the `small` config, NF4 dequantize throughput, QLoRA step time vs bf16 LoRA.

1. Weight memory of `examples/configs/small.yaml` (vocabulary = its `data.vocab_size`) stored four ways:
   fp32, bf16, and with every linear of the decoder layers in NF4 (block 64) without and with double
   quantization, the rest (embedding, LM head, norms) in bf16 as in the QLoRA paper. The NF4 sizes are
   measured (bytes of every tensor `quantize_nf4` returns, one tensor per distinct shape, times its
   count) and compared with the formula: 4 + 32/64 = 4.5 bits per parameter without double
   quantization, 4 + 8/64 + 32/(64*256) + 32/n with (per tensor of n values, block padding aside).
2. NF4 dequantize throughput: `dequantize_nf4` of a d x d weight (double-quantized) to bf16 and fp32, one
   thread, against baselines measured in the same run: cloning the output (a pure memory copy of the
   same bytes), our torch path (the native kernel switched off: the path before issue 22, same bits)
   and bitsandbytes' `dequantize_4bit` when importable. GB/s counts bytes read (codes and scales) plus
   bytes written. Then quantize: `quantize_nf4` against bitsandbytes' `quantize_4bit` and torchao's
   `to_nf4` (blocks of 64, scales double-quantized in groups of 256), when importable.
3. Training step (forward, backward, AdamW on the adapters) of a small MLA model with LoRA (r=8) on every
   linear of the decoder layers, under bf16 autocast, three ways: "bf16 LoRA" (frozen base weights
   stored in bf16), "QLoRA" (targeted weights in NF4 with double quantization, decoded to bf16 in
   forward and again in backward; other frozen weights bf16) and "fp32 LoRA" (no autocast; context).
   Adapters and their optimizer state are fp32 in every case. Interleaved rounds, medians, and the
   QLoRA / bf16 LoRA ratio as the median of per-round ratios.

    python benchmarks/bench_qlora.py [--quick] [--json OUT]
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from _common import REPO_ROOT, interleaved_times, markdown_table, paired_ratio, parse_args, run_world, summary
from _common import write_json as write_results

from models.config import MLAConfig
from models.transformer import MLATransformer
from parallel.lowbit import native
from parallel.lowbit.lora import apply_lora, lora_modules
from parallel.lowbit.quant import dequantize_nf4, quantize_nf4

DECODER_LINEARS = [
    "q_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]
STEP_CONFIG = dict(
    vocab_size=2048,
    hidden_size=256,
    num_layers=4,
    num_heads=4,
    q_lora_rank=128,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    intermediate_size=688,
    max_seq_len=256,
)
MB = 2**20


def small_config() -> MLAConfig:
    raw = yaml.safe_load((REPO_ROOT / "examples" / "configs" / "small.yaml").read_text())
    return MLAConfig(**raw["model"], vocab_size=raw["data"]["vocab_size"])


def is_decoder_linear(name: str, param: torch.Tensor) -> bool:
    return ".layers." in name and param.dim() == 2 and name.rsplit(".", 2)[-2] in DECODER_LINEARS


def weight_memory() -> dict:
    config = small_config()
    with torch.device("meta"):  # shapes only
        model = MLATransformer(config)
    params = dict(model.named_parameters())
    linear_shapes = Counter(tuple(p.shape) for n, p in params.items() if is_decoder_linear(n, p))
    n_linear = sum(torch.Size(s).numel() * c for s, c in linear_shapes.items())
    n_total = sum(p.numel() for p in params.values())
    n_rest = n_total - n_linear
    nf4_bytes = {}
    formula_bits = {}
    for double_quant in (False, True):
        total_bits, formula = 0, 0.0
        for shape, count in linear_shapes.items():
            q = quantize_nf4(torch.randn(shape), double_quant=double_quant)
            total_bits += q.storage_bits() * count
            n = torch.Size(shape).numel()
            per = 4 + 32 / 64 if not double_quant else 4 + 8 / 64 + 32 / (64 * 256) + 32 / n
            formula += per * n * count
        nf4_bytes[double_quant] = total_bits / 8
        formula_bits[double_quant] = formula / n_linear
    rows = [
        ("fp32", 4 * n_linear, 32.0, None, 4 * n_total),
        ("bf16", 2 * n_linear, 16.0, None, 2 * n_total),
        ("NF4", nf4_bytes[False], 8 * nf4_bytes[False] / n_linear, formula_bits[False], None),
        ("NF4 + double quant", nf4_bytes[True], 8 * nf4_bytes[True] / n_linear, formula_bits[True], None),
    ]
    table = []
    for label, linear_bytes, bits, formula, total in rows:
        total = total if total is not None else linear_bytes + 2 * n_rest
        table.append(
            {
                "format": label,
                "linear_mb": linear_bytes / MB,
                "bits_per_param_linear": bits,
                "formula_bits_per_param": formula,
                "model_mb": total / MB,
                "vs_fp32": total / (4 * n_total),
            }
        )
    return {
        "config": config.to_dict(),
        "parameters": n_total,
        "decoder_linear_parameters": n_linear,
        "other_parameters": n_rest,
        "rows": table,
    }


def bitsandbytes_dequantize(w: torch.Tensor) -> Callable[[], torch.Tensor] | str:
    """bitsandbytes' NF4 dequantize of `w` (blocks of 64, double quantization, output in w's dtype) as
    a callable, or why it cannot be timed here."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes not installed"
    try:
        import bitsandbytes.functional as bnb_functional

        packed, state = bnb_functional.quantize_4bit(
            w, blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        bnb_functional.dequantize_4bit(packed, state)
    except Exception as error:  # noqa: BLE001 - a peer that cannot run on this build is reported
        return f"bitsandbytes failed here: {type(error).__name__}: {str(error)[:160]}"
    return lambda: bnb_functional.dequantize_4bit(packed, state)


def torch_path_dequantize(q, dtype: torch.dtype) -> torch.Tensor:
    """`dequantize_nf4` with the native kernel switched off: the torch path, the same bits."""
    saved = native.library
    native.library = lambda: None
    try:
        return dequantize_nf4(q, dtype)
    finally:
        native.library = saved


def quantize_peers(w: torch.Tensor) -> dict[str, Callable[[], object] | str]:
    """Each peer's NF4 quantize of `w` (blocks of 64, double-quantized scales) as a callable, or why not."""
    peers: dict[str, Callable[[], object] | str] = {}
    if importlib.util.find_spec("bitsandbytes") is None:
        peers["bitsandbytes"] = "not installed"
    else:
        import bitsandbytes.functional as bnb_functional

        peers["bitsandbytes"] = lambda: bnb_functional.quantize_4bit(
            w, blocksize=64, compress_statistics=True, quant_type="nf4"
        )
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        peers["torchao"] = lambda: to_nf4(w, 64, 256)
    except ImportError as error:
        peers["torchao"] = f"not importable: {error}"
    return peers


def quantize_times(quick: bool) -> dict:
    """Quantize a d x d fp32 weight, ours against each peer, interleaved, one thread."""
    torch.set_num_threads(1)
    d, repeats = (2048, 5) if quick else (4096, 7)
    w = torch.randn(d, d)
    steps: dict[str, Callable[[], object]] = {"ours": lambda: quantize_nf4(w, double_quant=True)}
    skipped = {}
    for name, peer in quantize_peers(w).items():
        if isinstance(peer, str):
            skipped[name] = peer
            continue
        try:
            peer()
            steps[name] = peer
        except Exception as error:  # noqa: BLE001 - a peer that cannot run on this build is reported
            skipped[name] = f"failed here: {type(error).__name__}: {str(error)[:160]}"
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for i in range(repeats + 1):  # rotated order each round; the first round warms up
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            steps[name]()
            if i:
                times[name].append(time.perf_counter() - start)
    rows = {
        name: {**summary(t), "ours_over_peer": paired_ratio(times["ours"], t)} for name, t in times.items()
    }
    return {"shape": [d, d], "rows": rows, "skipped": skipped}


def dequantize_throughput(quick: bool) -> dict:
    torch.set_num_threads(1)
    d = 2048 if quick else 4096
    repeats = 5 if quick else 15
    q = quantize_nf4(torch.randn(d, d), double_quant=True)
    read_bytes = q.storage_bits() / 8
    results = []
    for dtype in (torch.bfloat16, torch.float32):
        out = dequantize_nf4(q, dtype)
        written = out.numel() * out.element_size()
        peer = bitsandbytes_dequantize(torch.randn(d, d).to(dtype))
        times = {"dequantize": [], "copy": [], "torch path": []}
        times.update({"bitsandbytes": []} if callable(peer) else {})
        for i in range(repeats + 1):
            steps = [("dequantize", lambda dtype=dtype: dequantize_nf4(q, dtype)), ("copy", out.clone)]
            steps.append(("torch path", lambda dtype=dtype: torch_path_dequantize(q, dtype)))
            if callable(peer):
                steps.append(("bitsandbytes", peer))
            for name, fn in steps if i % 2 else reversed(steps):
                start = time.perf_counter()
                fn()
                if i:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
        deq, copy = statistics.median(times["dequantize"]), statistics.median(times["copy"])
        results.append(
            {
                "dtype": str(dtype).replace("torch.", ""),
                "shape": [d, d],
                "dequantize": summary(times["dequantize"]),
                "copy": summary(times["copy"]),
                "gb_per_s": (read_bytes + written) / deq / 1e9,
                "params_per_s": d * d / deq,
                "copy_gb_per_s": 2 * written / copy / 1e9,
                "dequantize_over_copy": paired_ratio(times["dequantize"], times["copy"]),
                "dequantize_over_torch_path": paired_ratio(times["dequantize"], times["torch path"]),
                **(
                    {"dequantize_over_bitsandbytes": paired_ratio(times["dequantize"], times["bitsandbytes"])}
                    if callable(peer)
                    else {"bitsandbytes": peer}
                ),
            }
        )
    return {"threads": 1, "rows": results}


class LoraStep:
    """One model variant with its AdamW over the adapters and a fixed batch."""

    def __init__(self, variant: str, batch: torch.Tensor) -> None:
        torch.manual_seed(0)
        self.model = MLATransformer(MLAConfig(**STEP_CONFIG))
        quantize = "nf4" if variant == "QLoRA" else None
        apply_lora(self.model, DECODER_LINEARS, r=8, alpha=16, seed=0, quantize_base=quantize)
        self.autocast = variant != "fp32 LoRA"
        with torch.no_grad():
            for p in self.model.parameters():
                if not p.requires_grad and self.autocast:
                    p.data = p.data.to(torch.bfloat16)  # frozen weights stored in bf16
        adapters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(adapters, lr=1e-3, foreach=True)
        self.inputs, self.targets = batch[:, :-1], batch[:, 1:]

    def frozen_linear_bytes(self) -> int:
        total = 0
        for module in lora_modules(self.model).values():
            base = module.base_layer
            tensors = base.quantized.tensors() if module.quantized else [base.weight]
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total

    def loss(self) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            return self.model.loss(self.inputs, self.targets)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        self.optimizer.step()


def step_times(rank: int, world_size: int, quick: bool) -> dict:
    batch, seq = (2, 64) if quick else (4, 128)
    warmup, repeats = (1, 4) if quick else (2, 12)
    ids = torch.randint(
        STEP_CONFIG["vocab_size"], (batch, seq + 1), generator=torch.Generator().manual_seed(1)
    )
    variants = {name: LoraStep(name, ids) for name in ("bf16 LoRA", "QLoRA", "fp32 LoRA")}
    with torch.no_grad():
        losses = {name: v.loss().item() for name, v in variants.items()}
    times = interleaved_times({name: v.step for name, v in variants.items()}, warmup, repeats)
    return {
        "config": STEP_CONFIG,
        "batch": [batch, seq],
        "lora": {"r": 8, "alpha": 16, "targets": DECODER_LINEARS},
        "warmup": warmup,
        "repeats": repeats,
        "initial_loss": losses,
        "frozen_linear_mb": {name: v.frozen_linear_bytes() / MB for name, v in variants.items()},
        "times": {name: summary(t) for name, t in times.items()},
        "qlora_over_bf16_lora": paired_ratio(times["QLoRA"], times["bf16 LoRA"]),
        "fp32_lora_over_bf16_lora": paired_ratio(times["fp32 LoRA"], times["bf16 LoRA"]),
    }


def main() -> None:
    args = parse_args("bench_qlora", __doc__.splitlines()[0])
    memory = weight_memory()
    print(
        f"small config: {memory['parameters'] / 1e6:.1f} M parameters, "
        f"{memory['decoder_linear_parameters'] / 1e6:.1f} M in decoder linears\n"
    )
    print(
        markdown_table(
            ["format", "decoder linears (MB)", "bits/param", "formula", "whole model (MB)", "vs fp32"],
            [
                [
                    r["format"],
                    r["linear_mb"],
                    r["bits_per_param_linear"],
                    r["formula_bits_per_param"] or "-",
                    r["model_mb"],
                    r["vs_fp32"],
                ]
                for r in memory["rows"]
            ],
        )  # fmt: skip
    )
    throughput = dequantize_throughput(args.quick)
    print("\nNF4 dequantize (double-quantized weight, 1 thread) against cloning the output:\n")
    print(
        markdown_table(
            [
                "out dtype",
                "shape",
                "median ms",
                "GB/s",
                "Mparam/s",
                "copy GB/s",
                "dequant / copy",
                "/ torch path",
                "/ bitsandbytes",
            ],
            [
                [
                    r["dtype"],
                    "x".join(map(str, r["shape"])),
                    r["dequantize"]["median_ms"],
                    r["gb_per_s"],
                    r["params_per_s"] / 1e6,
                    r["copy_gb_per_s"],
                    r["dequantize_over_copy"],
                    r["dequantize_over_torch_path"],
                    r.get("dequantize_over_bitsandbytes", r.get("bitsandbytes")),
                ]
                for r in throughput["rows"]
            ],
        )  # fmt: skip
    )
    quantize = quantize_times(args.quick)
    print(f"\nNF4 quantize of a {quantize['shape'][0]}x{quantize['shape'][1]} fp32 weight, 1 thread:\n")
    print(
        markdown_table(
            ["quantizer", "median ms", "q1 ms", "q3 ms", "ours / it (paired)"],
            [
                [n, r["median_ms"], r["q1_ms"], r["q3_ms"], r["ours_over_peer"]]
                for n, r in quantize["rows"].items()
            ],
        )
    )
    for name, reason in quantize["skipped"].items():
        print(f"{name}: {reason}")
    steps = run_world(step_times, args.quick, world_size=1)
    b, s = steps["batch"]
    print(f"\nLoRA r=8 training step, batch {b}x{s}, one process, one thread:\n")
    print(
        markdown_table(
            ["variant", "median ms", "q1 ms", "q3 ms", "frozen linears (MB)", "initial loss"],
            [
                [
                    name,
                    t["median_ms"],
                    t["q1_ms"],
                    t["q3_ms"],
                    steps["frozen_linear_mb"][name],
                    steps["initial_loss"][name],
                ]
                for name, t in steps["times"].items()
            ],
        )  # fmt: skip
    )
    print(
        f"\nQLoRA / bf16 LoRA step time (median of paired ratios): {steps['qlora_over_bf16_lora']:.3f}; "
        f"fp32 LoRA / bf16 LoRA: {steps['fp32_lora_over_bf16_lora']:.3f}"
    )
    write_results(
        Path(args.json),
        {
            "quick": args.quick,
            "weight_memory": memory,
            "dequantize": throughput,
            "quantize": quantize,
            "training_step": steps,
        },
    )


if __name__ == "__main__":
    main()
