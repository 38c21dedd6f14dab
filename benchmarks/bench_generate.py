"""Decoding with MLA's latent KV cache: cache size against multi-head attention, and speed against
recomputing the prefix.

    python benchmarks/bench_generate.py [--quick]

Cache size is analytic (numbers per token and layer; bytes in bf16): MLA caches kv_lora_rank +
qk_rope_head_dim numbers, standard multi-head attention num_heads x (qk_nope + qk_rope + v_head_dim).
Speed: greedy decoding of NEW tokens after a 16-token prompt with the README's default model (random
weights; speed does not depend on them), one process, one thread, fp32 on CPU. Three modes run
interleaved (rotated each round): no cache (the whole prefix recomputed per token: the baseline), latent
cache (cached latents decompressed by W_kvb each step), absorbed (attention over the latents). Reported:
the median time per new token and its paired ratio to the baseline. All three produce the same tokens.
"""

from __future__ import annotations

import time

import torch
from _common import markdown_table, paired_ratio, parse_args, summary, write_json

from models import MLAConfig, MLATransformer
from models.generate import cache_numbers_per_token, generate

CONFIGS = {
    "README default (examples/train_mla.py)": MLAConfig(vocab_size=2048),
    "examples/configs/small.yaml": MLAConfig(
        vocab_size=16384,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        q_lora_rank=384,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        intermediate_size=2048,
        max_seq_len=1024,
    ),
    "DeepSeek-V2 (60 layers, 128 heads)": MLAConfig(
        num_layers=60,
        num_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
    ),
}


def cache_table() -> list[dict]:
    rows = []
    for name, cfg in CONFIGS.items():
        numbers = cache_numbers_per_token(cfg)
        rows.append(
            {
                "model": name,
                "layers": cfg.num_layers,
                "mla_numbers": numbers["mla"],
                "mha_numbers": numbers["mha"],
                "mla_bytes_per_token_bf16": 2 * numbers["mla"] * cfg.num_layers,
                "mha_bytes_per_token_bf16": 2 * numbers["mha"] * cfg.num_layers,
                "ratio": numbers["mha"] / numbers["mla"],
            }
        )
    return rows


def speed(new_tokens: int, rounds: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MLATransformer(CONFIGS["README default (examples/train_mla.py)"]).eval()
    prompt = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(0))
    modes = {"no cache": dict(use_cache=False), "latent cache": dict(), "absorbed": dict(absorb=True)}
    outputs, times = {}, {name: [] for name in modes}
    for i in range(rounds + 1):  # round 0 is warm-up
        names = list(modes)[i % 3 :] + list(modes)[: i % 3]
        for name in names:
            start = time.perf_counter()
            outputs[name] = generate(model, prompt, new_tokens, greedy=True, **modes[name])
            if i:
                times[name].append((time.perf_counter() - start) / new_tokens)
    same = all(torch.equal(outputs[n], outputs["no cache"]) for n in modes)
    return {
        "new_tokens": new_tokens,
        "same_tokens": same,
        "modes": {
            n: {**summary(t), "speedup_vs_no_cache": paired_ratio(times["no cache"], t)}
            for n, t in times.items()
        },
    }


def main() -> None:
    args = parse_args("bench_generate", __doc__.splitlines()[0])
    caches = cache_table()
    print(
        markdown_table(
            [
                "model",
                "layers",
                "MLA numbers",
                "MHA numbers",
                "MLA B/token (bf16)",
                "MHA B/token (bf16)",
                "MHA/MLA",
            ],
            [list(r.values()) for r in caches],
        )
    )
    new_tokens, rounds = (64, 2) if args.quick else (496, 5)
    result = speed(new_tokens, rounds)
    print(
        f"\ngreedy decoding of {new_tokens} tokens after 16, one thread; same tokens: {result['same_tokens']}"
    )
    print(
        markdown_table(
            ["mode", "ms per token (median)", "q1", "q3", "speed-up vs no cache (paired)"],
            [
                [n, m["median_ms"], m["q1_ms"], m["q3_ms"], m["speedup_vs_no_cache"]]
                for n, m in result["modes"].items()
            ],
        )
    )
    write_json(args.json, {"cache": caches, "speed": result})


if __name__ == "__main__":
    main()
