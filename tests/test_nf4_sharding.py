"""Layout-independent NF4: a tensor-parallel shard quantized on its own rank holds exactly its slice of the
whole tensor's NF4 form. Exact comparisons throughout (torch.equal): the shard sees the same block
contents as the whole tensor, the mean absmax is summed in fixed point (order-free), and the group scales
are maxima, so any difference at all is a bug, not rounding.
"""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_distributed
from hypothesis import given, settings
from hypothesis import strategies as st

from parallel.lowbit.quant import dequantize_nf4, nf4_absmax, nf4_shard_layout, quantize_nf4


def _case_tensor(shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # block scales spread over decades, so the mean and the group scales are not all alike
    return torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[0]).unsqueeze(1)


def _check_shards(cases: list[tuple[tuple[int, int], int, int, bool]]) -> None:
    """On every rank of the world: quantize this rank's shard, compare with the slice of the whole."""
    import torch.distributed as dist

    group = dist.group.WORLD if dist.is_initialized() else None
    tp = dist.get_world_size() if group is not None else 1
    rank = dist.get_rank() if group is not None else 0
    for shape, dim, seed, double_quant in cases:
        w = _case_tensor(shape, seed)
        whole = quantize_nf4(w, double_quant=double_quant)
        layout = nf4_shard_layout(shape, dim, rank, tp)
        shard = quantize_nf4(w.chunk(tp, dim)[rank], double_quant=double_quant, layout=layout, group=group)
        where = f"shape={shape} dim={dim} tp={tp} rank={rank} seed={seed}"
        assert torch.equal(shard.codes(), whole.codes().chunk(tp, dim)[rank]), where
        blocks = layout.full_index(shard.n_blocks, "cpu")
        assert torch.equal(nf4_absmax(shard), nf4_absmax(whole)[blocks]), where
        if double_quant:
            assert torch.equal(shard.absmax_codes, whole.absmax_codes[blocks]), where
            assert torch.equal(shard.absmax_offset, whole.absmax_offset), where
            assert torch.equal(shard.absmax_scale, whole.absmax_scale[torch.unique(blocks // 256)]), where
        assert torch.equal(dequantize_nf4(shard), dequantize_nf4(whole).chunk(tp, dim)[rank]), where


@st.composite
def shard_cases(draw, tp: int):
    """Shapes that split over tp on block boundaries: by rows (whole blocks per shard) or by columns
    (a multiple of 64 columns per shard), up to ~100k values so some tensors span several groups."""
    cases = []
    for _ in range(draw(st.integers(1, 4))):
        dim = draw(st.sampled_from([0, 1]))
        if dim == 0:  # 8 j rows of 8 k columns per shard: whole blocks, not always whole rows of blocks
            rows, cols = tp * 8 * draw(st.integers(1, 6)), 8 * draw(st.integers(1, 24))
        else:
            rows, cols = draw(st.integers(1, 300)), tp * 64 * draw(st.integers(1, 3))
        cases.append(((rows, cols), dim, draw(st.integers(0, 2**16)), draw(st.booleans())))
    return cases


@settings(max_examples=25, deadline=None)
@given(cases=shard_cases(1))
def test_nf4_of_the_whole_tensor_at_tp1(cases):
    _check_shards(cases)


@pytest.mark.parametrize("tp", [2, 4])
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_nf4_shard_codes_are_the_slice_of_the_whole_tensor_codes(tp, data):
    run_distributed(tp, _check_shards, cases=data.draw(shard_cases(tp)))


def test_row_shards_need_whole_blocks_not_whole_rows():
    layout = nf4_shard_layout((96, 24), 0, 1, 2)  # 48 x 24 = 1152 values = 18 blocks per shard
    assert (layout.first, layout.full_blocks) == (18, 36)


@pytest.mark.parametrize(
    "shape, dim, message",
    [
        ((10, 24), 0, r"each shard holds 5 x 24 = 120 values, not a whole number of blocks of 64"),
        ((64, 96), 1, r"each shard holds 48 columns of 96, not a multiple of the block size 64"),
        ((63, 128), 0, r"\(63, 128\) split over 2 ranks along dim 0: 63 is not divisible by 2"),
    ],
)
def test_shards_off_block_boundaries_are_rejected_with_the_numbers(shape, dim, message):
    with pytest.raises(ValueError, match=message):
        nf4_shard_layout(shape, dim, 0, 2)


def test_a_qlora_layout_that_splits_off_block_boundaries_is_refused_before_building():
    from train.config import ConfigError, load_config
    from train.layout import Layout, model_config

    model = dict(hidden_size=64, num_heads=4, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)
    overrides = [f"model.{k}={v}" for k, v in model.items()]
    lora = ["lora.enabled=true", "lora.quantize_base=nf4", "lora.targets=[o_proj]", "data.seq_len=32"]
    config = load_config(None, [*overrides, *lora])
    mcfg = model_config(config, vocab_size=128)
    Layout.resolve(config, mcfg, dp=1, tp=1)  # one process: nothing is split
    message = (
        r"lora.quantize_base='nf4' with distributed.tp=2: model.layers.0.self_attn.o_proj: NF4 weight of "
        r"shape \(64, 48\) split over 2 ranks along dim 1: each shard holds 24 columns of 48"
    )
    with pytest.raises(ConfigError, match=message):
        Layout.resolve(config, mcfg, dp=1, tp=2)
