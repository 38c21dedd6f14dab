"""Autoregressive decoding with MLA's latent KV cache, and the sampling rules.

The cache holds, per layer and token, only what MLA needs to attend to the past:

    latent[l]  (batch, max_len, kv_lora_rank)      RMSNorm(c_kv), the compressed keys and values
    rope[l]    (batch, max_len, qk_rope_head_dim)  RoPE(k_pe), the one positional key shared by all heads

that is kv_lora_rank + qk_rope_head_dim numbers per token and layer, against
num_heads * (qk_nope_head_dim + qk_rope_head_dim + v_head_dim) for a standard multi-head attention cache of
the same model (`cache_numbers_per_token`). The prompt is run once through the model, writing the cache
(prefill); each new token then costs one forward of a single position (decode). With `absorb=True` the
key/value up-projection W_kvb is folded into the query and output (see `models.mla`), so attention runs
over the latents themselves instead of decompressing every cached token at every step.

Sampling, in this order: greedy (argmax) if `greedy` or `temperature == 0`; else logits / temperature,
then top-k (keep the k largest), then top-p (keep the smallest set of most likely tokens whose probability
reaches p; the most likely token is always kept), then one draw from `generator`. Logits are moved to the
CPU in fp32 for sampling, so one seed gives the same tokens on every device and with or without the cache
(cached and uncached logits differ only by floating-point summation order).

Supported: a whole model on one rank (pp=1), any tp. Under tensor parallelism every rank of the TP group
holds the same replicated cache (the latent is computed by replicated down-projections; only the heads
are sharded), gathers the full logits and draws with its own generator: give every rank the same seed and
they pick the same tokens. Pipeline-parallel stages are not supported (gather the weights first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.config import MLAConfig
from models.mla import LayerCache
from models.transformer import MLATransformer


def cache_numbers_per_token(config: MLAConfig) -> dict[str, int]:
    """Numbers cached per token and layer: MLA's latent cache against standard multi-head attention
    (keys of num_heads x (d_nope + d_rope), values of num_heads x d_v) for the same model."""
    mla = config.kv_lora_rank + config.qk_rope_head_dim
    mha = config.num_heads * (config.qk_head_dim + config.v_head_dim)
    return {"mla": mla, "mha": mha}


@dataclass
class LatentKVCache:
    """Per-layer latent and RoPE-key caches of `batch` sequences of up to `max_len` tokens; the first
    `length` positions are filled. Layers are indexed by their global index in the model."""

    latent: dict[int, torch.Tensor]
    rope: dict[int, torch.Tensor]
    length: int = 0

    @classmethod
    def empty(
        cls,
        config: MLAConfig,
        batch: int,
        max_len: int,
        layers: list[int] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> LatentKVCache:
        layers = list(range(config.num_layers)) if layers is None else layers
        return cls(
            latent={
                i: torch.zeros(batch, max_len, config.kv_lora_rank, device=device, dtype=dtype)
                for i in layers
            },
            rope={
                i: torch.zeros(batch, max_len, config.qk_rope_head_dim, device=device, dtype=dtype)
                for i in layers
            },
        )

    def nbytes(self) -> int:
        """Bytes allocated for the whole cache (all layers, all `max_len` positions)."""
        return sum(t.numel() * t.element_size() for t in [*self.latent.values(), *self.rope.values()])


@torch.no_grad()
def forward_with_cache(
    model: MLATransformer,
    input_ids: torch.Tensor,
    cache: LatentKVCache,
    kv_weights: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Full-vocabulary logits (batch, s, vocab) of `input_ids` (batch, s) placed after the `cache.length`
    cached tokens; writes their latents into the cache and advances `cache.length` by s."""
    if not (model.stage.is_first and model.stage.is_last):
        raise ValueError("cached generation needs the whole model on one rank (pipeline stages: pp=1)")
    start, end = cache.length, cache.length + input_ids.shape[1]
    capacity = next(iter(cache.latent.values())).shape[1]
    if end > capacity:
        raise ValueError(f"the cache holds {capacity} positions; {end} are needed")
    if end > model.config.max_seq_len:
        raise ValueError(f"position {end - 1} is beyond model.max_seq_len={model.config.max_seq_len}")
    x = model.model.embed_tokens(input_ids)
    for name, layer in model.model.layers.items():
        i = int(name)
        weight = kv_weights[i] if kv_weights is not None else None
        x = layer.forward_cached(x, start, LayerCache(cache.latent[i], cache.rope[i], weight))
    cache.length = end
    return model.head(model.model.norm(x), gather_output=True)


def sample_next(
    logits: torch.Tensor,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of `logits` (batch, vocab), by the rules in the module docstring."""
    logits = logits.detach().float().cpu()
    if greedy or temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kept = torch.topk(logits, top_k, dim=-1).indices
        mask = torch.ones_like(logits, dtype=torch.bool).scatter_(-1, kept, False)
        logits = logits.masked_fill(mask, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p  # the first token has mass_before 0 and always stays
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_arguments(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: expected a value >= 0")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature}: expected a value >= 0 (0: greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k}: expected a value >= 1 (or None: no limit)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}: expected a value in (0, 1] (or None: no limit)")


@torch.no_grad()
def generate(
    model: MLATransformer,
    prompt: torch.Tensor | list[int],
    max_new_tokens: int,
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    absorb: bool = False,
    eos_id: int | None = None,
) -> torch.Tensor:
    """The prompt (batch, s) — or one prompt as a list of ids — followed by up to `max_new_tokens`
    sampled tokens, as (batch, s + n). With `eos_id`, a row that produced it keeps producing it and
    decoding stops once every row has. `use_cache=False` recomputes the whole sequence for every token
    (the reference the cache is tested against)."""
    _check_arguments(max_new_tokens, temperature, top_k, top_p)
    device = next(model.parameters()).device
    ids = torch.as_tensor(prompt, dtype=torch.long, device=device)
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"prompt of shape {tuple(ids.shape)}: expected (batch, s) token ids with s >= 1")
    limit = model.config.max_seq_len
    if ids.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {ids.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds "
            f"model.max_seq_len={limit}"
        )
    rules = dict(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    was_training = model.training
    model.eval()
    try:
        if use_cache:
            dtype = next(model.parameters()).dtype
            cache = LatentKVCache.empty(
                model.config, ids.shape[0], ids.shape[1] + max_new_tokens, None, device, dtype
            )
            kv_weights = None
            if absorb:
                kv_weights = {
                    int(i): layer.self_attn.absorbed_kv_weight() for i, layer in model.model.layers.items()
                }
            logits = forward_with_cache(model, ids, cache, kv_weights)[:, -1]
        else:
            logits = model(ids, gather_output=True)[:, -1]
        finished = torch.zeros(ids.shape[0], dtype=torch.bool)
        for step in range(max_new_tokens):
            token = sample_next(logits, **rules)
            if eos_id is not None:
                token = token.masked_fill(finished, eos_id)
                finished |= token == eos_id
            ids = torch.cat([ids, token.to(device)[:, None]], dim=1)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            if use_cache:
                logits = forward_with_cache(model, ids[:, -1:], cache, kv_weights)[:, -1]
            else:
                logits = model(ids, gather_output=True)[:, -1]
    finally:
        model.train(was_training)
    return ids
