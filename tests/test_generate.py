"""Decoding with the latent KV cache: same tokens as recomputing everything, cache shapes, sampling rules.

Tolerances: cached logits match a full forward to 1e-5 absolute (fp32; attention over the same keys,
summed in another order and shape). Tokens are compared exactly: the logit differences (~1e-7) are far
below the gaps between candidates, and sampling draws from the same generator state. The latent written to
the cache is compared exactly with the model's own RMSNorm(c_kv) (the same operations on the same input).
"""

import importlib.util
import json
from pathlib import Path

import pytest
import tokenizers
import torch
from dist_harness import grid, run_distributed
from safetensors.torch import save_file
from tokenizers import decoders, models, pre_tokenizers, trainers

from models import MLAConfig, MLATransformer
from models.generate import LatentKVCache, cache_numbers_per_token, forward_with_cache, generate, sample_next
from models.transformer import split_layers

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models decode faster on one thread, and much faster on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(**overrides) -> MLAConfig:
    base = dict(
        vocab_size=211,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        q_lora_rank=24,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        intermediate_size=96,
        max_seq_len=48,
        init_std=0.1,  # peaked logits, so a random model's samples are not near-ties
    )
    return MLAConfig(**{**base, **overrides})


def _model(**overrides) -> MLATransformer:
    torch.manual_seed(0)
    return MLATransformer(_config(**overrides)).eval()


def _prompt(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, 211, (batch, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("q_lora_rank", [24, None])
@pytest.mark.parametrize("absorb", [False, True])
def test_prefill_then_decode_gives_the_full_forward_logits(q_lora_rank, absorb):
    model = _model(q_lora_rank=q_lora_rank)
    ids = _prompt(length=20)
    cache = LatentKVCache.empty(model.config, 2, 24)
    weights = None
    if absorb:
        weights = {int(i): layer.self_attn.absorbed_kv_weight() for i, layer in model.model.layers.items()}
    pieces = [forward_with_cache(model, ids[:, :9], cache, weights)]
    pieces += [forward_with_cache(model, ids[:, t : t + 1], cache, weights) for t in range(9, 20)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, 1), model(ids), atol=ATOL, rtol=0)


def test_cache_holds_only_the_normed_latent_and_the_rotated_rope_key_per_layer():
    model = _model()
    cfg = model.config
    cache = LatentKVCache.empty(cfg, 3, 16)
    ids = _prompt(batch=3, length=5)
    forward_with_cache(model, ids, cache)
    assert sorted(cache.latent) == sorted(cache.rope) == [0, 1]
    for i in range(cfg.num_layers):
        assert cache.latent[i].shape == (3, 16, cfg.kv_lora_rank)
        assert cache.rope[i].shape == (3, 16, cfg.qk_rope_head_dim)
    assert cache.nbytes() == cfg.num_layers * 3 * 16 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    attn = model.model.layers["0"].self_attn
    x = model.model.layers["0"].input_layernorm(model.model.embed_tokens(ids))
    c_kv, k_pe = attn.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], -1)
    assert torch.equal(cache.latent[0][:, :5], attn.kv_a_layernorm(c_kv))
    assert torch.equal(cache.rope[0][:, :5], attn.rotary(k_pe, torch.arange(5)))
    assert not cache.latent[0][:, 5:].any(), "positions not yet decoded stay empty"


@pytest.mark.parametrize(
    "rules",
    [
        dict(greedy=True),
        dict(temperature=0.9),
        dict(temperature=0.7, top_k=20, top_p=0.9),
    ],
    ids=["greedy", "temperature", "top-k-top-p"],
)
def test_cached_and_uncached_decoding_give_the_same_tokens(rules):
    model = _model()
    runs = {
        name: generate(model, _prompt(), 30, generator=torch.Generator().manual_seed(5), **kw, **rules)
        for name, kw in {
            "uncached": dict(use_cache=False),
            "cached": dict(),
            "absorbed": dict(absorb=True),
        }.items()
    }
    assert runs["cached"].shape == (2, 37)
    assert torch.equal(runs["cached"], runs["uncached"])
    assert torch.equal(runs["absorbed"], runs["uncached"])


def test_greedy_decoding_is_deterministic_and_sampling_follows_the_seed():
    model = _model()
    assert torch.equal(
        generate(model, _prompt(), 20, greedy=True), generate(model, _prompt(), 20, greedy=True)
    )
    draw = lambda seed: generate(model, _prompt(), 20, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    assert torch.equal(
        generate(model, _prompt(), 20, temperature=0), generate(model, _prompt(), 20, greedy=True)
    )


def test_top_k_and_top_p_keep_only_their_tokens():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(2000, 4)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=gen).tolist()) == {0, 1}
    # top-p keeps the most likely tokens until their mass reaches p: 0.5 < 0.6 <= 0.5 + 0.3
    assert set(sample_next(logits, top_p=0.6, generator=gen).tolist()) == {0, 1}
    assert set(sample_next(logits, top_p=0.5, generator=gen).tolist()) == {0}
    assert set(sample_next(logits, top_p=1e-6, generator=gen).tolist()) == {0}, "the top token always stays"
    assert set(sample_next(logits, generator=gen).tolist()) == {0, 1, 2, 3}


def test_eos_stops_decoding_once_every_row_produced_it():
    model = _model()
    free = generate(model, _prompt(batch=1), 12, greedy=True)
    eos = int(free[0, 7 + 3])  # the 4th generated token
    stopped = generate(model, _prompt(batch=1), 12, greedy=True, eos_id=eos)
    first = (free[0, 7:] == eos).nonzero()[0].item()
    assert torch.equal(stopped[0], free[0, : 7 + first + 1])


def test_cache_size_against_multi_head_attention():
    # DeepSeek-V2: kv_lora_rank 512 + rope 64 = 576 numbers against 128 heads x (192 + 128) = 40960
    v2 = MLAConfig(num_heads=128, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
    assert cache_numbers_per_token(v2) == {"mla": 576, "mha": 40960}
    assert cache_numbers_per_token(MLAConfig()) == {"mla": 64 + 16, "mha": 4 * (48 + 32)}


def test_bad_arguments_are_one_line_errors():
    model = _model()
    with pytest.raises(
        ValueError, match=r"prompt of 7 tokens \+ max_new_tokens=42 exceeds model.max_seq_len=48"
    ):
        generate(model, _prompt(), 42)
    with pytest.raises(ValueError, match=r"top_p=0"):
        generate(model, _prompt(), 2, top_p=0.0)
    stage = MLATransformer(_config(), stage=split_layers(2, 2)[0])
    with pytest.raises(ValueError, match=r"whole model on one rank"):
        generate(stage, _prompt(), 2)


def _generate_under_tp(tp: int) -> list[list[int]]:
    with grid(tp=tp) as topo:
        torch.manual_seed(0)
        model = MLATransformer(_config(), topo).eval()
        out = {}
        for absorb in (False, True):
            gen = torch.Generator().manual_seed(5)
            out[absorb] = generate(
                model, _prompt(), 16, temperature=0.8, top_k=30, generator=gen, absorb=absorb
            )
        assert torch.equal(out[False], out[True])
        return out[False].tolist()


def test_tensor_parallel_generation_matches_one_process():
    expected = generate(
        _model(), _prompt(), 16, temperature=0.8, top_k=30, generator=torch.Generator().manual_seed(5)
    )
    results = run_distributed(2, _generate_under_tp, 2)
    assert results[0] == results[1] == expected.tolist()


def _tiny_checkpoint(folder: Path) -> None:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20, trainer=trainer)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    model = _model(vocab_size=tok.get_vocab_size())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()))


def test_example_script_reads_a_run_folder_and_the_cache_does_not_change_the_text(tmp_path, capsys):
    _tiny_checkpoint(tmp_path / "run" / "final")
    spec = importlib.util.spec_from_file_location("generate_example", ROOT / "examples" / "generate.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = [
        "--checkpoint",
        str(tmp_path / "run"),
        "--prompt",
        "def f",
        "--max-new-tokens",
        "12",
        "--top-k",
        "50",
    ]
    texts = [example.main([*args, *extra]) for extra in ([], ["--no-cache"], ["--absorb"])]
    assert texts[0] == texts[1] == texts[2] and texts[0].startswith("def f")
    stats = capsys.readouterr().err
    assert "40 numbers per token and layer against 144 for multi-head attention (3.6x smaller)" in stats
    with pytest.raises(SystemExit):
        example.main(["--checkpoint", str(tmp_path), "--prompt", "x"])
    assert "no model.safetensors + config.json" in capsys.readouterr().err
